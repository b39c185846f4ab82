"""`hydra/launcher=vectorized`: a sweep's jobs trained as vectorised ensembles, each job still its own run.

Every job's config is composed as under the other launchers (same `<num>_<hash>` folders; a job whose
folder holds a completed run of its config is skipped, so a killed sweep run again finishes only what
is missing). The remaining jobs are grouped by `ae_lab.ensemble.grouping.group_jobs` (jobs that differ
only in per-member scalars share a group, at most `max_members` per group); each group trains as one
ensemble (`ae_lab.ensemble.group.run_group`) and writes every member's run folder. A group the
ensemble loop cannot run (`sequential_reason`: greedy pretraining, some trainer settings) runs its
jobs one by one, as single runs, with a log line saying why.

Where: with GPU ids named (`hydra.launcher.gpus`, one or more), or with none named and several GPUs
visible to torch, the groups queue for those GPUs as the `gpu_queue` launcher's jobs do (`gpu_queue.GpuQueue`):
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

On a SLURM cluster (`hydra.launcher.backend=slurm`, the SLURM keys under `hydra.launcher.slurm`):
every group is one SLURM job (submitit), one GPU each where `trainer.accelerator` asks for GPUs; its
output is submitit's, `<group>.log` in `.ensembles/` links to it and `<group>.slurm.json` names the
job. On SLURM's signal the group checkpoints at the next step boundary, records its members `requeued`
and is requeued; the requeued job resumes from the checkpoint. Run again with the same
`hydra.sweep.dir`, the sweep skips completed members and resumes unfinished groups, and refuses to
start while a group's job from an earlier launch is still queued or running. Jobs that cannot train
as an ensemble are recorded failed there: `hydra/launcher=slurm` runs them. See docs/cluster-ensembles.md.
"""

import hashlib
import json
import logging
import os
import pickle
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, filter_overrides, run_job
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from hydra_plugins.ae_lab_plugins.gpu_queue import (ComposedOnce, GpuQueue, Job, SweepJobs, check_queue_keys, gpu_ids,
                                                    start_single_run)
from hydra_plugins.ae_lab_plugins.gpu_queue_launcher import GpuQueueLauncherConf

if TYPE_CHECKING:  # (ae_lab is imported lazily: Hydra imports every plugin at start-up)
    from ae_lab.ensemble.group import Member

log = logging.getLogger(__name__)


@dataclass
class SlurmGroupConf:
    """What each group's SLURM job asks for: `hydra/launcher=slurm`'s keys (same names and defaults),
    less those the launcher sets per group (one node, one task, one GPU where the trainer asks for GPUs)."""

    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"
    timeout_min: int = 240
    cpus_per_task: Optional[int] = 8
    mem_gb: Optional[int] = 32
    partition: Optional[str] = None
    qos: Optional[str] = None
    comment: Optional[str] = None
    constraint: Optional[str] = None
    exclude: Optional[str] = None
    gres: Optional[str] = None
    account: Optional[str] = None
    mem_per_gpu: Optional[str] = None
    mem_per_cpu: Optional[str] = None
    signal_delay_s: int = 120  # USR2 this long before the time limit: time to reach a step end and checkpoint
    max_num_timeout: int = 3  # requeues after reaching the time limit (a preemption's requeue does not count)
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    setup: Optional[list[str]] = None  # commands run in the job's script before the group starts
    stderr_to_stdout: bool = True  # one output file per group, which `<group>.log` links to


BACKENDS = ("local", "slurm")


@dataclass
class VectorizedLauncherConf(GpuQueueLauncherConf):
    _target_: str = "hydra_plugins.ae_lab_plugins.vectorized_launcher.VectorizedLauncher"
    max_members: int = 64  # members per ensemble at most (memory: M copies of weights and Adam state)
    backend: str = "local"  # local: this machine's GPUs or CPU; slurm: each group one SLURM job
    slurm: SlurmGroupConf = field(default_factory=SlurmGroupConf)  # with backend=slurm


ConfigStore.instance().store(group="hydra/launcher", name="vectorized", node=VectorizedLauncherConf,
                             provider="ae_lab")


@dataclass
class _Group:
    """One ensemble to train: its jobs, its name, and its checkpoint `<sweep>/.ensembles/<name>.pt`
    (beside it: the worker's `<name>.jobs.pkl` and `<name>.log`)."""

    name: str
    jobs: list[Job]
    checkpoint: Path
    devices: int = 1  # GPUs it takes in the queue

    @property
    def worker_log(self) -> Path:
        return self.checkpoint.with_suffix(".log")


