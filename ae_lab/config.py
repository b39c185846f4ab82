"""Configuration schemas (Hydra structured configs) and the checks Hydra's types cannot express.

Every knob a researcher may sweep is a field below; the YAML files in `conf/` only pick defaults.
Types and unknown keys are enforced by OmegaConf when Hydra composes the config; ranges and
combinations are enforced by `validate`, which runs before anything is trained or written.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import MISSING, DictConfig


class ConfigError(ValueError):
    """A bad configuration value: its message names the key and what is allowed."""


class Arch(str, Enum):
    mlp = "mlp"
    conv = "conv"


class LatentHead(str, Enum):
    deterministic = "deterministic"
    gaussian = "gaussian"


class Activation(str, Enum):
    relu = "relu"
    leaky_relu = "leaky_relu"
    elu = "elu"
    gelu = "gelu"
    silu = "silu"
    tanh = "tanh"
    sigmoid = "sigmoid"


class CodeActivation(str, Enum):
    none = "none"
    sigmoid = "sigmoid"
    relu = "relu"
    tanh = "tanh"


class Reconstruction(str, Enum):
    mse = "mse"
    bce = "bce"


class Sparsity(str, Enum):
    l1 = "l1"
    kl = "kl"


class ContractiveEstimator(str, Enum):
    exact = "exact"
    projection = "projection"


class Optimizer(str, Enum):
    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"


@dataclass
class ModelConfig:
    """Networks and latent head. `hidden_dims` is read by `arch=mlp`; `channels`, `kernel_size` and
    `fc_dims` (fully connected layers between the conv stack and the latent) by `arch=conv`."""

    arch: Arch = Arch.mlp
    latent: LatentHead = LatentHead.deterministic
    latent_dim: int = 16
    hidden_dims: list[int] = field(default_factory=lambda: [256, 128])
    channels: list[int] = field(default_factory=lambda: [32, 64])
    kernel_size: int = 3
    fc_dims: list[int] = field(default_factory=list)
    activation: Activation = Activation.relu
    code_activation: CodeActivation = CodeActivation.none
    compile: bool = False  # torch.compile the forward pass (benchmarks/RESULTS.md says when it pays)


@dataclass
class LossConfig:
    """loss = recon + beta * KL + sparsity_weight * sparsity + contractive_weight * ||dz/dx||_F^2.

    A weight of 0 switches its term off; `beta` only acts with `model.latent=gaussian`.
    """

    recon: Reconstruction = Reconstruction.bce
    beta: float = 0.0
    sparsity: Sparsity = Sparsity.l1
    sparsity_weight: float = 0.0
    sparsity_target: float = 0.05
    contractive_weight: float = 0.0
    contractive_estimator: ContractiveEstimator = ContractiveEstimator.exact
    contractive_projections: int = 1


@dataclass
class NoNoise:
    kind: str = "none"


@dataclass
class GaussianNoise:
    """x + N(0, std^2), per pixel."""

    kind: str = "gaussian"
    std: float = 0.1


@dataclass
class MaskingNoise:
    """Each pixel set to 0 with probability p."""

    kind: str = "masking"
    p: float = 0.25


@dataclass
class SaltPepperNoise:
    """Each pixel replaced with probability p by 0 or 1 (equally likely)."""

    kind: str = "salt_pepper"
    p: float = 0.1


@dataclass
class RandomSplitConfig:
    """A data set split at random into train/val/test by `split_seed` (not the training `seed`)."""

    name: str = MISSING
    batch_size: int = 64
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    num_workers: int = 0


@dataclass
class DigitsConfig(RandomSplitConfig):
    """scikit-learn's 8x8 handwritten digits."""

    name: str = "digits"
    held_out_class: Any = None  # anomaly detection: train and validate without this class (0-9)


class Binarize(str, Enum):
    none = "none"
    threshold = "threshold"
    static = "static"
    dynamic = "dynamic"


@dataclass
class DownloadedConfig:
    """Fields shared by data sets read from files under `root`, downloaded from `mirrors` when missing."""

    root: str = "data"
    mirrors: list[str] = field(default_factory=list)
    download: bool = True
    download_timeout: float = 30.0
    cache: bool = True  # keep decoded arrays next to the files (skipped where root is read-only)
    batch_size: int = 128
    num_workers: int = 0
    on_device: bool = False  # hold the whole set on the accelerator (no per-step host-to-device copy)
    split_seed: int = 0


