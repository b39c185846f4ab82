"""Resuming a killed run: `python -m ae_lab resume=outputs/runs/<run>` continues it, in its folder,
from its newest checkpoint, with the config recorded there, and ends with the numbers an uninterrupted
run of that config gives (exactly, on CPU in one process).

Every checkpoint is written atomically (`AtomicCheckpointIO`). `checkpoints/last.ckpt` is the resume
point: Lightning rewrites it every `checkpoint_every_n_steps` training steps and after each validation,
always between two batches. `interrupted.ckpt` (Ctrl-C) is not one: the interrupt may land inside a
step. An exact continuation needs, besides what Lightning restores from a checkpoint (weights,
optimizer, loop counters, and the training loader's place in the epoch, see `ResumableLoader`), what
`ResumeState` adds to it: each process's torch RNG states and running epoch sums.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from ae_lab.config import ConfigError
from ae_lab.tracking import atomic_write, flatten

RESUME_POINT = Path("checkpoints") / "last.ckpt"
# what a resume may set besides `resume`: how a run shows progress and checkpoints, never its numbers
RESUME_MAY_SET = ("checkpoint_every_n_steps", "trainer.enable_progress_bar", "trainer.enable_model_summary")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, writing each file through `atomic_write`: a run killed while writing a
    checkpoint keeps the previous one intact. (Lightning's own write goes through a temporary file in
    the system's temporary folder, which is moved into place by a copy when that folder is on another
    file system.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda file: torch.save(checkpoint, file))


class StepCheckpoint(pl.callbacks.ModelCheckpoint):
    """Rewrites `last.ckpt` every `every_n_steps` training steps, except after the batch that ends an
    epoch or that a validation follows: Lightning 2.6 resumes a checkpoint taken there as if the epoch's
    end and the validation had happened already, skipping them. The checkpoint written after the
    validation, a moment later, stands for those points."""

    def __init__(self, folder: Path, every_n_steps: int) -> None:
        super().__init__(dirpath=folder, every_n_train_steps=every_n_steps, save_top_k=0, save_last=True,
                         enable_version_counter=False)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loop = trainer.fit_loop.epoch_loop
        if loop.batch_progress.is_last_batch or loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def random_state() -> dict[str, torch.Tensor | None]:
    """This process's torch RNG states: the CPU generator's and the current GPU's (None without one)."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_random_state(state: dict[str, torch.Tensor | None]) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def from_every_rank(value: Any) -> list[Any]:
    """`value` of every DDP rank, in rank order (a collective call: every rank must make it)."""
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()) or distributed.get_world_size() == 1:
        return [value]
    values: list[Any] = [None] * distributed.get_world_size()
    distributed.all_gather_object(values, value)
    return values


class ResumeState(pl.Callback):
    """Adds to every checkpoint what an exact mid-epoch resume needs beyond Lightning's own state, for
    each process (DDP rank): torch's RNG states (noise, VAE sampling, the contractive estimator's
    projections and dynamic binarisation draw from them) and the running epoch's metric sums. Also the
    run's config, by which a resume recognises a checkpoint of another config.

    A resumed run sets them back when training starts: after Lightning restored everything else and
    after anything that draws random numbers only because this process is new (model initialisation).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.module: Any = None
        self.loaded: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.module = pl_module

    def state_dict(self) -> dict[str, Any]:
        # Lightning asks every rank while saving, so every rank takes part in the gathering
        mine = {"random": random_state(), "epoch_sums": self.module.epoch_sums()}
        return {"config": self.config, "ranks": from_every_rank(mine)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.loaded is None:
            return
        mine = self.loaded["ranks"][trainer.global_rank]
        pl_module.load_epoch_sums(mine["epoch_sums"])
        set_random_state(mine["random"])
        self.loaded = None


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues from: its checkpoint and position, and the run's previous record."""

    checkpoint: Path
    global_step: int
    epoch: int
    record: dict[str, Any]


def _refuse(value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"resume={str(value)!r} is not allowed: {allowed}")


