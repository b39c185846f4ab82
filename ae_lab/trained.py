"""A trained model used in the data's own units: `ae_lab.load(RUN)` -> `TrainedModel`.

`load` takes a run folder (a single run, or one job's folder of a sweep, vectorised or not) or a
checkpoint file in one, and gives back its `Autoencoder` in eval mode with the run's config and its data
set's units (`ae_lab/data/units.py`): every method takes inputs as the user has them ("raw": digit
counts 0..16, MNIST pixels 0..255, their own arrays before `dataset.normalize`), applies the run's
preprocessing, and returns reconstructions and decodings in those same units.

Conventions of every method:
- numpy in, numpy out (float32); torch in, torch out, on the input's device;
- a batch (N, *input_shape), or one example (*input_shape), which comes back without its batch axis
  (codes (latent_dim,), a score of shape ());
- processed `batch_size` examples at a time (a memory-mapped array larger than memory works) without
  gradients; nothing of the model or of torch's global random state changes (except `encode(x,
  sample=True)`, which draws from it).
A refused call raises `InputError`, a refused load `LoadError`: one line that names the problem and what
is allowed (both are `ConfigError`s, which the command line turns into exit code 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ae_lab.config import register_resolvers
from ae_lab.data import (ArrayDataModule, Split, Units, build_datamodule, input_shape as data_input_shape, is_own_data,
                         units)
from ae_lab.data.image_folder import read_images as read_image_files, write_images as write_image_files
from ae_lab.errors import ConfigError
from ae_lab.evaluation.anomaly import anomaly_scores, score_kinds
from ae_lab.module import MODULE_SECTIONS, Autoencoder
from ae_lab.resume import config_differences, recorded_config

BATCH_SIZE = 1024
CHECKPOINTS = ("best", "last")
SPLITS = ("train", "val", "test")
PNG_WHITE = 255.0

Array = Any  # a numpy array or a torch tensor


class LoadError(ConfigError):
    """`load` cannot use the path it was given: the message names the path and the fix."""


class InputError(ConfigError):
    """A call the trained model cannot serve (an input of another shape, an option it does not have)."""


def load(path: str | Path, which: str = "best", device: str | torch.device = "cpu") -> "TrainedModel":
    """The trained model of the run at `path`: a run folder (its `checkpoints/<which>.ckpt`, `which`
    `best` (lowest val/loss) or `last`) or a `.ckpt` file in a run's `checkpoints/` folder, on `device`.

    Refused (LoadError): a path that is not a run folder or a checkpoint in one, a run that did not
    complete, a missing checkpoint, a checkpoint of another config, a data set whose preprocessing cannot
    be rebuilt from the run folder (a `_target_` loader's).
    """
    run_dir, checkpoint = _locate(Path(path), which)
    record = _finished_record(run_dir)
    register_resolvers()
    cfg = recorded_config(run_dir)
    OmegaConf.resolve(cfg)  # e.g. a denoising run's `${noise_level:0.2}`: the values it trained with
    hparams, state = _read(checkpoint)
    try:
        data_units = units(cfg.dataset, run_dir, tuple(hparams["input_shape"]))
    except ConfigError as error:
        raise LoadError(f"{run_dir}: its data set's preprocessing cannot be rebuilt: {error}") from None
    _check_config(checkpoint, hparams, cfg)
    with torch.random.fork_rng(devices=[]):  # building the module draws its initial weights
        module = Autoencoder(hparams["config"], tuple(hparams["input_shape"]), hparams.get("dataset_size"))
    module.load_state_dict(state)
    return TrainedModel(module.eval().to(torch.device(device)), cfg, run_dir, checkpoint, data_units, record)


def _locate(path: Path, which: str) -> tuple[Path, Path]:
    """The run folder and the checkpoint that `path` and `which` name."""
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise LoadError(f"{path} is not allowed: no such checkpoint file")
        if path.parent.name != "checkpoints" or not (path.parent.parent / "run.json").is_file():
            raise LoadError(f"{path} is not allowed: a checkpoint is loaded from its run's checkpoints/ folder, "
                            "where the run's config and data facts are; give its run folder or leave it there")
        return path.parent.parent, path
    if which not in CHECKPOINTS:
        raise LoadError(f"which={which!r} is not allowed: one of {', '.join(map(repr, CHECKPOINTS))}")
    if not path.is_dir():
        raise LoadError(f"{path} is not allowed: {'no such folder' if not path.exists() else 'not a folder'}; "
                        "give a run folder or a .ckpt file in one")
    if not (path / "run.json").is_file() or not (path / ".hydra" / "config.yaml").is_file():
        runs = sorted(found.parent for found in path.glob("*/run.json"))
        hint = (f" (a sweep folder? give one of its runs, e.g. {runs[0]})" if runs
                else " (its run.json or .hydra/config.yaml is missing)")
        raise LoadError(f"{path} is not a run folder{hint}")
    checkpoint = path / "checkpoints" / f"{which}.ckpt"
    if not checkpoint.is_file():
        others = [name for name in CHECKPOINTS if name != which and (path / "checkpoints" / f"{name}.ckpt").is_file()]
        fix = (f"it has checkpoints/{others[0]}.ckpt: load that with which={others[0]!r}" if others
               else "it has no checkpoint at all: train it again")
        raise LoadError(f"{path} has no checkpoints/{which}.ckpt: {fix}")
    return path, checkpoint


def _finished_record(run_dir: Path) -> dict[str, Any]:
    """The run's run.json, refusing a run that did not complete."""
    record = json.loads((run_dir / "run.json").read_text())
    status = record.get("status")
    if status != "completed":
        fix = {"running": "wait for it to end",
               "failed": "see the error in its run.json and train it again"}.get(
            status, f"finish it with `python -m ae_lab resume={run_dir}` (or its sweep run again)")
        raise LoadError(f"{run_dir} is not a finished run (status {status}): {fix}")
    return record


def _read(checkpoint: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The module's hyperparameters (its config sections, input shape, training-set size) and weights."""
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        hparams, state = saved["hyper_parameters"], saved["state_dict"]
        hparams["config"], hparams["input_shape"]  # KeyError: not an Autoencoder's checkpoint
    except Exception as error:  # noqa: BLE001 - any unreadable or foreign file is refused the same way
        reason = str(error).splitlines()[0] if str(error) else ""
        raise LoadError(f"{checkpoint} is not an ae_lab checkpoint that can be read ({type(error).__name__}: "
                        f"{reason}): load another checkpoint") from None
    return hparams, state


def _check_config(checkpoint: Path, hparams: dict[str, Any], cfg: DictConfig) -> None:
    """Refuse a checkpoint whose module config or input shape is not the run's."""
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    differing = config_differences(hparams["config"], {section: plain[section] for section in MODULE_SECTIONS})
    shape = tuple(hparams["input_shape"])
    if not is_own_data(cfg.dataset) and shape != tuple(data_input_shape(cfg.dataset)):
        differing.append(f"input shape {shape} there, {tuple(data_input_shape(cfg.dataset))} in the run")
    if differing:
        shown = "; ".join(differing[:3]) + (f"; and {len(differing) - 3} more" if len(differing) > 3 else "")
        raise LoadError(f"{checkpoint} is a checkpoint of another config than its run's .hydra/config.yaml ({shown}): "
                        "put each run's checkpoints in its own folder")


def _tensor(x: Array) -> torch.Tensor:
    """`x` as a tensor: a tensor as it is, anything else (numpy, a memory map's rows) as a float32 copy."""
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, dtype=np.float32))


