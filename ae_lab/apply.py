"""`python -m ae_lab.apply RUN OPERATION --input X --output Y`: a trained run applied to new data.

Operations (each a thin layer over `ae_lab.load(RUN)`'s TrainedModel, in the data's own units):

    encode       --input X --output codes.npy          the codes (a VAE's posterior mean; --sample: a draw)
    decode       --input Z --output x.npy|FOLDER/      codes (N, latent_dim) back to data
    reconstruct  --input X --output x.npy|FOLDER/      denoising, inpainting, watermark removal, colourisation
    score        --input X --output scores.npy         per-example anomaly score; --fpr F adds a threshold
    sample       --n N --output x.npy|FOLDER/          --sampler prior (VAE) or gmm (a Gaussian mixture on the
                                                       training codes, saved in the run folder once fitted)
    interpolate  --input X --output x.npy|FOLDER/      --between I J, --steps S: the decoded path from I to J

X is a `.npy`, `.npz` (its array `--array`, default x) or `.pt` file, memory-mapped and processed
`--batch-size` examples at a time (so a file larger than memory works; the output `.npy` is written
batch by batch), or a folder of PNG/JPEG images (decoded as the run's data were; file order: sorted
paths, listed beside an array output in `<output>.files.txt`). An output folder gets one PNG per example:
the input image's name (relative path) for an image folder, the example's index otherwise.

`score --fpr F` also calibrates a threshold on the run's validation split: the smallest validation
score that at most floor(F * n) of its n examples exceed; `<output>.flags.npy` flags each example
above it, and `<output>.json` records the threshold, F, the calibration and the count flagged.

Outputs are written under temporary names and renamed at the end, so a refused or interrupted command
leaves nothing; an existing output is replaced only with `--overwrite`. Every bad input is one line,
exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ae_lab.errors import ConfigError, OneLineParser, fail

OPERATIONS = ("encode", "decode", "reconstruct", "score", "sample", "interpolate")
NEEDS_INPUT = ("encode", "decode", "reconstruct", "score", "interpolate")
IMAGE_OUTPUTS = ("decode", "reconstruct", "sample", "interpolate")  # their output may be a folder of PNGs
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def parser() -> OneLineParser:
    parse = OneLineParser(prog="python -m ae_lab.apply", description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter,
                   epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parse.add_argument("run", type=Path, help="a run folder, a sweep member's folder, or a .ckpt file")
    parse.add_argument("operation", choices=OPERATIONS)
    parse.add_argument("--input", type=Path, help="a .npy, .npz or .pt file, or a folder of images")
    parse.add_argument("--array", default="x", help="the array of a .npz or .pt file to read (default: x)")
    parse.add_argument("--output", type=Path, required=True,
                       help="a .npy file, or a folder for images (decode, reconstruct, sample, interpolate)")
    parse.add_argument("--overwrite", action="store_true", help="replace outputs that exist")
    parse.add_argument("--which", choices=("best", "last"), default="best", help="the checkpoint (default: best)")
    parse.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parse.add_argument("--batch-size", type=int, default=256, help="examples per batch (default: 256)")
    parse.add_argument("--sample", action="store_true", help="encode: a draw from q(z|x), not its mean (VAE)")
    parse.add_argument("--fpr", type=float, help="score: flag at this false-positive rate on the validation split")
    parse.add_argument("--n", type=int, default=64, help="sample: how many (default: 64)")
    parse.add_argument("--sampler", default="prior", help="sample: prior (VAE) or gmm (default: prior)")
    parse.add_argument("--components", type=int,
                       help="sample --sampler gmm: mixture components (default: the run's eval.gmm_components)")
    parse.add_argument("--seed", type=int, default=0, help="sample, encode --sample: random seed (default: 0)")
    parse.add_argument("--between", type=int, nargs=2, default=(0, 1), metavar=("I", "J"),
                       help="interpolate: the two examples of --input (default: 0 1)")
    parse.add_argument("--steps", type=int, default=8, help="interpolate: points on the path (default: 8)")
    return parse


@dataclass
class Inputs:
    """The examples to process: an array (possibly memory-mapped), or image files read batch by batch."""

    array: np.ndarray | None = None
    images: list[Path] | None = None
    folder: Path | None = None

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.array)

    def names(self) -> list[str]:
        """Each example's relative path (image folders) or index."""
        if self.images is not None:
            return [str(path.relative_to(self.folder)) for path in self.images]
        return [f"{index:06d}" for index in range(len(self))]

    def read(self, model: Any, start: int, stop: int) -> np.ndarray:
        if self.images is not None:
            return model.read_images(self.images[start:stop])
        return np.asarray(self.array[start:stop])


