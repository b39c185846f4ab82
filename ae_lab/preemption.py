"""Preemption and time limits on a SLURM cluster: checkpoint at the next exact point, requeue, go on.

One mechanism handles it: submitit's. A sweep job launched by `hydra/launcher=slurm` runs inside
submitit, which asks SLURM for a signal before the job's time limit (`--signal=USR2@signal_delay_s`;
`SUBMITIT_PREEMPT_SIGNAL` names another) and installs a handler for it that requeues the job
(`scontrol requeue`) after pickling the job for its next start. Called as the signal arrives, that
handler would stop training in the middle of a step; so while a run fits, `RequeueOnSignal` takes the
signal over: it only notes it, and at the end of the next training batch from which a resume is exact
(ae_lab.checkpoints.resumable_batch_end) `checkpoints/last.ckpt` is written (every DDP rank adds its
state) and the run stops with `Requeued`. The run records itself as `requeued`, finishes its W&B run, and only then calls
submitit's handler, which requeues the job and ends the process. The requeued job finds its folder
holding that unfinished run and goes on from the checkpoint (ae_lab.resume.unfinished_run), with the
same W&B run id. Lightning's own SLURM auto-requeue (a checkpoint written inside its SIGUSR1 handler,
wherever training happens to be) is switched off (`cluster_plugins`), so no two handlers compete.
"""

from __future__ import annotations

import logging
import os
import signal
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Iterator

import pytorch_lightning as pl

from ae_lab.checkpoints import resumable_batch_end

log = logging.getLogger(__name__)


def preempt_signal() -> signal.Signals:
    """The signal SLURM sends before a time limit or a preemption, as submitit asks for it."""
    return signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]


def cluster_plugins() -> list[Any]:
    """Trainer plugins for the cluster the process runs on: under SLURM (tasks started by srun), its
    environment with Lightning's auto-requeue off (RequeueOnSignal handles the signal)."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    in_slurm_job = "SLURM_JOB_ID" in os.environ  # (detect() warns wherever srun is installed but not used)
    return [SLURMEnvironment(auto_requeue=False)] if in_slurm_job and SLURMEnvironment.detect() else []


class Requeued(Exception):
    """The cluster's signal came and the run checkpointed and stopped; `requeue()` requeues the job.
    `continued_by`: what goes on from the checkpoint should the job not be requeued (None: the run's
    `resume=<run folder>`; an ensemble group: its sweep's command)."""

    def __init__(self, checkpoint: Path, requeue_handler: Callable[[int, FrameType | None], Any],
                 continued_by: str | None = None) -> None:
        super().__init__(f"stopped by the cluster's {preempt_signal().name} after writing {checkpoint}: requeued")
        self.checkpoint = checkpoint
        self.continued_by = continued_by
        self._requeue_handler = requeue_handler
        self.if_not_requeued: list[Callable[[str], None]] = []  # each told submitit's reason (the runs' records)

    def requeue(self) -> None:
        """Hand over to submitit's handler: it pickles the job for its next start, requeues it and exits.
        On ranks > 0 it does nothing (rank 0 requeues the whole job), so this process ends here. When it
        does not requeue (it raises: e.g. "timed-out too many times", `max_num_timeout` used up), the
        runs are told the reason (`if_not_requeued`) and submitit's error goes on, so the job ends."""
        try:
            self._requeue_handler(preempt_signal(), None)
        except Exception as refusal:  # submitit's UncompletedJobError
            for tell in self.if_not_requeued:
                tell(str(refusal))
            raise
        raise SystemExit(1)


class ClusterSignal:
    """submitit's handler of the cluster's signal, taken over while training runs (`taken_over`): the
    signal is only noted (`signalled`), and the training loop, at its next point from which a resume is
    exact, checkpoints and raises `stop(checkpoint)`, which hands over to submitit's handler. Outside a
    submitit job (no such handler) it takes nothing over and is never signalled."""

    def __init__(self, continued_by: str | None = None) -> None:
        self.continued_by = continued_by
        self.signalled = False
        self._requeue_handler: Callable[[int, FrameType | None], Any] | None = None

    def take_over(self) -> bool:
        """Note the signal instead of submitit's handler; False (nothing done) outside a submitit job."""
        handler = signal.getsignal(preempt_signal())
        if callable(handler) and "submitit" in getattr(handler, "__module__", ""):
            self._requeue_handler = handler
            signal.signal(preempt_signal(), self._note)
        return self._requeue_handler is not None

    def give_back(self) -> None:
        if self._requeue_handler is not None:
            signal.signal(preempt_signal(), self._requeue_handler)
            self._requeue_handler = None

    @contextmanager
    def taken_over(self) -> Iterator["ClusterSignal"]:
        self.take_over()
        try:
            yield self
        finally:
            self.give_back()

    def _note(self, signum: int, frame: FrameType | None) -> None:
        log.warning("received %s: checkpointing at the next exact point, then requeueing", signal.Signals(signum).name)
        self.signalled = True

    def stop(self, checkpoint: Path) -> Requeued:
        """The stop to raise once `checkpoint` is written after the signal."""
        assert self._requeue_handler is not None, "signalled without submitit's handler taken over"
        return Requeued(checkpoint, self._requeue_handler, self.continued_by)


class RequeueOnSignal(pl.Callback):
    """While fitting inside a submitit job, turn the cluster's signal into a checkpoint at the next batch
    end that resumes exactly, and a `Requeued` stop. Outside submitit (no handler to hand over to), it
    does nothing."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self.cluster_signal = ClusterSignal()
        self.active = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.active = self.cluster_signal.take_over()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.active:
            return
        # every rank gets the signal, each at its own moment: rank 0's view decides for all
        if trainer.strategy.broadcast(self.cluster_signal.signalled) and resumable_batch_end(trainer):
            trainer.save_checkpoint(self.checkpoint)  # every rank takes part; rank 0 writes
            raise self.cluster_signal.stop(self.checkpoint)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.cluster_signal.give_back()
        self.active = False
