"""Corruption processes: their statistics match the configured values; none at evaluation time."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ae_lab.module import Autoencoder
from ae_lab.noise import gaussian, masking, salt_pepper
from conftest import compose_config

N = 200_000


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def test_gaussian_noise_has_configured_mean_and_variance():
    x = torch.rand(N)
    delta = gaussian(x, 0.3) - x
    assert delta.mean().item() == pytest.approx(0.0, abs=4 * 0.3 / N**0.5)
    assert delta.var().item() == pytest.approx(0.09, rel=0.02)


def test_masking_zeroes_the_configured_fraction():
    x = torch.rand(N) * 0.9 + 0.1  # no zeros to begin with
    out = masking(x, 0.25)
    dropped = out == 0
    assert dropped.float().mean().item() == pytest.approx(0.25, abs=0.005)
    assert torch.equal(out[~dropped], x[~dropped])


def test_salt_and_pepper_replaces_the_configured_fraction_with_0_or_1():
    x = torch.full((N,), 0.5)
    out = salt_pepper(x, 0.2)
    changed = out != x
    assert changed.float().mean().item() == pytest.approx(0.2, abs=0.005)
    assert set(out[changed].unique().tolist()) == {0.0, 1.0}
    assert (out[changed] == 1).float().mean().item() == pytest.approx(0.5, abs=0.02)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
@pytest.mark.parametrize("noise", ["gaussian", "masking", "salt_pepper"])
def test_corruption_applies_in_training_only(noise):
    cfg = OmegaConf.to_container(compose_config([f"noise={noise}"]), resolve=True, enum_to_str=True)
    module = Autoencoder.from_config(cfg, (1, 8, 8))
    seen = []
    module.encoder.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    x = torch.rand(32, 1, 8, 8) * 0.8 + 0.1
    module.training_step({"x": x}, 0)
    module.validation_step({"x": x}, 0)
    module.test_step({"x": x}, 0)
    train_input, val_input, test_input = seen
    assert not torch.equal(train_input, x)
    assert torch.equal(val_input, x) and torch.equal(test_input, x)
