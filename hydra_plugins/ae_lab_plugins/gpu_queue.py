"""What the `gpu_queue` and `vectorized` launchers share, as components with public interfaces:

- `SweepJobs`: a batch of sweep jobs composed from Hydra's sweep config (`Job`: overrides, full config,
  folder, GPUs it takes), the jobs a re-run still has to run, and each job's return to the sweeper
  (completed with its metrics, or recorded failed in its folder);
- `GpuQueue`: pieces of work (anything with `devices`, the GPUs it takes) run as processes as soon as
  enough GPUs are free, each process seeing only its GPUs (CUDA_VISIBLE_DEVICES);
- `start_single_run`: a job as its own `python -m ae_lab` process in its folder, which is how both
  launchers run a job on GPUs by itself.

Hydra imports every plugin at start-up, so ae_lab itself is imported lazily here.
"""

import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Optional, Protocol, Sequence, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)
INTERRUPT_GRACE_SECONDS = 60  # after Ctrl-C, how long to wait for each running process to record its runs


@dataclass
class Job:
    """One sweep job, composed: its index in the sweep, overrides, full config (hydra node included),
    run folder and the number of GPUs it takes."""

    index: int
    overrides: list[str]
    config: DictConfig
    folder: Path
    devices: int

    @cached_property
    def task_config(self) -> DictConfig:
        """The config the task sees: `config` without its `hydra` node (made once; the copy is slow)."""
        config = OmegaConf.masked_copy(self.config, [key for key in self.config if key != "hydra"])
        OmegaConf.set_struct(config, True)
        return config


