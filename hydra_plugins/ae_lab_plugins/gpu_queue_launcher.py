"""`hydra/launcher=gpu_queue`: one job per GPU (or per `trainer.devices` GPUs) on a multi-GPU machine.

Jobs wait in a queue for free GPUs. Each job runs as its own process (`python -m ae_lab`, a single run
in the job's folder) that sees only the GPUs it was given, through CUDA_VISIBLE_DEVICES; a DDP job
(`trainer.devices=k`) is given k of them and its ranks share them. A pending job starts as soon as
enough GPUs are free (a later, smaller job may start before an earlier, larger one that does not fit
yet). submitit's local executor gives every job the same GPUs, which is why this exists.

A job whose folder already holds a completed run of the same config is not started again, so a
re-run into the same `hydra.sweep.dir` finishes only what is missing.

The queue (`_queue`) is shared with the `vectorized` launcher, which queues ensemble groups (one GPU
each) beside such jobs.
"""


import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)
Work = TypeVar("Work")  # what the queue runs: a job here, a job or an ensemble group under `vectorized`
INTERRUPT_GRACE_SECONDS = 60  # after Ctrl-C, how long to wait for each running process to record its runs


@dataclass
class GpuQueueLauncherConf:
    _target_: str = "hydra_plugins.ae_lab_plugins.gpu_queue_launcher.GpuQueueLauncher"
    gpus: Optional[list[int]] = None  # device ids to hand out; null: every GPU torch can see
    devices_key: str = "trainer.devices"  # how many GPUs a job takes
    poll_seconds: float = 0.5


ConfigStore.instance().store(group="hydra/launcher", name="gpu_queue", node=GpuQueueLauncherConf,
                             provider="ae_lab")


@dataclass
class _Job:
    index: int
    overrides: list[str]
    config: DictConfig  # the job's full config, hydra node included
    folder: Path
    devices: int

    @cached_property
    def task_config(self) -> DictConfig:
        """The config the task sees: `config` without its `hydra` node (made once; the copy is slow)."""
        config = OmegaConf.masked_copy(self.config, [key for key in self.config if key != "hydra"])
        OmegaConf.set_struct(config, True)
        return config