def read_inputs(path: Path | None, array_name: str) -> Inputs:
    """The examples of `--input`, refused in one line (ConfigError) when they cannot be read."""
    from ae_lab.data.arrays import open_arrays

    if path is None:
        raise ConfigError("--input is missing: give a .npy, .npz or .pt file, or a folder of images")
    if path.is_dir():
        files = sorted(file for file in path.rglob("*") if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES
                       and not any(part.startswith(".") for part in file.relative_to(path).parts))
        if not files:
            raise ConfigError(f"--input={str(path)!r} is not allowed: the folder holds no PNG or JPEG images")
        outputs = [file.relative_to(path).with_suffix(".png") for file in files]
        if len(set(outputs)) < len(outputs):
            clash = next(name for name in outputs if outputs.count(name) > 1)
            raise ConfigError(f"--input={str(path)!r} is not allowed: two of its images would both be written "
                              f"as {clash} (the same name with another suffix): rename one")
        return Inputs(images=files, folder=path)
    arrays = open_arrays(str(path), "--input")
    if array_name not in arrays:
        raise ConfigError(f"--array={array_name!r} is not allowed: {path} holds {', '.join(map(repr, arrays))}")
    array = arrays[array_name]
    if array.ndim < 1 or array.dtype.kind not in "biuf":
        raise ConfigError(f"--input={str(path)!r} is not allowed: its array {array_name!r} has shape {array.shape} "
                          f"and dtype {array.dtype}; it must be numeric with one example per row")
    return Inputs(array=array)


class Output:
    """The files one command writes: each under a temporary name until `commit` renames them all."""

    def __init__(self, paths: list[Path], overwrite: bool) -> None:
        existing = [path for path in paths if path.exists()]
        if existing and not overwrite:
            raise ConfigError(f"--output={str(existing[0])!r} is not allowed: it exists (add --overwrite to replace it)")
        self.paths = paths
        self.temporary = {path: path.with_name(f".{path.name}.partial-{os.getpid()}") for path in paths}

    def __getitem__(self, path: Path) -> Path:
        return self.temporary[path]

    def commit(self) -> None:
        """Rename the temporary files into place; a folder that exists (--overwrite) gets the new files,
        replacing those of the same names and keeping the others."""
        for path, temporary in self.temporary.items():
            if not temporary.exists():
                continue
            if path.is_dir() and temporary.is_dir():
                for file in sorted(temporary.rglob("*.png")):
                    (path / file.relative_to(temporary)).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(file, path / file.relative_to(temporary))
                continue
            if path.is_dir():
                shutil.rmtree(path)
            os.replace(temporary, path)

    def discard(self) -> None:
        for temporary in self.temporary.values():
            if temporary.is_dir():
                shutil.rmtree(temporary)
            else:
                temporary.unlink(missing_ok=True)


@contextmanager
def progress(total: int, description: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr over `total` examples (none when stderr is not a terminal): yields `advance(n)`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=total)
        yield lambda count: bar.advance(task, count)


class ArrayWriter:
    """Rows written one batch at a time into a `.npy` file (a memory map: never held whole)."""

    def __init__(self, path: Path, rows: int) -> None:
        self.path, self.rows, self.array, self.filled = path, rows, None, 0

    def write(self, batch: np.ndarray) -> None:
        if self.array is None:  # the shape of a row is known with the first batch
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=batch.dtype,
                                                   shape=(self.rows, *batch.shape[1:]))
        self.array[self.filled:self.filled + len(batch)] = batch
        self.filled += len(batch)

    def close(self) -> None:
        if self.array is not None:
            self.array.flush()
            del self.array


