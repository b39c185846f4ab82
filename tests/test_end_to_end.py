"""End to end: every variant x arch trains; the run folder contract; W&B offline; determinism."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from wandb_records import run_contents

VARIANTS = {
    "undercomplete": ["model.latent_dim=8"],
    "overcomplete": ["model.latent_dim=128"],
    "denoising_gaussian": ["noise=gaussian"],
    "denoising_masking": ["noise=masking"],
    "denoising_salt_pepper": ["noise=salt_pepper"],
    "sparse_l1": ["loss=sparse_l1"],
    "sparse_kl": ["loss=sparse_kl"],
    "contractive_exact": ["loss=contractive"],
    "contractive_projection": ["loss=contractive", "loss.contractive_estimator=projection",
                               "loss.contractive_projections=2"],
    "vae": ["model=vae"],
    "beta_vae": ["model=vae", "loss.beta=4"],
    "mse": ["loss.recon=mse"],
}
EXPECTED_TERMS = {"sparse_l1": "sparsity", "sparse_kl": "sparsity", "contractive_exact": "contractive",
                  "contractive_projection": "contractive", "vae": "kl", "beta_vae": "kl"}


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_trains(variant, arch, tmp_path, compose_config, quick, read_json, train_in_process):
    overrides = [*VARIANTS[variant], f"model.arch={arch}", *quick, "logger=none"]
    metrics = train_in_process(overrides, tmp_path)
    cfg = compose_config(overrides).loss
    assert all(math.isfinite(value) for value in metrics.values())
    for split in ("train", "val", "test"):
        assert f"{split}/recon" in metrics and f"{split}/loss" in metrics
    if variant in EXPECTED_TERMS:
        assert f"test/{EXPECTED_TERMS[variant]}" in metrics
    if variant.endswith("vae"):
        assert metrics["test/elbo"] == pytest.approx(-(metrics["test/recon"] + metrics["test/kl"]), rel=1e-5)
    # the reported loss is the configured weighted sum of the reported terms
    total = (metrics["test/recon"] + cfg.beta * metrics.get("test/kl", 0.0)
             + cfg.sparsity_weight * metrics.get("test/sparsity", 0.0)
             + cfg.contractive_weight * metrics.get("test/contractive", 0.0))
    assert metrics["test/loss"] == pytest.approx(total, rel=1e-5)
    assert read_json(tmp_path / "run.json")["status"] == "completed"


def _digits_checksum() -> str:
    digits = load_digits()
    digest = hashlib.sha256()
    for array in (digits.images.astype(np.uint8), digits.target.astype(np.int64)):
        digest.update(str(array.dtype).encode())
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def test_cli_run_folder_contract(cli_run, read_json):
    done, run_dir = cli_run
    assert f"run folder: {run_dir}" in done.stdout

    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        assert (run_dir / ".hydra" / name).is_file()
    metrics = read_json(run_dir / "metrics.json")
    for split in ("train", "val", "test"):
        assert math.isfinite(metrics[f"{split}/recon"]) and math.isfinite(metrics[f"{split}/loss"])

    record = read_json(run_dir / "run.json")
    assert record["status"] == "completed" and record["seed"] == 0
    assert record["data"] == {"name": "digits", "sha256": _digits_checksum()}
    assert record["packages"]["torch"] and record["packages"]["pytorch-lightning"]
    assert set(record["git"]) == {"commit", "dirty"}
    assert record["started"] <= record["ended"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert Path(record["best_checkpoint"]) == run_dir / "checkpoints" / "best.ckpt"
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    figure = run_dir / "figures" / "reconstructions.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # W&B: offline, inside the run folder, config = the resolved Hydra config, summary = metrics
    wandb = run_contents(run_dir)
    assert wandb["config"]["model.latent_dim"] == 12
    assert wandb["config"]["loss.recon"] == "bce"
    assert wandb["summary"]["test/loss"] == pytest.approx(metrics["test/loss"])
    assert any("train/loss" in row for row in wandb["history"])
    assert "wandb sync" in done.stdout


def test_git_state_is_recorded_when_the_source_is_a_checkout(tmp_path):
    from ae_lab.tracking import git_state

    state = git_state()
    if state["commit"] is None:
        pytest.skip("ae_lab is not running from a git checkout")
    assert len(state["commit"]) == 40 and isinstance(state["dirty"], bool)


def test_same_seed_gives_identical_metrics_and_runs_keep_their_own_folders(tmp_path, read_json, run_cli):
    args = ["trainer.max_epochs=2", "trainer.limit_train_batches=4", "trainer.enable_progress_bar=false",
            "logger=csv", "model=vae", "noise=masking"]
    first = run_cli([*args, "seed=3"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    [first_dir] = (tmp_path / "outputs" / "runs").iterdir()
    snapshot = {p: p.read_bytes() for p in first_dir.rglob("*") if p.is_file()}

    second = run_cli([*args, "seed=3"], cwd=tmp_path)
    third = run_cli([*args, "seed=4"], cwd=tmp_path)
    assert second.returncode == 0 and third.returncode == 0
    runs = sorted((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 3
    assert {p: p.read_bytes() for p in first_dir.rglob("*") if p.is_file()} == snapshot

    metrics = [read_json(run / "metrics.json") for run in runs]
    assert metrics[0] == metrics[1]
    assert metrics[0]["test/loss"] != metrics[2]["test/loss"]  # the seed matters


def test_training_stopped_by_max_steps_before_any_validation_is_still_evaluated(tmp_path, read_json, train_in_process):
    metrics = train_in_process(["trainer.max_steps=1", "trainer.limit_train_batches=5",
                                "trainer.enable_progress_bar=false", "logger=none", "eval=minimal"], tmp_path)
    assert np.isfinite(metrics["val/loss"]) and np.isfinite(metrics["test/loss"])
    assert read_json(tmp_path / "run.json")["best_checkpoint"] is None


def test_epoch_metrics_weight_every_example_equally(compose_config):
    """A split served in batches of 3 and 1: the epoch's reconstruction error is the mean over the 4
    examples, not the mean of the two batch means."""
    import torch
    from omegaconf import OmegaConf

    from ae_lab.module import Autoencoder
    from ae_lab.objectives import reconstruction_error

    cfg = compose_config(["model.latent_dim=3"])
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    module = Autoencoder.from_config(plain, (1, 8, 8))
    x = torch.rand(4, 1, 8, 8)
    for batch in (x[:3], x[3:]):
        module._step({"x": batch}, "val")
    with torch.no_grad():
        logits, _ = module(x)
        per_example = reconstruction_error(logits, x, "bce")
    assert float(module.epoch_means["val__recon"].compute()) == pytest.approx(float(per_example.mean()), rel=1e-6)


def test_a_job_that_stops_before_training_starts_makes_no_wandb_run(tmp_path, monkeypatch, quick, read_json,
                                                                    train_in_process):
    """The W&B run starts with training: a job that fails after its run folder is made but before its
    first step (here as its fit is set up, after its logger is built) leaves no wandb/ folder and no W&B id
    in run.json."""
    import ae_lab.run

    def no_trainer(*args, **kwargs):
        raise RuntimeError("no Trainer today")

    monkeypatch.setattr(ae_lab.run, "_fit_and_test", no_trainer)
    with pytest.raises(RuntimeError, match="no Trainer today"):
        train_in_process(list(quick), tmp_path)
    record = read_json(tmp_path / "run.json")
    assert record["status"] == "failed" and "wandb_run_id" not in record
    assert not (tmp_path / "wandb").exists()
