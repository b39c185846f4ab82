"""Resuming a killed run through the real command line (`python -m ae_lab resume=RUN`): it ends with the
numbers of an uninterrupted run; checkpoints survive a kill while being written; a resume that cannot
continue its run is refused before anything is written."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from paths import ROOT
from wandb_records import read_records
from ae_lab.history import STEP_LOSS, read_history
from ae_lab.wandb_log import history_rows

SHARED = ROOT.parent / "shared" / "data"
# MNIST with dynamic binarisation, masking noise and a VAE: the data order, the binarisation, the noise
# and the latent samples all have to continue exactly. 10 batches an epoch, step checkpoints every 5.
RUN = ["dataset=mnist", f"dataset.root={SHARED}", "dataset.binarize=dynamic", "noise=masking", "model=vae",
       "model.hidden_dims=[64]", "model.latent_dim=8", "trainer.max_epochs=3", "trainer.limit_train_batches=10",
       "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "checkpoint_every_n_steps=5",
       "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "seed=3",
       "eval.fd_samples=0"]  # no Fréchet distances: their MNIST classifier would be trained (40 s) for them


def _environment(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    return {**env, **extra}


def _global_step(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason=f"the MNIST files are not in {SHARED}")
def test_a_run_killed_mid_epoch_and_resumed_ends_as_an_uninterrupted_run(tmp_path, kill_after_step, read_json, run_cli):
    reference_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    reference = subprocess.Popen([sys.executable, "-m", "ae_lab", *RUN, "logger=none",
                                  f"hydra.run.dir={reference_dir}"], cwd=tmp_path, env=_environment(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # killed after the last batch of the last epoch (30), before its validation: no checkpoint is
        # taken there (Lightning would resume it past the validation), so step 25's is the newest, and
        # the final training metrics depend on the epoch sums of steps 21-25 that it carries
        kill_after_step([*RUN, f"hydra.run.dir={run_dir}"], tmp_path, step=30)
        assert _global_step(run_dir / "checkpoints" / "last.ckpt") == 25
        assert read_json(run_dir / "run.json")["status"] == "running"
        wandb_id = read_json(run_dir / "run.json")["wandb_run_id"]
        done = run_cli([f"resume={run_dir}"], cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        # it shows the run's recorded choices and overrides, not those of the resume's command line
        config, overrides = done.stdout.splitlines()[:2]
        assert " model=vae " in f"{config} " and "dataset=mnist" in config and "model=ae" not in config, config
        assert "model.latent_dim=8" in overrides and f"resume={run_dir}" in overrides, overrides
        _, errors = reference.communicate(timeout=300)
        assert reference.returncode == 0, errors[-3000:]
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()

    assert read_json(run_dir / "metrics.json") == read_json(reference_dir / "metrics.json")
    record = read_json(run_dir / "run.json")
    assert record["status"] == "completed" and record["wandb_run_id"] == wandb_id
    assert record["resumed_from"]["global_step"] == 25 and record["resumed_from"]["epoch"] == 2
    [attempt] = run_dir.glob("run.attempt-*.json")
    assert read_json(attempt)["status"] == "running" and record["resumed_from"]["previous_record"] == attempt.name
    # one W&B run, written offline in one folder per attempt, both with the run's id
    parts = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(parts) == 2 and all(part.name.endswith(f"-{wandb_id}") for part in parts)
    runs = [record.run for part in parts for record in read_records(next(part.glob("run-*.wandb")))
            if record.WhichOneof("record_type") == "run"]
    # named as the run was, not after the resume's command line (the killed attempt's own run record
    # may never have reached its file under load: SIGKILL allows no flush)
    assert runs and len({(run.display_name, run.run_group, run.job_type) for run in runs}) == 1
    assert runs[0].display_name.startswith("mnist_") and "resume" not in runs[-1].display_name
    assert f"wandb sync {run_dir / 'wandb'}/offline-run-*" in done.stdout


def test_a_ctrl_c_inside_a_checkpoint_write_stays_a_ctrl_c(tmp_path, monkeypatch):
    """torch.save turns a KeyboardInterrupt raised mid-record into a RuntimeError when its zip writer
    closes: the run would be recorded failed (and a sweep would go on) instead of interrupted."""
    import ae_lab.storage
    from ae_lab.storage import atomic_torch_save

    class InterruptedFile(io.FileIO):
        """A file that gets Ctrl-C on its second write, once torch has begun a record."""

        def write(self, data: bytes) -> int:
            if self.tell() > 0:
                raise KeyboardInterrupt
            return super().write(data)

    with pytest.raises(RuntimeError, match="unexpected pos") as plain:  # what torch.save does alone
        torch.save({"weights": torch.ones(1000)}, InterruptedFile(tmp_path / "plain", "wb"))
    assert isinstance(plain.value.__context__, KeyboardInterrupt)

    path = tmp_path / "last.ckpt"
    atomic_torch_save(path, {"global_step": 1})
    monkeypatch.setattr(ae_lab.storage, "open", InterruptedFile, raising=False)  # atomic_write's open
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save(path, {"global_step": 2, "weights": torch.ones(1000)})
    assert torch.load(path, weights_only=True) == {"global_step": 1}


def test_a_kill_while_a_checkpoint_is_written_leaves_the_previous_one(tmp_path):
    """A process killed (SIGKILL) half-way through writing a checkpoint over the previous one."""
    from ae_lab.checkpoints import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "weights": torch.ones(1000)}, path)
    script = f"""
