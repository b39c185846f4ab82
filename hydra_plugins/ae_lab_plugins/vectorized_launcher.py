"""`hydra/launcher=vectorized`: a sweep's jobs trained as vectorised ensembles, each job still its own run.

Every job's config is composed as under the other launchers (same `<num>_<hash>` folders; a job whose
folder holds a completed run of its config is skipped, so a killed sweep run again finishes only what
is missing). The remaining jobs are grouped by `ae_lab.ensemble.grouping.group_jobs` (jobs that differ
only in per-member scalars share a group, at most `max_members` per group); each group trains as one
ensemble (`ae_lab.ensemble.group.run_group`) and writes every member's run folder. A group the
ensemble loop cannot run (`sequential_reason`: greedy pretraining, some trainer settings) runs its
jobs one by one, as single runs, with a log line saying why.

Where: with GPU ids named (`hydra.launcher.gpus`, one or more), or with none named and several GPUs
visible to torch, the groups queue for those GPUs as the `gpu_queue` launcher's jobs do (its queue):
each group trains in its own worker process
(`group_worker`) that sees exactly one GPU (CUDA_VISIBLE_DEVICES), its members' full configs handed
over in `<sweep>/.ensembles/<group>.jobs.pkl`, its output in `<group>.log` there; a sequential group's
jobs run as `gpu_queue` jobs (one `python -m ae_lab` process per job on its `trainer.devices` GPUs,
output in the job folder's `output.log`). A worker that dies leaves the members it had not written
recorded failed; the sweep goes on, and running it again resumes the group from its checkpoint. Ctrl-C
in the terminal reaches the workers as it reaches `gpu_queue`'s jobs: each records its members
interrupted and keeps its group checkpoint, and the launcher waits for them before its summary.
Otherwise (no ids named, at most one GPU visible) everything runs in this process, one group after
another, on that GPU or the CPU.
"""

import hashlib
import json
import logging
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, filter_overrides, run_job
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from hydra_plugins.ae_lab_plugins.gpu_queue_launcher import GpuQueueLauncher, GpuQueueLauncherConf, _Job

if TYPE_CHECKING:  # (ae_lab is imported lazily: Hydra imports every plugin at start-up)
    from ae_lab.ensemble.group import Member

log = logging.getLogger(__name__)


@dataclass
class VectorizedLauncherConf(GpuQueueLauncherConf):
    _target_: str = "hydra_plugins.ae_lab_plugins.vectorized_launcher.VectorizedLauncher"
    max_members: int = 64  # members per ensemble at most (memory: M copies of weights and Adam state)


ConfigStore.instance().store(group="hydra/launcher", name="vectorized", node=VectorizedLauncherConf,
                             provider="ae_lab")


@dataclass
class _Group:
    """One ensemble to train: its jobs, its name, and its checkpoint `<sweep>/.ensembles/<name>.pt`
    (beside it: the worker's `<name>.jobs.pkl` and `<name>.log`)."""

    name: str
    jobs: list[_Job]
    checkpoint: Path
    devices: int = 1  # GPUs it takes in the queue

    @property
    def worker_log(self) -> Path:
        return self.checkpoint.with_suffix(".log")


