"""Hydra callbacks: what runs around every run and sweep, before any job trains."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ae_lab.checks import validate
from ae_lab.errors import ConfigError, fail


class CheckBeforeRun(Callback):
    """Refuse a bad config, a run folder that already holds a run, or one that cannot be written, or a
    resume that cannot continue its run, before anything is written; summarise a sweep when it ends."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from ae_lab.distributed import launched_rank, queued_sweep_job

        run_dir = Path(str(config.hydra.run.dir))
        first_rank = launched_rank() == 0  # DDP ranks > 0 join rank 0's run and write nothing
        if config.resume is not None:
            self._check_resume(config, first_rank)  # checks the run's recorded config
        else:
            if first_rank and (run_dir / "run.json").exists() and not queued_sweep_job():
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
        # a sweeper may keep its state in the sweep folder before the first job makes it (Optuna's study
        # storage); the folder is made only then, so that a sweep its launcher refuses leaves nothing
        if OmegaConf.select(config, "hydra.sweeper.storage"):
            Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        from ae_lab.sweep import IDENTITY_VARIABLE, sweep_identity

        # the jobs' W&B group and swept keys; in the environment, so that jobs in processes of their own
        # (gpu_queue, SLURM) know them too
        os.environ[IDENTITY_VARIABLE] = json.dumps(sweep_identity(config))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ae_lab.sweep import summarize

        jobs = summarize(Path(str(config.hydra.sweep.dir)))
        failed = [job for job in jobs if job.status != "completed"]
        if failed:
            fail(f"{len(failed)} of {len(jobs)} jobs did not complete: see the summary above", exit_code=1)
