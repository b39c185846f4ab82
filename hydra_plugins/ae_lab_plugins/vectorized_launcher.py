"""`hydra/launcher=vectorized`: a sweep's jobs trained as vectorised ensembles, each job still its own run.

Every job's config is composed as under the other launchers (same `<num>_<hash>` folders; a job whose
folder holds a completed run of its config is skipped, so a killed sweep run again finishes only what
is missing). The remaining jobs are grouped by `ae_lab.ensemble.grouping.group_jobs` (jobs that differ
only in per-member scalars share a group, at most `max_members` per group); each group trains as one
ensemble (`ae_lab.ensemble.group.run_group`) and writes every member's run folder. A group the
ensemble loop cannot run (`sequential_reason`: greedy pretraining, some trainer settings) runs its
jobs one by one in this process, as the basic launcher would, with a log line saying why.

Groups run one after another on one device (the first GPU when one is visible, else the CPU);
spreading groups over several GPUs is not implemented yet.
"""

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from hydra_plugins.ae_lab_plugins.gpu_queue_launcher import GpuQueueLauncher, _Job

log = logging.getLogger(__name__)


@dataclass
class VectorizedLauncherConf:
    _target_: str = "hydra_plugins.ae_lab_plugins.vectorized_launcher.VectorizedLauncher"
    max_members: int = 64  # members per ensemble at most (memory: M copies of weights and Adam state)


ConfigStore.instance().store(group="hydra/launcher", name="vectorized", node=VectorizedLauncherConf,
                             provider="ae_lab")


class VectorizedLauncher(GpuQueueLauncher):
    """Reuses the per-GPU queue launcher's job composition, folder naming and job returns."""

    def __init__(self, max_members: int = 64) -> None:
        super().__init__()
        self.max_members = max_members
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from ae_lab.checks import validate
        from ae_lab.data import input_shape
        from ae_lab.ensemble.grouping import group_jobs, group_key, sequential_reason
        from ae_lab.errors import ConfigError, fail

        if not isinstance(self.max_members, int) or self.max_members < 1:
            fail(f"hydra.launcher.max_members={self.max_members!r} is not allowed: an integer >= 1")
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        jobs = [self._job(initial_job_idx + i, overrides) for i, overrides in enumerate(job_overrides)]
        returns: dict[int, JobReturn] = {}
        todo: list[_Job] = []
        for job, task_config in self._jobs_to_run(jobs, returns):
            try:
                for warning in validate(task_config, input_shape(task_config.dataset)):
                    log.warning(warning)
            except ConfigError as error:
                returns[job.index] = self._failed(job, str(error))
                continue
            todo.append(job)
        plain = [OmegaConf.to_container(self._task_config(job), resolve=True, enum_to_str=True) for job in todo]
        groups = group_jobs(plain, self.max_members)
        log.info(f"Vectorized launcher: {len(todo)} jobs to run in {len(groups)} groups "
                 f"({len(jobs) - len(todo)} completed or refused)")
        for indices in groups:
            members = [todo[i] for i in indices]
            reason = sequential_reason(plain[indices[0]])
            if reason is not None:
                log.info(f"group of jobs {[job.index for job in members]} runs one job at a time: {reason}")
                for job in members:
                    returns[job.index] = self._run_alone(job)
                continue
            returns.update(self._run_group(members, group_key(plain[indices[0]]), sweep_dir))
        return [returns[job.index] for job in jobs]

    def _run_group(self, jobs: list[_Job], structure: str, sweep_dir: Path) -> dict[int, JobReturn]:
        from ae_lab.ensemble.group import Member, run_group

        folders = "\n".join(job.folder.name for job in jobs)
        name = f"{structure}-{hashlib.sha256(folders.encode()).hexdigest()[:8]}"
        for job in jobs:
            log.info(f"\t#{job.index} (ensemble {name}) : {' '.join(filter_overrides(job.overrides))}")
        members = [Member(self._task_config(job), job.folder, lambda job=job: self._activate(job)) for job in jobs]
        try:
            outcomes = run_group(members, name, sweep_dir / ".ensembles" / f"{name}.pt")
        except KeyboardInterrupt:  # the members are recorded as interrupted; as for a single run in a sweep
            from ae_lab.errors import fail
            from ae_lab.sweep import summarize

            summarize(sweep_dir)
            fail(f"interrupted; run the same sweep again (hydra.sweep.dir={sweep_dir}) to resume ensemble {name}",
                 exit_code=130)
        except Exception as error:  # noqa: BLE001 - each member's run.json holds it; the sweep goes on
            log.exception(f"ensemble {name} failed: {error}")
            # a member whose record was not written yet (the data could not be loaded) gets one now
            return {job.index: self._failed(job, f"ensemble {name} failed: {error}") for job in jobs}
        returns = {}
        for job, outcome in zip(jobs, outcomes):
            if outcome.metrics is None:
                log.error(f"\t#{job.index} failed: {outcome.error}")
            value = math.nan if outcome.metrics is None else outcome.metrics.get(self._task_config(job).objective, math.nan)
            returns[job.index] = self._return(job, value)
        return returns

    @staticmethod
    def _activate(job: _Job) -> None:
        """Make `job` the current Hydra job, as Hydra does before it runs one."""
        with read_write(job.config.hydra.runtime), open_dict(job.config.hydra.runtime):
            job.config.hydra.runtime.output_dir = str(job.folder.resolve())
        HydraConfig.instance().set_config(job.config)

    def _run_alone(self, job: _Job) -> JobReturn:
        """One job in this process, as Hydra's basic launcher runs it."""
        log.info(f"\t#{job.index} : {' '.join(filter_overrides(job.overrides))}")
        HydraConfig.instance().set_config(job.config)
        return run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=job.config,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
