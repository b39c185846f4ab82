"""DDP that is safe under Hydra, and the isolation that lets jobs run one after another in a process.

Lightning's subprocess launcher starts ranks 1..N-1 by re-running the parent's command line with
`hydra.run.dir` appended. Under `-m` that command is the whole sweep (each child re-runs every job
and makes a stray sweep folder), and in any Hydra job the run dir it passes is `hydra.run.dir`, not
the job's folder. `HydraJobDDPStrategy` starts each child as a single run of *this job only*: the
job's own overrides, its own folder, run mode, no config or log files of its own.

Lightning also leaves DDP state behind in the parent process (MASTER_*/LOCAL_RANK/WORLD_SIZE in
os.environ, the process group, the deterministic-algorithms flag): `isolated_job` restores it, so
the next job of an in-process sweep starts as if it were the first.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator
from unittest import mock

import torch
from pytorch_lightning.strategies import DDPStrategy, StrategyRegistry
from pytorch_lightning.strategies.launchers import subprocess_script
from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from ae_lab.job import JobContext

_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def launched_rank() -> int:
    """This process's rank as its launcher set it in the environment (0 for a process started by hand)."""
    return max(int(os.environ.get(name, 0) or 0) for name in _RANK_VARIABLES)


def queued_sweep_job() -> bool:
    """Whether this process is a sweep's job that a launcher started as a single run of its own
    (`gpu_queue`; it names the sweep in `ae_lab.job.SWEEP_VARIABLE`): like an in-process sweep job,
    its folder may hold the unfinished run that it goes on with when the sweep runs again."""
    from ae_lab.job import SWEEP_VARIABLE

    return bool(os.environ.get(SWEEP_VARIABLE))


def log_to_console_only() -> None:
    """For ranks > 0: no log file. Ranks a cluster starts (srun) set up Hydra's job logging as rank 0
    does, into the job's `ae_lab.log`; rank 0 owns that file, the others log to their task's output."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()


def quoted(value: str) -> str:
    """A Hydra override value quoted, so commas, brackets or '=' in a path are taken literally."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def job_command(job: JobContext, local_rank: int) -> tuple[list[str], str]:
    """Command line and working directory that start rank `local_rank` of the Hydra job `job`."""
    if job.cwd is None:
        raise ValueError(f"trainer.strategy starts DDP ranks as processes of a Hydra job: {job.run_dir} was "
                         "not started by Hydra (python -m ae_lab)")
    command = [sys.executable, "-m", "ae_lab", *job.overrides,
               f"hydra.run.dir={quoted(str(job.run_dir))}",
               "hydra.mode=RUN",  # a sweep preset may set MULTIRUN: a rank is never a sweep
               "hydra.output_subdir=null",  # rank 0 writes the job's .hydra/
               f"hydra.job.name=rank{local_rank}",
               "hydra/job_logging=stdout"]  # log to the console only: rank 0 owns the log file
    return command, str(job.cwd)


class _HydraJobLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher, with each child started by `job_command`."""

    def __init__(self, job: JobContext | None, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.job = job

    def _call_children_scripts(self) -> None:
        with mock.patch.object(subprocess_script, "_hydra_subprocess_cmd", partial(job_command, self.job)):
            super()._call_children_scripts()

    def wait_for_children(self, timeout: float) -> None:
        for process in self.procs:
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()


class HydraJobDDPStrategy(DDPStrategy):
    """DDP (subprocess start) whose ranks run the Hydra job `job`, not the process's command line (`job`
    None: a strategy that is only checked, never launched: `ae_lab.trainer_check`)."""

    def __init__(self, job: JobContext | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.job = job

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _SubprocessScriptLauncher):
            self._launcher = _HydraJobLauncher(self.job, self.cluster_environment, self.num_processes, self.num_nodes)

    def wait_for_children(self, timeout: float = 120.0) -> None:
        if isinstance(self._launcher, _HydraJobLauncher):
            self._launcher.wait_for_children(timeout)


def resolve_strategy(name: Any, job: JobContext | None = None) -> Any:
    """`trainer.strategy` as the Trainer should get it: DDP strategies that start ranks as
    subprocesses become HydraJobDDPStrategy of `job` with the same settings; every other value passes
    through."""
    if isinstance(name, str) and name in StrategyRegistry:
        entry = StrategyRegistry[name]
        if entry["strategy"] is DDPStrategy and entry["init_params"].get("start_method", "popen") == "popen":
            return HydraJobDDPStrategy(job, **entry["init_params"])
    return name


@contextmanager
def isolated_job() -> Iterator[None]:
    """Run one job and then undo the process-wide state it changed (environment, process group,
    torch's determinism flags, the Ctrl-C handler)."""
    environment = dict(os.environ)
    interrupt_handler = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C once it caught one
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
        signal.signal(signal.SIGINT, interrupt_handler)
