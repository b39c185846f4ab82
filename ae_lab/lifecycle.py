"""One run's life, whichever engine trains it: the Lightning Trainer (ae_lab/run.py: a single run, DDP) or
the vectorised ensemble (ae_lab/ensemble/group.py: each member).

`RunLifecycle` owns the run's files and states: its config files (`.hydra/`), `run.json` (running, then
completed, failed, interrupted or requeued: `ended_by` is the one place an exception becomes a state),
its logger (built, finished) with the run's `History` (the learning curves, and the sink that logs them
into W&B), and the results recorded (`completed`). The engines train and hand back `Results`; both write
a run's evaluation, metrics and figures with `write_results`.

Under DDP only rank 0 writes (`writes=False` on the other ranks: every file and record method then does
nothing, while the logger is still built, as Lightning wants it on every rank).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from ae_lab.data import ArrayDataModule
from ae_lab.history import History
from ae_lab.job import JobContext
from ae_lab.module import Autoencoder
from ae_lab.preemption import Requeued
from ae_lab.storage import atomic_write, write_json
from ae_lab.tracking import (RunRecord, build_logger, finish_logger, history_sink, is_wandb, log_results,
                             replay_sink, wandb_run_id, write_config_files)

# what both engines warn when training stopped (trainer.max_steps) before the first validation: there is
# then no best checkpoint, and val/*, test/* and the evaluation are of the final weights
NO_VALIDATION = "no validation ran before training stopped: val, test and evaluation use the final weights"


@dataclass
class Results:
    """What an engine hands back when it has trained and written a run's results (`write_results`):
    the final metrics (flat `split/name` keys and `epochs`), the figures drawn, the best checkpoint
    (None when no validation made one) and the fit's timings (`fit_seconds`, `first_step_unix`, ...)."""

    metrics: dict[str, float]
    figures: dict[str, Path]
    best_checkpoint: Path | None
    timings: dict[str, float | None]


def resumed_from(checkpoint: Path, global_step: int, epoch: int) -> dict[str, Any]:
    """run.json's `resumed_from`: the checkpoint a run went on from (a run's own, or its ensemble's
    group checkpoint), at which global step and epoch."""
    return {"checkpoint": str(checkpoint.resolve()), "global_step": global_step, "epoch": epoch}


