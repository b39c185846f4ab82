"""Sweeps through `hydra/launcher=slurm` on a live one-node SLURM cluster (tests/slurm_cluster.py, started
once per test session): job folders, summary, compare table and W&B grouping as with the basic launcher, a
failing job, DDP as one job of two SLURM tasks, and a job signalled as before a preemption or its time
limit that checkpoints, requeues itself and ends with the metrics of an uninterrupted run. Then vectorised
sweeps on the cluster (each ensemble group one SLURM job): the local vectorised sweep's folders and numbers, a
signalled group requeued exactly, a second launch refused while the jobs live, requeues used up and the
recorded command that finishes the sweep."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from omegaconf import OmegaConf

from conftest import read_json
from test_sweeps import JOB_FILES, _test_recon_by_hand, files_of
from wandb_records import read_records, run_contents

pytestmark = pytest.mark.slurm

STALL = Path(__file__).resolve().parent / "stall"  # a sitecustomize that stops a run after a given step
# what a job asks of the 2-CPU test node; no GPU key: the preset asks for GPUs only with accelerator=gpu
RESOURCES = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
             "hydra.launcher.timeout_min=10"]
QUICK = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false"]


def _environment(cluster, **extra: str) -> dict[str, str]:
    return {**{k: v for k, v in cluster.environment.items() if not k.startswith("WANDB_")}, **extra}


def sweep_on(cluster, args: list[str], cwd: Path, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
    """`python -m ae_lab -m hydra/launcher=slurm ARGS` as a user on the cluster runs it."""
    return subprocess.run([sys.executable, "-m", "ae_lab", "-m", *RESOURCES, *args], cwd=cwd,
                          env=_environment(cluster, **extra), capture_output=True, text=True, timeout=timeout)


def job_folders(sweep: Path) -> list[Path]:
    """The sweep's job folders (not submitit's `.submitit/`, which holds the jobs' pickles and logs)."""
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


def _task_logs(sweep: Path) -> str:
    """What the jobs' tasks printed (submitit keeps it in the sweep's .submitit folder)."""
    return "\n".join(path.read_text(errors="replace") for path in sorted(sweep.glob(".submitit/*/*.out"))
                     + sorted(sweep.glob(".submitit/*/*.err")))


