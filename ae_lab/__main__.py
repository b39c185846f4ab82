"""`python -m ae_lab [overrides]`: train one configuration (or a sweep with `-m`)."""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ae_lab.config import register_configs
from ae_lab.errors import ConfigError, fail

register_configs()
log = logging.getLogger("ae_lab")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Train one run. In a sweep a failing job is recorded (run.json, the sweep's summary) and the
    sweep goes on; alone, a bad config ends the process with one line and exit code 2."""
    from ae_lab.distributed import launched_rank, log_to_console_only, queued_sweep_job
    from ae_lab.job import JobContext
    from ae_lab.preemption import Requeued
    from ae_lab.report import print_config_summary, print_summary
    from ae_lab.resume import recorded_job, unfinished_run
    from ae_lab.run import RunInterrupted, train
    from ae_lab.tracking import record_refused

    hydra_config = HydraConfig.get()
    job = JobContext.current()  # what identifies this job, handed to everything below
    run_dir = job.run_dir
    in_sweep = hydra_config.mode == RunMode.MULTIRUN
    logging.captureWarnings(True)  # libraries' warnings into ae_lab.log; on the console with verbose=true
    first_rank = launched_rank() == 0
    if first_rank:  # DDP's other ranks join rank 0's run
        choices, overrides = dict(job.choices), list(job.overrides)
        recorded = recorded_job(Path(cfg.resume)) if cfg.resume is not None else None
        if recorded is not None:  # a resumed run trains its recorded config: show that one
            choices, overrides = recorded[0], [*recorded[1], *overrides]
        print_config_summary(choices, overrides, run_dir)
    else:
        log_to_console_only()
    try:
        if cfg.resume is not None:  # CheckBeforeRun has checked that the run can be resumed
            from ae_lab.resume import resume_point

            cfg, resume = resume_point(cfg, list(job.overrides))
            metrics = train(cfg, job, resume)
        elif in_sweep or not first_rank or queued_sweep_job():  # a requeued job, or a sweep run again, goes
            # on from an unfinished job's checkpoint; every rank of a DDP job decides alike (local DDP ranks > 0
            # run as single runs, and so do gpu_queue's jobs)
            metrics = train(cfg, job, unfinished_run(cfg, run_dir, first_rank))
        else:
            metrics = train(cfg, job)
    except ConfigError as error:
        if not in_sweep:
            if cfg.resume is None and first_rank:
                _remove_unstarted(run_dir)
            fail(str(error))
        record_refused(job, cfg, error)
        log.error("job refused: %s", error)
        return math.nan
    except Requeued as stop:  # recorded; submitit requeues the job, which goes on from the checkpoint
        log.warning("%s", stop)
        stop.requeue()
    except RunInterrupted as error:  # recorded; a sweep stops here, with its summary
        if in_sweep:
            from ae_lab.sweep import summarize

            summarize(Path(hydra_config.sweep.dir))
        fail(str(error), exit_code=130)
    except FloatingPointError as error:  # recorded in run.json; the last good checkpoint is kept
        if not in_sweep:
            fail(f"run failed: {error} (run folder: {run_dir})", exit_code=1)
        log.error("job failed: %s", error)
        return math.nan
    except Exception as error:  # noqa: BLE001 - the job's run.json holds it; the sweep goes on
        if not in_sweep:
            raise
        log.exception("job failed: %s", error)
        return math.nan
    if first_rank:  # rank 0 owns the run's files, its W&B run and its report
        print_summary(run_dir, metrics)
    return metrics.get(cfg.objective, math.nan)


def _remove_unstarted(run_dir: Path) -> None:
    """Take back the folder of a run refused before it started (e.g. a missing or corrupt data file, found
    when the data are read): it holds only the log Hydra opened. Anything else in it is left alone."""
    if (run_dir / "run.json").exists():
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir.resolve():
            root.removeHandler(handler)
            handler.close()
    log_file = run_dir / "ae_lab.log"
    if log_file.exists() and [path.name for path in run_dir.iterdir()] == [log_file.name]:
        log_file.unlink()
        run_dir.rmdir()


def cli() -> None:
    """`python -m ae_lab`: Hydra's entry, with a composition error of the command line (an unknown option,
    key, or a value of the wrong type) reported as one line that points at the fix, exit code 2.

    Hydra prints such errors itself unless HYDRA_FULL_ERROR is set, in which case it raises them: it is
    set here so that they reach `explain`. A user who sets it gets Hydra's full error, as documented.
    """
    if {"--help", "-h"} & set(sys.argv[1:]):  # ae_lab's page (ae_lab/help.py), whatever else the line holds
        from ae_lab.help import page

        print(page())
        return
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import OmegaConfBaseException

    from ae_lab.composition_errors import explain

    # set by the user, not inherited from an ae_lab process that set it (a launcher's job, a DDP rank)
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1" and "AE_LAB_SET_HYDRA_FULL_ERROR" not in os.environ
    os.environ["HYDRA_FULL_ERROR"] = os.environ["AE_LAB_SET_HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (ConfigCompositionException, OmegaConfBaseException) as error:
        message = None if full_error else explain(error)
        if message is None:
            raise
        fail(message)


if __name__ == "__main__":
    cli()