class VectorizedLauncher(Launcher):
    """The `gpu_queue` launcher's components (job composition, folder naming, returns, the GPU queue)
    with the jobs trained as ensemble groups."""

    def __init__(self, gpus: list[int] | None = None, devices_key: str = "trainer.devices", poll_seconds: float = 0.5,
                 max_members: int = 64, backend: str = "local", slurm: dict[str, Any] | None = None) -> None:
        self.gpus = gpus
        self.devices_key = devices_key
        self.poll_seconds = poll_seconds
        self.max_members = max_members
        self.backend = backend
        self.slurm = OmegaConf.to_container(slurm, resolve=True) if isinstance(slurm, DictConfig) else dict(slurm or {})
        self.jobs: SweepJobs | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.check_keys()
        if self.backend == "slurm":  # before the sweeper writes anything into the sweep folder
            self._refuse_while_jobs_live(Path(str(config.hydra.sweep.dir)))
        self.jobs = SweepJobs(hydra_context, config, self.devices_key)
        ComposedOnce.install(hydra_context)
        self.hydra_context = hydra_context
        self.task_function = task_function

    def check_keys(self) -> None:
        from ae_lab.errors import fail

        check_queue_keys(self.gpus, self.poll_seconds)
        if not isinstance(self.max_members, int) or self.max_members < 1:
            fail(f"hydra.launcher.max_members={self.max_members!r} is not allowed: an integer >= 1")
        if self.backend not in BACKENDS:
            fail(f"hydra.launcher.backend={self.backend!r} is not allowed: one of {', '.join(BACKENDS)}")

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from ae_lab.checks import validate
        from ae_lab.data import input_shape
        from ae_lab.ensemble.grouping import group_jobs, group_key, sequential_reason
        from ae_lab.errors import ConfigError

        jobs = self.jobs.compose(job_overrides, initial_job_idx)
        sweep_dir = self.jobs.sweep_dir
        returns: dict[int, JobReturn] = {}
        todo: list[Job] = []
        for job in self.jobs.to_run(jobs, returns):
            try:
                for warning in validate(job.task_config, input_shape(job.task_config.dataset)):
                    log.warning(warning)
            except ConfigError as error:
                returns[job.index] = self.jobs.failed(job, str(error))
                continue
            todo.append(job)
        plain = [OmegaConf.to_container(job.task_config, resolve=True, enum_to_str=True) for job in todo]
        groups = group_jobs(plain, self.max_members)
        log.info(f"Vectorized launcher: {len(todo)} jobs to run in {len(groups)} groups "
                 f"({len(jobs) - len(todo)} completed or refused)")
        work: list[_Group | Job] = []  # in the order of the groups' first jobs
        for indices in groups:
            members = [todo[i] for i in indices]
            reason = sequential_reason(plain[indices[0]])
            if reason is not None:
                log.info(f"group of jobs {[job.index for job in members]} runs one job at a time: {reason}")
                work.extend(members)
            else:
                name = self._group_name(members, group_key(plain[indices[0]]))
                work.append(_Group(name, members, sweep_dir / ".ensembles" / f"{name}.pt"))
        if self.backend == "slurm":
            self._on_slurm(work, returns)
        elif self.gpus or len(gpu_ids(self.gpus)) > 1:  # named ids: a worker sees its own (torch's cuda:0 may differ)
            self._on_gpus(work, gpu_ids(self.gpus), returns)
        else:
            for piece in work:
                if isinstance(piece, _Group):
                    returns.update(self._run_group(piece))
                else:
                    returns[piece.index] = self._run_alone(piece)
        return [returns[job.index] for job in jobs]

    @staticmethod
    def _group_name(jobs: list[Job], structure: str) -> str:
        """The structure's key and a hash of the members' folders: the same group gets the same name
        (and finds its checkpoint) when the sweep runs again."""
        folders = "\n".join(job.folder.name for job in jobs)
        return f"{structure}-{hashlib.sha256(folders.encode()).hexdigest()[:8]}"

    @staticmethod
    def members(jobs: list[Job]) -> list["Member"]:
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
            self.jobs.interrupted(f"ensemble {group.name}")
        except Exception as error:  # noqa: BLE001 - each member's run.json holds it; the sweep goes on
            log.exception(f"ensemble {group.name} failed: {error}")
            # a member whose record was not written yet (the data could not be loaded) gets one now
            return {job.index: self.jobs.failed(job, f"ensemble {group.name} failed: {error}") for job in group.jobs}
        returns = {}
        for job, outcome in zip(group.jobs, outcomes):
            if outcome.metrics is None:
                log.error(f"\t#{job.index} failed: {outcome.error}")
            returns[job.index] = self.jobs.returned(job, outcome.metrics)
        return returns

    def _run_alone(self, job: Job) -> JobReturn:
        """One job in this process, as Hydra's basic launcher runs it."""
        log.info(f"\t#{job.index} : {' '.join(filter_overrides(job.overrides))}")
        HydraConfig.instance().set_config(job.config)
        return run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=job.config,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")

    # ----- several GPUs: a worker process per group, queued over the GPUs

    def _on_gpus(self, work: list[_Group | Job], gpus: list[int], returns: dict[int, JobReturn]) -> None:
        """Queue the groups (one GPU each) and the jobs that run alone (`trainer.devices` GPUs each) over
        `gpus`; their jobs' returns into `returns`."""
        alone = [piece for piece in work if isinstance(piece, Job)]
        placeable = {job.index for job in self.jobs.placeable(alone, gpus, returns)}
        work = [piece for piece in work if isinstance(piece, _Group) or piece.index in placeable]
        groups = sum(isinstance(piece, _Group) for piece in work)
        log.info(f"Queueing {groups} groups and {len(work) - groups} single jobs on GPUs {gpus}")
        queue = GpuQueue(gpus, self.poll_seconds, self.jobs.sweep_dir, Path(str(self.jobs.config.hydra.runtime.cwd)))
        try:
            for piece, process in queue.run(work, lambda piece, gpus: self._start_work(queue, piece, gpus)):
                if isinstance(piece, _Group):
                    returns.update(self._worker_ended(piece, process))
                else:
                    returns[piece.index] = self.jobs.finished(piece, process.returncode)
        except KeyboardInterrupt:  # the workers got it too: members recorded interrupted, checkpoints kept
            self.jobs.interrupted("its unfinished groups and jobs")

    def _start_work(self, queue: GpuQueue, piece: _Group | Job, gpus: list[int]) -> subprocess.Popen:
        """A job as `gpu_queue` starts it; a group as its worker, its jobs handed over in a file."""
        if isinstance(piece, Job):
            return start_single_run(queue, piece, gpus)
        for job in piece.jobs:
            log.info(f"\t#{job.index} (ensemble {piece.name}, GPU {gpus[0]}) : "
                     f"{' '.join(filter_overrides(job.overrides))}")
        command = [sys.executable, "-m", "hydra_plugins.ae_lab_plugins.group_worker", str(self._hand_over(piece))]
        return queue.spawn(command, gpus, piece.worker_log)

    @staticmethod
    def _hand_over(group: _Group) -> Path:
        """The group, its jobs' full configs included, in `<group>.jobs.pkl` for its worker (group_worker)."""
        from ae_lab.storage import atomic_write

        group.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        handover = group.checkpoint.with_suffix(".jobs.pkl")
        atomic_write(handover, lambda file: pickle.dump(group, file))  # the configs keep Hydra's resolver cache
        return handover

    def _worker_ended(self, group: _Group, process: subprocess.Popen) -> dict[int, JobReturn]:
        """Each member's return once its group's worker has ended (see `_group_ended`); the worker's
        members' records carry its pid."""
        code = process.returncode
        if code < 0:
            ended = f"was killed (signal {-code})"
        else:  # a Python error's last line ends the log
            last = group.worker_log.read_text(errors="replace").strip().splitlines()[-1:]
            ended = f"ended (exit code {code}: {' '.join(last)})"
        return self._group_ended(group, f"the worker of ensemble {group.name} {ended}",
                                 lambda job, record: record.get("pid") == process.pid)

    def _group_ended(self, group: _Group, ended: str, wrote: Callable[[Job, dict[str, Any]], bool]
                     ) -> dict[int, JobReturn]:
        """Each member's return once its group's process has `ended`: a member it wrote (`wrote(the job,
        its run.json)`) as it is, completed or failed; one it did not is recorded failed."""
        from ae_lab.tracking import record_lost

        returns = {}
        for job in group.jobs:
            record = _record(job)
            written = wrote(job, record)
            if written and record["status"] == "completed":
                returns[job.index] = self.jobs.returned(job, json.loads((job.folder / "metrics.json").read_text()))
            elif written and record["status"] != "running":  # failed (NaN, the group's error) or interrupted
                log.error(f"\t#{job.index} {record['status']}: {record.get('error')}")
                returns[job.index] = self.jobs.returned(job, None)
            else:
                message = f"{ended} before writing this member (see {group.worker_log})"
                if written:  # left `running` by the worker
                    record_lost(job.folder, message)
                returns[job.index] = self.jobs.failed(job, message)
        return returns

    # ----- on a SLURM cluster: one SLURM job per group

    def _on_slurm(self, work: list[_Group | Job], returns: dict[int, JobReturn]) -> None:
        """Submit every group as a SLURM job, wait for them all (through their requeues), and put their
        members' returns into `returns`. A job that cannot train as an ensemble is recorded failed."""
        from hydra_plugins.ae_lab_plugins.slurm_launcher import job_states_from_squeue

        for job in (piece for piece in work if isinstance(piece, Job)):
            returns[job.index] = self.jobs.failed(
                job, "hydra.launcher.backend=slurm trains ensembles only and this job cannot be one (see the "
                     "launcher's log line); run it with hydra/launcher=slurm")
        groups = [piece for piece in work if isinstance(piece, _Group)]
        if not groups:
            return
        earlier = {job.index: _record(job).get("started") for group in groups for job in group.jobs}

        def written_here(job: Job, record: dict[str, Any]) -> bool:  # not a record left by an earlier launch
            return record.get("started") not in (None, earlier[job.index])

        with job_states_from_squeue():
            pending = self._submit(groups)
            log.info(f"Submitted {len(groups)} ensemble groups as SLURM jobs; waiting for them")
            try:
                while pending:
                    for group, slurm_job in list(pending):
                        if slurm_job.done():
                            pending.remove((group, slurm_job))
                            ended = f"the SLURM job {slurm_job.job_id} of ensemble {group.name} ended " \
                                    f"({slurm_job.state})"
                            returns.update(self._group_ended(group, ended, written_here))
                    time.sleep(self.poll_seconds)
            except KeyboardInterrupt:  # the jobs are the cluster's: they go on
                ids = ", ".join(str(slurm_job.job_id) for _, slurm_job in pending)
                self.jobs.interrupted(f"once its groups' SLURM jobs ({ids}) have ended: they go on without it")

    def _submit(self, groups: list[_Group]) -> list[tuple[_Group, Any]]:
        """Each group as a SLURM job (submitit's `GroupJob`), its job named beside it; the submitit jobs."""
        from hydra_plugins.ae_lab_plugins.group_worker import GroupJob
        from hydra_plugins.ae_lab_plugins.slurm_launcher import group_request, slurm_executor

        executor = slurm_executor(self.slurm)
        continued_by = self._command_that_continues()
        submitted = []
        for group in groups:
            executor.update_parameters(**group_request(group.name, group.jobs[0].task_config.trainer.accelerator))
            slurm_job = executor.submit(GroupJob(self._hand_over(group), continued_by))
            self._link_output(group, slurm_job)
            log.info(f"ensemble {group.name}: SLURM job {slurm_job.job_id}, jobs {[job.index for job in group.jobs]}")
            submitted.append((group, slurm_job))
        return submitted

    def _command_that_continues(self) -> str:
        """The command that runs this sweep again into its folder (recorded in members whose group's
        requeues are used up)."""
        hydra = self.jobs.config.hydra
        overrides = [str(o) for o in [*hydra.overrides.hydra, *hydra.overrides.task]
                     if not str(o).startswith("hydra.sweep.dir=")]
        return shlex.join(["python", "-m", "ae_lab", "-m", *overrides, f"hydra.sweep.dir={self.jobs.sweep_dir}"])

    @staticmethod
    def _link_output(group: _Group, job: Any) -> None:
        """`<group>.slurm.json` names the group's SLURM job (a re-run checks it); `<group>.log` links to
        the job's output, where submitit puts it."""
        from ae_lab.storage import write_json

        output = Path(job.paths.stdout)
        write_json(group.checkpoint.with_suffix(".slurm.json"),
                   {"job_id": str(job.job_id), "output": str(output), "errors": str(job.paths.stderr)})
        group.worker_log.unlink(missing_ok=True)
        group.worker_log.symlink_to(os.path.relpath(output, group.worker_log.parent))

    @staticmethod
    def _refuse_while_jobs_live(sweep_dir: Path) -> None:
        """Refuse (one line, exit code 2) to launch into a sweep folder while a group's SLURM job from an
        earlier launch is still queued, running or ending: the two would write the same members."""
        from ae_lab.errors import fail
        from hydra_plugins.ae_lab_plugins.slurm_launcher import live_jobs

        named = {}
        for path in sorted((sweep_dir / ".ensembles").glob("*.slurm.json")):
            named[json.loads(path.read_text())["job_id"]] = path.name.removesuffix(".slurm.json")
        live = live_jobs(list(named))
        if live:
            job_id, state = next(iter(live.items()))
            fail(f"{sweep_dir}: SLURM job {job_id} of ensemble {named[job_id]}, from an earlier launch of this "
                 f"sweep, is still {state.lower()} ({len(live)} such jobs): wait for it or scancel {job_id}, "
                 "then run the sweep again")


def _record(job: Job) -> dict[str, Any]:
    """The job's run.json as it is now (empty when there is none)."""
    try:
        return json.loads((job.folder / "run.json").read_text())
    except FileNotFoundError:
        return {}