@dataclass
class MnistConfig(DownloadedConfig):
    """MNIST or Fashion-MNIST (`name`): `val_size` training images held out; `binarize`: none (grey
    levels), threshold (at 0.5), static (one Bernoulli draw from `binarize_seed`), dynamic (a fresh
    draw per training batch; validation and test use the static draw)."""

    name: str = "mnist"
    held_out_class: Any = None  # anomaly detection: train and validate without this class (0-9)
    val_size: int = 5000
    binarize: Binarize = Binarize.none
    binarize_seed: int = 0


@dataclass
class DspritesConfig(DownloadedConfig):
    name: str = "dsprites"
    sha256: Any = None
    batch_size: int = 64
    val_fraction: float = 0.05
    test_fraction: float = 0.05


@dataclass
class ShapesConfig(RandomSplitConfig):
    """The generated dSprites-style set; `subsample` images drawn from the full grid (null: all 737,280)."""

    name: str = "shapes"
    subsample: Any = 20000
    test_fraction: float = 0.1


@dataclass
class TrainerConfig:
    """Passed to `pytorch_lightning.Trainer` as keyword arguments, key for key."""

    max_epochs: int = 100
    max_steps: int = -1
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: Any = "32-true"
    gradient_clip_val: Any = None
    gradient_clip_algorithm: str = "norm"
    accumulate_grad_batches: int = 1
    limit_train_batches: Any = 1.0
    limit_val_batches: Any = 1.0
    limit_test_batches: Any = 1.0
    val_check_interval: Any = 1.0
    check_val_every_n_epoch: int = 1
    log_every_n_steps: int = 10
    deterministic: Any = True
    benchmark: Any = None
    enable_progress_bar: bool = True
    enable_model_summary: bool = True
    detect_anomaly: bool = False


@dataclass
class WandbLoggerConfig:
    """W&B; `mode=offline` (the default) writes the run into the run folder for a later `wandb sync`."""

    kind: str = "wandb"
    mode: str = "offline"
    project: str = "ae_lab"
    entity: Any = None
    group: Any = None
    tags: list[str] = field(default_factory=list)


@dataclass
class CsvLoggerConfig:
    kind: str = "csv"


@dataclass
class NoLoggerConfig:
    kind: str = "none"


@dataclass
class OptimConfig:
    """The optimiser, and a step schedule: the learning rate is multiplied by `gamma` at the start of
    each epoch listed in `milestones` (none by default)."""

    name: Optimizer = Optimizer.adam
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd
    eps: float = 1e-8  # adam, adamw
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1


@dataclass
class EvalConfig:
    """What `ae_lab/evaluation` measures and draws after fit, on the test split with the best weights.

    A size of 0 switches its metric off. Metrics that do not apply to the model or data (the IW bound
    without a Gaussian head, the probe without labels, disentanglement without factors) are skipped.
    """

    seed: int = 0  # evaluation's own randomness (test corruption, IW samples, subsets), apart from `seed`
    test_examples: Any = None  # evaluate on the first N test examples only (null: all of them)
    batch_size: int = 500
    max_decode_batch: int = 32768  # images decoded at once by the IW bound (memory)
    iw_samples: int = 10  # k for the importance-weighted bound on log p(x); papers use 5000 (eval=paper)
    active_unit_threshold: float = 0.01  # a unit is active when Var_x(E[z_d|x]) exceeds this
    probe_train_size: int = 5000  # training-split codes the logistic probe learns from
    disentanglement_pool: int = 10000  # test examples encoded for MIG / FactorVAE / DCI / SAP
    disentanglement_train_size: int = 2000  # DCI/SAP fits and FactorVAE votes (dlib: 10000)
    disentanglement_test_size: int = 1000  # DCI/SAP tests and FactorVAE eval votes (dlib: 5000)
    dci: bool = False  # DCI's gradient-boosted trees take about a minute even at the sizes above
    jacobian_examples: int = 1000  # test examples for the encoder Jacobian norm
    near_zero: float = 0.01  # |activation| below this counts as a silent unit in sparse-code stats
    figures: bool = True
    num_reconstructions: int = 10  # test images in figures/reconstructions.png
    num_samples: int = 10  # prior samples (VAE)
    traversal_dims: int = 10  # latent traversals: at most this many dims, most informative first
    traversal_steps: int = 9
    traversal_range: float = 3.0  # each dim swept over +-range standard deviations
    interpolation_steps: int = 10


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    noise: Any = MISSING
    dataset: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: Any = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    objective: str = "val/loss"  # the metric `python -m ae_lab` returns, for sweepers that optimise
    noise_level: Any = None  # when set, the strength of whichever noise is chosen (std or p)
    # checkpoints/last.ckpt is rewritten every this many training steps (0: only after validations)
    checkpoint_every_n_steps: int = 500
    resume: Optional[str] = None  # a run folder: continue that run from its last checkpoint (ae_lab/resume.py)


