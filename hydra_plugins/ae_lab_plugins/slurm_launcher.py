"""`hydra/launcher=slurm`: Hydra's submitit launcher, asking squeue for job states where the cluster
keeps no accounting.

submitit follows its jobs with `sacct`, which on a cluster without accounting storage (no slurmdbd,
`AccountingStorageType=accounting_storage/none`, common on small clusters) can only answer "Slurm
accounting storage is disabled"; submitit then warns "Bypassing sacct error ..., status may be
inaccurate" at every poll while it waits. There, `QueueWatcher` asks `squeue` (which knows pending,
running and recently ended jobs) instead; any other failure of the command is still warned about.

The same SLURM helpers serve `hydra/launcher=vectorized hydra.launcher.backend=slurm` (each ensemble
group one SLURM job): `job_states_from_squeue`, `slurm_executor`, `group_request` and `live_jobs`.
"""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence
from unittest import mock

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher import submitit_launcher


def accounting_disabled() -> bool:
    """Whether the cluster keeps no job accounting, so that sacct cannot answer (`scontrol show config`)."""
    try:
        config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False  # no scontrol here: leave sacct to say what is wrong
    return any(line.split("=", 1)[0].strip() == "AccountingStorageType"
               and line.split("=", 1)[1].strip() == "accounting_storage/none" for line in config.splitlines())


def queue_watcher() -> Any:
    """submitit's SLURM job watcher, asking squeue instead of sacct."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    class QueueWatcher(SlurmInfoWatcher):
        def _make_command(self) -> Optional[list[str]]:
            command = super()._make_command()  # sacct -o JobID,State,NodeList --parsable2 -j ID ...
            if command is None:
                return None
            ids = ",".join(command[command.index("-j") + 1::2])
            return ["squeue", "--noheader", "--states=all", "--format=%i|%T|%N", f"--jobs={ids}"]

        def read_info(self, string: Any) -> dict[str, dict[str, str]]:
            text = string.decode() if isinstance(string, bytes) else string
            return super().read_info("JobID|State|NodeList\n" + text)  # squeue's columns, sacct's names

    return QueueWatcher(delay_s=600)


@contextmanager
def job_states_from_squeue() -> Iterator[None]:
    """Inside: submitit's SLURM jobs learn their states from squeue where the cluster keeps no accounting."""
    if not accounting_disabled():
        yield
        return
    from submitit.slurm.slurm import SlurmJob

    with mock.patch.object(SlurmJob, "watcher", queue_watcher()):
        yield


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    """submitit's SLURM launcher; job states from squeue when the cluster keeps no accounting."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        with job_states_from_squeue():
            return super().launch(job_overrides, initial_job_idx)


def slurm_executor(keys: dict[str, Any]) -> Any:
    """A submitit SLURM executor asking for `keys` (hydra/launcher=slurm's keys, `submitit_folder` and
    `max_num_timeout` included), passed on as Hydra's submitit launcher passes them: its base keys as
    they are, the others as `slurm_<key>`."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    keys = dict(keys)
    executor = submitit.AutoExecutor(folder=keys.pop("submitit_folder"), cluster="slurm",
                                     slurm_max_num_timeout=keys.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{key if key in base else f"slurm_{key}": value for key, value in keys.items()})
    return executor


def group_request(name: str, accelerator: str) -> dict[str, Any]:
    """What an ensemble group's SLURM job asks for beyond the launcher's SLURM keys: its name, one node
    and one task, and one GPU where the trainer asks for GPUs (`accelerator` gpu or cuda; none for cpu
    or auto, as `hydra/launcher=slurm` asks): the members are stacked on one device."""
    from ae_lab.sweep import slurm_gpus

    return {"name": name, "nodes": 1, "tasks_per_node": 1, "gpus_per_node": slurm_gpus(accelerator, 1)}


# the states of a job that is still queued, running or ending (squeue's names)
LIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
               "RESIZING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "STOPPED", "RESV_DEL_HOLD"}


def live_jobs(job_ids: Sequence[str]) -> dict[str, str]:
    """Of `job_ids`, those SLURM still holds (queued, running, requeued or ending), with their states."""
    if not job_ids:
        return {}
    done = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i|%T", f"--jobs={','.join(job_ids)}"],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0 and len(job_ids) > 1:  # squeue may refuse a list for one id it no longer knows
        return {job_id: state for one in job_ids for job_id, state in live_jobs([one]).items()}
    listed = (line.partition("|") for line in done.stdout.split())
    return {job_id: state for job_id, _, state in listed if job_id in job_ids and state in LIVE_STATES}
