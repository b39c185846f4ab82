"""The vectorised launcher (`hydra/launcher=vectorized`, ae_lab/ensemble/): grouping, the per-member
optimiser against torch.optim, members equal to separate runs (deterministic and stochastic), the contractive
projection estimator under vmap, member run folders and W&B runs, a NaN member isolated, a killed group
resumed exactly, compare on a vectorised sweep."""

from __future__ import annotations

import csv
import math
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
from omegaconf import OmegaConf

from ae_lab.ensemble import group as group_module
from ae_lab.ensemble.group import Ensemble, Member, run_group
from ae_lab.ensemble.grouping import group_jobs, sequential_reason
from ae_lab.ensemble.optim import StackedOptimizer, clip_gradients
from ae_lab.history import STEP_LOSS, read_history
from ae_lab.objectives import contractive_penalty
from paths import ROOT, SHARED, needs_shared
from wandb_records import run_contents

# on top of `quick`: whole epochs (digits: 20 training batches), two of them, the cheap metrics only
WHOLE_EPOCHS = ["trainer.max_epochs=2", "trainer.limit_train_batches=1.0", "trainer.limit_val_batches=1.0",
                "trainer.limit_test_batches=1.0", "eval=minimal"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One torch thread, here and in the processes the tests start: an ensemble's operations are large
    enough for torch to split them over threads, which on a busy shared CPU is many times slower."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def plain(compose_config):
    def plain(overrides: list[str]) -> dict:
        return OmegaConf.to_container(compose_config(overrides), resolve=True, enum_to_str=True)

    return plain


# ----- grouping

def test_latent_size_by_beta_makes_one_group_per_latent_size(plain):
    jobs = [[f"model.latent_dim={size}", "model=vae", f"loss.beta={beta}", f"seed={seed}"]
            for size in (4, 8) for beta in (1, 4) for seed in (0, 1)]
    groups = group_jobs([plain(job) for job in jobs], max_members=64)
    assert groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert group_jobs([plain(job) for job in jobs], max_members=3) == [[0, 1, 2], [3], [4, 5, 6], [7]]


def test_a_weight_switched_on_or_another_noise_kind_is_another_group(plain):
    jobs = [["loss.sparsity_weight=0"], ["loss.sparsity_weight=0.1"], ["loss.sparsity_weight=0.5"],
            ["noise=gaussian", "noise.std=0.1"], ["noise=gaussian", "noise.std=0.3"], ["noise=masking"],
            ["optim.lr=0.01", "optim.weight_decay=0.1", "seed=3"], ["model.hidden_dims=[32]"]]
    assert group_jobs([plain(job) for job in jobs], max_members=64) == [[0, 6], [1, 2], [3, 4], [5], [7]]


def test_greedy_pretraining_falls_back_to_single_runs_the_contractive_penalty_does_not(plain):
    assert "greedy" in sequential_reason(plain(["model.pretrain=greedy"]))
    for estimator in ("exact", "projection"):
        assert sequential_reason(plain(["loss=contractive", f"loss.contractive_estimator={estimator}"])) is None
    assert sequential_reason(plain(["model=vae", "noise=masking"])) is None


# ----- the per-member optimiser against torch.optim

@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_stacked_optimizer_follows_torch_optim_per_member(name):
    torch.manual_seed(0)
    members, size = 3, 50
    start = torch.randn(members, size)
    settings = [dict(lr=1e-2, weight_decay=0.0, eps=1e-8, momentum=0.9),
                dict(lr=3e-3, weight_decay=0.1, eps=1e-6, momentum=0.0),
                dict(lr=5e-2, weight_decay=0.01, eps=1e-8, momentum=0.5)]
    targets = torch.randn(members, size)
    flat = start.clone()
    stacked = StackedOptimizer(flat, name, *([s[key] for s in settings] for key in ("lr", "weight_decay", "eps", "momentum")))
    singles = []
    for m, s in enumerate(settings):
        param = torch.nn.Parameter(start[m].clone())
        if name == "sgd":
            optimizer = torch.optim.SGD([param], lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"])
        else:
            optimizer = (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)(
                [param], lr=s["lr"], eps=s["eps"], weight_decay=s["weight_decay"])
        singles.append((param, optimizer))
    clip = torch.tensor([0.5, 100.0, 1.0])
    for _ in range(20):
        grad = (flat - targets) ** 3  # a non-linear gradient, different per member
        stacked.step(clip_gradients(grad, clip, "norm"), [True] * members)
        for m, (param, optimizer) in enumerate(singles):
            optimizer.zero_grad()
            ((param - targets[m]) ** 4 / 4).sum().backward()
            torch.nn.utils.clip_grad_norm_([param], float(clip[m]))
            optimizer.step()
    for m, (param, _) in enumerate(singles):
        torch.testing.assert_close(flat[m], param.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_a_frozen_member_keeps_its_parameters_exactly(name):
    flat = torch.randn(2, 10)
    before = flat.clone()
    optimizer = StackedOptimizer(flat, name, [0.1, 0.1], [0.0, 0.0], [1e-8, 1e-8], [0.9, 0.9])
    grad = torch.randn(2, 10)
    grad[1, 3] = math.nan
    optimizer.step(grad, [True, False])
    assert torch.equal(flat[1], before[1]) and not torch.equal(flat[0], before[0])
    assert all(torch.isfinite(value).all() for key, value in optimizer.state.items() if key != "step")


# ----- equality with separate runs

def _csv_epochs(run_dir: Path) -> list[dict[str, float]]:
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    by_epoch: dict[int, dict[str, float]] = {}
    for row in rows:
        for key, value in row.items():
            if value not in ("", None) and key.startswith(("train/", "val/")):
                by_epoch.setdefault(int(float(row["epoch"])), {})[key] = float(value)
    # the training epochs (a single run's CSV also holds the validation after fit, with the best weights)
    return [by_epoch[epoch] for epoch in sorted(by_epoch) if "train/loss" in by_epoch[epoch]]


@pytest.mark.parametrize("loss", [
    pytest.param([[]] * 3, id="plain"),
    pytest.param([["loss=contractive", f"loss.contractive_weight={weight}"] for weight in (0.01, 0.3, 1.0)],
                 id="contractive-exact"),
    pytest.param([["model.arch=conv"]] * 3, id="conv"),
    pytest.param([["model=vae", "noise=gaussian", f"loss.beta={beta}", f"noise.std={std}"]
                  for beta, std in ((1, 0.1), (4, 0.3), (0.5, 0.2))], id="vae-gaussian-noise"),
    pytest.param([["noise=occlusion", f"noise.size={size}"] for size in (0.3, 0.5, 0.7)], id="occlusion"),
    pytest.param([["loss=contractive", "loss.contractive_estimator=projection", "noise=salt_pepper",
                   f"loss.contractive_weight={weight}", f"noise.p={p}"] for weight, p in ((0.1, 0.1), (1, 0.2), (0.3, 0.3))],
                 id="contractive-projection-salt-pepper"),
    # without weight decay: Adam makes whole steps of near-zero gradients (MNIST's blank pixels), so with
    # clipping and weight decay together rounding differences reach 1e-4 within an epoch (digits above)
    pytest.param([["model=vae", "dataset=mnist", f"dataset.root={SHARED}", "dataset.download=false",
                   "dataset.binarize=dynamic", "trainer.limit_train_batches=5", "trainer.limit_val_batches=2",
                   "trainer.limit_test_batches=2", f"loss.beta={beta}", "optim.weight_decay=0"] for beta in (1, 2, 4)],
                 id="vae-dynamic-binarisation", marks=needs_shared),
])
def test_members_equal_separate_runs_epoch_by_epoch(tmp_path, loss, compose_config, read_json, train_in_process, quick):
    """Each member with its own seed, lr, weight decay, clipping, lr milestone (and loss weight, noise
    level): every epoch's train and val terms and every final metric equal the separate run's (`_equal`:
    relative 1e-4). Plain AE; exact contractive AE (its penalty through torch.func.vjp in the ensemble, through
    torch.autograd.grad in the single run); and members that draw random numbers (VAE sampling, noise,
    contractive projections): each draws in its own stream what its single run draws."""
    base = [*quick, *WHOLE_EPOCHS, "trainer.max_epochs=3", "logger=csv", "optim.milestones=[2]", "optim.gamma=0.5"]
    variants = [["seed=0"], ["seed=1", "optim.lr=0.003", "optim.weight_decay=0.01", "trainer.gradient_clip_val=5"],
                ["seed=2", "optim.name=adam", "optim.eps=1e-6", "trainer.gradient_clip_val=0.5"]]
    variants = [variant + own_loss for variant, own_loss in zip(variants, loss)]
    # clipping on is structure: the first variant gets its own group, the others share one
    members = [Member(compose_config(base + v), tmp_path / "ensemble" / str(i)) for i, v in enumerate(variants)]
    run_group(members[:1], "a", tmp_path / "a.pt")
    run_group(members[1:], "b", tmp_path / "b.pt")
    for i, variant in enumerate(variants):
        alone = tmp_path / "alone" / str(i)
        train_in_process(base + variant, alone)
        member = members[i].run_dir
        ours, theirs = _csv_epochs(member), _csv_epochs(alone)
        assert len(ours) == len(theirs) == 3
        for mine, single in zip(ours, theirs):
            _equal(mine, single)
        _equal(read_json(member / "metrics.json"), read_json(alone / "metrics.json"))


def _equal(mine: dict[str, float], single: dict[str, float]) -> None:
    """The same keys, each value within float rounding of the single run's: relative 1e-4, or for a small
    term (a KL near 0) 1e-5 of its split's loss, of which its rounding error is a part."""
    assert mine.keys() == single.keys()
    for key, value in single.items():
        scale = abs(single.get(key.split("/")[0] + "/loss", 0.0))
        assert mine[key] == pytest.approx(value, rel=1e-4, abs=max(1e-6, 1e-5 * scale)), key


@pytest.mark.parametrize("max_steps", [47, 13])
def test_max_steps_stops_a_member_where_a_single_run_stops(tmp_path, max_steps, compose_config, read_json,
                                                           train_in_process, plain, quick):
    """digits: 20 batches an epoch. 47 steps: two whole epochs and 7 steps of a third, which Lightning
    trains but does not validate; 13 steps: no validation at all (final weights, no best.ckpt).
    Every epoch's losses, every final metric, `epochs` and the best epoch equal the single run's."""
    base = [*quick, *WHOLE_EPOCHS, "trainer.max_epochs=5", f"trainer.max_steps={max_steps}", "logger=csv", "seed=3"]
    assert sequential_reason(plain(base)) is None
    member = Member(compose_config(base), tmp_path / "member")
    run_group([member], "steps", tmp_path / "steps.pt")
    alone = tmp_path / "alone"
    train_in_process(base, alone)
    ours, theirs = _csv_epochs(member.run_dir), _csv_epochs(alone)
    assert len(ours) == len(theirs) == math.ceil(max_steps / 20)
    steps = [[(row["epoch"], row["step"]) for row in csv.DictReader((run_dir / "csv" / "metrics.csv").open())
              if row["train/loss"]] for run_dir in (member.run_dir, alone)]
    assert steps[0] == steps[1]  # each epoch's metrics logged at the same step
    assert "val/loss" not in theirs[-1]  # the cut epoch is not validated
    for mine, single in zip(ours, theirs):
        assert mine.keys() == single.keys()
        for key in single:
            assert mine[key] == pytest.approx(single[key], rel=1e-4), key
    mine, single = read_json(member.run_dir / "metrics.json"), read_json(alone / "metrics.json")
    assert mine.keys() == single.keys() and mine["epochs"] == single["epochs"] == math.ceil(max_steps / 20)
    for key in single:
        assert mine[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
    best = [folder / "checkpoints" / "best.ckpt" for folder in (member.run_dir, alone)]
    if max_steps == 47:
        epochs = [torch.load(path, weights_only=False)["epoch"] for path in best]
        assert epochs[0] == epochs[1] in (0, 1)
    else:
        assert not any(path.exists() for path in best)
        assert read_json(member.run_dir / "run.json")["best_checkpoint"] is None


def test_replay_hands_out_the_recorded_draws_and_refuses_any_other():
    from ae_lab.ensemble.streams import MemberStreams, Replay

    plan = MemberStreams.record(lambda: (torch.rand(3), torch.randn_like(torch.zeros(2, 5))))
    assert [(draw.function, draw.shape) for draw in plan] == [(torch.rand, (3,)), (torch.randn_like, (2, 5))]
    given = [torch.zeros(3), torch.ones(2, 5)]
    with Replay(plan, given):
        assert torch.rand(3) is given[0] and torch.randn_like(torch.empty(2, 5)) is given[1]
    for other in (lambda: torch.rand(4), lambda: torch.randn(3)):  # another shape, another function
        with pytest.raises(RuntimeError, match="recorded draws"), Replay(plan, given):
            other()


def test_conv_members_in_chunks_equal_each_single_module(plain):
    """Conv nets on a CPU are vmapped in chunks of CPU_CONV_CHUNK members: with 3 members (two chunks),
    each member's terms (a VAE's: its sampling drawn in its own stream) equal its own module's, run alone
    from the same generator state."""
    configs = [plain(["model=vae", "model.arch=conv", f"loss.beta={beta}", f"seed={seed}"])
               for seed, beta in ((0, 1.0), (1, 2.0), (2, 4.0))]
    ensemble = Ensemble(configs, (1, 8, 8), dataset_size=1000, device=torch.device("cpu"))
    assert ensemble.chunk == group_module.CPU_CONV_CHUNK < len(configs)
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    before = list(ensemble.streams.states)
    terms = ensemble.eval_terms(ensemble.flat, x, 0)
    for member, module in enumerate(ensemble.modules):
        with torch.random.fork_rng(), torch.no_grad():
            torch.set_rng_state(before[member]["cpu"])
            logits, latent = module(x)
            alone = module.objective(logits, x, latent, x, module.objective.weights(0), create_graph=False)
        for name, value in alone.items():
            assert terms[name][member].item() == pytest.approx(value.item(), rel=1e-5), name


def test_ensemble_projection_estimates_each_members_exact_penalty(plain):
    """The projection estimator under vmap (the rows from a torch.func pullback): the mean of repeated
    estimates on one batch lies within 4 standard errors of each member's exact penalty, computed by the
    single run's autograd path."""
    configs = [plain(["loss=contractive", "loss.contractive_estimator=projection", f"seed={seed}"])
               for seed in (0, 1)]
    ensemble = Ensemble(configs, (1, 8, 8), dataset_size=1000, device=torch.device("cpu"))
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    draws = torch.stack([ensemble.eval_terms(ensemble.flat, x, 0)["contractive"] for _ in range(400)])
    for member, module in enumerate(ensemble.modules):
        inputs = x.clone().requires_grad_(True)
        exact = contractive_penalty(module(inputs)[1].code, inputs, "exact").mean().item()
        estimates = draws[:, member]
        assert abs(estimates.mean().item() - exact) < 4 * estimates.std().item() / math.sqrt(len(estimates))
        assert estimates.std() > 0  # a random estimate, not the exact value again


def test_a_contractive_sweep_trains_as_one_ensemble(tmp_path, read_json, run_cli):
    sweep_dir = tmp_path / "sweep"
    done = run_cli(["-m", "hydra/launcher=vectorized", "loss=contractive", "loss.contractive_weight=0.01,0.1",
                    "trainer.max_epochs=1", "eval=minimal", "logger=none", "trainer.enable_progress_bar=false",
                    f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "in 1 groups" in output and "one job at a time" not in output, output[-3000:]
    records = [read_json(folder / "run.json") for folder in sweep_dir.glob("*_*") if folder.is_dir()]
    assert len(records) == 2
    assert all(r["status"] == "completed" and r["ensemble"]["members"] == 2 for r in records)


# ----- faults

def test_a_nan_member_is_recorded_failed_and_frozen_the_others_train_on(tmp_path, compose_config, read_json,
                                                                        train_in_process, quick):
    base = [*quick, *WHOLE_EPOCHS, "logger=none", "optim.name=sgd"]
    members = [Member(compose_config(base + [f"optim.lr={lr}"]), tmp_path / str(i))
               for i, lr in enumerate([0.01, 1e4, 0.02])]
    outcomes = run_group(members, "nan", tmp_path / "g.pt")
    assert outcomes[1].metrics is None and outcomes[0].metrics and outcomes[2].metrics
    record = read_json(tmp_path / "1" / "run.json")
    assert record["status"] == "failed" and "at step" in record["error"]
    assert record["failure"]["step"] >= 0 and "recon" in record["failure"]["terms"]
    assert not (tmp_path / "1" / "metrics.json").exists()
    for good in ("0", "2"):
        assert read_json(tmp_path / good / "run.json")["status"] == "completed"
        assert math.isfinite(read_json(tmp_path / good / "metrics.json")["test/loss"])
    # the healthy member trained as it would have without the failing one
    alone = train_in_process(base + ["optim.lr=0.01"], tmp_path / "alone")
    assert outcomes[0].metrics["test/loss"] == pytest.approx(alone["test/loss"], rel=1e-4)


def test_a_member_failing_after_training_leaves_the_others_written(tmp_path, monkeypatch, compose_config, read_json,
                                                                   quick):
    """An error while one member's results are written fails that member only; a Ctrl-C there records it
    and the members after it interrupted."""
    members = [Member(compose_config([*quick, *WHOLE_EPOCHS, "logger=none", f"seed={seed}"]), tmp_path / str(seed))
               for seed in range(3)]
    write_results = group_module.write_results
    raised = {"error": RuntimeError("disk full")}

    def failing_for_member_1(module, data, cfg, run_dir, metrics, history, checkpoint):
        if run_dir.name == "1":
            raise raised["error"]
        return write_results(module, data, cfg, run_dir, metrics, history, checkpoint)

    monkeypatch.setattr(group_module, "write_results", failing_for_member_1)
    outcomes = run_group(members, "g", tmp_path / "g.pt")
    assert outcomes[1].metrics is None and "disk full" in outcomes[1].error
    assert outcomes[0].metrics and outcomes[2].metrics
    record = read_json(tmp_path / "1" / "run.json")
    assert record["status"] == "failed" and "disk full" in record["error"]
    assert [read_json(tmp_path / name / "run.json")["status"] for name in ("0", "2")] == ["completed"] * 2

    raised["error"] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        run_group(members, "g", tmp_path / "g.pt")
    assert [read_json(tmp_path / str(s) / "run.json")["status"] for s in range(3)] == \
        ["completed", "interrupted", "interrupted"]
    # the re-run's group lacks member 0, which is written: it cannot resume from the group checkpoint
    assert read_json(tmp_path / "2" / "run.json")["interrupted_checkpoint"] is None
    assert not (tmp_path / "g.pt").exists()


def test_a_killed_group_resumes_from_its_checkpoint_exactly(tmp_path, monkeypatch, compose_config, read_json,
                                                            run_cli, quick):
    """A VAE with noise: the resumed group's numbers equal an uninterrupted group's exactly (the RNG
    state and the place in the epoch come back)."""
    base = [*quick, *WHOLE_EPOCHS, "model=vae", "noise=gaussian", "logger=none", "eval.figures=false",
            "checkpoint_every_n_steps=7"]

    def members(folder: Path) -> list[Member]:
        return [Member(compose_config(base + [f"seed={s}", f"loss.beta={b}"]), folder / f"{s}_{b}")
                for s, b in ((0, 1.0), (1, 4.0))]

    whole = run_group(members(tmp_path / "whole"), "g", tmp_path / "whole.pt")
    step = group_module.GroupTrainer._step
    calls = {"n": 0}

    def killed_at_step_30(self, x):
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt
        step(self, x)

    monkeypatch.setattr(group_module.GroupTrainer, "_step", killed_at_step_30)
    checkpoint = tmp_path / "cut.pt"
    with pytest.raises(KeyboardInterrupt):
        run_group(members(tmp_path / "cut"), "g", checkpoint)
    assert checkpoint.exists()
    assert read_json(tmp_path / "cut" / "0_1.0" / "run.json")["status"] == "interrupted"
    refused = run_cli([f"resume={tmp_path / 'cut' / '0_1.0'}"], cwd=tmp_path)  # a member resumes with its group
    assert refused.returncode == 2 and "run its sweep again with hydra.sweep.dir=" in refused.stderr
    assert "Traceback" not in refused.stderr
    monkeypatch.setattr(group_module.GroupTrainer, "_step", step)
    resumed = run_group(members(tmp_path / "cut"), "g", checkpoint)
    assert not checkpoint.exists()
    record = read_json(tmp_path / "cut" / "1_4.0" / "run.json")
    assert record["status"] == "completed" and record["resumed_from"]["global_step"] == 28
    for ours, theirs in zip(resumed, whole):
        assert ours.metrics == theirs.metrics


# ----- the launcher end to end: folders, W&B, compare, reproduce, a re-run

@pytest.mark.slow
def test_vectorized_sweep_folders_wandb_compare_reproduce_and_rerun(tmp_path, read_json, run_cli):
    """A VAE sweep (stochastic steps: each member draws in its own stream) through the real command line:
    the member folders, their logs and W&B runs; compare equals the basic launcher's sweep; reproduce
    re-runs a member alone and finds its numbers; a re-run skips the completed members."""
    sweep = ["model=vae", "seed=0,1", "optim.lr=0.003", "trainer.max_epochs=2", "eval=default", "eval.figures=false",
             "trainer.enable_progress_bar=false"]
    vectorized, basic = tmp_path / "vectorized", tmp_path / "basic"
    done = run_cli(["-m", "hydra/launcher=vectorized", *sweep, f"hydra.sweep.dir={vectorized}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_cli(["-m", *sweep, f"hydra.sweep.dir={basic}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    folders = sorted(p.name for p in vectorized.glob("*_*") if p.is_dir())
    assert folders == sorted(p.name for p in basic.glob("*_*") if p.is_dir()) and len(folders) == 2
    runs = {}
    for name in folders:
        run_dir = vectorized / name
        for needed in (".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "run.json",
                       "metrics.json", "evaluation.json", "checkpoints/best.ckpt", "checkpoints/last.ckpt",
                       "ae_lab.log"):
            assert (run_dir / needed).exists(), needed
        # its log: the group's training lines, and of the members' write-outs only its own
        lines = (run_dir / "ae_lab.log").read_text().splitlines()
        assert sum("epoch 1: 2 of 2 members training" in line for line in lines) == 1
        written = [line for line in lines if " written in " in line]
        assert len(written) == 1 and f"({name})" in written[0]
        record, metrics = read_json(run_dir / "run.json"), read_json(run_dir / "metrics.json")
        assert record["status"] == "completed" and record["ensemble"]["members"] == 2
        assert metrics.keys() == read_json(basic / name / "metrics.json").keys()
        from ae_lab.module import Autoencoder

        Autoencoder.load_from_checkpoint(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
        contents = run_contents(run_dir)
        single = run_contents(basic / name)["run"]
        assert contents["run"].run_id == record["wandb_run_id"] and contents["run"].run_group == f"seed {vectorized.name}"
        assert (contents["run"].display_name, contents["run"].job_type) == (single.display_name, single.job_type)
        assert contents["config"]["seed"] == record["seed"]
        for key, value in metrics.items():  # the summary holds this member's final metrics
            assert contents["summary"][key] == pytest.approx(value)
        runs[name] = [row["train/loss"] for row in contents["history"] if "train/loss" in row]
        assert len(runs[name]) == 2
        # the learning curves as a single run has them: history.csv, curves.png, and the same W&B history
        # (the epochs' steps, the step losses, test/* and best/val/* once at the last step)
        ours, theirs = read_history(run_dir), read_history(basic / name)
        assert [(row["epoch"], row["step"], sorted(row)) for row in ours] == \
            [(row["epoch"], row["step"], sorted(row)) for row in theirs]
        assert any(STEP_LOSS in row for row in ours) and any("val/loss" in row for row in ours)
        for mine, single in zip(ours, theirs):
            assert mine == pytest.approx(single, rel=1e-4, abs=1e-6)
        assert not (run_dir / "figures").exists()  # eval=minimal draws no figures, the curves neither

        def points(history: list[dict]) -> list[tuple]:  # (step, epoch, key) of the rows ae_lab logs
            return [(row["trainer/global_step"], row["epoch"], key) for row in history if "epoch" in row
                    for key in row if not key.startswith("_") and key not in ("epoch", "trainer/global_step")]

        single_history = run_contents(basic / name)["history"]
        assert sorted(points(contents["history"])) == sorted(set(points(single_history)))
        assert sum("test/loss" in row and "best/val/loss" in row for row in contents["history"]) == 1
        assert sum("val/loss" in row for row in single_history) == 2  # no point after the last epoch
    assert len({tuple(history) for history in runs.values()}) == 2  # each run holds only its own values
    # compare: the same columns, the same numbers within the equality's tolerance
    tables = [run_cli_module("ae_lab.compare", [str(folder), "--by-seed", "--format", "csv"], tmp_path) for folder in (vectorized, basic)]
    ours, theirs = (list(csv.DictReader(table.splitlines())) for table in tables)
    assert ours[0].keys() == theirs[0].keys() and len(ours) == len(theirs) == 2
    for mine, single in zip(ours, theirs):
        for key, value in single.items():
            try:
                assert float(mine[key]) == pytest.approx(float(value), rel=1e-4, abs=1e-6), key
            except ValueError:
                assert mine[key] == value, key
    # reproduce re-runs a member alone and finds its numbers, within a member's tolerance, which it states;
    # its copy lands beside the sweep folder, not in it, and its console is a run's
    member = vectorized / folders[1]
    done = subprocess.run([sys.executable, "-m", "ae_lab.reproduce", str(member)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    count = len(read_json(member / "metrics.json"))
    assert done.returncode == 0 and f"{count} of {count} metrics match" in done.stdout, done.stdout[-3000:]
    assert "a member of a vectorised sweep" in done.stdout and "relative tolerance 1e-05" in done.stdout
    [copy] = tmp_path.glob(f"vectorized-{folders[1]}-reproduced-*")
    assert (copy / "metrics.json").exists() and (copy / "ae_lab.log").exists()
    assert sorted(p.name for p in vectorized.glob("*_*") if p.is_dir()) == folders
    assert "GPU available" not in done.stderr and "Trainer(" not in done.stderr, done.stderr
    # a re-run of the sweep skips the completed members
    again = run_cli(["-m", "hydra/launcher=vectorized", *sweep, f"hydra.sweep.dir={vectorized}"], tmp_path)
    output = again.stdout + again.stderr
    assert again.returncode == 0 and output.count("already completed") == 2, output[-2000:]


GROUPS_SWEEP = ["model.latent_dim=4,8", "seed=0,1", "trainer.max_epochs=1", "logger=none", "eval=minimal",
                "trainer.enable_progress_bar=false"]  # two groups (one per latent size) of two members
ON_TWO_GPUS = ["hydra/launcher=vectorized", "hydra.launcher.gpus=[0,1]", "hydra.launcher.poll_seconds=0.1"]


def _members(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.mark.slow
def test_groups_run_one_per_gpu_in_workers_and_equal_the_in_process_sweep(tmp_path, read_json, run_cli):
    """Two simulated GPUs (CUDA_VISIBLE_DEVICES on this CPU-only machine): each group trains in its own
    worker process that saw exactly one of them, writes its members' folders as in-process, and the
    numbers equal the same sweep trained in this process."""
    on_gpus, in_process = tmp_path / "gpus", tmp_path / "here"
    done = run_cli(["-m", *ON_TWO_GPUS, *GROUPS_SWEEP, f"hydra.sweep.dir={on_gpus}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_cli(["-m", "hydra/launcher=vectorized", *GROUPS_SWEEP, f"hydra.sweep.dir={in_process}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # what each worker saw, from its log beside the group checkpoint
    seen = {}
    for worker_log in (on_gpus / ".ensembles").glob("*.log"):
        [(pid, gpu)] = re.findall(r"worker (\d+), CUDA_VISIBLE_DEVICES=([^,]*),", worker_log.read_text())
        seen[worker_log.stem] = (gpu, int(pid))
    assert sorted(gpu for gpu, _ in seen.values()) == ["0", "1"]
    assert not list((on_gpus / ".ensembles").glob("*.pt")) and not list((on_gpus / ".ensembles").glob("*.pkl"))
    members = _members(on_gpus)
    assert [p.name for p in members] == [p.name for p in _members(in_process)] and len(members) == 4
    groups = set()
    for member in members:
        record = read_json(member / "run.json")
        gpu, pid = seen[record["ensemble"]["group"]]
        assert record["status"] == "completed" and record["ensemble"]["members"] == 2
        assert record["cuda_visible_devices"] == gpu and record["pid"] == pid  # written by its group's worker
        groups.add(record["ensemble"]["group"])
        single = in_process / member.name
        assert read_json(single / "run.json")["ensemble"] == record["ensemble"]
        for name in ("config.yaml", "overrides.yaml"):
            assert (member / ".hydra" / name).read_text() == (single / ".hydra" / name).read_text()
        for needed in ("evaluation.json", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
            assert (member / needed).exists(), needed
        ours, theirs = read_json(member / "metrics.json"), read_json(single / "metrics.json")
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert len(groups) == 2


def test_one_named_gpu_trains_its_group_in_a_worker_that_sees_that_gpu(tmp_path, read_json, run_cli):
    """`hydra.launcher.gpus=[1]`: the group trains on GPU 1 (its worker sees only it), not on torch's cuda:0."""
    sweep = tmp_path / "sweep"
    done = run_cli(["-m", "hydra/launcher=vectorized", "hydra.launcher.gpus=[1]", "hydra.launcher.poll_seconds=0.1",
                    "seed=0,1", "trainer.max_epochs=1", "logger=none", "eval=minimal",
                    "trainer.enable_progress_bar=false", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    [worker_log] = (sweep / ".ensembles").glob("*.log")
    assert "CUDA_VISIBLE_DEVICES=1," in worker_log.read_text()
    members = _members(sweep)
    assert len(members) == 2
    assert [read_json(member / "run.json")["cuda_visible_devices"] for member in members] == ["1", "1"]


@pytest.fixture(scope="session")
def sweep_stalled_after_step_5(ctrl_c_by_default):
    """`sweep_stalled_after_step_5(...)`: `python -m ae_lab -m` on two simulated GPUs into `tmp_path/sweep`, in its own process group, with..."""
    @contextmanager
    def sweep_stalled_after_step_5(tmp_path: Path, overrides: list[str], groups: int) -> Iterator[subprocess.Popen]:
        """`python -m ae_lab -m` on two simulated GPUs into `tmp_path/sweep`, in its own process group, with
        its `groups` workers stalled after their group checkpoints at step 5 (tests/stall); killed at the end
        if still running. Its output goes to `tmp_path/sweep.log`."""
        sweep_dir, marker = tmp_path / "sweep", tmp_path / "stalled"
        env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
        env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "tests" / "stall"), os.environ.get("PYTHONPATH")])),
                   AE_LAB_STALL_AFTER_STEP="5", AE_LAB_STALL_MARKER=str(marker))
        args = [sys.executable, "-m", "ae_lab", "-m", *ON_TWO_GPUS, *overrides, f"hydra.sweep.dir={sweep_dir}"]
        with open(tmp_path / "sweep.log", "w") as output:
            sweep = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=ctrl_c_by_default)
            try:
                deadline = time.time() + 240
                while not marker.exists() or len(list((sweep_dir / ".ensembles").glob("*.pt"))) < groups:
                    assert sweep.poll() is None and time.time() < deadline, (tmp_path / "sweep.log").read_text()[-3000:]
                    time.sleep(0.1)
                yield sweep
            finally:
                marker.unlink(missing_ok=True)
                if sweep.poll() is None:
                    os.killpg(sweep.pid, signal.SIGKILL)
                    sweep.wait()

    return sweep_stalled_after_step_5


STEPPED = ["trainer.max_epochs=1", "logger=none", "eval=minimal", "trainer.enable_progress_bar=false",
           "checkpoint_every_n_steps=5"]


@pytest.mark.slow
def test_a_killed_worker_leaves_its_members_failed_and_a_rerun_resumes_its_group(tmp_path, read_json, run_cli,
                                                                                 sweep_stalled_after_step_5):
    """The worker of a group is SIGKILLed after its group checkpoint at step 5: the sweep ends with the
    members recorded failed (the worker's end in their run.json); run again, the group goes on
    from that checkpoint and completes."""
    sweep_dir = tmp_path / "sweep"
    with sweep_stalled_after_step_5(tmp_path, ["seed=0,1", *STEPPED], groups=1) as sweep:
        members = _members(sweep_dir)
        worker = read_json(members[0] / "run.json")["pid"]
        assert worker != sweep.pid and read_json(members[1] / "run.json")["pid"] == worker
        os.kill(worker, signal.SIGKILL)
        assert sweep.wait(timeout=120) == 1  # the sweep went on to its end: failed jobs
    [checkpoint] = (sweep_dir / ".ensembles").glob("*.pt")
    for member in members:
        record = read_json(member / "run.json")
        assert record["status"] == "failed" and "was killed (signal 9)" in record["error"], record
        assert not (member / "metrics.json").exists()
    done = run_cli(["-m", *ON_TWO_GPUS, "seed=0,1", *STEPPED, f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not checkpoint.exists()
    for member in members:
        record = read_json(member / "run.json")
        assert record["status"] == "completed" and record["resumed_from"]["global_step"] == 5
        assert list(member.glob("run.attempt-*.json"))  # the failed attempt's record is kept
        assert math.isfinite(read_json(member / "metrics.json")["test/loss"])


@pytest.mark.slow
def test_ctrl_c_interrupts_every_worker_and_the_sweep_ends_with_its_summary(tmp_path, read_json,
                                                                            sweep_stalled_after_step_5):
    """Ctrl-C (SIGINT to the terminal's process group) while two groups train in their workers: each
    worker records its members interrupted and keeps its group checkpoint; the launcher waits for them,
    writes the summary and exits with 130 and one line, no traceback."""
    sweep_dir = tmp_path / "sweep"
    with sweep_stalled_after_step_5(tmp_path, ["model.latent_dim=4,8", "seed=0,1", *STEPPED], groups=2) as sweep:
        os.killpg(sweep.pid, signal.SIGINT)
        assert sweep.wait(timeout=120) == 130
    output = (tmp_path / "sweep.log").read_text()
    assert "interrupted; run the same sweep again" in output and "Traceback" not in output, output[-3000:]
    assert "4 interrupted" in (sweep_dir / "summary.md").read_text()
    assert len(list((sweep_dir / ".ensembles").glob("*.pt"))) == 2
    for member in _members(sweep_dir):
        assert read_json(member / "run.json")["status"] == "interrupted"


def run_cli_module(module: str, args: list[str], cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_refused_jobs_record_their_own_overrides(tmp_path, read_json, run_cli):
    """Jobs refused before training (here: greedy pretraining with fewer epochs than its phases) are
    recorded failed, each folder with its own config and overrides, not those of the last job composed."""
    done = run_cli(["-m", "hydra/launcher=vectorized", "model.pretrain=greedy", "trainer.max_epochs=1",
                    "optim.lr=0.001,0.002", "logger=none", "hydra.sweep.dir=sweep"], cwd=tmp_path)
    assert done.returncode != 0
    jobs = sorted((tmp_path / "sweep").glob("[0-9]*_*"))
    assert len(jobs) == 2
    for job, lr in zip(jobs, ("0.001", "0.002")):
        assert read_json(job / "run.json")["status"] == "failed"
        assert f"optim.lr={lr}" in (job / ".hydra" / "overrides.yaml").read_text()
        assert OmegaConf.load(job / ".hydra" / "config.yaml").optim.lr == float(lr)
    # no job has metrics: the summary's table has its three columns and no empty fourth
    assert (tmp_path / "sweep" / "summary.md").read_text().splitlines()[:2] == ["| job | overrides | status |",
                                                                                "|---|---|---|"]
