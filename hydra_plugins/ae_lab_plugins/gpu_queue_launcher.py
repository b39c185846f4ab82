"""`hydra/launcher=gpu_queue`: one job per GPU (or per `trainer.devices` GPUs) on a multi-GPU machine.

Jobs wait in a queue for free GPUs. Each job runs as its own process (`python -m ae_lab`, a single run
in the job's folder) that sees only the GPUs it was given, through CUDA_VISIBLE_DEVICES; a DDP job
(`trainer.devices=k`) is given k of them and its ranks share them. A pending job starts as soon as
enough GPUs are free (a later, smaller job may start before an earlier, larger one that does not fit
yet). submitit's local executor gives every job the same GPUs, which is why this exists.

A job whose folder already holds a completed run of the same config is not started again, so a
re-run into the same `hydra.sweep.dir` finishes only what is missing.

The queue, the jobs' composition and their returns are components (`gpu_queue`) that the `vectorized`
launcher uses too: it queues ensemble groups (one GPU each) beside such jobs.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from hydra_plugins.ae_lab_plugins.gpu_queue import (ComposedOnce, GpuQueue, SweepJobs, check_queue_keys, gpu_ids,
                                                    start_single_run)

log = logging.getLogger(__name__)


@dataclass
class GpuQueueLauncherConf:
    _target_: str = "hydra_plugins.ae_lab_plugins.gpu_queue_launcher.GpuQueueLauncher"
    gpus: Optional[list[int]] = None  # device ids to hand out; null: every GPU torch can see
    devices_key: str = "trainer.devices"  # how many GPUs a job takes
    poll_seconds: float = 0.5


ConfigStore.instance().store(group="hydra/launcher", name="gpu_queue", node=GpuQueueLauncherConf,
                             provider="ae_lab")


class GpuQueueLauncher(Launcher):
    def __init__(self, gpus: Optional[list[int]] = None, devices_key: str = "trainer.devices",
                 poll_seconds: float = 0.5) -> None:
        self.gpus = gpus
        self.devices_key = devices_key
        self.poll_seconds = poll_seconds
        self.jobs: Optional[SweepJobs] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        check_queue_keys(self.gpus, self.poll_seconds)
        self.jobs = SweepJobs(hydra_context, config, self.devices_key)
        ComposedOnce.install(hydra_context)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        jobs = self.jobs.compose(job_overrides, initial_job_idx)
        gpus = gpu_ids(self.gpus)
        log.info(f"Queueing {len(jobs)} jobs on GPUs {gpus}")
        returns: dict[int, JobReturn] = {}
        pending = self.jobs.placeable(self.jobs.to_run(jobs, returns), gpus, returns)
        queue = GpuQueue(gpus, self.poll_seconds, self.jobs.sweep_dir, Path(str(self.jobs.config.hydra.runtime.cwd)))
        try:
            for job, process in queue.run(pending, lambda job, gpus: start_single_run(queue, job, gpus)):
                returns[job.index] = self.jobs.finished(job, process.returncode)
        except KeyboardInterrupt:
            self.jobs.interrupted("its unfinished jobs")
        return [returns[job.index] for job in jobs]
