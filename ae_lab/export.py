"""`python -m ae_lab.export RUN --format onnx|torchscript --part encoder|decoder|autoencoder|score`: one
file a deployer feeds raw data, with the run's preprocessing inside.

Each part is the TrainedModel method of the same meaning, traced on the run's data, so the file computes
exactly what `ae_lab.load(RUN)` does, in the data's own units (digit counts 0..16, MNIST pixels 0..255,
a user's arrays before `dataset.normalize`):

    encoder      x (N, *input_shape) raw      -> codes (N, latent_dim)        TrainedModel.encode
    decoder      z (N, latent_dim)            -> x (N, *input_shape) raw      TrainedModel.decode
    autoencoder  x (N, *input_shape) raw      -> reconstruction, raw          TrainedModel.reconstruct
    score        x (N, *input_shape) raw      -> anomaly score (N,)           TrainedModel.score

The batch axis N is dynamic; inputs are float32. A TorchScript file's outputs carry autograd unless it
is called under `torch.no_grad()` (or `torch.inference_mode()`), as a deployer would. The input is named `x` (`z` for the decoder), the
output `codes`, `x`, `reconstruction` or `score`. The ELBO score of a VAE averages a fixed set of
`eval.iw_samples` draws (common random numbers from `eval.seed`, see ae_lab/evaluation/anomaly.py),
which the file holds as constants. ONNX files come from torch's TorchScript-based exporter (opset 18;
`torch.export` would fix the batch size at TrainedModel's batch loop); tests/test_export.py runs every
part with onnxruntime and TorchScript against torch on the run's whole test split.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ae_lab.errors import ConfigError, OneLineParser, fail

PARTS = ("encoder", "decoder", "autoencoder", "score")
FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
NAMES = {"encoder": ("x", "codes"), "decoder": ("z", "x"), "autoencoder": ("x", "reconstruction"),
         "score": ("x", "score")}
WHOLE = sys.maxsize  # one batch of any size: the traced graph must not slice the input into batches
ONNX_OPSET = 18


class Part(nn.Module):
    """One part of a trained model as a module of raw tensors (see the module docstring)."""

    def __init__(self, model: Any, part: str) -> None:
        super().__init__()
        if part not in PARTS:
            raise ConfigError(f"--part={part!r} is not allowed: one of {', '.join(PARTS)}")
        self.model = model
        # its networks registered here (not the LightningModule, which tracing cannot walk), so that the
        # tracers keep their weights as the file's parameters
        self.networks = nn.ModuleList([model.module.encoder, model.module.head, model.module.decoder])
        self.part = part
        self.scorer = model.scorer() if part == "score" else None  # its random draws made here, not traced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scorer is not None:
            return self.scorer(x)
        method = {"encoder": self.model.encode, "decoder": self.model.decode,
                  "autoencoder": self.model.reconstruct}[self.part]
        return method(x, batch_size=WHOLE)

    def example(self, count: int = 2) -> torch.Tensor:
        """`count` inputs of the right shape to trace with: codes of the test split for the decoder, else
        its raw examples."""
        test = torch.from_numpy(self.model.split_inputs("test")[:count])
        return self.model.encode(test) if self.part == "decoder" else test


def default_output(run_dir: Path, part: str, format: str) -> Path:
    return run_dir / "exports" / f"{part}{FORMATS[format]}"


def export(model: Any, part: str, format: str, output: Path) -> Path:
    """Write `part` of `model` (a TrainedModel) as `format` to `output` (replaced atomically); return it.
    A model loaded on a GPU is exported from its checkpoint loaded on the CPU: a graph traced on the GPU
    would hold its weights there and the casts of its inputs to that GPU, and run nowhere else."""
    from ae_lab.trained import load

    if format not in FORMATS:
        raise ConfigError(f"--format={format!r} is not allowed: one of {', '.join(FORMATS)}")
    if model.device.type != "cpu":
        model = load(model.checkpoint, device="cpu")
    wrapped = Part(model, part).eval()
    example = wrapped.example()
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.partial-{os.getpid()}")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracers' notes on Python values they fix (shape checks)
            if format == "torchscript":
                traced = torch.jit.trace(wrapped, example, check_trace=False)
                traced.save(str(temporary))
            else:
                _export_onnx(wrapped, example, temporary)
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)
    return output


def _export_onnx(wrapped: Part, example: torch.Tensor, path: Path) -> None:
    input_name, output_name = NAMES[wrapped.part]
    torch.onnx.export(wrapped, (example,), str(path), input_names=[input_name], output_names=[output_name],
                      dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, opset_version=ONNX_OPSET, dynamo=False)


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    """The ONNX file's output for `x` (float32), with onnxruntime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [output] = session.run(None, {session.get_inputs()[0].name: np.asarray(x, dtype=np.float32)})
    return output


def main(argv: Sequence[str] | None = None) -> int:
    from ae_lab.trained import load

    parse = OneLineParser(prog="python -m ae_lab.export", description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parse.add_argument("run", type=Path, help="a run folder, a sweep member's folder, or a .ckpt file")
    parse.add_argument("--format", choices=tuple(FORMATS), required=True)
    parse.add_argument("--part", choices=PARTS, required=True)
    parse.add_argument("--output", type=Path, help="the file (default: RUN/exports/PART.onnx or .pt)")
    parse.add_argument("--which", choices=("best", "last"), default="best", help="the checkpoint (default: best)")
    parse.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    args = parse.parse_args(argv)
    try:
        model = load(args.run, which=args.which)
        output = args.output or default_output(model.run_dir, args.part, args.format)
        if output.exists() and not args.overwrite:
            raise ConfigError(f"--output={str(output)!r} is not allowed: it exists (add --overwrite to replace it)")
        export(model, args.part, args.format, output)
    except ConfigError as error:
        fail(str(error))
    print(f"{args.part} ({args.format}): {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