class _ComposedOnce:
    """`ConfigLoader.load_sweep_config` that keeps each composition for one more call with the same
    arguments. Hydra's sweeper composes every job's config to validate the batch, then hands the launcher
    only the overrides, and the launcher composes each again (0.2-0.5 s a job, as much as a small job's
    training); the two share one config loader, so the launcher gets the sweeper's composition instead."""

    def __init__(self, load: Any) -> None:
        self.load = load
        self.kept: dict[tuple[int, tuple[str, ...]], DictConfig] = {}

    def __call__(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        key = (id(master_config), tuple(sweep_overrides))
        if key in self.kept:
            return self.kept.pop(key)
        self.kept[key] = composed = self.load(master_config=master_config, sweep_overrides=sweep_overrides)
        return composed


class GpuQueueLauncher(Launcher):
    def __init__(self, gpus: Optional[list[int]] = None, devices_key: str = "trainer.devices",
                 poll_seconds: float = 0.5) -> None:
        self.gpus = gpus
        self.devices_key = devices_key
        self.poll_seconds = poll_seconds
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.check_keys()
        self.config = config
        self.hydra_context = hydra_context
        loader = hydra_context.config_loader
        if not isinstance(loader.load_sweep_config, _ComposedOnce):
            loader.load_sweep_config = _ComposedOnce(loader.load_sweep_config)

    def check_keys(self) -> None:
        """Refuse a launcher key that cannot work, in one line: here, before the sweeper makes the sweep
        folder, so that a refused sweep leaves nothing behind."""
        from ae_lab.errors import fail

        gpus = None if self.gpus is None else list(self.gpus)
        if gpus is not None and (not all(isinstance(gpu, int) and gpu >= 0 for gpu in gpus)
                                 or len(set(gpus)) < len(gpus)):
            fail(f"hydra.launcher.gpus={gpus!r} is not allowed: GPU ids (integers >= 0, each once), "
                 "or null for every GPU torch sees")
        if not (isinstance(self.poll_seconds, (int, float)) and self.poll_seconds > 0):
            fail(f"hydra.launcher.poll_seconds={self.poll_seconds!r} is not allowed: a number of seconds > 0")

    def _gpu_ids(self) -> list[int]:
        if self.gpus is not None:
            return list(self.gpus)
        import torch

        return list(range(torch.cuda.device_count()))

    def _job(self, index: int, overrides: Sequence[str]) -> _Job:
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
        return _Job(index, list(overrides), config, folder, devices)

    def _composed_jobs(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[_Job]:
        """Every job of the batch composed (Hydra's logging set up and the sweep folder made first)."""
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        return [self._job(initial_job_idx + i, overrides) for i, overrides in enumerate(job_overrides)]

    def _jobs_to_run(self, jobs: list[_Job], returns: dict[int, JobReturn]) -> list[_Job]:
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
                returns[job.index] = self._failed(job, str(error), write_record=False)
                continue
            if finished is not None:
                log.info(f"\t#{job.index} : already completed in {job.folder}")
                returns[job.index] = self._return(job, finished)
            else:
                todo.append(job)
        return todo

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        jobs = self._composed_jobs(job_overrides, initial_job_idx)
        gpus = self._gpu_ids()
        log.info(f"Queueing {len(jobs)} jobs on GPUs {gpus}")
        returns: dict[int, JobReturn] = {}
        pending = self._placeable(self._jobs_to_run(jobs, returns), gpus, returns)
        try:
            for job, process in self._queue(pending, gpus, self._start):
                returns[job.index] = self._finished(job, process.returncode)
        except KeyboardInterrupt:
            self._interrupted("its unfinished jobs")
        return [returns[job.index] for job in jobs]

    def _interrupted(self, what: str) -> None:
        """After Ctrl-C: the sweep's summary, then exit code 130 with one line saying how to go on."""
        from ae_lab.errors import fail
        from ae_lab.sweep import summarize

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        summarize(sweep_dir)
        fail(f"interrupted; run the same sweep again (hydra.sweep.dir={sweep_dir}) to resume {what}", exit_code=130)

    def _placeable(self, jobs: list[_Job], gpus: list[int], returns: dict[int, JobReturn]) -> list[_Job]:
        """The jobs that fit on `gpus`; each of the others is recorded failed (into `returns`)."""
        placeable = []
        for job in jobs:
            if job.devices > len(gpus):
                returns[job.index] = self._failed(
                    job, f"{self.devices_key}={job.devices} but only {len(gpus)} GPUs are available")
            else:
                placeable.append(job)
        return placeable

    def _queue(self, work: list[Work], gpus: list[int], start: Callable[[Work, list[int]], subprocess.Popen]
               ) -> Iterator[tuple[Work, subprocess.Popen]]:
        """Run each piece of `work` (anything with `devices`, the number of GPUs it takes, each at most
        len(gpus)) as the process `start(work, its GPUs)` as soon as enough of `gpus` are free, a
        later, smaller piece before an earlier one that does not fit yet; yield each piece with its
        process once that has ended.

        Ctrl-C: the processes are in this process's group, so a Ctrl-C in the terminal reaches each of
        them (each records its own runs interrupted); here the loop waits for them to end (at most
        INTERRUPT_GRACE_SECONDS each), so that their records are written before the sweep's summary,
        then raises KeyboardInterrupt."""
        free, pending = list(gpus), list(work)
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

    def _spawn(self, command: list[str], gpus: list[int], output: Path) -> subprocess.Popen:
        """Start `command` in the sweep's working directory, seeing only `gpus` (CUDA_VISIBLE_DEVICES),
        its stdout and stderr into `output`; a job started so learns its sweep (its W&B group) from
        `ae_lab.job.SWEEP_VARIABLE`."""
        from ae_lab.job import SWEEP_VARIABLE

        environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus)),
                       SWEEP_VARIABLE: Path(str(self.config.hydra.sweep.dir)).name}
        with open(output, "w") as file:  # the process has its own copy of the file
            return subprocess.Popen(command, env=environment, cwd=str(self.config.hydra.runtime.cwd),
                                    stdout=file, stderr=subprocess.STDOUT)

    def _start(self, job: _Job, gpus: list[int]) -> subprocess.Popen:
        """`job` as a single run (`python -m ae_lab`) in its folder, its output into `output.log` there."""
        from ae_lab.distributed import quoted

        log.info(f"\t#{job.index} on GPUs {gpus} : {' '.join(filter_overrides(job.overrides))}")
        job.folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "ae_lab", *job.overrides,
                   f"hydra.run.dir={quoted(str(job.folder))}", "hydra.mode=RUN"]
        return self._spawn(command, gpus, job.folder / "output.log")

    def _finished(self, job: _Job, returncode: int) -> JobReturn:
        metrics_path = job.folder / "metrics.json"
        if returncode == 0 and metrics_path.exists():
            import json

            return self._return(job, json.loads(metrics_path.read_text()))
        tail = (job.folder / "output.log").read_text(errors="replace").strip().splitlines()[-1:]
        return self._failed(job, f"exit code {returncode}: {' '.join(tail)}")

    def _failed(self, job: _Job, message: str, write_record: bool = True) -> JobReturn:
        """A failed job is recorded in its folder (like a job that fails in-process) and the sweep
        goes on; the sweep summary counts it."""
        from ae_lab.job import JobContext
        from ae_lab.tracking import record_refused

        log.error(f"\t#{job.index} failed: {message}")
        if write_record:
            job.folder.mkdir(parents=True, exist_ok=True)
            record_refused(JobContext.from_hydra(job.config.hydra, job.folder), job.task_config, RuntimeError(message))
        return self._return(job, None)

    def _return(self, job: _Job, metrics: dict[str, float] | None) -> JobReturn:
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
