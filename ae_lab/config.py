"""Configuration schemas (Hydra structured configs), registered in Hydra's ConfigStore.

Every knob a researcher may sweep is a field below; the YAML files in `conf/` only pick defaults.
Types and unknown keys are enforced by OmegaConf when Hydra composes the config; ranges and
combinations by `ae_lab.checks.validate`, which runs before anything is trained or written
(`ae_lab.hydra_callbacks.CheckBeforeRun`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from ae_lab.paths import SWEEPS


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


class Output(str, Enum):
    sigmoid = "sigmoid"
    linear = "linear"


class Normalize(str, Enum):
    none = "none"
    minmax = "minmax"
    standard = "standard"


class Colour(str, Enum):
    auto = "auto"
    grey = "grey"
    rgb = "rgb"


class Reconstruction(str, Enum):
    mse = "mse"
    bce = "bce"


class Sparsity(str, Enum):
    l1 = "l1"
    kl = "kl"


class ContractiveEstimator(str, Enum):
    exact = "exact"
    projection = "projection"


class ScheduleKind(str, Enum):
    constant = "constant"
    linear = "linear"
    cyclical = "cyclical"
    capacity = "capacity"


class RampShape(str, Enum):
    linear = "linear"
    cosine = "cosine"


class KlForm(str, Enum):
    standard = "standard"
    tc = "tc"


class TcEstimator(str, Enum):
    mws = "mws"
    mss = "mss"
    mss_uniform = "mss_uniform"


class Pretraining(str, Enum):
    none = "none"
    greedy = "greedy"


class PoolSource(str, Enum):
    test = "test"
    grid = "grid"


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
    # the reconstruction from the decoder's last layer: sigmoid (data in [0, 1]) or linear (any real
    # values, e.g. dataset.normalize=standard; needs loss.recon=mse)
    output: Output = Output.sigmoid
    compile: bool = False  # torch.compile the forward pass (benchmarks/RESULTS.md says when it pays)
    # greedy: train the encoder's layers one at a time (ae_lab/greedy.py), `epochs_per_layer` epochs
    # each, then fine-tune the joined network end to end for the remaining epochs (mlp only)
    pretrain: Pretraining = Pretraining.none
    epochs_per_layer: int = 1


@dataclass
class WeightSchedule:
    """How a loss weight moves with the global step (formulas in ae_lab/schedules.py): constant (the
    configured weight throughout), linear warm-up from `start` over `steps`, cyclical (`cycles` ramps
    from `start` within `steps`, each rising for the fraction `rise` of its period, `shape` linear or
    cosine), and for beta only capacity (gamma = loss.beta times |KL - C|, C rising to `capacity`
    nats over `steps`)."""

    kind: ScheduleKind = ScheduleKind.constant
    start: float = 0.0
    steps: int = 10000
    cycles: int = 4
    rise: float = 0.5
    shape: RampShape = RampShape.linear
    capacity: float = 25.0


@dataclass
class LossConfig:
    """loss = recon + beta * KL + sparsity_weight * sparsity + contractive_weight * ||dz/dx||_F^2.

    A weight of 0 switches its term off; `beta` only acts with `model.latent=gaussian`. `beta` and
    `sparsity_weight` are the targets of their schedules. `free_bits` (nats per latent unit, Kingma et
    al. 2016) puts max(free_bits, KL_j) in the loss for each unit's batch-mean KL. `kl=tc` splits the KL
    into index-code MI, total correlation and dimension-wise KL (Chen et al. 2018), weighted by
    `tc_alpha`, `beta` and `tc_gamma`, estimated by `tc_estimator` (ae_lab/kl_forms.py).
    """

    recon: Reconstruction = Reconstruction.bce
    beta: float = 0.0
    sparsity: Sparsity = Sparsity.l1
    sparsity_weight: float = 0.0
    sparsity_target: float = 0.05
    contractive_weight: float = 0.0
    contractive_estimator: ContractiveEstimator = ContractiveEstimator.exact
    contractive_projections: int = 1
    beta_schedule: WeightSchedule = field(default_factory=WeightSchedule)
    sparsity_schedule: WeightSchedule = field(default_factory=WeightSchedule)
    free_bits: float = 0.0
    kl: KlForm = KlForm.standard
    tc_alpha: float = 1.0
    tc_gamma: float = 1.0
    tc_estimator: TcEstimator = TcEstimator.mws


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
class OcclusionNoise:
    """Inpainting: one random box per example, `size` of each side (of the image, sequence or row), set to 0."""

    kind: str = "occlusion"
    size: float = 0.5


@dataclass
class WatermarkNoise:
    """Watermark removal: white diagonal stripes over half of each side, blended in at a random place with
    weight `opacity`."""

    kind: str = "watermark"
    opacity: float = 0.5


@dataclass
class GrayscaleNoise:
    """Colourisation (RGB images only): the input turned grey with weight `amount` (1: fully grey)."""

    kind: str = "grayscale"
    amount: float = 1.0


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
class ArrayConfig(RandomSplitConfig):
    """Your own arrays (ae_lab/data/arrays.py): `path` a .npy (the inputs), .npz (x, optional labels and
    factors) or .pt file of shape (N, D), (N, C, T) or (N, C, H, W); val and test split from it by
    `split_seed`, or read from `val_path` / `test_path`; scaled by `normalize` fitted on train."""

    name: str = "array"
    path: Optional[str] = None
    val_path: Optional[str] = None
    test_path: Optional[str] = None
    normalize: Normalize = Normalize.none
    held_out_class: Any = None  # anomaly detection: train and validate without this label


@dataclass
class ImageFolderConfig(RandomSplitConfig):
    """A folder of PNG/JPEG images (ae_lab/data/image_folder.py), one subfolder per class (labels) or
    none; resized to `size` (an int for square images, or [height, width]); `colour` grey, rgb or auto
    (the files' own, RGB when they mix); decoded once into a cache under `root`, checked against the
    files' checksums."""

    name: str = "image_folder"
    path: Optional[str] = None
    size: Any = 32
    colour: Colour = Colour.auto
    normalize: Normalize = Normalize.none
    held_out_class: Any = None  # anomaly detection: train and validate without this class (its index)
    root: str = "data"
    cache: bool = True


@dataclass
class CustomDataConfig:
    """Your own loader: `_target_` names a function (module.function) that returns an
    ae_lab.data.ArrayDataModule; `kwargs` are passed to it (Hydra's instantiate)."""

    _target_: str = MISSING
    name: str = "custom"
    kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64  # for the checks; the returned module's own batch size is the one used
    num_workers: int = 0
    held_out_class: Any = None


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


class CheckpointArtifacts(str, Enum):
    """Which checkpoints a W&B run holds as artifacts: `best` (best.ckpt, alias `best`), `all` (also
    last.ckpt, alias `last`), `none`."""

    none = "none"
    best = "best"
    all = "all"


@dataclass
class WandbLoggerConfig:
    """W&B; `mode=offline` (the default) writes the run into the run folder for a later `wandb sync`."""

    kind: str = "wandb"
    mode: str = "offline"
    project: str = "ae_lab"
    entity: Any = None
    group: Any = None
    tags: list[str] = field(default_factory=list)
    checkpoints: CheckpointArtifacts = CheckpointArtifacts.best  # as W&B artifacts: none | best | all


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
    # images decoded at once by the IW bound: its memory, and its speed on a CPU, where decoding 32,768
    # at once (100 MB per tensor) spent 40% of the bound's time in the kernel mapping fresh memory
    max_decode_batch: int = 2048
    iw_samples: int = 10  # k for the importance-weighted bound on log p(x); papers use 5000 (eval=paper)
    active_unit_threshold: float = 0.01  # a unit is active when Var_x(E[z_d|x]) exceeds this
    probe_train_size: int = 5000  # training-split codes the logistic probe learns from
    disentanglement_pool: int = 10000  # test examples encoded for MIG / FactorVAE / DCI / SAP
    # where that pool comes from: `test`, the first examples of the test split; `grid`, examples drawn
    # uniformly from the data set's whole factor grid as disentanglement_lib draws them (shapes, dsprites)
    disentanglement_pool_source: PoolSource = PoolSource.test
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
    # sample quality (ae_lab/evaluation/sample_quality.py), labelled data only: Fréchet distances between
    # this many decoded samples (at most the test split's size) and test examples in the features of a
    # classifier trained on the labels (0 switches them off)
    fd_samples: int = 10000
    gmm_components: int = 10  # the Gaussian mixture fitted on the training codes (fd_gmm; the gmm sampler)
    gmm_train_size: int = 10000  # the mixture is fitted on the codes of at most this many training examples
    fd_classifier_hidden: list[int] = field(default_factory=lambda: [256, 64])  # its MLP; the last: features
    fd_classifier_epochs: int = 20
    # where the classifier is cached, one file per data set and settings (null: ~/.cache/ae_lab/fd_classifiers,
    # or $XDG_CACHE_HOME/ae_lab/fd_classifiers): shared by every run, so that their FDs are comparable
    fd_classifier_cache: Optional[str] = None


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
    # false: the console shows the config, progress and results (libraries' messages go to ae_lab.log only)
    verbose: bool = False


# Config keys (flat, `fnmatch` patterns) that cannot change a run's numbers: where data files live and
# are fetched from, what is logged and shown, how often a checkpoint is written, which figures are drawn.
# `ae_lab.compare` never takes them for swept keys; a resume refused for a changed config names the
# other keys first. Not here: anything that changes the data, the model, the training or the metrics
# (also `dataset.num_workers`, under which dynamic binarisation draws in worker processes).
NON_RESULT_KEYS = ("dataset.root", "dataset.mirrors", "dataset.mirrors.*", "dataset.download",
                   "dataset.download_timeout", "dataset.cache", "dataset.on_device", "logger.*",
                   "checkpoint_every_n_steps", "resume", "verbose", "objective", "trainer.enable_progress_bar",
                   "trainer.enable_model_summary", "trainer.detect_anomaly", "eval.figures",
                   "eval.num_reconstructions", "eval.num_samples", "eval.traversal_*", "eval.interpolation_steps")


def changes_results(key: str) -> bool:
    """Whether the flat config key `key` can change a run's numbers (it is not one of NON_RESULT_KEYS)."""
    from fnmatch import fnmatchcase

    return not any(fnmatchcase(key, pattern) for pattern in NON_RESULT_KEYS)


SCHEMAS: dict[str, dict[str, type]] = {
    "noise": {
        "none": NoNoise,
        "gaussian": GaussianNoise,
        "masking": MaskingNoise,
        "salt_pepper": SaltPepperNoise,
        "occlusion": OcclusionNoise,
        "watermark": WatermarkNoise,
        "grayscale": GrayscaleNoise,
    },
    "dataset": {
        "digits": DigitsConfig,
        "mnist": MnistConfig,
        "dsprites": DspritesConfig,
        "shapes": ShapesConfig,
        "array": ArrayConfig,
        "image_folder": ImageFolderConfig,
        "custom": CustomDataConfig,
    },
    "logger": {
        "wandb": WandbLoggerConfig,
        "csv": CsvLoggerConfig,
        "none": NoLoggerConfig,
    },
}


def register_configs() -> None:
    """Put the schemas into Hydra's ConfigStore and register ae_lab's resolvers.

    A group's schemas go under `schema/<group>/<name>`, apart from the group's options, so that they
    are never offered as options; each option's YAML names its schema (`- /schema/dataset/mnist@_here_`).
    """
    register_resolvers()
    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            store.store(group=f"schema/{group}", name=name, node=node)
    register_sweeps(store)


def register_resolvers() -> None:
    """ae_lab's OmegaConf resolvers, which a run's recorded config may still hold (e.g. `${noise_level:0.2}`)."""
    from omegaconf import OmegaConf

    from ae_lab.help import pointer
    from ae_lab.sweep import config_hash, noise_level, slurm_gpus

    for name, resolver in (("config_hash", config_hash), ("noise_level", noise_level), ("run_folder", run_folder),
                           ("slurm_gpus", slurm_gpus), ("ae_lab_help", pointer)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)




def register_sweeps(store: ConfigStore) -> None:
    """The ready sweeps in the repository's `sweeps/` as the config group `sweeps` (`+sweeps=<name>`,
    from any working directory). Stored in the ConfigStore rather than by putting the repository root on
    Hydra's search path: that made every folder of the repository (.git, .venv, outputs) a config group
    that Hydra walks, e.g. for `--help`. Each file's `# @package` header is kept."""
    from omegaconf import OmegaConf

    for path in sorted(SWEEPS.glob("*.yaml")):
        header = path.read_text().splitlines()[:1]
        package = header[0].split("@package", 1)[1].strip() if header and "@package" in header[0] else None
        store.store(group="sweeps", name=path.stem, node=OmegaConf.load(path), package=package)


def run_folder(new: str, *, _root_: Any) -> str:
    """OmegaConf resolver for `hydra.run.dir`: the `resume` folder when resuming a run, else `new`."""
    return _root_.get("resume") or new


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys: {"model": {"latent_dim": 8}} -> {"model.latent_dim": 8}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
