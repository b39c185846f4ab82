"""What a checkpoint holds and how it is written, so that a killed run can be resumed exactly.

Every checkpoint is written atomically (`AtomicCheckpointIO`). `checkpoints/last.ckpt` is the resume
point: rewritten every `checkpoint_every_n_steps` training steps (`StepCheckpoint`) and after each
validation, always between two batches. Besides what Lightning saves and restores (weights, optimizer,
loop counters, and the training loader's place in the epoch, see `ae_lab.data.base.ResumableLoader`),
an exact continuation needs what `ResumeState` adds: each process's torch RNG states and running
epoch sums. `interrupted.ckpt` (Ctrl-C) is not a resume point: the interrupt may land inside a step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from ae_lab.storage import atomic_torch_save


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
        atomic_torch_save(path, checkpoint)


class StepCheckpoint(pl.callbacks.ModelCheckpoint):
    """Rewrites `last.ckpt` every `every_n_steps` training steps, except after the batch that ends an
    epoch or that a validation follows: Lightning 2.6 resumes a checkpoint taken there as if the epoch's
    end and the validation had happened already, skipping them. The checkpoint written after the
    validation, a moment later, stands for those points."""

    def __init__(self, folder: Path, every_n_steps: int) -> None:
        super().__init__(dirpath=folder, every_n_train_steps=every_n_steps, save_top_k=0, save_last=True,
                         enable_version_counter=False)
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # at a step ModelCheckpoint would save at, skip it where it would not resume exactly
        if trainer.global_step % self.every_n_steps == 0 and not resumable_batch_end(trainer):
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def resumable_batch_end(trainer: pl.Trainer) -> bool:
    """Whether a checkpoint taken at the end of the current training batch resumes exactly: not after the
    batch that ends an epoch or that a validation follows (see StepCheckpoint). A collective call under
    DDP: rank 0 decides, as a time-based validation interval may differ across ranks."""
    loop = trainer.fit_loop.epoch_loop
    # Lightning's own test of "a validation follows this batch" (private API of Lightning 2.6)
    ends = loop.batch_progress.is_last_batch or loop._should_check_val_fx(trainer.fit_loop._data_fetcher)
    return not trainer.strategy.broadcast(ends)


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
