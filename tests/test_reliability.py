"""Reproducing a finished run, Ctrl-C, and secrets kept out of everything a run writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ctrl_c_by_default, read_json, run_cli
from wandb_records import read_records

SHORT = ["trainer.max_epochs=2", "trainer.limit_train_batches=4", "trainer.enable_progress_bar=false",
         "model=vae", "noise=masking"]


def reproduce(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ae_lab.reproduce", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("reproduce")
    done = run_cli([*SHORT, "logger=csv"], cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    [run] = (cwd / "outputs" / "runs").iterdir()
    return run


def test_reproduce_matches_metric_by_metric(finished, tmp_path):
    done = reproduce(str(finished), "--output", str(tmp_path / "again"))
    assert done.returncode == 0, done.stderr[-3000:]
    count = len(read_json(finished / "metrics.json"))
    assert f"{count} of {count} metrics match" in done.stdout
    assert read_json(tmp_path / "again" / "metrics.json") == read_json(finished / "metrics.json")
    assert "warning:" not in done.stderr


def test_reproduce_reports_a_mismatch_and_a_changed_record(finished, tmp_path):
    edited = tmp_path / "edited"
    subprocess.run(["cp", "-r", str(finished), str(edited)], check=True)
    metrics = read_json(edited / "metrics.json")
    metrics["test/loss"] += 1.0
    (edited / "metrics.json").write_text(json.dumps(metrics))
    record = read_json(edited / "run.json")
    record["packages"]["torch"] = "1.0.0"
    record["data"]["sha256"] = "0" * 64
    (edited / "run.json").write_text(json.dumps(record))
    done = reproduce(str(edited), "--output", str(tmp_path / "again"))
    assert done.returncode == 1
    assert "differing: test/loss" in done.stdout
    assert "package torch differs: recorded 1.0.0" in done.stderr and "data differs" in done.stderr


def test_a_counting_metric_may_differ_by_one_count_and_no_more():
    from ae_lab.reproduce import compare_metrics

    step = 1 / 359  # one of 359 test examples
    original = {"eval/probe_accuracy": 289 / 359, "eval/active_units": 7.0, "test/loss": 27.3}
    again = {"eval/probe_accuracy": 288 / 359, "eval/active_units": 9.0, "test/loss": 27.3 * (1 + 2e-7)}
    rows = compare_metrics(original, again, rtol=1e-5, resolution={"eval/probe_accuracy": step,
                                                                   "eval/active_units": 1})
    assert [match for *_, match in rows] == ["", "1 count", "rtol"]  # sorted by name: units 7 -> 9 is two
    again["eval/probe_accuracy"] = 287 / 359
    assert compare_metrics(original, again, 1e-5, {"eval/probe_accuracy": step})[1][3] == ""
    assert [match for *_, match in compare_metrics(original, original, 0.0)] == ["exact"] * 3


def test_reproduce_refuses_what_is_not_a_finished_run(tmp_path):
    done = reproduce(str(tmp_path))
    assert done.returncode == 2 and "is not a finished run folder" in done.stderr
    assert "Traceback" not in done.stderr


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    return subprocess.Popen([sys.executable, "-m", "ae_lab", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=ctrl_c_by_default)


def _interrupt_when_training(process: subprocess.Popen, cwd: Path, pattern: str) -> tuple[str, str]:
    """Send Ctrl-C once `pattern` (an epoch's checkpoint: training is under way) exists."""
    try:
        deadline = time.time() + 180
        while not list(cwd.glob(pattern)) and time.time() < deadline:
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        return process.communicate(timeout=120)
    finally:
        if process.poll() is None:  # never leave a training process behind
            process.kill()


def test_ctrl_c_ends_a_run_cleanly(tmp_path):
    process = _start(["trainer.max_epochs=100000", "trainer.enable_progress_bar=false"], tmp_path)
    out, err = _interrupt_when_training(process, tmp_path, "outputs/runs/*/checkpoints/last.ckpt")
    assert process.returncode == 130
    [run] = (tmp_path / "outputs" / "runs").iterdir()
    record = read_json(run / "run.json")
    assert record["status"] == "interrupted"
    assert Path(record["interrupted_checkpoint"]) == run / "checkpoints" / "interrupted.ckpt"
    import torch

    checkpoint = torch.load(run / "checkpoints" / "interrupted.ckpt", weights_only=True)
    assert checkpoint["global_step"] > 0
    assert "interrupted" in err.splitlines()[-1] and "Traceback" not in err
    [log] = run.glob("wandb/offline-run-*/run-*.wandb")
    kinds = [record.WhichOneof("record_type") for record in read_records(log)]
    assert "exit" in kinds  # the W&B run was finished


def test_ctrl_c_stops_a_sweep_after_the_current_job_with_a_summary(tmp_path):
    process = _start(["-m", "seed=0,1,2", "trainer.max_epochs=100000", "trainer.enable_progress_bar=false",
                      "logger=none"], tmp_path)
    out, err = _interrupt_when_training(process, tmp_path, "outputs/sweeps/*/*/checkpoints/last.ckpt")
    assert process.returncode == 130
    [sweep] = (tmp_path / "outputs" / "sweeps").iterdir()
    jobs = [p for p in sweep.iterdir() if p.is_dir()]
    assert len(jobs) == 1 and read_json(jobs[0] / "run.json")["status"] == "interrupted"
    assert "1 interrupted" in (sweep / "summary.md").read_text()


def test_secrets_never_reach_what_a_run_writes(tmp_path):
    secret = "ae-lab-test-secret-7f3c1d"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("WANDB_")},
           "WANDB_API_KEY": secret, "MY_SERVICE_TOKEN": secret}
    done = subprocess.run([sys.executable, "-m", "ae_lab", "trainer=debug"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert secret not in done.stdout + done.stderr
    written = [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in written)
    for path in written:
        assert secret.encode() not in path.read_bytes(), f"{path} holds the secret"


def test_a_run_submitit_does_not_requeue_is_recorded_interrupted(tmp_path):
    """When submitit's handler refuses to requeue (it raises UncompletedJobError, e.g. "timed-out too
    many times" once `max_num_timeout` is used up), the run's record says `interrupted`, with the reason
    and the way on, not `requeued` (the job will not come back)."""
    from submitit.core.utils import UncompletedJobError

    from ae_lab.preemption import Requeued
    from ae_lab.tracking import RunRecord
    from conftest import compose_config

    record = RunRecord(tmp_path, compose_config([]), "digits", "checksum")
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"

    def submitit_refuses(signum, frame):
        raise UncompletedJobError("Job not requeued because: timed-out too many times.")

    stop = Requeued(checkpoint, submitit_refuses)
    record.requeued(stop)  # as ae_lab.run records a stop for the cluster's signal
    with pytest.raises(UncompletedJobError):
        stop.requeue()
    saved = read_json(tmp_path / "run.json")
    assert saved["status"] == "interrupted" and saved["interrupted_checkpoint"] == str(checkpoint)
    assert "timed-out too many times" in saved["error"] and f"resume={tmp_path}" in saved["error"]


def test_a_run_whose_loss_turns_nan_keeps_its_earlier_checkpoints_as_they_were(tmp_path, monkeypatch):
    """The docs' promise (docs/reproducing.md): the batch of step 4 is made NaN, after the
    checkpoints of steps 2 and 4; the run fails naming the step, and the checkpoint folder holds the same
    files with the same bytes as when step 4 began."""
    from ae_lab.module import Autoencoder
    from conftest import train_in_process

    before: dict[str, bytes] = {}
    step = Autoencoder.training_step

    def poisoned(self, batch, batch_idx):
        if self.global_step == 4:
            before.update({path.name: path.read_bytes() for path in (tmp_path / "checkpoints").iterdir()})
            batch = {**batch, "x": batch["x"] * float("nan")}
        return step(self, batch, batch_idx)

    monkeypatch.setattr(Autoencoder, "training_step", poisoned)
    with pytest.raises(FloatingPointError, match="loss became nan at step 4"):
        train_in_process(["trainer=debug", "trainer.limit_train_batches=6", "checkpoint_every_n_steps=2",
                          "logger=none", "eval=minimal"], tmp_path)
    assert "last.ckpt" in before
    assert {path.name: path.read_bytes() for path in (tmp_path / "checkpoints").iterdir()} == before
    assert read_json(tmp_path / "run.json")["status"] == "failed"
