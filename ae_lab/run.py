"""One run through the Lightning Trainer (a single run, DDP): check config -> data -> lifecycle start ->
seed -> module -> trainer -> fit -> test -> evaluate -> write results -> lifecycle end. The run's files
and states belong to its `ae_lab.lifecycle.RunLifecycle`; this engine trains and hands back `Results`.

Results go into the run folder: `run.json` (record), `metrics.json` (final train/val/test loss terms
and the `eval/*` metrics, flat `split/name` keys), `evaluation.json` (per-unit vectors), with a held-out
class `scores.npz` (every test example's anomaly scores, label and `is_anomaly`),
`checkpoints/` (`last.ckpt`, the resume point, and `best.ckpt` by val/loss), `figures/`, and for a
user's data set `scaling.json` (`dataset.normalize`'s statistics, fitted on the training split). A resumed
run (ae_lab/resume.py) goes on in the same folder.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ae_lab.checkpoints import AtomicCheckpointIO, ResumeState, StepCheckpoint
from ae_lab.checks import schedule_warnings, validate
from ae_lab.errors import ConfigError
from ae_lab.data import build_datamodule, input_shape
from ae_lab.distributed import HydraJobDDPStrategy, isolated_job, launched_rank, resolve_strategy
from ae_lab.greedy import PhaseCheckpoints
from ae_lab.history import HistoryLogger, HistoryRecorder
from ae_lab.job import JobContext
from ae_lab.module import Autoencoder
from ae_lab.preemption import RequeueOnSignal, cluster_plugins
from ae_lab.resume import ResumePoint
from ae_lab.lifecycle import NO_VALIDATION, Results, RunLifecycle, resumed_from, write_results
from ae_lab.tracking import completed_metrics

log = logging.getLogger(__name__)
# Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates, once per loop: noise, not news.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
# a resumed run (or a sweep job run again) finds its checkpoints folder filled, as it should
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")

def train(cfg: DictConfig, job: JobContext | Path, resume: ResumePoint | None = None) -> dict[str, float]:
    """Train and evaluate one configuration into the job's folder; return the final metrics. `job`: the
    job Hydra runs (`JobContext`), or a run folder alone (a run started from Python).

    Raises ConfigError before anything is written when the config is bad. A folder that already holds
    a completed run of this same config (a resumed sweep) is not trained again: its metrics are
    returned. With `resume`, the run in `run_dir` goes on from that checkpoint (its config files stay
    as they are; its W&B run goes on). Under DDP every rank calls this; only rank 0 writes files.
    """
    if not isinstance(job, JobContext):
        job = JobContext.outside_hydra(job)
    run_dir = job.run_dir
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
    with isolated_job():
        # a resumed run keeps its config files, and the sweep identity and W&B run it started with
        life = RunLifecycle(job, cfg, data, writes=rank_zero, config_files=resume is None,
                            resumed=resumed_from(resume.checkpoint, resume.global_step, resume.epoch) if resume else None,
                            sweep=resume.record.get("sweep") if resume else job.sweep_identity)
        earlier_wandb_run = resume.record.get("wandb_run_id") if resume else None
        if earlier_wandb_run:  # kept should this attempt not train
            life.update(wandb_run_id=earlier_wandb_run)
        if data.scaling is not None:  # dataset.normalize as fitted on the training split
            life.write_json("scaling.json", data.scaling.record())
        interrupt = CheckpointOnInterrupt(run_dir / "checkpoints" / "interrupted.ckpt")
        try:
            life.open_logger(run_id=earlier_wandb_run, resumed_at_step=resume.global_step if resume else None)
            results = _fit_and_test(cfg, life, [interrupt, RecordWandbRun(life)], resume)
            life.completed(results)
            return results.metrics
        except BaseException as error:
            if life.ended_by(error, interrupt.checkpoint, interrupted=interrupt.interrupted) == "interrupted":
                saved = f", checkpoint: {interrupt.checkpoint}" if interrupt.checkpoint else ""
                raise RunInterrupted(f"interrupted; run folder: {run_dir}{saved}") from error
            raise  # failed, or requeued: checkpointed, to be requeued by the caller
        finally:
            life.close()


class RecordWandbRun(pl.Callback):
    """Starts the run's W&B run when training starts (a job refused before has none), in the background,
    and records its id in run.json at once (`RunLifecycle.wandb_started`); the start has ended before the
    run's first checkpoint (`RunLifecycle.wandb_ready`)."""

    def __init__(self, life: RunLifecycle) -> None:
        self.life = life

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.life.wandb_started()

    def on_save_checkpoint(self, trainer: pl.Trainer, module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.life.wandb_ready()


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


def _fit_and_test(cfg: DictConfig, life: RunLifecycle, extra_callbacks: list[pl.Callback],
                  resume: ResumePoint | None = None) -> Results:
    """Fit (from `resume`'s checkpoint when given), then evaluate val and test with the best
    checkpoint and write the results (rank 0); return them.

    `checkpoints/last.ckpt`, the resume point, is rewritten after each validation and every
    `checkpoint_every_n_steps` steps; every checkpoint is written atomically. What fit logs goes into
    the run's history (and from there into W&B) and, with `logger=csv`, into csv/metrics.csv; the
    evaluations of the best checkpoint after fit are not logged as points of the history.
    """
    run_dir, data, logger, history = life.run_dir, life.data, life.logger, life.history
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
    trainer_args["strategy"] = resolve_strategy(trainer_args["strategy"], life.job)
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
        log.warning(NO_VALIDATION)
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
    return Results(metrics, figures, best_checkpoint, timer.timings())


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