class ImageWriter:
    """One PNG per example into a folder, named after the examples."""

    def __init__(self, model: Any, folder: Path, names: list[str]) -> None:
        self.model, self.folder, self.names, self.filled = model, folder, names, 0

    def write(self, batch: np.ndarray) -> None:
        paths = [self.folder / Path(name).with_suffix(".png") for name in self.names[self.filled:self.filled + len(batch)]]
        for path in {path.parent for path in paths}:
            path.mkdir(parents=True, exist_ok=True)
        self.model.write_images(batch, paths)
        self.filled += len(batch)

    def close(self) -> None:
        pass


def _is_image_output(path: Path) -> bool:
    return path.suffix == ""


def _check_output(args: argparse.Namespace, model: Any | None = None) -> None:
    if _is_image_output(args.output):
        if args.operation not in IMAGE_OUTPUTS:
            raise ConfigError(f"--output={str(args.output)!r} is not allowed: {args.operation} writes an array: "
                              "give a .npy file")
        if model is not None and not (len(model.input_shape) == 3 and model.input_shape[0] in (1, 3)):
            raise ConfigError(f"--output={str(args.output)!r} is not allowed: the run's examples have shape "
                              f"{tuple(model.input_shape)}, not images (1 or 3, H, W): give a .npy file")
    elif args.output.suffix != ".npy":
        raise ConfigError(f"--output={str(args.output)!r} is not allowed: a .npy file"
                          + (", or a folder (no suffix) for images" if args.operation in IMAGE_OUTPUTS else ""))


def output_paths(args: argparse.Namespace, inputs: Inputs | None) -> list[Path]:
    """Every path the command writes."""
    paths = [args.output]
    if args.operation == "score" and args.fpr is not None:
        paths += [args.output.with_suffix(".flags.npy"), args.output.with_suffix(".json")]
    if inputs is not None and inputs.images is not None and not _is_image_output(args.output):
        paths.append(args.output.with_suffix(".files.txt"))
    return paths


def _check_options(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size} is not allowed: at least 1")
    if args.fpr is not None and (args.operation != "score" or not 0 < args.fpr < 1):
        raise ConfigError(f"--fpr={args.fpr} is not allowed: " + ("a rate strictly between 0 and 1"
                          if args.operation == "score" else "it is an option of score only"))
    if args.operation == "sample" and args.n < 1:
        raise ConfigError(f"--n={args.n} is not allowed: at least 1")
    if args.operation == "interpolate" and args.steps < 2:
        raise ConfigError(f"--steps={args.steps} is not allowed: at least 2 (the two ends)")
    if args.operation not in NEEDS_INPUT and args.input is not None:
        raise ConfigError(f"--input is not allowed with {args.operation}: it reads no data")


def calibrate(validation_scores: np.ndarray, fpr: float) -> dict[str, Any]:
    """The threshold at false-positive rate `fpr` on normal (validation) scores: the smallest value that at
    most floor(fpr * n) of the n scores exceed, so that flagging `score > threshold` flags at most that
    share of them (fewer when scores tie)."""
    ordered = np.sort(np.asarray(validation_scores, dtype=np.float64))
    allowed = math.floor(fpr * len(ordered))
    threshold = float(ordered[len(ordered) - allowed - 1])
    flagged = int((ordered > threshold).sum())
    return {"threshold": threshold, "fpr": fpr,
            "calibration": {"split": "val", "examples": len(ordered), "flagged": flagged,
                            "observed_fpr": flagged / len(ordered),
                            "rule": "flag = score > threshold; threshold = the smallest validation score that at "
                                    "most floor(fpr * n) of the n validation scores exceed"}}