def _overridden(task_overrides: list[str]) -> list[tuple[str, str]]:
    """(key, override) of each command-line override of the job's config (not Hydra's own)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    return [(override.key_or_group, text) for override, text in zip(parsed, task_overrides)
            if not override.is_hydra_override()]


def recorded_config(run_dir: Path) -> DictConfig:
    """The run's `.hydra/config.yaml` on ae_lab's schema (keys added since the run get their defaults)."""
    from ae_lab.config import Config

    return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(run_dir / ".hydra" / "config.yaml"))


def _differences(saved: dict[str, Any], recorded: dict[str, Any]) -> list[str]:
    saved, recorded = flatten(saved), flatten(recorded)
    keys = sorted((set(saved) | set(recorded)) - {"resume", *RESUME_MAY_SET})
    return [f"{key}={saved.get(key)!r} there, {recorded.get(key)!r} in the run"
            for key in keys if saved.get(key, "<absent>") != recorded.get(key, "<absent>")]


def _running_elsewhere(record: dict[str, Any]) -> bool:
    """Whether the record's process (on this host) is still alive: the run is not dead, only running."""
    if record.get("status") != "running" or record.get("host") != socket.gethostname() or not record.get("pid"):
        return False
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return int(record["pid"]) != os.getpid()


def check_resume(config: DictConfig, first_rank: bool = True) -> bool:
    """Refuse, with a ConfigError naming `resume` and what it needs, a resume that cannot continue the
    run exactly; before anything is written. Returns True when the run has completed already.

    `config` is the composed config with its `hydra` section. Ranks > 0 of a DDP run skip the checks
    of the run's state (rank 0 has made it `running` by the time they start).
    """
    from ae_lab.config import validate
    from ae_lab.data import input_shape

    value = config.resume
    run_dir = Path(str(value))
    if Path(str(config.hydra.run.dir)).resolve() != run_dir.resolve():
        raise ConfigError(f"hydra.run.dir={str(config.hydra.run.dir)!r} is not allowed with resume: "
                          "a resumed run continues in its own folder (give resume=RUN_FOLDER only)")
    expected = "a run folder holding run.json and .hydra/config.yaml"
    if not run_dir.is_dir():
        raise _refuse(value, f"{expected}; there is no folder {run_dir}")
    for needed in (Path("run.json"), Path(".hydra") / "config.yaml"):
        if not (run_dir / needed).is_file():
            hint = (" (a sweep folder? resume one job's folder, or run the sweep again with "
                    "hydra.sweep.dir)") if any(run_dir.glob("*/run.json")) else ""
            raise _refuse(value, f"{expected}; {run_dir} has no {needed}{hint}")
    changed = [text for key, text in _overridden(config.hydra.overrides.task)
               if key != "resume" and key not in RESUME_MAY_SET]
    if changed:
        raise _refuse(value, f"together with {', '.join(changed)}: a resumed run keeps its recorded config "
                             f"(what may be given with resume: {', '.join(RESUME_MAY_SET)})")
    record = json.loads((run_dir / "run.json").read_text())
    if first_rank and record.get("status") == "completed":
        return True
    if first_rank and _running_elsewhere(record):
        raise _refuse(value, f"a run that is not running; process {record['pid']} on this host is still "
                             f"running it (started {record.get('started')})")
    checkpoint = run_dir / RESUME_POINT
    if not checkpoint.is_file():
        raise _refuse(value, f"a run with a checkpoint to resume from; {run_dir} has no {RESUME_POINT} "
                             "(it stopped before its first checkpoint): start it again")
    recorded = recorded_config(run_dir)
    validate(recorded, input_shape(recorded.dataset))
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is refused the same way
        raise _refuse(value, f"a run whose checkpoint can be read; {checkpoint} cannot: {error}") from None
    state = saved.get("callbacks", {}).get(ResumeState.__qualname__) if isinstance(saved, dict) else None
    if not state:
        raise _refuse(value, f"a run with an ae_lab checkpoint; {checkpoint} was not written by ae_lab")
    differing = _differences(state["config"], OmegaConf.to_container(recorded, resolve=True, enum_to_str=True))
    if differing:
        shown = "; ".join(differing[:5]) + (f"; and {len(differing) - 5} more" if len(differing) > 5 else "")
        raise _refuse(value, f"a checkpoint of the run's own config; {checkpoint} is from another config: {shown}")
    return False


def resume_point(config: DictConfig, task_overrides: list[str]) -> tuple[DictConfig, ResumePoint]:
    """The config a resumed run trains (the recorded one, with the settings of RESUME_MAY_SET given on
    the command line) and where it resumes from. `check_resume` has passed."""
    run_dir = Path(str(config.resume))
    recorded = recorded_config(run_dir)
    for key, _ in _overridden(task_overrides):
        if key in RESUME_MAY_SET:
            OmegaConf.update(recorded, key, OmegaConf.select(config, key))
    checkpoint = run_dir / RESUME_POINT
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    record = json.loads((run_dir / "run.json").read_text())
    return recorded, ResumePoint(checkpoint, saved["global_step"], saved["epoch"], record)
