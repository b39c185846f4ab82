"""`hydra/launcher=slurm`: Hydra's submitit launcher, asking squeue for job states where the cluster
keeps no accounting.

submitit follows its jobs with `sacct`, which on a cluster without accounting storage (no slurmdbd,
`AccountingStorageType=accounting_storage/none`, common on small clusters) can only answer "Slurm
accounting storage is disabled"; submitit then warns "Bypassing sacct error ..., status may be
inaccurate" at every poll while it waits. There, `QueueWatcher` asks `squeue` (which knows pending,
running and recently ended jobs) instead; any other failure of the command is still warned about.
"""

from __future__ import annotations

import subprocess
from typing import Any, Optional, Sequence
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


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    """submitit's SLURM launcher; job states from squeue when the cluster keeps no accounting."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if not accounting_disabled():
            return super().launch(job_overrides, initial_job_idx)
        from submitit.slurm.slurm import SlurmJob

        with mock.patch.object(SlurmJob, "watcher", queue_watcher()):
            return super().launch(job_overrides, initial_job_idx)
