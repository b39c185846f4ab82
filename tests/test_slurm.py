"""Sweeps through `hydra/launcher=slurm` on a live one-node SLURM cluster (tests/slurm_cluster.py, started
once per test session): job folders, summary, compare table and W&B grouping as with the basic launcher, a
failing job, DDP as one job of two SLURM tasks, and a job signalled as before a preemption or its time
limit that checkpoints, requeues itself and ends with the metrics of an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

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