def run_operation(args: argparse.Namespace, model: Any, inputs: Inputs | None, output: Output) -> dict[str, Any]:
    """Compute the operation into `output`'s temporary files; return what to report."""
    target = output[args.output]
    if args.operation == "sample":
        options = {} if args.components is None else {"components": args.components}
        return _write_all(args, model, model.sample(args.n, sampler=args.sampler, seed=args.seed, **options), target,
                          [f"{index:06d}" for index in range(args.n)])
    _check_examples(args, inputs, model)
    if args.operation == "interpolate":
        first, second = args.between
        for index in (first, second):
            if not 0 <= index < len(inputs):
                raise ConfigError(f"--between={first} {second} is not allowed: --input has {len(inputs)} examples "
                                  f"(indices 0 to {len(inputs) - 1})")
        a, b = inputs.read(model, first, first + 1)[0], inputs.read(model, second, second + 1)[0]
        return _write_all(args, model, model.interpolate(a, b, args.steps), target,
                          [f"step_{index:03d}" for index in range(args.steps)])
    operation = {"encode": lambda x: model.encode(x, sample=args.sample),
                 "decode": model.decode, "reconstruct": model.reconstruct, "score": model.score}[args.operation]
    if args.operation == "encode" and args.sample:
        import torch

        torch.manual_seed(args.seed)
    writer = (ImageWriter(model, target, inputs.names()) if _is_image_output(args.output)
              else ArrayWriter(target, len(inputs)))
    with progress(len(inputs), args.operation) as advance:
        for start in range(0, len(inputs), args.batch_size):
            stop = min(start + args.batch_size, len(inputs))
            writer.write(np.asarray(operation(inputs.read(model, start, stop))))
            advance(stop - start)
    writer.close()
    if inputs.images is not None and not _is_image_output(args.output):
        output[args.output.with_suffix(".files.txt")].write_text("\n".join(inputs.names()) + "\n")
    report: dict[str, Any] = {"examples": len(inputs)}
    if args.operation == "score" and args.fpr is not None:
        report.update(_flag(args, model, output))
    return report


def _check_examples(args: argparse.Namespace, inputs: Inputs, model: Any) -> None:
    """Refuse an input whose examples are not the model's (codes for decode) before anything is written."""
    wanted = (model.latent_dim,) if args.operation == "decode" else tuple(model.input_shape)
    if inputs.images is not None:
        if args.operation == "decode":
            raise ConfigError(f"--input={str(args.input)!r} is not allowed: decode takes codes (N, {model.latent_dim}) "
                              "in a .npy, .npz or .pt file, not images")
        model.read_images(inputs.images[:1])  # a run not trained on images is refused here
        return
    shape = tuple(inputs.array.shape[1:])
    if shape != wanted:
        what = f"codes of shape (N, {model.latent_dim}) (model.latent_dim)" if args.operation == "decode" \
            else f"examples of shape {wanted}"
        raise ConfigError(f"--input={str(args.input)!r} is not allowed: its array has shape {inputs.array.shape}; "
                          f"{args.operation} takes {what}")


def _write_all(args: argparse.Namespace, model: Any, examples: np.ndarray, target: Path,
               names: list[str]) -> dict[str, Any]:
    examples = np.asarray(examples)
    writer = ImageWriter(model, target, names) if _is_image_output(args.output) else ArrayWriter(target, len(examples))
    writer.write(examples)
    writer.close()
    return {"examples": len(examples)}


def _flag(args: argparse.Namespace, model: Any, output: Output) -> dict[str, Any]:
    """Calibrate on the validation split, flag each scored example, record both beside the scores."""
    record = calibrate(model.score(model.split_inputs("val"), batch_size=args.batch_size), args.fpr)
    scores = np.load(output[args.output], mmap_mode="r")
    flags = ArrayWriter(output[args.output.with_suffix(".flags.npy")], len(scores))
    for start in range(0, len(scores), 1 << 16):
        flags.write(np.asarray(scores[start:start + (1 << 16)]) > record["threshold"])
    flags.close()
    record.update(flagged=int(np.count_nonzero(np.load(output[args.output.with_suffix(".flags.npy")]))),
                  examples=len(scores), run=str(args.run), which=args.which,
                  scores=args.output.name, flags=args.output.with_suffix(".flags.npy").name)
    output[args.output.with_suffix(".json")].write_text(json.dumps(record, indent=2) + "\n")
    return {"threshold": record["threshold"], "flagged": record["flagged"]}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from ae_lab.trained import load

    try:
        _check_options(args)
        _check_output(args)
        inputs = read_inputs(args.input, args.array) if args.operation in NEEDS_INPUT else None
        output = Output(output_paths(args, inputs), args.overwrite)
        model = load(args.run, which=args.which, device=args.device)
        _check_output(args, model)
        try:
            report = run_operation(args, model, inputs, output)
            output.commit()
        finally:
            output.discard()
    except ConfigError as error:
        fail(str(error))
    details = ", ".join(f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}"
                        for key, value in report.items())
    print(f"{args.operation}: {details}; written: {', '.join(str(path) for path in output.paths)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
