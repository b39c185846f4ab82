"""Test helper, not part of ae_lab: a one-node SLURM cluster on this machine, for the tests of
`hydra/launcher=slurm` (tests/test_slurm.py).

`start_cluster(folder)` installs Debian's `slurm-wlm` and `munge` when they are missing (apt-get, as
root), writes a private config into `folder` (its own munge key and socket, free ports, state, spool,
log and pid files, all in `folder`), starts munged, slurmctld and slurmd, and waits until the node is
idle. `Cluster.stop()` ends exactly those three daemons, by the pids they wrote. The daemons' clients
(sbatch, squeue, scontrol, and the jobs) find the cluster through `SLURM_CONF` in `Cluster.environment`.
Where the cluster cannot be had, `ClusterUnavailable` says why (the tests skip with it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
PARTITION = "ae_lab"
CPUS = 2
MEMORY_MB = 4096


class ClusterUnavailable(Exception):
    """Why no test cluster could be started (the SLURM tests are skipped with this reason)."""


@dataclass
class Cluster:
    folder: Path
    environment: dict[str, str]
    pids: dict[str, int] = field(default_factory=dict)

    def command(self, *args: str, timeout: float = 30) -> str:
        """Run a SLURM client command against this cluster; its output."""
        done = subprocess.run(list(args), env=self.environment, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def logs(self) -> str:
        """The daemons' logs (for a failing test's message)."""
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
                         for path in sorted(self.folder.glob("*.log")))

    def stop(self) -> None:
        """End the jobs left on the cluster, then the daemons it started (by their pids only), and wait
        until they are gone. (Stopping slurmd under a job that is still ending would leave its step
        daemon and srun waiting for it.)"""
        if "slurmd" in self.pids:
            self._end_jobs()
        for name in reversed(DAEMONS):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 20
            while _alive(pid) and time.time() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


    def _end_jobs(self, timeout: float = 30) -> None:
        """Cancel every job still on the cluster and wait until SLURM has ended them; kill what is left of
        their processes (as `scontrol listpids` names them) after `timeout`."""
        try:
            jobs = self.command("squeue", "-h", "-o", "%A").split()
            if jobs:
                self.command("scancel", *jobs)
            deadline = time.time() + timeout
            while self.command("squeue", "-h", "-o", "%A").split() and time.time() < deadline:
                time.sleep(0.5)
            for line in self.command("scontrol", "listpids").splitlines()[1:]:
                os.kill(int(line.split()[0]), signal.SIGKILL)
        except (RuntimeError, OSError, ValueError, subprocess.SubprocessError):
            pass  # the daemons are stopped next in any case


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a daemon that ended but is not reaped yet (our own child) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def install() -> None:
    """Install slurm-wlm and munge with apt-get when missing; ClusterUnavailable when that cannot be."""
    if all(shutil.which(name) for name in (*DAEMONS, "sbatch", "mungekey")):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"{' and '.join(PACKAGES)} are not installed, and installing them needs "
                                 "root and apt-get")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")


def _config(folder: Path) -> str:
    host = socket.gethostname()
    return "\n".join([
        "ClusterName=ae_lab_test",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # a requeued job waits cred_expire seconds before it starts again (default 120)
        f"AuthInfo=socket={folder / 'munge.socket'},cred_expire=10",
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}",
        f"SlurmdLogFile={folder / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",  # no slurmdbd: sacct cannot answer
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SlurmdParameters=config_overrides",  # the node as configured here, whatever the machine has
        "MpiDefault=none",
        "ReturnToService=2",
        "SchedulerType=sched/builtin",
        "SchedulerParameters=sched_interval=1",  # a requeued job starts within a second of its wait
        "KillWait=10",
        "MinJobAge=600",
        # the node named as the machine: DDP ranks find their first node's address by its name
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={CPUS} RealMemory={MEMORY_MB} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        ""])


def _start(name: str, command: list[str], pid_file: Path, environment: dict[str, str], folder: Path) -> int:
    """Start a daemon (it forks into the background and writes its pid file); its pid."""
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise ClusterUnavailable(f"{name} did not start: {(done.stderr or done.stdout).strip()[-500:]}")
    deadline = time.time() + 30
    while not (pid_file.is_file() and pid_file.read_text().strip()):
        if time.time() > deadline:
            log = folder / f"{name}.log"
            raise ClusterUnavailable(f"{name} wrote no pid file: {log.read_text()[-500:] if log.exists() else ''}")
        time.sleep(0.1)
    return int(pid_file.read_text().split()[0])


def start_cluster(folder: Path, timeout: float = 60) -> Cluster:
    """Install (when needed), configure and start a one-node cluster in `folder`; it is idle on return."""
    install()
    if os.geteuid() != 0:
        raise ClusterUnavailable("slurmd runs jobs as their users: the test cluster needs root")
    if len(str(folder / "munge.socket")) > 100:
        raise ClusterUnavailable(f"{folder} is too long a path for munge's socket (a Unix socket path has at most "
                                 "107 characters): set TMPDIR to a shorter folder")
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)  # munged checks that no one else can write where its socket and key are
    for sub in ("state", "spool"):
        (folder / sub).mkdir(exist_ok=True)
    key = folder / "munge.key"
    subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True, timeout=30)
    key.chmod(0o600)
    (folder / "slurm.conf").write_text(_config(folder))
    environment = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
    cluster = Cluster(folder, environment)
    try:
        cluster.pids["munged"] = _start("munged", [
            "munged", "--force", f"--socket={folder / 'munge.socket'}", f"--key-file={key}",
            f"--pid-file={folder / 'munged.pid'}", f"--log-file={folder / 'munged.log'}",
            f"--seed-file={folder / 'munged.seed'}"], folder / "munged.pid", environment, folder)
        cluster.pids["slurmctld"] = _start("slurmctld", ["slurmctld", "-f", str(folder / "slurm.conf")],
                                           folder / "slurmctld.pid", environment, folder)
        cluster.pids["slurmd"] = _start("slurmd", ["slurmd", "-f", str(folder / "slurm.conf")],
                                        folder / "slurmd.pid", environment, folder)
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            done = subprocess.run(["sinfo", "-h", "-n", socket.gethostname(), "-o", "%T"], env=environment,
                                  capture_output=True, text=True, timeout=30)
            state = done.stdout.strip()
            if state == "idle":
                return cluster
            time.sleep(0.5)
        raise ClusterUnavailable(f"the node did not become idle within {timeout:.0f} s (state: {state!r})\n"
                                 + cluster.logs())
    except BaseException:
        cluster.stop()
        raise
