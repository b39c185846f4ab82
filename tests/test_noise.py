"""Corruption processes: their statistics match the configured values; none at evaluation time."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ae_lab.module import Autoencoder
from ae_lab.checks import validate
from ae_lab.errors import ConfigError
from ae_lab.noise import KINDS, LUMA, gaussian, grayscale, masking, occlusion, salt_pepper, watermark

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
@pytest.mark.parametrize("noise", ["gaussian", "masking", "salt_pepper", "occlusion", "watermark"])
def test_corruption_applies_in_training_only(noise, compose_config):
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


def box_bounds(mask: torch.Tensor) -> tuple[int, int]:
    """The number of rows and columns a 2-D boolean mask touches."""
    return int(mask.any(1).sum()), int(mask.any(0).sum())


def test_occlusion_blanks_one_box_of_the_configured_size_in_every_channel():
    x = torch.rand(64, 3, 10, 8) * 0.9 + 0.1
    out = occlusion(x, 0.5)
    blank = out == 0
    assert torch.equal(out[~blank], x[~blank])
    assert (blank.all(1) == blank.any(1)).all()  # all channels or none
    for example in blank[:, 0]:
        assert box_bounds(example) == (5, 4) and int(example.sum()) == 20  # one 5x4 box, nowhere else
    starts = {int(example.any(1).float().argmax()) for example in blank[:, 0]}
    assert len(starts) > 3  # placed at random
    rows = occlusion(torch.ones(50, 10), 0.3)  # rows of numbers: a run of 3 features
    assert ((rows == 0).sum(1) == 3).all()


def test_watermark_blends_stripes_into_a_window_of_half_of_each_side():
    x = torch.rand(64, 1, 12, 12) * 0.5
    out = watermark(x, 0.6)
    changed = out != x
    assert torch.allclose(out[changed], 0.4 * x[changed] + 0.6)
    for example in changed[:, 0]:
        rows, columns = box_bounds(example)
        assert rows <= 6 and columns <= 6 and 0.3 < example.sum() / 36 <= 0.6  # stripes: about half the window
    assert torch.equal(watermark(x, 0.0), x)
    sequences = watermark(torch.zeros(8, 2, 20), 1.0)
    assert ((sequences > 0).sum(-1) == 6).all()  # a window of 10: offsets 0-1, 4-5, 8-9 white


def test_grayscale_gives_the_luma_in_every_channel():
    x = torch.rand(16, 3, 5, 5)
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    grey = grayscale(x, 1.0)
    for channel in range(3):
        assert torch.allclose(grey[:, channel], luma, atol=1e-6)
    # in the data's own precision: float64 images get float64 weights (float32 ones are off by ~1e-8)
    x64 = x.double()
    luma64 = 0.299 * x64[:, 0] + 0.587 * x64[:, 1] + 0.114 * x64[:, 2]
    torch.testing.assert_close(grayscale(x64, 1.0)[:, 1], luma64, rtol=0, atol=1e-15)
    assert torch.allclose(grayscale(x, 0.25), 0.75 * x + 0.25 * luma.unsqueeze(1), atol=1e-6)
    assert LUMA == (0.299, 0.587, 0.114)


def test_grayscale_is_refused_on_data_without_three_channels(compose_config):
    cfg = compose_config(["noise=grayscale"])
    with pytest.raises(ConfigError, match=r"^noise='grayscale' is not allowed: only on RGB images"):
        validate(cfg, (1, 8, 8))
    validate(cfg, (3, 8, 8))


@pytest.mark.parametrize("kind", ["occlusion", "watermark", "grayscale"])
def test_structured_corruptions_take_per_member_tensor_strengths_under_vmap(kind):
    corrupt, _ = KINDS[kind]
    x = torch.rand(8, 3, 8, 8) * 0.9 + 0.1
    strengths = torch.tensor([0.0, 1.0])
    out = torch.func.vmap(lambda strength: corrupt(x, strength), randomness="different")(strengths)
    assert torch.equal(out[0], x) and not torch.equal(out[1], x)
