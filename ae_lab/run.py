"""One run: check config -> seed -> data -> module -> trainer -> fit -> test -> evaluate -> write results.

Results go into the run folder: `run.json` (record), `metrics.json` (final train/val/test loss terms
and the `eval/*` metrics, flat `split/name` keys), `evaluation.json` (per-unit vectors), with a held-out
class `scores.npz` (every test example's anomaly scores, label and `is_anomaly`),
`checkpoints/` (`last.ckpt`, the resume point, and `best.ckpt` by val/loss), `figures/`, and for a
user's data set `scaling.json` (`dataset.normalize`'s statistics, fitted on the training split). A resumed
run (ae_lab/resume.py) goes on in the same folder.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ae_lab.checkpoints import AtomicCheckpointIO, ResumeState, StepCheckpoint
from ae_lab.checks import schedule_warnings, validate
from ae_lab.errors import ConfigError
from ae_lab.data import ArrayDataModule, build_datamodule, input_shape
from ae_lab.distributed import HydraJobDDPStrategy, isolated_job, launched_rank, resolve_strategy
from ae_lab.greedy import PhaseCheckpoints
from ae_lab.history import History, HistoryLogger, HistoryRecorder
from ae_lab.module import Autoencoder
from ae_lab.preemption import Requeued, RequeueOnSignal, cluster_plugins
from ae_lab.resume import ResumePoint
from ae_lab.storage import atomic_write, write_json
from ae_lab.tracking import (RunRecord, build_logger, completed_metrics, finish_logger, history_sink, is_wandb,
                             job_sweep_identity, log_results, write_config_files)

log = logging.getLogger(__name__)
# Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates, once per loop: noise, not news.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
# a resumed run (or a sweep job run again) finds its checkpoints folder filled, as it should
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")

def train(cfg: DictConfig, run_dir: Path, resume: ResumePoint | None = None) -> dict[str, float]:
    """Train and evaluate one configuration into `run_dir`; return the final metrics.

    Raises ConfigError before anything is written when the config is bad. A folder that already holds
    a completed run of this same config (a resumed sweep) is not trained again: its metrics are
    returned. With `resume`, the run in `run_dir` goes on from that checkpoint (its config files stay
    as they are; its W&B run goes on). Under DDP every rank calls this; only rank 0 writes files.
    """
    for warning in validate(cfg, input_shape(cfg.dataset)):
        log.warning(warning)
    rank_zero = launched_rank() == 0
    if resume is None:  # every rank: those of a DDP job on a cluster start together and all return here
        finished = completed_metrics(run_dir, cfg)
        if finished is not None:
            log.info("%s already holds a completed run of this config: not run again", run_dir)
            return finished
    data = build_datamodule(cfg.dataset)
    for warning in schedule_warnings(cfg, len(data.splits["train"])):
        log.warning(warning)
    if rank_zero and resume is not None and resume.record.get("data", {}).get("sha256") != data.checksum:
        raise ConfigError(f"resume={str(run_dir)!r} is not allowed: the data set {data.name} has changed since "
                          "the run started (its checksum differs from the one in run.json)")
    sweep = job_sweep_identity(run_dir, resume.record if resume else None)
    with isolated_job():
        record = None
        if rank_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
            if resume is None:
                write_config_files(run_dir, cfg)
            resumed_from = None if resume is None else {
                "checkpoint": str(resume.checkpoint.resolve()), "global_step": resume.global_step,
                "epoch": resume.epoch}
            record = RunRecord(run_dir, cfg, data.name, data.checksum, resumed_from=resumed_from, sweep=sweep)
            if resume is not None and resume.record.get("wandb_run_id"):  # kept should this attempt not train
                record.update(wandb_run_id=resume.record["wandb_run_id"])
            if data.scaling is not None:  # dataset.normalize as fitted on the training split
                write_json(run_dir / "scaling.json", data.scaling.record())
        logger = None
        interrupt = CheckpointOnInterrupt(run_dir / "checkpoints" / "interrupted.ckpt")
        try:
            logger = build_logger(cfg, run_dir, math.prod(data.input_shape),
                                  run_id=resume.record.get("wandb_run_id") if resume else None,
                                  resumed_at_step=resume.global_step if resume else None, sweep=sweep)
            history = History(sink=history_sink(logger, run_dir) if rank_zero else None)
            started = RecordWandbRun(record, logger)
            metrics, best_checkpoint, figures, timings = _fit_and_test(cfg, run_dir, data, logger, history,
                                                                       [interrupt, started], resume)
            if record is not None:
                wandb_run = log_results(logger, cfg, run_dir, metrics, figures, history.sink)
                record.completed(best_checkpoint=best_checkpoint, wandb_run_id=wandb_run, timings=timings)
            return metrics
        except Requeued as stop:  # the cluster's signal: checkpointed, to be requeued by the caller
            if record is not None:
                record.requeued(stop)
            raise
        except BaseException as error:
            if not interrupt.interrupted and not isinstance(error, KeyboardInterrupt):
                if record is not None:
                    record.failed(error)
                raise
            if record is not None:
                record.interrupted(interrupt.checkpoint)
            saved = f", checkpoint: {interrupt.checkpoint}" if interrupt.checkpoint else ""
            raise RunInterrupted(f"interrupted; run folder: {run_dir}{saved}") from error
        finally:
            finish_logger(logger)


class RecordWandbRun(pl.Callback):
    """Starts the run's W&B run when training starts (a job refused before has none), in the background
    (ae_lab/wandb_logger.py: the first steps do not wait for it), and records its id in run.json at once,
    so that a resumed run goes on with it (`record`: rank 0's, None elsewhere). The start has ended before
    the run's first checkpoint: every attempt that a resume goes on from holds its part of the W&B run."""

    def __init__(self, record: RunRecord | None, logger: Any) -> None:
        self.record, self.logger = record, logger

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.record is not None:
            self.record.update(wandb_run_id=self.logger.start() if is_wandb(self.logger) else None)

    def on_save_checkpoint(self, trainer: pl.Trainer, module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.record is not None and is_wandb(self.logger):
            self.logger.wait()


class RunInterrupted(Exception):
    """The user stopped the run (Ctrl-C); it was recorded as interrupted."""


class CheckpointOnInterrupt(pl.Callback):
    """On Ctrl-C during fit, save a checkpoint before Lightning shuts down (Lightning then exits)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.interrupted = False
        self.checkpoint: Path | None = None

    def on_exception(self, trainer: pl.Trainer, module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt):
            return
        self.interrupted = True
        if trainer.state.fn == "fit" and trainer.global_step > 0:
            trainer.save_checkpoint(self.path)  # rank 0 writes it
            self.checkpoint = self.path


def _fit_and_test(cfg: DictConfig, run_dir: Path, data: ArrayDataModule, logger: Any, history: History,
                  extra_callbacks: list[pl.Callback], resume: ResumePoint | None = None
                  ) -> tuple[dict[str, float], str | None, dict[str, Path], dict[str, float | None]]:
    """Fit (from `resume`'s checkpoint when given), then evaluate val and test with the best
    checkpoint; return the metrics, that checkpoint, the figures drawn and the fit's timings.

    `checkpoints/last.ckpt`, the resume point, is rewritten after each validation and every
    `checkpoint_every_n_steps` steps; every checkpoint is written atomically. What fit logs goes into
    `history` (and from there into W&B) and, with `logger=csv`, into csv/metrics.csv; the evaluations
    of the best checkpoint after fit are not logged as points of the history.
    """
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    module = Autoencoder.from_config(plain, data.input_shape, dataset_size=len(data.splits["train"]))
    timer = StepTimer()
    folder = run_dir / "checkpoints"
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=folder, filename="best", monitor="val/loss", mode="min",
        save_top_k=1, save_last=True, enable_version_counter=False)
    callbacks = [checkpoints, timer, *extra_callbacks, ResumeState(plain), RequeueOnSignal(folder / "last.ckpt"),
                 HistoryRecorder(history, cfg.trainer.log_every_n_steps)]
    if cfg.trainer.enable_model_summary and not cfg.verbose:  # its table into ae_lab.log, not on the console
        callbacks.append(pl.callbacks.ModelSummary())
    if cfg.checkpoint_every_n_steps:
        callbacks.append(StepCheckpoint(folder, cfg.checkpoint_every_n_steps))
    if cfg.model.pretrain == "greedy":
        callbacks.append(PhaseCheckpoints(folder, module.model_cfg))
    trainer_args = OmegaConf.to_container(cfg.trainer)
    trainer_args["strategy"] = resolve_strategy(trainer_args["strategy"])
    loggers = [HistoryLogger(history, run_dir), *([logger] if type(logger).__name__ == "CSVLogger" else [])]
    trainer = pl.Trainer(**trainer_args, logger=loggers, callbacks=callbacks,
                         plugins=[AtomicCheckpointIO(), *cluster_plugins()], default_root_dir=str(run_dir),
                         use_distributed_sampler=False,  # the data module shards (see ArrayDataModule)
                         inference_mode=False)  # the contractive term needs grads in evaluation
    trainer.fit(module, datamodule=data, ckpt_path=resume.checkpoint if resume else None, weights_only=True)
    trainer.loggers = []  # the best checkpoint's evaluations below are results, not points of the history
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()
               if key.startswith("train/")}
    # val and test both with the best weights, so the two splits describe the same model; when no
    # validation ran (max_steps ended training within the first epoch), with the final weights
    if not checkpoints.best_model_path:
        log.warning("no validation ran before training stopped: val, test and evaluation use the final weights")
    best = {"datamodule": data, "ckpt_path": checkpoints.best_model_path or None, "verbose": False,
            "weights_only": True}
    for results in (trainer.validate(module, **best), trainer.test(module, **best)):
        metrics.update({key: float(value) for key, value in results[0].items()})
    metrics["epochs"] = trainer.current_epoch
    best_checkpoint = Path(checkpoints.best_model_path) if checkpoints.best_model_path else None
    figures = (write_results(module, data, cfg, run_dir, metrics, history, best_checkpoint)
               if trainer.is_global_zero else {})
    if isinstance(trainer.strategy, HydraJobDDPStrategy):
        trainer.strategy.wait_for_children()
    return metrics, checkpoints.best_model_path or None, figures, timer.timings()


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


class StepTimer(pl.Callback):
    """When the first training step started (Unix time) and how long `fit` took, for run.json."""

    def __init__(self) -> None:
        self.first_step: float | None = None
        self.fit_start = self.fit_end = 0.0

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.fit_start = time.time()

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.first_step is None:
            self.first_step = time.time()

    def on_fit_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.fit_end = time.time()

    def timings(self) -> dict[str, float | None]:
        return {"first_step_unix": self.first_step, "fit_seconds": self.fit_end - self.fit_start}