class TrainedModel:
    """A run's trained `module` (eval mode) with its config `cfg`, `run_dir`, `checkpoint`, its data
    set's `units` and its run.json `record`; see the module docstring for the conventions."""

    def __init__(self, module: Autoencoder, cfg: DictConfig, run_dir: Path, checkpoint: Path, units: Units,
                 record: dict[str, Any]) -> None:
        self.module = module
        self.cfg = cfg
        self.run_dir = run_dir
        self.checkpoint = checkpoint
        self.units = units
        self.record = record
        self.input_shape: tuple[int, ...] = tuple(module.hparams["input_shape"])
        self.latent_dim: int = int(cfg.model.latent_dim)
        self._data: ArrayDataModule | None = None

    def __repr__(self) -> str:
        return (f"TrainedModel({str(self.run_dir)!r}, {self.checkpoint.name}, input {self.input_shape}, "
                f"latent_dim {self.latent_dim}, data {self.cfg.dataset.name})")

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def gaussian(self) -> bool:
        """A Gaussian latent head (VAE): codes are posterior means, and there is a posterior to sample."""
        return bool(self.module.objective.gaussian_head)

    @property
    def score_kinds(self) -> tuple[str, ...]:
        """The anomaly scores `score` gives: `recon`, and `elbo` for a VAE with loss.recon=bce."""
        return score_kinds(self.module)

    # ----- units
    def to_model(self, x: Array) -> torch.Tensor:
        """Raw inputs (N, *input_shape) or one example -> float32 model inputs on the model's device, as
        the run's loader made them (see `units`)."""
        self._check(x, self.input_shape, "x")
        return self.units.to_model(_tensor(x).to(self.device))

    def from_model(self, x: torch.Tensor) -> torch.Tensor:
        """Model units (inputs or reconstructions) -> raw units, on the tensor's device."""
        return self.units.from_model(x)

    # ----- operations
    def encode(self, x: Array, sample: bool = False, batch_size: int = BATCH_SIZE) -> Array:
        """Codes (N, latent_dim): the deterministic code, or for a VAE the posterior mean (with `sample`,
        a draw z = mean + exp(logvar / 2) * eps from torch's global RNG)."""
        if sample and not self.gaussian:
            raise InputError("encode(sample=True) is not allowed: this model's code is deterministic (no "
                             "Gaussian latent head); sample=False gives it")

        def code(raw: torch.Tensor) -> torch.Tensor:
            features = self.module.encoder(self.units.to_model(raw))
            if not sample:
                return self.module.head.code(features)
            mean, logvar = self.module.head.posterior(features)
            return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)

        return self._map(code, x, self.input_shape, "x", batch_size)

    def encode_params(self, x: Array, batch_size: int = BATCH_SIZE) -> tuple[Array, Array]:
        """A VAE's posterior q(z|x): (mean, logvar), each (N, latent_dim)."""
        if not self.gaussian:
            raise InputError("encode_params is not allowed: this model has no Gaussian latent head (a VAE's "
                             "posterior); encode gives its code")
        return self._map(lambda raw: self.module.head.posterior(self.module.encoder(self.units.to_model(raw))),
                         x, self.input_shape, "x", batch_size)

    def decode(self, z: Array, batch_size: int = BATCH_SIZE) -> Array:
        """Codes (N, latent_dim) -> decoded examples (N, *input_shape) in raw units."""
        return self._map(self._decoded, z, (self.latent_dim,), "z", batch_size)

    def reconstruct(self, x: Array, batch_size: int = BATCH_SIZE) -> Array:
        """The reconstruction from the code (the posterior mean for a VAE), in raw units. No noise is
        added: to denoise, give the corrupted input."""
        return self._map(lambda raw: self.units.from_model(self.module.reconstruct(self.units.to_model(raw))),
                         x, self.input_shape, "x", batch_size)

    def score(self, x: Array, kind: str | None = None, batch_size: int = BATCH_SIZE) -> Array:
        """Per-example anomaly score (N,), higher = more anomalous: exactly what `eval/anomaly_auroc_<kind>`
        ranks (ae_lab/evaluation/anomaly.py, with this run's `eval.iw_samples` and `eval.seed`): `recon`,
        the reconstruction error of loss.recon in model units, or `elbo`, -ELBO in nats (a VAE with
        loss.recon=bce). By default `elbo` where the model has it, else `recon`."""
        kinds = self.score_kinds
        kind = kinds[-1] if kind is None else kind
        if kind not in kinds:
            raise InputError(f"kind={kind!r} is not allowed: this model scores {' or '.join(map(repr, kinds))}")
        ev = self.cfg.eval

        def scored(raw: torch.Tensor) -> torch.Tensor:
            return anomaly_scores(self.module, self.units.to_model(raw), max(ev.iw_samples, 1), ev.seed,
                                  ev.max_decode_batch, kinds=(kind,))[kind]

        return self._map(scored, x, self.input_shape, "x", batch_size)

    def interpolate(self, a: Array, b: Array, steps: int = 10) -> Array:
        """(steps, *input_shape) in raw units: the decodings of codes on the straight line from a's code to
        b's (a and b single examples), so the first and last are a's and b's reconstructions."""
        if steps < 2:
            raise InputError(f"steps={steps} is not allowed: at least 2 (the two ends)")
        ends = torch.stack([self._example(a, "a"), self._example(b, "b")])
        codes = self.encode(ends)
        weights = torch.linspace(0, 1, steps, device=codes.device)[:, None]
        return self._like(self.decode((1 - weights) * codes[0] + weights * codes[1]), a)

    def traverse(self, x: Array, unit: int, values: Sequence[float] | Array) -> Array:
        """(len(values), *input_shape) in raw units: the decodings of x's code (x one example) with code
        unit `unit` set to each of `values` in turn."""
        if not 0 <= unit < self.latent_dim:
            raise InputError(f"unit={unit} is not allowed: a code unit of 0..{self.latent_dim - 1}")
        code = self.encode(self._example(x, "x"))
        settings = _tensor(values).to(code.device, torch.float32).reshape(-1)
        codes = code.repeat(len(settings), 1)
        codes[:, unit] = settings
        return self._like(self.decode(codes), x)

    def sample(self, n: int, sampler: str = "prior", seed: int = 0, **options: Any) -> np.ndarray:
        """`n` examples (n, *input_shape) in raw units, numpy: codes drawn by `sampler` (ae_lab/samplers.py,
        its `options`) from `seed`, decoded."""
        from ae_lab.samplers import sampler_for

        codes = sampler_for(self, sampler, **options).sample(n, torch.Generator().manual_seed(seed))
        return self.decode(torch.as_tensor(codes).cpu().numpy())

    # ----- the run's data
    def training_codes(self, batch_size: int = BATCH_SIZE) -> torch.Tensor:
        """The codes (means, for a VAE) of the run's training split, (N, latent_dim) on the CPU."""
        batches = self._raw_batches("train", batch_size)
        return torch.cat([self.encode(raw, batch_size=batch_size).cpu() for raw in batches])

    def split_inputs(self, name: str, batch_size: int = BATCH_SIZE) -> np.ndarray:
        """The run's `train`, `val` or `test` split in raw units (what a user would feed), float32
        (N, *input_shape), e.g. to calibrate a score threshold on the validation split."""
        return torch.cat(list(self._raw_batches(name, batch_size))).numpy()

    def split_labels(self, name: str) -> np.ndarray | None:
        """The labels (N,) of the run's split `name`, in the order of `split_inputs`; None without labels."""
        split = self._split(name)
        return None if split.labels is None else split.labels[split.rows(torch.arange(len(split)))].numpy()

    # ----- image files
    def read_images(self, paths: Sequence[str | Path]) -> np.ndarray:
        """Image files -> raw inputs (N, C, H, W) float32: converted to grey or RGB as the model was trained
        and resized to its size as `dataset=image_folder` does (bilinear), PNG level v as raw v * scale / 255."""
        channels, height, width = self._image_shape()
        pixels = read_image_files([Path(path) for path in paths], channels, (height, width))
        return pixels.astype(np.float32) * np.float32(self.units.scale / PNG_WHITE)

    def write_images(self, x: Array, paths: Sequence[str | Path]) -> None:
        """Raw-unit images (N, C, H, W), or one, as image files (PNG), clipped to the pixel range."""
        self._image_shape()
        single = self._check(x, self.input_shape, "x")
        images = _tensor(x).detach().cpu()
        images = images[None] if single else images
        if len(images) != len(paths):
            raise InputError(f"paths has {len(paths)} entries for {len(images)} images: give one path per image")
        pixels = (images.float() * (PNG_WHITE / self.units.scale)).round().clamp(0, PNG_WHITE).to(torch.uint8)
        write_image_files(pixels.numpy(), [Path(path) for path in paths])

    # ----- helpers
    def _decoded(self, z: torch.Tensor) -> torch.Tensor:
        return self.units.from_model(self.module.output(self.module.decoder(z.to(torch.float32))))

    def _image_shape(self) -> tuple[int, int, int]:
        shape = self.input_shape
        if not self.units.pixels or len(shape) != 3 or shape[0] not in (1, 3):
            what = f"its inputs are {shape}" if self.units.pixels else "its raw values are your own array's, not pixels"
            raise InputError(f"image files are not allowed for {self.run_dir}: {what}; image files go with models of "
                             "grey or RGB images (C, H, W) of a pixel data set")
        return shape  # type: ignore[return-value]

    def _check(self, x: Array, shape: tuple[int, ...], name: str) -> bool:
        """Whether `x` is one example of `shape` (else a batch of them); refuse any other shape."""
        got = tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))
        if got == shape:
            return True
        if got[1:] == shape:
            return False
        raise InputError(f"{name} of shape {got} is not allowed: this model takes a batch of shape "
                         f"(N, {', '.join(map(str, shape))}) or one example of shape {shape}")

    def _map(self, function: Callable[[torch.Tensor], Any], x: Array, shape: tuple[int, ...], name: str,
             batch_size: int) -> Any:
        """`function` (a raw batch on the device -> a tensor, or a tuple of them) over `x` in batches of
        `batch_size`, without gradients; its results joined and returned like `x` (see the conventions)."""
        single = self._check(x, shape, name)
        if batch_size < 1:
            raise InputError(f"batch_size={batch_size} is not allowed: at least 1")
        if not isinstance(x, torch.Tensor):
            x = np.asarray(x)
        rows = x[None] if single else x
        parts = []
        with torch.no_grad():
            for start in range(0, max(len(rows), 1), batch_size):  # an empty batch gives empty results
                result = function(_tensor(rows[start:start + batch_size]).to(self.device))
                parts.append(result if isinstance(result, tuple) else (result,))
        joined = tuple(torch.cat(pieces) for pieces in zip(*parts))
        outputs = tuple(self._like(value[0] if single else value, x) for value in joined)
        return outputs if len(outputs) > 1 else outputs[0]

    def _example(self, x: Array, name: str) -> torch.Tensor:
        """One example (or a batch of one) as a raw tensor on the device."""
        tensor = _tensor(x)
        if tuple(tensor.shape) == (1, *self.input_shape):
            tensor = tensor[0]
        if tuple(tensor.shape) != self.input_shape:
            raise InputError(f"{name} of shape {tuple(tensor.shape)} is not allowed: one example of shape "
                             f"{self.input_shape}")
        return tensor.to(self.device)

    @staticmethod
    def _like(value: torch.Tensor, x: Array) -> Array:
        """`value` as the type of `x`: a tensor on x's device, or a numpy array."""
        return value.to(x.device) if isinstance(x, torch.Tensor) else value.cpu().numpy()

    def _datamodule(self) -> ArrayDataModule:
        """The run's data set, rebuilt (once) from its config; refused when it changed since the run."""
        if self._data is None:
            data = build_datamodule(self.cfg.dataset)
            recorded = self.record.get("data", {}).get("sha256")
            if recorded != data.checksum:
                raise LoadError(f"{self.run_dir}'s data set {data.name} has changed since the run (its checksum "
                                "differs from run.json's): its splits cannot be rebuilt; restore the data it "
                                "trained on")
            self._data = data
        return self._data

    def _split(self, name: str) -> Split:
        if name not in SPLITS:
            raise InputError(f"split {name!r} is not allowed: one of {', '.join(SPLITS)}")
        return self._datamodule().splits[name]

    def _raw_batches(self, name: str, batch_size: int) -> Iterator[torch.Tensor]:
        split = self._split(name)
        for start in range(0, len(split), batch_size):
            yield self.units.raw(split, torch.arange(start, min(start + batch_size, len(split))))