SCHEMAS: dict[str, dict[str, type]] = {
    "noise": {
        "none_schema": NoNoise,
        "gaussian_schema": GaussianNoise,
        "masking_schema": MaskingNoise,
        "salt_pepper_schema": SaltPepperNoise,
    },
    "dataset": {
        "digits_schema": DigitsConfig,
        "mnist_schema": MnistConfig,
        "dsprites_schema": DspritesConfig,
        "shapes_schema": ShapesConfig,
    },
    "logger": {
        "wandb_schema": WandbLoggerConfig,
        "csv_schema": CsvLoggerConfig,
        "none_schema": NoLoggerConfig,
    },
}


def register_configs() -> None:
    """Put the schemas into Hydra's ConfigStore (the YAML files in `conf/` name them in `defaults`)
    and register ae_lab's resolvers."""
    from omegaconf import OmegaConf

    from ae_lab.sweep import config_hash, noise_level

    for name, resolver in (("config_hash", config_hash), ("noise_level", noise_level), ("run_folder", run_folder)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            store.store(group=group, name=name, node=node)


def run_folder(new: str, *, _root_: Any) -> str:
    """OmegaConf resolver for `hydra.run.dir`: the `resume` folder when resuming a run, else `new`."""
    return _root_.get("resume") or new


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def validate(cfg: DictConfig, input_shape: tuple[int, ...] | None = None) -> list[str]:
    """Check ranges and combinations; raise ConfigError on the first bad value.

    `input_shape` (C, H, W), when known, lets the conv depth be checked against the image size.
    Returns warnings for settings that are allowed but probably not meant.
    """
    model, loss, noise, data, trainer, optim = (
        cfg.model, cfg.loss, cfg.noise, cfg.dataset, cfg.trainer, cfg.optim
    )
    _require(model.latent_dim >= 1, "model.latent_dim", model.latent_dim, "an integer >= 1")
    _require(all(d >= 1 for d in model.hidden_dims), "model.hidden_dims", list(model.hidden_dims),
             "a list of integers >= 1")
    _require(len(model.channels) >= 1 and all(c >= 1 for c in model.channels), "model.channels",
             list(model.channels), "a non-empty list of integers >= 1")
    _require(2 <= model.kernel_size <= 7, "model.kernel_size", model.kernel_size, "an integer from 2 to 7")
    _require(all(d >= 1 for d in model.fc_dims), "model.fc_dims", list(model.fc_dims),
             "a list of integers >= 1")
    if input_shape is not None and model.arch == "conv":
        from ae_lab.nets import conv_sizes

        sizes = conv_sizes(min(input_shape[1:]), len(model.channels), model.kernel_size)
        # every stride-2 layer needs an input side >= 2
        deepest = next((depth for depth, side in enumerate(sizes) if side < 2), len(model.channels))
        _require(len(model.channels) <= deepest, "model.channels", list(model.channels),
                 f"at most {deepest} stride-2 conv layers with kernel_size={model.kernel_size} for "
                 f"{input_shape[1]}x{input_shape[2]} images of dataset={data.name}")

    _require(loss.beta >= 0, "loss.beta", loss.beta, "a number >= 0")
    _require(loss.sparsity_weight >= 0, "loss.sparsity_weight", loss.sparsity_weight, "a number >= 0")
    _require(0 < loss.sparsity_target < 1, "loss.sparsity_target", loss.sparsity_target,
             "a rate strictly between 0 and 1")
    _require(loss.contractive_weight >= 0, "loss.contractive_weight", loss.contractive_weight,
             "a number >= 0")
    _require(loss.contractive_projections >= 1, "loss.contractive_projections",
             loss.contractive_projections, "an integer >= 1")
    if model.compile:
        _require(loss.contractive_weight == 0, "model.compile", True,
                 "false with the contractive penalty (torch.compile does not support the double backward "
                 "it needs)")
    if loss.sparsity == "kl" and loss.sparsity_weight > 0:
        _require(model.code_activation == "sigmoid" and model.latent == "deterministic",
                 "loss.sparsity", "kl",
                 "KL sparsity needs code activations in (0, 1): use model.code_activation=sigmoid "
                 "with model.latent=deterministic, or loss.sparsity=l1")

    if noise.kind == "gaussian":
        _require(noise.std >= 0, "noise.std", noise.std, "a standard deviation >= 0")
    elif noise.kind in ("masking", "salt_pepper"):
        _require(0 <= noise.p <= 1, "noise.p", noise.p, "a probability in [0, 1]")

    _validate_dataset(data)

    _require(optim.lr > 0, "optim.lr", optim.lr, "a learning rate > 0")
    _require(optim.weight_decay >= 0, "optim.weight_decay", optim.weight_decay, "a number >= 0")
    _require(optim.eps > 0, "optim.eps", optim.eps, "a number > 0")
    milestones = list(optim.milestones)
    _require(all(m >= 1 for m in milestones) and milestones == sorted(set(milestones)), "optim.milestones",
             milestones, "strictly increasing epoch numbers >= 1")
    _require(0 < optim.gamma <= 1, "optim.gamma", optim.gamma, "a factor in (0, 1]")
    _require(trainer.max_epochs >= 1 or trainer.max_epochs == -1, "trainer.max_epochs",
             trainer.max_epochs, "an integer >= 1, or -1 for no limit")
    if trainer.accelerator in ("gpu", "cuda") and isinstance(trainer.devices, int):
        import torch

        available = torch.cuda.device_count()
        _require(trainer.devices <= available, "trainer.devices", trainer.devices,
                 f"at most the {available} GPU(s) this machine has")
    clip = trainer.gradient_clip_val
    _require(clip is None or (isinstance(clip, (int, float)) and clip >= 0), "trainer.gradient_clip_val",
             clip, "null or a number >= 0")
    _validate_eval(cfg.eval)
    _require(cfg.checkpoint_every_n_steps >= 0, "checkpoint_every_n_steps", cfg.checkpoint_every_n_steps,
             "an integer >= 0 (0: checkpoint only after validations)")

    if cfg.logger.kind == "wandb":
        _require(cfg.logger.mode in ("offline", "online", "disabled"), "logger.mode", cfg.logger.mode,
                 "one of offline, online, disabled")
        if cfg.logger.mode == "online":
            _require(_wandb_key_available(), "logger.mode", "online",
                     "no W&B API key found: run `wandb login` or set WANDB_API_KEY, "
                     "or keep logger.mode=offline and `wandb sync` the run later")

    warnings = []
    if loss.beta > 0 and model.latent == "deterministic":
        warnings.append(f"loss.beta={loss.beta} has no effect: there is no KL term without "
                        "model.latent=gaussian (e.g. model=vae)")
    return warnings


def _validate_dataset(data: DictConfig) -> None:
    _require(data.batch_size >= 1, "dataset.batch_size", data.batch_size, "an integer >= 1")
    _require(data.num_workers >= 0, "dataset.num_workers", data.num_workers, "an integer >= 0")
    if "val_fraction" in data:
        for key in ("val_fraction", "test_fraction"):
            _require(0 < data[key] < 1, f"dataset.{key}", data[key], "a fraction strictly between 0 and 1")
        _require(data.val_fraction + data.test_fraction < 1, "dataset.val_fraction", data.val_fraction,
                 f"val_fraction + test_fraction < 1 (test_fraction={data.test_fraction})")
    if "val_size" in data:
        _require(1 <= data.val_size < 60000, "dataset.val_size", data.val_size,
                 "between 1 and 59,999 of the 60,000 training images")
    if data.get("held_out_class") is not None:
        _require(data.held_out_class in range(10), "dataset.held_out_class", data.held_out_class,
                 "null or a class label 0-9 (left out of training and validation; the test split keeps it)")
    if "download_timeout" in data:
        _require(data.download_timeout > 0, "dataset.download_timeout", data.download_timeout,
                 "a number of seconds > 0")
    if "subsample" in data and data.subsample is not None:
        _require(isinstance(data.subsample, int) and 10 <= data.subsample <= 737_280,
                 "dataset.subsample", data.subsample, "null (all 737,280 images) or an integer in [10, 737280]")


def _validate_eval(ev: DictConfig) -> None:
    for key in ("batch_size", "max_decode_batch", "num_reconstructions", "num_samples",
                "traversal_steps", "interpolation_steps"):
        _require(ev[key] >= 1, f"eval.{key}", ev[key], "an integer >= 1")
    for key in ("iw_samples", "probe_train_size", "disentanglement_pool", "disentanglement_train_size",
                "disentanglement_test_size", "jacobian_examples", "traversal_dims"):
        _require(ev[key] >= 0, f"eval.{key}", ev[key], "an integer >= 0 (0 switches it off)")
    _require(ev.test_examples is None or (isinstance(ev.test_examples, int) and ev.test_examples >= 2),
             "eval.test_examples", ev.test_examples, "null (the whole test split) or an integer >= 2")
    for key in ("active_unit_threshold", "near_zero", "traversal_range"):
        _require(ev[key] > 0, f"eval.{key}", ev[key], "a number > 0")


def _wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def fail(message: str, exit_code: int = 2) -> None:
    """End the process with one line on stderr and `exit_code` (no traceback)."""
    print(f"ae_lab: error: {message}", file=sys.stderr)
    raise SystemExit(exit_code)


class CheckBeforeRun(Callback):
    """Refuse a bad config, a run folder that already holds a run, or one that cannot be written, or a
    resume that cannot continue its run, before anything is written; summarise a sweep when it ends."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from ae_lab.distributed import launched_rank

        run_dir = Path(str(config.hydra.run.dir))
        first_rank = launched_rank() == 0  # DDP ranks > 0 join rank 0's run and write nothing
        if config.resume is not None:
            self._check_resume(config, first_rank)  # checks the run's recorded config
        else:
            if first_rank and (run_dir / "run.json").exists():
                fail(f"hydra.run.dir={str(run_dir)!r} already holds a run: choose a new folder, "
                     f"or continue it with resume={run_dir}")
            from ae_lab.data import input_shape

            try:
                validate(config, input_shape(config.dataset))
            except ConfigError as error:
                fail(str(error))
        if first_rank:
            try:  # the config is good: make the folder now, to refuse one that cannot be written
                run_dir.mkdir(parents=True, exist_ok=True)
                probe = run_dir / f".write-test-{os.getpid()}"
                probe.touch()
                probe.unlink()
            except OSError as error:
                fail(f"hydra.run.dir={str(run_dir)!r} cannot be written: {error.strerror or error}")

    @staticmethod
    def _check_resume(config: DictConfig, first_rank: bool) -> None:
        """Refuse a resume that cannot continue its run; end at once (exit 0) when it has completed."""
        from ae_lab.resume import check_resume

        try:
            completed = check_resume(config, first_rank)
        except ConfigError as error:
            fail(str(error))
        if completed:
            print(f"ae_lab: {config.resume} has completed: nothing to resume "
                  f"(its metrics: {Path(str(config.resume)) / 'metrics.json'})")
            raise SystemExit(0)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("resume") is not None:
            fail(f"resume={config.resume!r} is not allowed with -m: resume one run at a time (a sweep "
                 "continues when run again with hydra.sweep.dir=<its folder>)")
        # sweepers may keep state in the sweep folder before the first job makes it (Optuna's study)
        Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ae_lab.sweep import summarize

        jobs = summarize(Path(str(config.hydra.sweep.dir)))
        failed = [job for job in jobs if job.status != "completed"]
        if failed:
            fail(f"{len(failed)} of {len(jobs)} jobs did not complete: see the summary above", exit_code=1)