class VectorizedLauncher(GpuQueueLauncher):
    """Reuses the per-GPU queue launcher's job composition, folder naming, queue and job returns."""

    def __init__(self, max_members: int = 64, **queue: Any) -> None:  # queue: GpuQueueLauncher's keys
        super().__init__(**queue)
        self.max_members = max_members
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.task_function = task_function

    def check_keys(self) -> None:
        from ae_lab.errors import fail

        super().check_keys()
        if not isinstance(self.max_members, int) or self.max_members < 1:
            fail(f"hydra.launcher.max_members={self.max_members!r} is not allowed: an integer >= 1")

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from ae_lab.checks import validate
        from ae_lab.data import input_shape
        from ae_lab.ensemble.grouping import group_jobs, group_key, sequential_reason
        from ae_lab.errors import ConfigError

        jobs = self._composed_jobs(job_overrides, initial_job_idx)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        returns: dict[int, JobReturn] = {}
        todo: list[_Job] = []
        for job in self._jobs_to_run(jobs, returns):
            try:
                for warning in validate(job.task_config, input_shape(job.task_config.dataset)):
                    log.warning(warning)
            except ConfigError as error:
                returns[job.index] = self._failed(job, str(error))
                continue
            todo.append(job)
        plain = [OmegaConf.to_container(job.task_config, resolve=True, enum_to_str=True) for job in todo]
        groups = group_jobs(plain, self.max_members)
        log.info(f"Vectorized launcher: {len(todo)} jobs to run in {len(groups)} groups "
                 f"({len(jobs) - len(todo)} completed or refused)")
        work: list[_Group | _Job] = []  # in the order of the groups' first jobs
        for indices in groups:
            members = [todo[i] for i in indices]
            reason = sequential_reason(plain[indices[0]])
            if reason is not None:
                log.info(f"group of jobs {[job.index for job in members]} runs one job at a time: {reason}")
                work.extend(members)
            else:
                name = self._group_name(members, group_key(plain[indices[0]]))
                work.append(_Group(name, members, sweep_dir / ".ensembles" / f"{name}.pt"))
        gpus = self._gpu_ids()
        if self.gpus or len(gpus) > 1:  # named ids: a worker sees its own (torch's cuda:0 may be another)
            self._on_gpus(work, gpus, returns)
        else:
            for piece in work:
                if isinstance(piece, _Group):
                    returns.update(self._run_group(piece))
                else:
                    returns[piece.index] = self._run_alone(piece)
        return [returns[job.index] for job in jobs]

    @staticmethod
    def _group_name(jobs: list[_Job], structure: str) -> str:
        """The structure's key and a hash of the members' folders: the same group gets the same name
        (and finds its checkpoint) when the sweep runs again."""
        folders = "\n".join(job.folder.name for job in jobs)
        return f"{structure}-{hashlib.sha256(folders.encode()).hexdigest()[:8]}"

    @staticmethod
    def members(jobs: list[_Job]) -> list["Member"]:
        """The jobs as `ae_lab.ensemble.group.Member`s (in this process or in a group's worker), each with
        its job context built from its own composed config, the job's folder its output folder as Hydra's
        `run_job` sets it (Hydra's global config is left as it is)."""
        from ae_lab.ensemble.group import Member
        from ae_lab.job import JobContext

        members = []
        for job in jobs:
            with read_write(job.config.hydra.runtime), open_dict(job.config.hydra.runtime):
                job.config.hydra.runtime.output_dir = str(job.folder.resolve())
            members.append(Member(job.task_config, job.folder, JobContext.from_hydra(job.config.hydra)))
        return members

    # ----- one GPU or none: in this process

    def _run_group(self, group: _Group) -> dict[int, JobReturn]:
        from ae_lab.ensemble.group import run_group

        for job in group.jobs:
            log.info(f"\t#{job.index} (ensemble {group.name}) : {' '.join(filter_overrides(job.overrides))}")
        try:
            outcomes = run_group(self.members(group.jobs), group.name, group.checkpoint)
        except KeyboardInterrupt:  # the members are recorded as interrupted; as for a single run in a sweep
            self._interrupted(f"ensemble {group.name}")
        except Exception as error:  # noqa: BLE001 - each member's run.json holds it; the sweep goes on
            log.exception(f"ensemble {group.name} failed: {error}")
            # a member whose record was not written yet (the data could not be loaded) gets one now
            return {job.index: self._failed(job, f"ensemble {group.name} failed: {error}") for job in group.jobs}
        returns = {}
        for job, outcome in zip(group.jobs, outcomes):
            if outcome.metrics is None:
                log.error(f"\t#{job.index} failed: {outcome.error}")
            returns[job.index] = self._return(job, outcome.metrics)
        return returns

    def _run_alone(self, job: _Job) -> JobReturn:
        """One job in this process, as Hydra's basic launcher runs it."""
        log.info(f"\t#{job.index} : {' '.join(filter_overrides(job.overrides))}")
        HydraConfig.instance().set_config(job.config)
        return run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=job.config,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")

    # ----- several GPUs: a worker process per group, queued over the GPUs

    def _on_gpus(self, work: list[_Group | _Job], gpus: list[int], returns: dict[int, JobReturn]) -> None:
        """Queue the groups (one GPU each) and the jobs that run alone (`trainer.devices` GPUs each) over
        `gpus`; their jobs' returns into `returns`."""
        alone = [piece for piece in work if isinstance(piece, _Job)]
        placeable = {job.index for job in self._placeable(alone, gpus, returns)}
        work = [piece for piece in work if isinstance(piece, _Group) or piece.index in placeable]
        groups = sum(isinstance(piece, _Group) for piece in work)
        log.info(f"Queueing {groups} groups and {len(work) - groups} single jobs on GPUs {gpus}")
        try:
            for piece, process in self._queue(work, gpus, self._start_work):
                if isinstance(piece, _Group):
                    returns.update(self._worker_ended(piece, process))
                else:
                    returns[piece.index] = self._finished(piece, process.returncode)
        except KeyboardInterrupt:  # the workers got it too: members recorded interrupted, checkpoints kept
            self._interrupted("its unfinished groups and jobs")

    def _start_work(self, piece: _Group | _Job, gpus: list[int]) -> subprocess.Popen:
        """A job as `gpu_queue` starts it; a group as its worker, its jobs handed over in a file."""
        from ae_lab.storage import atomic_write

        if isinstance(piece, _Job):
            return self._start(piece, gpus)
        for job in piece.jobs:
            log.info(f"\t#{job.index} (ensemble {piece.name}, GPU {gpus[0]}) : "
                     f"{' '.join(filter_overrides(job.overrides))}")
        piece.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        handover = piece.checkpoint.with_suffix(".jobs.pkl")
        atomic_write(handover, lambda file: pickle.dump(piece, file))  # the configs keep Hydra's resolver cache
        command = [sys.executable, "-m", "hydra_plugins.ae_lab_plugins.group_worker", str(handover)]
        return self._spawn(command, gpus, piece.worker_log)

    def _worker_ended(self, group: _Group, process: subprocess.Popen) -> dict[int, JobReturn]:
        """Each member's return once its group's worker has ended: a member the worker wrote (its run.json
        says so: the worker's pid) as it is, completed or failed; one it did not is recorded failed."""
        from ae_lab.tracking import record_lost

        code = process.returncode
        if code < 0:
            ended = f"was killed (signal {-code})"
        else:  # a Python error's last line ends the log
            last = group.worker_log.read_text(errors="replace").strip().splitlines()[-1:]
            ended = f"ended (exit code {code}: {' '.join(last)})"
        returns = {}
        for job in group.jobs:
            try:
                record = json.loads((job.folder / "run.json").read_text())
            except FileNotFoundError:
                record = {}
            written = record.get("pid") == process.pid
            if written and record["status"] == "completed":
                returns[job.index] = self._return(job, json.loads((job.folder / "metrics.json").read_text()))
            elif written and record["status"] != "running":  # failed (NaN, the group's error) or interrupted
                log.error(f"\t#{job.index} {record['status']}: {record.get('error')}")
                returns[job.index] = self._return(job, None)
            else:
                message = (f"the worker of ensemble {group.name} {ended} before writing this member "
                           f"(see {group.worker_log})")
                if written:  # left `running` by the worker
                    record_lost(job.folder, message)
                returns[job.index] = self._failed(job, message)
        return returns