import time
from pathlib import Path
from ae_lab.storage import atomic_write
def half_then_killed(file):
    file.write(b"half a checkpoint")
    file.flush()
    print("writing", flush=True)
    time.sleep(600)
atomic_write(Path({str(path)!r}), half_then_killed)
"""
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["global_step"] == 1 and torch.equal(checkpoint["weights"], torch.ones(1000))
    AtomicCheckpointIO().save_checkpoint({"global_step": 2}, path)  # the next write replaces the leftover
    assert torch.load(path, weights_only=True) == {"global_step": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_resumed_loader_serves_the_rest_of_the_epoch_in_the_same_order():
    from ae_lab.data.base import BatchedTensors, EpochSampler, ResumableLoader, Split, keep_batch

    dataset = BatchedTensors(Split(torch.arange(50, dtype=torch.float32).view(50, 1, 1, 1)))

    def loader() -> ResumableLoader:
        return ResumableLoader(dataset, batch_size=8, sampler=EpochSampler(dataset, 0, 1, seed=7),
                               collate_fn=keep_batch)

    def epoch(source: ResumableLoader, number: int) -> list[list[float]]:
        source.sampler.set_epoch(number)
        return [batch["x"].flatten().tolist() for batch in source]

    uninterrupted = loader()
    epochs = [epoch(uninterrupted, number) for number in range(3)]
    assert epochs[0] != epochs[1] and sorted(sum(epochs[2], [])) == list(range(50))

    first = loader()
    first.sampler.set_epoch(1)
    served = iter(first)
    for _ in range(3):
        next(served)
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 3}
    resumed = loader()  # a new process: Lightning loads the state before it iterates
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # as Lightning does at the start of the (resumed) epoch
    assert [batch["x"].flatten().tolist() for batch in resumed] == epochs[1][3:]
    assert resumed.state_dict() == {"epoch": 1, "batches": 7} and len(resumed) == 7
    assert epoch(resumed, 2) == epochs[2]


# ---- refusals: one line naming `resume`, exit code 2, and the folder left exactly as it was ----

def _snapshot(folder: Path) -> dict[str, tuple]:
    return {str(p.relative_to(folder)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in [folder, *folder.rglob("*")]}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, quick, train_in_process) -> tuple[Path, Path]:
    """Two finished runs of different configs (their checkpoints to resume from or to misplace)."""
    folder = tmp_path_factory.mktemp("runs")
    train_in_process([*quick, "logger=none"], folder / "run")
    train_in_process([*quick, "logger=none", "model.latent_dim=4"], folder / "other")
    return folder / "run", folder / "other"


@pytest.fixture(scope="session")
def killed_copy(read_json):
    """`killed_copy(...)`: A copy of `run` as a killed run leaves it: status running, no process alive."""
    def killed_copy(run: Path, destination: Path) -> Path:
        """A copy of `run` as a killed run leaves it: status running, no process alive."""
        subprocess.run(["cp", "-r", str(run), str(destination)], check=True)
        record = read_json(destination / "run.json")
        (destination / "run.json").write_text(json.dumps({**record, "status": "running", "pid": None}))
        return destination

    return killed_copy


@pytest.fixture(scope="session")
def refused(run_cli):
    def refused(args: list[str], cwd: Path, folder: Path) -> str:
        before = _snapshot(folder)
        done = run_cli(args, cwd=cwd)
        assert done.returncode == 2, done.stderr[-3000:]
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stdout
        assert _snapshot(folder) == before, "a refused resume changed the folder"
        assert not (cwd / "outputs").exists()
        return lines[0]

    return refused


def test_resume_of_a_folder_that_is_not_a_run_is_refused(tmp_path, refused):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("my own file\n")
    line = refused([f"resume={folder}"], tmp_path, tmp_path)
    assert line == (f"ae_lab: error: resume='{folder}' is not allowed: a run folder holding run.json and "
                    f".hydra/config.yaml; {folder} has no run.json")


def test_resume_from_a_checkpoint_of_another_config_is_refused(two_runs, tmp_path, killed_copy, refused):
    run = killed_copy(two_runs[0], tmp_path / "run")
    subprocess.run(["cp", str(two_runs[1] / "checkpoints" / "last.ckpt"), str(run / "checkpoints")], check=True)
    line = refused([f"resume={run}"], tmp_path, tmp_path)
    assert f"resume='{run}' is not allowed" in line and "checkpoints/last.ckpt is from another config" in line
    assert "model.latent_dim=4 there, 16 in the run" in line


def test_a_config_mismatch_names_the_keys_that_change_results_first(compose_config):
    from ae_lab.resume import config_differences

    run = OmegaConf.to_container(compose_config(["model=vae", "loss.beta=4", "model.latent_dim=8"]),
                                 resolve=True, enum_to_str=True)
    other = OmegaConf.to_container(compose_config(["logger=none", "checkpoint_every_n_steps=7"]),
                                   resolve=True, enum_to_str=True)
    differing = config_differences(other, run)
    keys = [line.split("=")[0].split(" ")[0] for line in differing]
    assert keys[:3] == ["loss.beta", "model.latent", "model.latent_dim"], differing
    assert all(key.startswith("logger.") for key in keys[3:]) and "logger.entity absent there, None in the run" in differing


def test_resume_of_a_completed_run_does_nothing(two_runs, tmp_path, run_cli):
    run = two_runs[0]
    before = _snapshot(run)
    done = run_cli([f"resume={run}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "has completed: nothing to resume" in done.stdout
    assert _snapshot(run) == before and not (tmp_path / "outputs").exists()


def _check(run: Path, *overrides: str) -> bool:
    """`check_resume` as `python -m ae_lab resume=RUN OVERRIDES` calls it (the parts it reads first)."""
    from omegaconf import OmegaConf

    from ae_lab.resume import check_resume

    task = [f"resume={run}", *overrides]
    return check_resume(OmegaConf.create({"resume": str(run), "hydra": {"run": {"dir": str(run)},
                                                                         "overrides": {"task": task}}}))


def test_resumes_that_cannot_continue_their_run_are_refused(two_runs, tmp_path, read_json, killed_copy):
    from ae_lab.errors import ConfigError

    with pytest.raises(ConfigError, match="is not allowed: a run folder .*; there is no folder"):
        _check(tmp_path / "missing")
    run = killed_copy(two_runs[0], tmp_path / "run")
    # the progress bar may be switched off on resume, the latent size may not be changed
    with pytest.raises(ConfigError, match=r"together with model.latent_dim=4: a resumed run keeps its recorded "
                                          r"config \(what may be given with resume: checkpoint_every_n_steps"):
        _check(run, "model.latent_dim=4", "trainer.enable_progress_bar=false")
    record = read_json(run / "run.json")
    (run / "run.json").write_text(json.dumps({**record, "pid": os.getppid()}))  # a process alive on this host
    with pytest.raises(ConfigError, match=f"process {os.getppid()} on this host is still running it"):
        _check(run)
    (run / "run.json").write_text(json.dumps(record))
    assert _check(run, "trainer.enable_progress_bar=false") is False  # resumable
    for checkpoint in (run / "checkpoints").iterdir():
        checkpoint.unlink()
    with pytest.raises(ConfigError, match="has no checkpoints/last.ckpt .*: start it again"):
        _check(run)


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason=f"the MNIST files are not in {SHARED}")
def test_a_resumed_run_keeps_its_csv_history(tmp_path, kill_after_step, run_cli):
    """Lightning's CSV writer deletes metrics.csv when it starts; a resumed run's file holds the same rows
    as an uninterrupted run's: the killed attempt's rows before the checkpoint, then the resumed ones."""
    reference_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    done = run_cli([*RUN, "logger=csv", f"hydra.run.dir={reference_dir}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    kill_after_step([*RUN, "logger=csv", f"hydra.run.dir={run_dir}"], tmp_path, step=30)
    assert _global_step(run_dir / "checkpoints" / "last.ckpt") == 25
    done = run_cli([f"resume={run_dir}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    def rows(folder: Path) -> list[tuple[tuple[str, str], ...]]:
        with (folder / "csv" / "metrics.csv").open(newline="") as file:
            return sorted(tuple(sorted((key, value) for key, value in row.items() if value)) for row in csv.DictReader(file))

    resumed = rows(run_dir)
    assert {"0", "1", "2"} <= {dict(row)["epoch"] for row in resumed}  # 0 and 1 were logged before the kill
    assert resumed == rows(reference_dir)


def _wandb_values(run_dir: Path) -> list[tuple[int, str, float]]:
    """(trainer/global_step, key, value) of every value of the run's history in its W&B attempts, in
    order (not the figures and tables, whose names are random)."""
    values = []
    for part in sorted(run_dir.glob("wandb/offline-run-*")):
        for row in history_rows(next(part.glob("run-*.wandb"))):
            values += [(row["trainer/global_step"], key, value) for key, value in row.items()
                       if key.split("/")[0] in ("train", "val", "test", "best", "scheduled")]
    return values


@pytest.mark.slow
def test_a_killed_and_resumed_run_holds_every_value_once_in_wandb_and_in_its_history(tmp_path, kill_after_step,
                                                                                     run_cli, train_in_process):
    """Killed 10 steps into the last of 3 epochs (its checkpoint: epoch 1's end, step 40), with the W&B
    records not yet written lost (W&B writes its file every 15 s, and a block when it fills; here only the
    latter, so that the loss does not depend on the machine's speed), then resumed: the attempts'
    records hold every logged value once, equal to an uninterrupted run's, and its history.csv equals
    that run's."""
    run = ["model=vae", "model.latent_dim=4", "trainer.max_epochs=3", "eval=minimal",
           "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "seed=1"]
    reference_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    train_in_process(run, reference_dir)
    kill_after_step([*run, f"hydra.run.dir={run_dir}"], tmp_path, step=50,
                    extra_env={"WANDB__TRANSACTION_LOG_FLUSH_INTERVAL": "0"})
    assert _global_step(run_dir / "checkpoints" / "last.ckpt") == 40
    killed = _wandb_values(run_dir)
    done = run_cli([f"resume={run_dir}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    reference = _wandb_values(reference_dir)
    assert {(step, key) for step, key, _ in reference} >= {(39, "val/loss"), (39, "train/loss"), (9, STEP_LOSS),
                                                          (59, "test/loss"), (59, "best/val/loss")}
    assert {(step, key) for step, key, _ in killed} < {(step, key) for step, key, _ in reference if step <= 40}
    resumed = _wandb_values(run_dir)
    assert len(resumed) == len({(step, key) for step, key, _ in resumed})  # each value once
    assert sorted(resumed) == sorted(reference)
    assert read_history(run_dir) == read_history(reference_dir)


def test_the_wandb_history_sink_logs_only_what_the_run_does_not_hold():
    """What an earlier attempt's records hold (step 39's val/loss) is not logged again; the rest of a row
    is, with its step and epoch; a value already logged by this attempt is not logged twice."""
    from ae_lab.tracking import WandbHistory

    class Logger:
        def __init__(self):
            self.calls = []

        def log_metrics(self, metrics, step):
            self.calls.append((step, metrics))

    logger = Logger()
    sink = WandbHistory(logger, lambda: {(39, "val/loss")})
    sink(1, 39, {"val/loss": 2.0, "val/kl": 0.5})
    sink(1, 39, {"val/kl": 0.5, "train/loss": 3.0})
    sink(1, 39, {"val/loss": 2.0})
    assert logger.calls == [(39, {"val/kl": 0.5, "epoch": 1}), (39, {"train/loss": 3.0, "epoch": 1})]
    assert sink.last == (39, 1)
