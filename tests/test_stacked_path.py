"""The ensemble's stacked-MLP path (ae_lab/ensemble/stacked.py) against its general vmap path: which groups
take it, equal terms, gradients and parameters step by step (a plain AE and a VAE, whose sampling draws in
each member's stream), equal evaluation, and a group resumed from its checkpoint on that path exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ae_lab.compose import compose_config
from ae_lab.data import build_datamodule
from ae_lab.ensemble import group as group_module
from ae_lab.ensemble.group import GroupTrainer, Member
from ae_lab.ensemble.stacked import STACKED, VMAP, choose_path
from ae_lab.module import Autoencoder

STEPS = 6
# members of one group: their own seed, learning rate, weight decay (and β for the VAE)
MEMBERS = [["seed=0"], ["seed=1", "optim.lr=0.003", "optim.weight_decay=0.01"], ["seed=2", "optim.eps=1e-6"]]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def path_of(overrides: list[str]) -> str:
    plain = OmegaConf.to_container(compose_config(overrides), resolve=True, enum_to_str=True)
    return choose_path(plain, Autoencoder.from_config(plain, (1, 8, 8), dataset_size=100))[0]


def test_plain_mlp_autoencoders_and_vaes_take_the_stacked_path_every_other_variant_vmap():
    assert path_of([]) == path_of(["model=vae", "loss.beta=4"]) == STACKED
    for variant in (["model.arch=conv"], ["model=vae", "noise=masking"], ["loss=contractive"], ["loss=sparse_l1"],
                    ["model.compile=true"]):
        assert path_of(variant) == VMAP, variant


def trainer(overrides: list[str], folder: Path, monkeypatch: pytest.MonkeyPatch | None = None) -> GroupTrainer:
    """A group of `MEMBERS` (each with `overrides`); with `monkeypatch`, forced onto the vmap path."""
    if monkeypatch is not None:
        monkeypatch.setattr(group_module, "choose_path", lambda config, module: (VMAP, "forced by the test"))
    configs = [compose_config([*overrides, *member, "logger=none"]) for member in MEMBERS]
    made = GroupTrainer([Member(c, folder / str(i)) for i, c in enumerate(configs)],
                        build_datamodule(configs[0].dataset), folder / "group.pt", torch.device("cpu"))
    if monkeypatch is not None:
        monkeypatch.undo()
    return made


def batches(trainer: GroupTrainer, count: int) -> list[torch.Tensor]:
    """The group's first `count` training batches of epoch 0, (M, B, 1, 8, 8)."""
    positions, size = trainer._epoch_positions(0), trainer.data.batch_size
    return [trainer._fetch(trainer.data.splits["train"], positions[:, i * size:(i + 1) * size]) for i in range(count)]


def step_terms(trainer: GroupTrainer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The step's terms (as `_step` computes them), then the step itself."""
    ensemble = trainer.ensemble
    state, streams = ensemble.flat.detach().clone(), list(ensemble.streams.states)
    terms, _ = ensemble.train_terms(x, trainer.progress.global_step)
    ensemble.streams.states = streams  # the step below draws the same numbers again
    assert torch.equal(ensemble.flat, state)
    trainer._step(x)
    return {name: value.detach() for name, value in terms.items()}


@pytest.mark.parametrize("overrides", [[], ["model=vae", "loss.beta=2"]], ids=["ae", "vae"])
def test_the_stacked_path_equals_the_vmap_path_step_by_step(tmp_path, monkeypatch, overrides):
    """Same weights, batches and draws: every step's terms equal (relative 1e-4, the member tests'
    tolerance), the first step's gradient equals (the stacked path's hand-written backward), the
    parameters after the steps and the validation terms with them equal."""
    stacked, general = trainer(overrides, tmp_path / "s"), trainer(overrides, tmp_path / "v", monkeypatch)
    assert (stacked.ensemble.path, general.ensemble.path) == (STACKED, VMAP)
    assert torch.equal(stacked.ensemble.flat, general.ensemble.flat)
    for step, x in enumerate(batches(stacked, STEPS)):
        ours, theirs = step_terms(stacked, x), step_terms(general, x)
        assert ours.keys() == theirs.keys()
        for name in theirs:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=f"{name}, step {step}")
        if step == 0:
            torch.testing.assert_close(stacked.ensemble._gradient, general.ensemble._gradient, rtol=1e-4, atol=1e-6)
    # Adam moves a parameter by about lr a step whatever its gradient's size, so rounding in a near-zero
    # gradient can move it by a fraction of lr (1e-3)
    torch.testing.assert_close(stacked.ensemble.flat, general.ensemble.flat, rtol=1e-4, atol=2e-5)
    ours, theirs = stacked._evaluate(stacked.ensemble.flat, "val"), general._evaluate(general.ensemble.flat, "val")
    for mine, single in zip(ours, theirs):
        assert mine == pytest.approx(single, rel=1e-4, abs=1e-6)


def test_a_group_on_the_stacked_path_resumes_from_its_checkpoint_exactly(tmp_path):
    """A VAE group (members drawing in their own streams): 3 steps, its checkpoint, a new trainer from that
    checkpoint 3 more steps; its parameters, optimiser state and epoch sums equal 6 uninterrupted steps'."""
    overrides = ["model=vae", "loss.beta=4"]
    whole, cut = trainer(overrides, tmp_path / "whole"), trainer(overrides, tmp_path / "cut")
    assert whole.ensemble.path == STACKED
    xs = batches(whole, STEPS)
    for x in xs:
        whole._step(x)
    for x in xs[:3]:
        cut._step(x)
    cut.save_checkpoint()
    resumed = trainer(overrides, tmp_path / "cut")
    assert resumed.load_checkpoint() and resumed.progress.global_step == 3
    for x in xs[3:]:
        resumed._step(x)
    assert torch.equal(resumed.ensemble.flat, whole.ensemble.flat)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(resumed.optimizer.state[key], whole.optimizer.state[key])
    for name, total in whole.sums.sums.items():
        assert torch.equal(resumed.sums.sums[name], total), name