class RunLifecycle:
    """One run's files and states, from its start (config files, run.json `running`) to its end.

    `job` names the run and its folder; `data` is the data set it trains on (its name and checksum go
    into run.json); `resumed`: `resumed_from(...)` when the run goes on from a checkpoint; `sweep`: the
    sweep's identity (`JobContext.sweep_identity`, or for a resumed run the one its record kept);
    `config_files`: False when the folder's `.hydra/` is kept (a resumed run's). `record` is None when
    the lifecycle does not write (`writes=False`).
    """

    def __init__(self, job: JobContext, cfg: DictConfig, data: ArrayDataModule, *, writes: bool = True,
                 resumed: dict[str, Any] | None = None, sweep: dict[str, Any] | None = None,
                 config_files: bool = True) -> None:
        self.job, self.cfg, self.data, self.sweep = job, cfg, data, sweep
        self.logger: Any = None
        self.history = History()
        self.record: RunRecord | None = None
        if not writes:
            return
        job.run_dir.mkdir(parents=True, exist_ok=True)
        if config_files:
            write_config_files(job, cfg)
        self.record = RunRecord(job.run_dir, cfg, data.name, data.checksum, resumed_from=resumed, sweep=sweep)

    @property
    def run_dir(self) -> Path:
        return self.job.run_dir

    def update(self, **fields: Any) -> None:
        """Add `fields` to run.json."""
        if self.record is not None:
            self.record.update(**fields)

    def write_json(self, name: str, payload: dict[str, Any]) -> None:
        """A JSON file of the run's own (e.g. `scaling.json`) into its folder."""
        if self.record is not None:
            write_json(self.run_dir / name, payload)

    def open_logger(self, run_id: str | None = None, resumed_at_step: int | None = None,
                    trained_rows: list[dict[str, float]] | None = None) -> Any:
        """Build the run's logger (`ae_lab.tracking.build_logger`; `run_id`: the W&B run to go on with) and
        the history that logs into it.

        `trained_rows`: the history of a run that no Trainer logged while it trained (an ensemble member):
        its W&B run starts now (its id into run.json), and the rows are logged into it (those it holds
        already are not logged again).
        """
        self.logger = build_logger(self.cfg, self.job, math.prod(self.data.input_shape), run_id=run_id,
                                   resumed_at_step=resumed_at_step, sweep=self.sweep)
        if trained_rows is None:
            self.history = History(sink=history_sink(self.logger, self.run_dir) if self.record is not None else None)
            return self.logger
        self.update(wandb_run_id=wandb_run_id(self.logger))
        self.history = History(trained_rows, replay_sink(self.logger, self.run_dir))
        self.history.resend()
        if self.logger:
            self.logger.save()
        return self.logger

    def wandb_started(self) -> None:
        """Start the run's W&B run in the background (ae_lab/wandb_logger.py: the first steps do not wait
        for it) and record its id in run.json at once, so that a resumed run goes on with it."""
        if self.record is None:  # a DDP rank other than 0
            return
        self.update(wandb_run_id=self.logger.start() if is_wandb(self.logger) else None)

    def wandb_ready(self) -> None:
        """Wait for the W&B run's start to end (before a checkpoint: every attempt that a resume goes on
        from holds its part of the W&B run)."""
        if self.record is not None and is_wandb(self.logger):
            self.logger.wait()

    def completed(self, results: Results) -> None:
        """The results into the run's W&B run, and run.json `completed`."""
        if self.record is None:
            return
        wandb_run = log_results(self.logger, self.cfg, self.run_dir, results.metrics, results.figures,
                                self.history.sink)
        best = str(results.best_checkpoint) if results.best_checkpoint else None
        self.record.completed(best_checkpoint=best, wandb_run_id=wandb_run, timings=results.timings)

    def failed(self, error: BaseException, **fields: Any) -> None:
        """run.json `failed` with `error` (and `fields`, e.g. a member's `failure`)."""
        if self.record is not None:
            self.record.failed(error)
            if fields:
                self.record.update(**fields)

    def ended_by(self, error: BaseException, checkpoint: Path | None = None, interrupted: bool = False) -> str:
        """Record how `error` ended the run and return that state: `requeued` (the cluster's signal,
        `ae_lab.preemption.Requeued`: checkpointed, to be requeued), `interrupted` (Ctrl-C, or `interrupted`
        when the engine saw it and raised something else, as Lightning does; `checkpoint`: what it saved)
        or `failed`."""
        if isinstance(error, Requeued):
            if self.record is not None:
                self.record.requeued(error)
            return "requeued"
        if interrupted or isinstance(error, KeyboardInterrupt):
            if self.record is not None:
                self.record.interrupted(checkpoint)
            return "interrupted"
        self.failed(error)
        return "failed"

    def close(self) -> None:
        """Finish the logger (the next job of a sweep starts a fresh W&B run)."""
        finish_logger(self.logger)

    def previous_wandb_run(self) -> str | None:
        """The W&B run id of the attempt this run resumed from, when that attempt's record holds one."""
        previous = (self.record.payload.get("resumed_from", {}).get("previous_record")
                    if self.record is not None else None)
        if previous is None:
            return None
        return json.loads((self.run_dir / previous).read_text()).get("wandb_run_id")


def write_results(module: Autoencoder, data: ArrayDataModule, cfg: DictConfig, run_dir: Path,
                  metrics: dict[str, float], history: History, checkpoint: Path | None) -> dict[str, Path]:
    """Evaluate the trained `module` (its best weights, read from `checkpoint`; None when no validation
    made a best checkpoint), add the `eval/*` metrics to `metrics`, write `evaluation.json`,
    `scores.npz` (with a held-out class), `metrics.json`, `history.csv` and the figures
    (`figures/curves.png` from the history among them); return the figures. Every way a run is made
    (a single run, an ensemble's member) ends with this."""
    from ae_lab.evaluation.evaluate import evaluate  # (scikit-learn, matplotlib: imported after training)
    from ae_lab.figures import learning_curves

    evaluation = evaluate(module, data, cfg, run_dir, checkpoint)
    metrics.update(evaluation.metrics)
    write_json(run_dir / "evaluation.json", evaluation.details)
    if evaluation.scores:  # a held-out class: every test example's anomaly scores
        atomic_write(run_dir / "scores.npz", lambda file: np.savez(file, **evaluation.scores))
    write_json(run_dir / "metrics.json", dict(sorted(metrics.items())))
    history.write(run_dir)
    figures = dict(evaluation.figures)
    if cfg.eval.figures and history.rows:
        figures["curves"] = learning_curves({run_dir.name: history.rows}, run_dir / "figures" / "curves.png",
                                            title=f"Learning curves of {run_dir.name}")
    return figures
