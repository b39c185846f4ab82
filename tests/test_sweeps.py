"""Multirun through the real command line: sweeps, DDP under multirun, launchers, Optuna, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from paths import ROOT
from wandb_records import run_contents

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
JOB_FILES = {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "ae_lab.log",
             "checkpoints/best.ckpt", "checkpoints/last.ckpt", "metrics.json", "evaluation.json", "run.json",
             "history.csv", "samplers/gmm-10.npz",  # the Fréchet distance's mixture sampler, saved for ae_lab.load
             *(f"figures/{name}.png" for name in ("reconstructions", "traversals", "interpolations", "codes", "curves"))}


def sweep_folder(cwd: Path) -> Path:
    [folder] = (cwd / "outputs" / "sweeps").iterdir()
    return folder


def job_folders(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir())


def files_of(job: Path) -> set[str]:
    """The job's files, W&B's own folder counted as one entry per offline run."""
    files = {str(p.relative_to(job)) for p in job.rglob("*") if p.is_file() and "wandb" not in p.parts}
    files |= {f"wandb/{p.name}" for p in job.glob("wandb/offline-run-*")}
    return files


def test_two_by_two_sweep_with_summary(tmp_path, read_json, run_cli, quick):
    done = run_cli(["-m", "model=vae", "loss.beta=1,4", "model.latent_dim=2,8", *quick, "logger=csv", "eval=minimal"],
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = sweep_folder(tmp_path)
    jobs = job_folders(sweep)
    assert len(jobs) == 4
    combos = set()
    for job in jobs:
        config = OmegaConf.load(job / ".hydra" / "config.yaml")
        combos.add((config.loss.beta, config.model.latent_dim))
        assert read_json(job / "run.json")["status"] == "completed"
    assert combos == {(1, 2), (1, 8), (4, 2), (4, 8)}
    summary = json.loads((sweep / "summary.json").read_text())
    assert [entry["status"] for entry in summary] == ["completed"] * 4
    assert "4 jobs: 4 completed, 0 failed" in (sweep / "summary.md").read_text()
    assert not (tmp_path / "outputs" / "runs").exists()


def _test_recon_by_hand(job: Path) -> float:
    """Per-example BCE on the whole test split, from the best checkpoint, in this one process."""
    from ae_lab.data import build_datamodule
    from ae_lab.module import Autoencoder
    from ae_lab.objectives import reconstruction_error

    config = OmegaConf.load(job / ".hydra" / "config.yaml")
    module = Autoencoder.load_from_checkpoint(job / "checkpoints" / "best.ckpt", weights_only=True)
    module.eval()
    test = build_datamodule(config.dataset).splits["test"]
    with torch.no_grad():
        x = test.batch(torch.arange(len(test)))["x"]
        logits, _ = module(x)
        return reconstruction_error(logits, x, "bce").mean().item()


@pytest.mark.slow
def test_ddp_under_multirun_runs_each_job_once_in_its_own_folder(tmp_path, read_json, run_cli, quick):
    # verbose=true: Lightning's "Initializing distributed: ... MEMBER: r/n" lines reach the console
    # the whole test split, which the test metric is checked to cover across the ranks
    done = run_cli(["-m", *DDP, "model.latent_dim=4,8", *quick, "trainer.limit_test_batches=1.0", "verbose=true"],
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert output.count("MEMBER: 2/2") == 2  # two ranks per job...
    assert output.count("MEMBER: 1/2") == 2  # ...in exactly two jobs
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["sweeps"]
    sweep = sweep_folder(tmp_path)
    assert {p.name for p in sweep.iterdir() if p.is_file()} == {"multirun.yaml", "summary.md", "summary.json"}
    jobs = job_folders(sweep)
    assert len(jobs) == 2
    for job in jobs:
        files = files_of(job)
        wandb_runs = {f for f in files if f.startswith("wandb/")}
        assert files - wandb_runs == JOB_FILES
        assert len(wandb_runs) == 1  # one W&B run per job: rank 1 made none
        metrics = read_json(job / "metrics.json")
        # the test metric covers the whole split across both ranks: the same as one process on all of it
        assert metrics["test/recon"] == pytest.approx(_test_recon_by_hand(job), rel=1e-5)


def test_single_run_with_ddp_makes_one_run_folder(tmp_path, run_cli, quick):
    done = run_cli([*DDP, *quick, "logger=csv", "verbose=true"], cwd=tmp_path)  # MEMBER lines on the console
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MEMBER: 2/2" in done.stdout + done.stderr
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["runs"]
    [run] = (tmp_path / "outputs" / "runs").iterdir()
    assert files_of(run) == JOB_FILES | {"csv/metrics.csv"}
    # rank 0 alone reports the run: one final table, one closing "run folder" line
    assert done.stdout.splitlines().count(f"run folder: {run}") == 1, done.stdout[-3000:]


@pytest.mark.slow
def test_joblib_launcher_with_ddp_jobs(tmp_path, run_cli, quick):
    done = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *DDP, "model=vae",
                    "loss.beta=1,4", *quick, "logger=none"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["sweeps"]
    jobs = job_folders(sweep_folder(tmp_path))
    assert len(jobs) == 2
    assert {OmegaConf.load(job / ".hydra" / "config.yaml").loss.beta for job in jobs} == {1, 4}
    assert all(files_of(job) == JOB_FILES | {"figures/samples.png"} for job in jobs)  # a VAE samples


def test_jobs_leak_nothing_into_the_next(tmp_path, read_json, run_cli, quick):
    done = run_cli(["-m", "model.latent_dim=3,5", "model=vae", *quick, "eval=minimal"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = job_folders(sweep_folder(tmp_path))
    for job, latent_dim in zip(jobs, (3, 5)):
        wandb = run_contents(job)
        assert wandb["config"]["model.latent_dim"] == latent_dim
        metrics = read_json(job / "metrics.json")
        for key in ("test/loss", "test/kl", "val/elbo"):
            assert wandb["summary"][key] == pytest.approx(metrics[key])
    first, second = (read_json(job / "metrics.json") for job in jobs)
    assert first["test/loss"] != second["test/loss"]


def test_failed_job_is_recorded_the_sweep_goes_on_and_a_rerun_resumes(tmp_path, read_json, run_cli, quick):
    sweep_dir = tmp_path / "outputs" / "sweeps" / "resumable"
    args = ["-m", "optim.name=sgd", "optim.lr=0.01,1e30", *quick, "logger=none", "eval=minimal",
            f"hydra.sweep.dir={sweep_dir}"]
    first = run_cli(args, cwd=tmp_path)
    assert first.returncode == 1
    assert "1 of 2 jobs did not complete" in first.stderr
    good, bad = job_folders(sweep_dir)
    assert read_json(good / "run.json")["status"] == "completed"
    failed = read_json(bad / "run.json")
    assert failed["status"] == "failed" and "loss became nan at step" in failed["error"]
    kept = {p: p.read_bytes() for p in good.rglob("*") if p.is_file() and p.name != "ae_lab.log"}

    second = run_cli(args, cwd=tmp_path)
    assert second.returncode == 1
    assert "already holds a completed run of this config" in second.stdout + second.stderr
    assert {p: p.read_bytes() for p in good.rglob("*") if p.is_file() and p.name != "ae_lab.log"} == kept
    assert len(list(bad.glob("run.attempt-*.json"))) == 1  # the first attempt's record is kept
    assert read_json(bad / "run.json")["status"] == "failed"
    assert "1 failed" in (sweep_dir / "summary.md").read_text()


@pytest.mark.slow
def test_a_sweep_run_again_resumes_a_cut_off_job_from_its_checkpoint(tmp_path, kill_after_step, read_json, run_cli,
                                                                     quick):
    """A sweep killed (SIGKILL) in the middle of its job, run again into its folder: the job goes on from
    its step checkpoint, in its folder, and ends with the metrics of an uninterrupted run."""
    run = ["model=vae", "noise=masking", "model.hidden_dims=[32]", "model.latent_dim=4", *quick,
           "trainer.limit_train_batches=10", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
           "checkpoint_every_n_steps=4", "eval=minimal", "logger=none", "seed=5"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    reference = subprocess.Popen([sys.executable, "-m", "ae_lab", *run, f"hydra.run.dir={tmp_path / 'reference'}"],
                                 cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sweep = tmp_path / "sweep"
    args = ["-m", *run, f"hydra.sweep.dir={sweep}"]
    try:
        kill_after_step(args, tmp_path, step=6)
        again = run_cli(args, cwd=tmp_path)
        assert again.returncode == 0, again.stderr[-3000:]
        _, errors = reference.communicate(timeout=300)
        assert reference.returncode == 0, errors[-3000:]
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    [job] = job_folders(sweep)
    record = read_json(job / "run.json")
    assert record["status"] == "completed" and record["resumed_from"]["global_step"] == 4
    [attempt] = job.glob("run.attempt-*.json")
    assert read_json(attempt)["status"] == "running"  # the killed attempt's record
    assert read_json(job / "metrics.json") == read_json(tmp_path / "reference" / "metrics.json")


def test_optuna_search_stores_its_study_and_continues(tmp_path, read_json, run_cli, quick):
    import optuna

    sweep_dir = tmp_path / "study"
    args = ["-m", "hparams_search=vae_elbo", *quick, "logger=none", "eval=minimal",
            f"hydra.sweep.dir={sweep_dir}"]
    first = run_cli([*args, "hydra.sweeper.n_trials=3"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    storage = f"sqlite:///{sweep_dir / 'optuna.db'}"
    study = optuna.load_study(study_name="vae_elbo", storage=storage)
    assert len(study.trials) == 3
    elbos = sorted(read_json(job / "metrics.json")["val/elbo"] for job in job_folders(sweep_dir))
    assert study.best_value == pytest.approx(elbos[-1])  # maximised the configured objective

    again = run_cli([*args, "hydra.sweeper.n_trials=1"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(optuna.load_study(study_name="vae_elbo", storage=storage).trials) == 4


@pytest.mark.parametrize("launcher, key, allowed", [
    ("gpu_queue", "hydra.launcher.gpus=[0,0]", "GPU ids (integers >= 0, each once)"),
    ("vectorized", "hydra.launcher.max_members=0", "an integer >= 1"),
])
def test_a_bad_launcher_key_is_refused_before_the_sweep_folder_is_made(tmp_path, launcher, key, allowed, run_cli):
    done = run_cli(["-m", f"hydra/launcher={launcher}", key, "seed=0,1", "logger=none"], cwd=tmp_path)
    assert done.returncode == 2
    [line] = done.stderr.splitlines()  # one line, no traceback
    assert line.startswith(f"ae_lab: error: {key.split('=')[0]}=") and f"is not allowed: {allowed}" in line
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_gpu_queue_launcher_gives_each_job_its_own_gpus(tmp_path, read_json, run_cli, quick):
    """Three simulated GPUs, four jobs taking 2, 2, 1, 1 of them: every job sees exactly its own
    devices, and jobs that ran at the same time never shared one."""
    done = run_cli(["-m", "hydra/launcher=gpu_queue", "hydra.launcher.gpus=[0,1,2]", "hydra.launcher.poll_seconds=0.1",
                    *DDP, "trainer.devices=2,1", "seed=1,2", *quick, "logger=none", "eval=minimal"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = job_folders(sweep_folder(tmp_path))
    assert len(jobs) == 4
    spans = []
    for job in jobs:
        record = read_json(job / "run.json")
        devices = OmegaConf.load(job / ".hydra" / "config.yaml").trainer.devices
        gpus = set(record["cuda_visible_devices"].split(","))
        assert record["status"] == "completed" and len(gpus) == devices and gpus <= {"0", "1", "2"}
        spans.append((record["started"], record["ended"], gpus))
    for i, (start_a, end_a, gpus_a) in enumerate(spans):
        for start_b, end_b, gpus_b in spans[i + 1:]:
            if start_a < end_b and start_b < end_a:  # ran at the same time
                assert not gpus_a & gpus_b
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:]), \
        "with 3 GPUs some jobs should have run in parallel"


@pytest.mark.slow
def test_gpu_queue_jobs_are_wandb_runs_in_the_sweeps_group(tmp_path, read_json, run_cli, quick):
    """A gpu_queue job is a single run in its own process; its W&B run still joins the sweep's group."""
    sweep = tmp_path / "outputs" / "queued"
    done = run_cli(["-m", "hydra/launcher=gpu_queue", "hydra.launcher.gpus=[0]", "hydra.launcher.poll_seconds=0.1",
                    "seed=1,2", *quick, "eval=minimal", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = job_folders(sweep)
    assert len(jobs) == 2
    assert [run_contents(job)["run"].run_group for job in jobs] == ["seed queued", "seed queued"]
    # a job left interrupted (as a Ctrl-C leaves it) goes on from its checkpoint when the sweep runs again
    record = read_json(jobs[0] / "run.json")
    (jobs[0] / "run.json").write_text(json.dumps({**record, "status": "interrupted"}))
    (jobs[0] / "metrics.json").unlink()
    again = run_cli(["-m", "hydra/launcher=gpu_queue", "hydra.launcher.gpus=[0]", "hydra.launcher.poll_seconds=0.1",
                     "seed=1,2", *quick, "eval=minimal", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:] + (jobs[0] / "output.log").read_text()[-2000:]
    resumed = read_json(jobs[0] / "run.json")
    assert resumed["status"] == "completed" and resumed["resumed_from"]["checkpoint"].endswith("last.ckpt")
    assert "already completed" in again.stdout + again.stderr  # the other job is not run again


@pytest.mark.parametrize("sweep", sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml")))
def test_ready_sweeps_compose(sweep):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+sweeps={sweep}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert len(params) >= 2 and all("," in str(values) for values in params.values())


@pytest.mark.slow
def test_a_ready_sweep_runs(tmp_path, read_json, run_cli):
    done = run_cli(["-m", "+sweeps=denoising_noise", "trainer=debug", "logger=none", "eval=minimal"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = job_folders(sweep_folder(tmp_path))
    assert len(jobs) == 9
    assert all(read_json(job / "run.json")["status"] == "completed" for job in jobs)
    crossed = set()
    for job in jobs:
        noise = OmegaConf.load(job / ".hydra" / "config.yaml")
        strength = noise.noise.std if noise.noise.kind == "gaussian" else noise.noise.p
        crossed.add((noise.noise.kind, strength))
    assert crossed == {(kind, level) for kind in ("gaussian", "masking", "salt_pepper")
                       for level in (0.1, 0.25, 0.5)}


@pytest.mark.parametrize("accelerator, gpus", [("gpu", 4), ("cuda", 4), ("cpu", None), ("auto", None)])
def test_slurm_launcher_takes_gpus_nodes_and_tasks_from_the_trainer(accelerator, gpus):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                                 "trainer.num_nodes=2", f"trainer.accelerator={accelerator}"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    # GPUs only when the trainer trains on them: a CPU-only cluster gets no GPU request at all
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (gpus, 4, 2)