class ComposedOnce:
    """`ConfigLoader.load_sweep_config` that keeps each composition for one more call with the same
    arguments. Hydra's sweeper composes every job's config to validate the batch
    (`Sweeper.validate_batch_is_legal`), then hands the launcher only the overrides, and the launcher
    composes each again (0.2-0.5 s a job, as much as a small job's training); the two share one config
    loader, so the launcher gets the sweeper's composition instead.

    Why a patch: Hydra has no documented way to hand the sweeper's compositions to the launcher (the
    Launcher interface receives overrides only, and the sweeper keeps nothing), and not composing in
    the launcher would lose what only composition gives (the job's `hydra.job` node, its folder). The
    patch wraps one method of the loader of this process's Hydra context, nothing global, and
    depends on two things a Hydra upgrade could change: the sweeper calling `load_sweep_config` with
    the keywords `master_config` and `sweep_overrides`, and the launcher then asking for the same
    overrides. tests/test_gpu_queue.py checks both against the installed Hydra."""

    def __init__(self, load: Any) -> None:
        self.load = load
        self.kept: dict[tuple[int, tuple[str, ...]], DictConfig] = {}

    def __call__(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        key = (id(master_config), tuple(sweep_overrides))
        if key in self.kept:
            return self.kept.pop(key)
        self.kept[key] = composed = self.load(master_config=master_config, sweep_overrides=sweep_overrides)
        return composed

    @classmethod
    def install(cls, hydra_context: HydraContext) -> None:
        """Wrap the context's config loader (once)."""
        loader = hydra_context.config_loader
        if not isinstance(loader.load_sweep_config, cls):
            loader.load_sweep_config = cls(loader.load_sweep_config)


def check_queue_keys(gpus: Optional[Sequence[Any]], poll_seconds: Any) -> None:
    """Refuse a queue key that cannot work, in one line: before the sweeper makes the sweep folder, so
    that a refused sweep leaves nothing behind."""
    from ae_lab.errors import fail

    gpus = None if gpus is None else list(gpus)
    if gpus is not None and (not all(isinstance(gpu, int) and gpu >= 0 for gpu in gpus)
                             or len(set(gpus)) < len(gpus)):
        fail(f"hydra.launcher.gpus={gpus!r} is not allowed: GPU ids (integers >= 0, each once), "
             "or null for every GPU torch sees")
    if not (isinstance(poll_seconds, (int, float)) and poll_seconds > 0):
        fail(f"hydra.launcher.poll_seconds={poll_seconds!r} is not allowed: a number of seconds > 0")


def gpu_ids(gpus: Optional[Sequence[int]]) -> list[int]:
    """The GPU ids named, or (None) every GPU torch sees."""
    if gpus is not None:
        return list(gpus)
    import torch

    return list(range(torch.cuda.device_count()))


class SweepJobs:
    """A sweep's jobs, composed from the multirun `config` by the context's config loader, and their
    returns to the sweeper."""

    def __init__(self, hydra_context: HydraContext, config: DictConfig, devices_key: str = "trainer.devices") -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.devices_key = devices_key

    @property
    def sweep_dir(self) -> Path:
        return Path(str(self.config.hydra.sweep.dir))

    def compose(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Job]:
        """Every job of the batch composed (Hydra's logging set up and the sweep folder made first)."""
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        return [self._job(initial_job_idx + i, overrides) for i, overrides in enumerate(job_overrides)]

    def _job(self, index: int, overrides: Sequence[str]) -> Job:
        config = self.hydra_context.config_loader.load_sweep_config(master_config=self.config,
                                                                    sweep_overrides=list(overrides))
        with open_dict(config):
            config.hydra.job.id = index
            config.hydra.job.num = index
        HydraConfig.instance().set_config(config)
        folder = Path(str(config.hydra.sweep.dir)) / str(OmegaConf.select(config, "hydra.sweep.subdir"))
        devices = OmegaConf.select(config, self.devices_key)
        if not isinstance(devices, int) or devices < 1:
            raise ValueError(f"{self.devices_key}={devices!r}: hydra/launcher=gpu_queue needs a number "
                             "of GPUs per job (an integer >= 1)")
        return Job(index, list(overrides), config, folder, devices)

    def to_run(self, jobs: list[Job], returns: dict[int, JobReturn]) -> list[Job]:
        """The jobs still to run. A job whose folder holds a completed run of its config is returned as it
        is (into `returns`); one whose folder holds another config's completed run is recorded failed,
        and its folder kept."""
        from ae_lab.errors import ConfigError
        from ae_lab.tracking import completed_metrics

        todo = []
        for job in jobs:
            try:
                finished = completed_metrics(job.folder, job.task_config)
            except ConfigError as error:
                returns[job.index] = self.failed(job, str(error), write_record=False)
                continue
            if finished is not None:
                log.info(f"\t#{job.index} : already completed in {job.folder}")
                returns[job.index] = self.returned(job, finished)
            else:
                todo.append(job)
        return todo

    def placeable(self, jobs: list[Job], gpus: list[int], returns: dict[int, JobReturn]) -> list[Job]:
        """The jobs that fit on `gpus`; each of the others is recorded failed (into `returns`)."""
        placeable = []
        for job in jobs:
            if job.devices > len(gpus):
                returns[job.index] = self.failed(
                    job, f"{self.devices_key}={job.devices} but only {len(gpus)} GPUs are available")
            else:
                placeable.append(job)
        return placeable

    def finished(self, job: Job, returncode: int) -> JobReturn:
        """The return of a job that ran as its own process (`start_single_run`), once it has ended."""
        metrics_path = job.folder / "metrics.json"
        if returncode == 0 and metrics_path.exists():
            return self.returned(job, json.loads(metrics_path.read_text()))
        tail = (job.folder / "output.log").read_text(errors="replace").strip().splitlines()[-1:]
        return self.failed(job, f"exit code {returncode}: {' '.join(tail)}")

    def failed(self, job: Job, message: str, write_record: bool = True) -> JobReturn:
        """A failed job is recorded in its folder (like a job that fails in-process) and the sweep
        goes on; the sweep summary counts it."""
        from ae_lab.job import JobContext
        from ae_lab.tracking import record_refused

        log.error(f"\t#{job.index} failed: {message}")
        if write_record:
            job.folder.mkdir(parents=True, exist_ok=True)
            record_refused(JobContext.from_hydra(job.config.hydra, job.folder), job.task_config, RuntimeError(message))
        return self.returned(job, None)

    @staticmethod
    def returned(job: Job, metrics: dict[str, float] | None) -> JobReturn:
        """The job's return to the sweeper: its `objective` metric (NaN without metrics: it failed)."""
        value = math.nan if metrics is None else metrics.get(job.task_config.objective, math.nan)
        result = JobReturn()
        result.overrides = job.overrides
        result.cfg = job.task_config
        result.hydra_cfg = OmegaConf.create({"hydra": job.config.hydra})
        result.working_dir = str(job.folder)
        result.task_name = str(job.config.hydra.job.name)
        result.status = JobStatus.COMPLETED
        result.return_value = value
        return result

    def interrupted(self, what: str) -> NoReturn:
        """After Ctrl-C: the sweep's summary, then exit code 130 with one line saying how to go on."""
        from ae_lab.errors import fail
        from ae_lab.sweep import summarize

        summarize(self.sweep_dir)
        fail(f"interrupted; run the same sweep again (hydra.sweep.dir={self.sweep_dir}) to resume {what}",
             exit_code=130)


class Placed(Protocol):
    devices: int  # GPUs it takes


Work = TypeVar("Work", bound=Placed)  # what the queue runs: a job, or an ensemble group under `vectorized`


class GpuQueue:
    """Processes queued for `gpus`: each piece of work starts as soon as enough of them are free."""

    def __init__(self, gpus: list[int], poll_seconds: float, sweep_dir: Path, cwd: Path) -> None:
        self.gpus = gpus
        self.poll_seconds = poll_seconds
        self.sweep_dir = sweep_dir
        self.cwd = cwd

    def run(self, work: list[Work], start: Callable[[Work, list[int]], subprocess.Popen]
            ) -> Iterator[tuple[Work, subprocess.Popen]]:
        """Run each piece of `work` (each taking at most len(gpus)) as the process `start(work, its GPUs)`
        as soon as enough GPUs are free, a later, smaller piece before an earlier one that does not fit
        yet; yield each piece with its process once that has ended.

        Ctrl-C: the processes are in this process's group, so a Ctrl-C in the terminal reaches each of
        them (each records its own runs interrupted); here the loop waits for them to end (at most
        INTERRUPT_GRACE_SECONDS each), so that their records are written before the sweep's summary,
        then raises KeyboardInterrupt."""
        free, pending = list(self.gpus), list(work)
        running: list[tuple[Work, subprocess.Popen, list[int]]] = []
        try:
            while pending or running:
                for piece in list(pending):
                    if piece.devices > len(free):
                        continue
                    assigned, free = free[:piece.devices], free[piece.devices:]
                    pending.remove(piece)
                    running.append((piece, start(piece, assigned), assigned))
                time.sleep(self.poll_seconds)
                for entry in list(running):
                    piece, process, assigned = entry
                    if process.poll() is None:
                        continue
                    running.remove(entry)
                    free = sorted(free + assigned)
                    yield piece, process
        except KeyboardInterrupt:
            for _, process, _ in running:
                try:
                    process.wait(timeout=INTERRUPT_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    log.error(f"process {process.pid} has not ended {INTERRUPT_GRACE_SECONDS} s after Ctrl-C")
            raise

    def spawn(self, command: list[str], gpus: list[int], output: Path) -> subprocess.Popen:
        """Start `command` in the sweep's working directory, seeing only `gpus` (CUDA_VISIBLE_DEVICES),
        its stdout and stderr into `output`; a job started so learns its sweep (its W&B group) from
        `ae_lab.job.SWEEP_VARIABLE`."""
        from ae_lab.job import SWEEP_VARIABLE

        environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus)),
                       SWEEP_VARIABLE: self.sweep_dir.name}
        with open(output, "w") as file:  # the process has its own copy of the file
            return subprocess.Popen(command, env=environment, cwd=str(self.cwd), stdout=file,
                                    stderr=subprocess.STDOUT)


def start_single_run(queue: GpuQueue, job: Job, gpus: list[int]) -> subprocess.Popen:
    """`job` as a single run (`python -m ae_lab`) in its folder on `gpus`, its output into `output.log`
    there; `SweepJobs.finished` reads its return once it has ended."""
    from ae_lab.distributed import quoted

    log.info(f"\t#{job.index} on GPUs {gpus} : {' '.join(filter_overrides(job.overrides))}")
    job.folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "ae_lab", *job.overrides,
               f"hydra.run.dir={quoted(str(job.folder))}", "hydra.mode=RUN"]
    return queue.spawn(command, gpus, job.folder / "output.log")