def test_a_sweep_on_slurm_records_every_job_as_the_basic_launcher_does(slurm_cluster, tmp_path):
    sweep = tmp_path / "outputs" / "sweeps" / "on_slurm"
    done = sweep_on(slurm_cluster, ["optim.name=sgd", "optim.lr=0.01,1e30", *QUICK, f"hydra.sweep.dir={sweep}"],
                    cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:] + _task_logs(sweep)[-3000:]
    assert "1 of 2 jobs did not complete" in done.stderr
    assert "Bypassing sacct" not in output + _task_logs(sweep)  # the cluster keeps no accounting
    # what was asked of SLURM: the signal before the time limit, no GPU on a CPU trainer
    [script] = sweep.glob(".submitit/*/*_submission.sh")
    assert "#SBATCH --signal=USR2@120\n" in script.read_text() and "gpu" not in script.read_text()
    good, bad = job_folders(sweep)
    assert read_json(good / "run.json")["status"] == "completed"
    assert files_of(good) - {"wandb/" + p.name for p in good.glob("wandb/offline-run-*")} == JOB_FILES
    failed = read_json(bad / "run.json")
    assert failed["status"] == "failed" and "loss became nan at step" in failed["error"]
    summary = json.loads((sweep / "summary.json").read_text())
    assert [(entry["folder"], entry["status"]) for entry in summary] == [(good.name, "completed"), (bad.name, "failed")]
    # one W&B run per job, grouped by the sweep, its summary the job's metrics
    wandb = run_contents(good)
    assert wandb["run"].run_group == f"lr {sweep.name}"  # the swept key, then the sweep folder's name
    metrics = read_json(good / "metrics.json")
    assert wandb["summary"]["test/loss"] == pytest.approx(metrics["test/loss"])
    # the compare table: one row per job, by the swept key, the failed one without values
    table = subprocess.run([sys.executable, "-m", "ae_lab.compare", str(sweep), "--format", "json"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr[-3000:]
    rows = {row["optim.lr"]: row for row in json.loads(table.stdout)}
    assert {lr: row["status"] for lr, row in rows.items()} == {0.01: "completed", 1e30: "failed"}
    assert rows[0.01]["test/loss"] == pytest.approx(metrics["test/loss"]) and rows[1e30]["test/loss"] is None


def test_a_ddp_job_on_slurm_is_one_job_of_two_tasks(slurm_cluster, tmp_path):
    sweep = tmp_path / "outputs" / "sweeps" / "ddp"
    # verbose=true: Lightning's "MEMBER: 2/2" line (the process group's size) reaches the tasks' output
    done = sweep_on(slurm_cluster, ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "verbose=true",
                                    *QUICK, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    tasks = _task_logs(sweep)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:] + tasks[-3000:]
    # the two ranks are the job's two SLURM tasks (submitit's log of each task names its rank)
    assert re.search(r"global_rank=0\(2\)", tasks) and re.search(r"global_rank=1\(2\)", tasks)
    assert "MEMBER: 2/2" in tasks
    [job] = job_folders(sweep)
    files = files_of(job)
    wandb_runs = {f for f in files if f.startswith("wandb/")}
    assert files - wandb_runs == JOB_FILES and len(wandb_runs) == 1  # as a local DDP job: rank 1 writes nothing
    log = (job / "ae_lab.log").read_text()
    assert "GLOBAL_RANK: 0" in log and "GLOBAL_RANK: 1" not in log  # rank 1 logs to its task's output only
    # the test metric covers the whole split across both ranks: the same as one process on all of it
    assert read_json(job / "metrics.json")["test/recon"] == pytest.approx(_test_recon_by_hand(job), rel=1e-5)


# a VAE with masking noise: the data order, the noise and the latent samples all have to continue exactly.
# Digits: 20 batches an epoch, step checkpoints every 4; stopped after step 6, signalled there.
RUN = ["model=vae", "noise=masking", "model.hidden_dims=[32]", "model.latent_dim=4", "trainer.max_epochs=2",
       "trainer.limit_train_batches=10", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
       "checkpoint_every_n_steps=4", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
       "eval=minimal", "seed=3"]
SIGNALLED_AFTER = 6


def _wait_for(condition, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_job_signalled_before_preemption_requeues_and_ends_as_an_uninterrupted_run(slurm_cluster, tmp_path):
    sweep, reference_dir = tmp_path / "outputs" / "sweeps" / "preempted", tmp_path / "uninterrupted"
    reference = subprocess.Popen(
        [sys.executable, "-m", "ae_lab", *RUN, "logger=none", f"hydra.run.dir={reference_dir}"], cwd=tmp_path,
        env=_environment(slurm_cluster), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = tmp_path / "stalled"
    stall = {"PYTHONPATH": os.pathsep.join(filter(None, [str(STALL), os.environ.get("PYTHONPATH")])),
             "AE_LAB_STALL_AFTER_STEP": str(SIGNALLED_AFTER), "AE_LAB_STALL_MARKER": str(marker)}
    launcher = subprocess.Popen([sys.executable, "-m", "ae_lab", "-m", *RESOURCES, *RUN, f"hydra.sweep.dir={sweep}"],
                                cwd=tmp_path, env=_environment(slurm_cluster, **stall), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(marker.exists, f"the job to reach step {SIGNALLED_AFTER}")
        [job] = job_folders(sweep)
        wandb_id = read_json(job / "run.json")["wandb_run_id"]
        [job_id] = [line.split()[0] for line in slurm_cluster.command("squeue", "-h", "-o", "%i %T").splitlines()
                    if line.split()[1] == "RUNNING"]
        # what SLURM sends before a preemption or the time limit (`--signal=USR2@...`, asked by submitit)
        slurm_cluster.command("scancel", "--signal=USR2", job_id)
        _wait_for(lambda: "received SIGUSR2" in (job / "ae_lab.log").read_text(), "the signal to arrive")
        marker.unlink()  # the run goes on, checkpoints at the next exact point and requeues itself
        _wait_for(lambda: read_json(job / "run.json")["status"] == "requeued", "the job to requeue itself", 120)
        # a requeued job waits (cred_expire, here 10 s) before it starts again; from then on: no help
        output, _ = launcher.communicate(timeout=300)
        assert launcher.returncode == 0, output[-3000:] + _task_logs(sweep)[-3000:]
        _, errors = reference.communicate(timeout=300)
        assert reference.returncode == 0, errors[-3000:]
    finally:
        for process in (launcher, reference):
            if process.poll() is None:  # never leave a process behind
                process.kill()
                process.wait()
        if marker.exists():
            marker.unlink()

    assert read_json(job / "metrics.json") == read_json(reference_dir / "metrics.json")
    record = read_json(job / "run.json")
    assert record["status"] == "completed" and record["wandb_run_id"] == wandb_id
    assert record["resumed_from"]["global_step"] == SIGNALLED_AFTER + 1  # the checkpoint written on the signal
    [attempt] = job.glob("run.attempt-*.json")
    assert read_json(attempt)["status"] == "requeued" and record["resumed_from"]["previous_record"] == attempt.name
    assert "Restarts=1 " in slurm_cluster.command("scontrol", "show", "job", job_id)  # requeued once, by itself
    # one W&B run, written offline in one folder per attempt, both with the run's id
    parts = sorted(job.glob("wandb/offline-run-*"))
    assert len(parts) == 2 and all(part.name.endswith(f"-{wandb_id}") for part in parts)
    runs = [r.run for part in parts for r in read_records(next(part.glob("run-*.wandb")))
            if r.WhichOneof("record_type") == "run"]
    assert {run.run_group for run in runs} == {sweep.name}
    assert {OmegaConf.load(job / ".hydra" / "config.yaml").seed} == {3}
    summary = json.loads((sweep / "summary.json").read_text())
    assert [entry["status"] for entry in summary] == ["completed"]


# ----- vectorised sweeps on SLURM (hydra/launcher=vectorized hydra.launcher.backend=slurm): each ensemble
# group one SLURM job. Two groups (one per latent size) of four members (β × seed), a VAE with masking noise
# (its steps draw noise and latent samples, which must go on exactly); digits: 6 steps an epoch, 2 epochs,
# group checkpoints every 4 steps, the groups stalled after the one at step 4.
GROUPS = ["model=vae", "noise=masking", "model.hidden_dims=[16]", "model.latent_dim=2,3", "loss.beta=1,4", "seed=3,4",
          "trainer.max_epochs=2", "trainer.limit_train_batches=6", "trainer.limit_val_batches=2",
          "trainer.limit_test_batches=2", "checkpoint_every_n_steps=4", "eval=minimal", "logger=none",
          "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
ON_SLURM = ["hydra/launcher=vectorized", "hydra.launcher.backend=slurm", "hydra.launcher.poll_seconds=0.2",
            "hydra.launcher.slurm.cpus_per_task=1", "hydra.launcher.slurm.mem_gb=1",
            "hydra.launcher.slurm.timeout_min=10"]
STALLED_AT = 4


@pytest.fixture(scope="module")
def local_groups(tmp_path_factory) -> Path:
    """The same sweep through the local vectorised launcher, in this machine's process: the reference."""
    cwd = tmp_path_factory.mktemp("local_groups")
    done = subprocess.run([sys.executable, "-m", "ae_lab", "-m", "hydra/launcher=vectorized", *GROUPS,
                           f"hydra.sweep.dir={cwd / 'sweep'}"], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if not k.startswith("WANDB_")})
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd / "sweep"


def _vectorized_on(cluster, args: list[str], cwd: Path, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ae_lab", "-m", *ON_SLURM, *GROUPS, *args], cwd=cwd,
                            env=_environment(cluster, **extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _groups(sweep: Path) -> dict[str, tuple[str, list[Path]]]:
    """Each group's SLURM job id and member folders, by the group's name."""
    names = {path.name.removesuffix(".slurm.json"): read_json(path)["job_id"]
             for path in (sweep / ".ensembles").glob("*.slurm.json")}
    members = {name: [] for name in names}
    for member in job_folders(sweep):
        members[read_json(member / "run.json")["ensemble"]["group"]].append(member)
    return {name: (job_id, members[name]) for name, job_id in names.items()}


@contextmanager
def _stalled_groups(cluster, sweep: Path, tmp_path: Path, args: list[str]) -> Iterator[tuple[subprocess.Popen, Path]]:
    """The sweep launched on the cluster into `sweep` with both groups' jobs stalled after their checkpoint at
    step STALLED_AT (tests/stall; deleting the marker lets them go on); the launcher is never left running."""
    marker = tmp_path / "stalled"
    stall = {"PYTHONPATH": os.pathsep.join(filter(None, [str(STALL), os.environ.get("PYTHONPATH")])),
             "AE_LAB_STALL_AFTER_STEP": str(STALLED_AT), "AE_LAB_STALL_MARKER": str(marker)}
    launcher = _vectorized_on(cluster, [*args, f"hydra.sweep.dir={sweep}"], tmp_path, **stall)
    try:
        _wait_for(lambda: len(list(sweep.glob(".ensembles/*.pt"))) == 2 and marker.exists(),
                  f"both groups to reach step {STALLED_AT}")
        yield launcher, marker
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        marker.unlink(missing_ok=True)


def _signal_group(cluster, job_id: str, member: Path, marker: Path) -> None:
    """SLURM's signal before a preemption or the time limit, to a stalled group's job; then let it go on."""
    cluster.command("scancel", "--signal=USR2", job_id)
    _wait_for(lambda: "received SIGUSR2" in (member / "ae_lab.log").read_text(), "the signal to arrive")
    marker.unlink()


def _launcher_output(launcher: subprocess.Popen, marker: Path, timeout: float = 300) -> str:
    """The launcher's output once it has ended. Should a group stall again at step STALLED_AT (a requeued
    job that started over instead of resuming from its checkpoint), at once an error saying so."""
    deadline = time.time() + timeout
    while launcher.poll() is None:
        assert not marker.exists(), f"a requeued group reached step {STALLED_AT} again: it did not resume"
        assert time.time() < deadline, "timed out waiting for the launcher"
        time.sleep(0.2)
    return launcher.stdout.read()


def _assert_equal_to(sweep: Path, local: Path) -> None:
    """The same member folders as the local vectorised sweep: configs byte for byte, metrics within the
    tolerance of the member tests (tests/test_vectorized.py), every member completed."""
    members = job_folders(sweep)
    assert [p.name for p in members] == [p.name for p in job_folders(local)] and len(members) == 8
    for member in members:
        reference = local / member.name
        for name in ("config.yaml", "overrides.yaml"):
            assert (member / ".hydra" / name).read_bytes() == (reference / ".hydra" / name).read_bytes()
        assert read_json(member / "run.json")["status"] == "completed"
        ours, theirs = read_json(member / "metrics.json"), read_json(reference / "metrics.json")
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (member.name, key)
    summary = [(e["folder"], e["status"]) for e in json.loads((sweep / "summary.json").read_text())]
    assert summary == [(e["folder"], e["status"]) for e in json.loads((local / "summary.json").read_text())]


def test_a_vectorized_sweep_runs_each_group_as_a_slurm_job_and_a_signalled_group_requeues_exactly(
        slurm_cluster, local_groups, tmp_path):
    sweep = tmp_path / "sweep"
    with _stalled_groups(slurm_cluster, sweep, tmp_path, []) as (launcher, marker):
        groups = _groups(sweep)
        assert len(groups) == 2 and all(len(members) == 4 for _, members in groups.values())
        # while the groups' jobs are queued or running, the same sweep launched again is refused, untouched
        before = sorted(str(p) for p in sweep.rglob("*"))
        again = _vectorized_on(slurm_cluster, [f"hydra.sweep.dir={sweep}"], tmp_path)
        refusal, _ = again.communicate(timeout=120)
        assert again.returncode == 2 and len(refusal.strip().splitlines()) == 1, refusal[-3000:]
        assert re.search(r"SLURM job (\d+) of ensemble \S+, from an earlier launch of this sweep, is still running",
                         refusal).group(1) in {job_id for job_id, _ in groups.values()}
        assert sorted(str(p) for p in sweep.rglob("*")) == before
        signalled, (job_id, members) = sorted(groups.items())[0]
        # its checkpoint of step 4 taken away: the group can then resume only from what it writes on the signal
        (sweep / ".ensembles" / f"{signalled}.pt").unlink()
        _signal_group(slurm_cluster, job_id, members[0], marker)
        output = _launcher_output(launcher, marker)
        assert launcher.returncode == 0, output[-3000:] + _task_logs(sweep)[-3000:]

    _assert_equal_to(sweep, local_groups)
    for name, (group_job, group_members) in groups.items():
        # each group's output: submitit's, linked from the group's log; what it asked of SLURM
        group_log = sweep / ".ensembles" / f"{name}.log"
        assert group_log.is_symlink() and group_log.resolve() == (sweep / ".submitit" / group_job /
                                                                  f"{group_job}_0_log.out").resolve()
        script = (sweep / ".submitit" / group_job / f"{group_job}_submission.sh").read_text()
        assert f"#SBATCH --job-name={name}\n" in script and "#SBATCH --cpus-per-task=1\n" in script
        assert "#SBATCH --signal=USR2@120\n" in script and "gpu" not in script  # a CPU trainer asks no GPU
        for member in group_members:
            record, attempts = read_json(member / "run.json"), list(member.glob("run.attempt-*.json"))
            if name != signalled:
                assert not attempts and "resumed_from" not in record
                continue
            # the signalled group: checkpointed where the signal found it, recorded requeued, resumed from there
            [attempt] = attempts
            assert read_json(attempt)["status"] == "requeued"
            assert record["resumed_from"]["global_step"] == STALLED_AT
            assert record["resumed_from"]["previous_record"] == attempt.name
    assert "Restarts=1 " in slurm_cluster.command("scontrol", "show", "job", job_id)  # requeued once, by itself
    assert "Restarts=0 " in slurm_cluster.command("scontrol", "show", "job", next(
        group_job for name, (group_job, _) in groups.items() if name != signalled))
    assert "received SIGUSR2" in (sweep / ".ensembles" / f"{signalled}.log").read_text()


def test_a_group_whose_requeues_are_used_up_is_interrupted_and_its_recorded_command_finishes_the_sweep(
        slurm_cluster, local_groups, tmp_path):
    sweep = tmp_path / "sweep"
    no_requeue = ["hydra.launcher.slurm.max_num_timeout=0"]
    with _stalled_groups(slurm_cluster, sweep, tmp_path, no_requeue) as (launcher, marker):
        groups = _groups(sweep)
        signalled, (job_id, members) = sorted(groups.items())[0]
        _signal_group(slurm_cluster, job_id, members[0], marker)  # (with a 10-minute limit, a time-out)
        output = _launcher_output(launcher, marker)
    assert launcher.returncode == 1 and "4 of 8 jobs did not complete" in output, output[-3000:]
    commands = set()
    for member in members:
        record = read_json(member / "run.json")
        assert record["status"] == "interrupted" and record["interrupted_checkpoint"].endswith(f"{signalled}.pt")
        reason, command = re.fullmatch(r"stopped by the cluster and not requeued \((.*)\); (.*) goes on",
                                       record["error"]).groups()
        assert "timed-out too many times" in reason
        commands.add(command)
    [command] = commands
    # the recorded command: the same sweep into the same folder; it skips the other group's completed
    # members and resumes this group from its checkpoint, ending with the numbers of an uninterrupted sweep
    words = shlex.split(command)
    assert words[:4] == ["python", "-m", "ae_lab", "-m"] and f"hydra.sweep.dir={sweep}" in words
    done = subprocess.run([sys.executable, *words[1:]], cwd=tmp_path, env=_environment(slurm_cluster),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:] + _task_logs(sweep)[-3000:]
    assert (done.stdout + done.stderr).count("already completed") == 4
    _assert_equal_to(sweep, local_groups)
    for member in members:
        assert read_json(member / "run.json")["resumed_from"]["global_step"] == STALLED_AT
