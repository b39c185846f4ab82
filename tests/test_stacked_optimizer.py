"""The ensemble's per-member optimiser and gradient clipping (ae_lab/ensemble/optim.py) against torch:
each member row against torch.optim on one parameter with that member's settings, in float64 (where a
learning rate rounded to float32 would show), with its MultiStepLR factor, across a save and restore of
the optimiser's state, and the clipping against torch.nn.utils' clip_grad_norm_ / clip_grad_value_."""

from __future__ import annotations

import pytest
import torch

from ae_lab.ensemble.optim import StackedOptimizer, clip_gradients

SETTINGS = [dict(lr=1e-2, weight_decay=0.0, eps=1e-8, momentum=0.9),
            dict(lr=3e-3, weight_decay=0.1, eps=1e-6, momentum=0.0),
            dict(lr=5e-2, weight_decay=0.01, eps=1e-8, momentum=0.5)]
SCALE = [0.5, 1.0, 0.1]  # each member's lr factor (MultiStepLR's gamma^milestones passed)
SIZE = 40


def torch_optimizer(name: str, param: torch.nn.Parameter, setting: dict[str, float]) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD([param], lr=setting["lr"], momentum=setting["momentum"],
                               weight_decay=setting["weight_decay"])
    kind = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return kind([param], lr=setting["lr"], eps=setting["eps"], weight_decay=setting["weight_decay"])


def stacked(name: str, flat: torch.Tensor) -> StackedOptimizer:
    return StackedOptimizer(flat, name, *([s[key] for s in SETTINGS] for key in ("lr", "weight_decay", "eps", "momentum")))


def gradient(params: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (params - targets) ** 3  # the gradient of (p - t)^4 / 4: non-linear, different per member


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_float64_members_with_their_lr_factor_follow_torch_optim_across_a_saved_and_restored_state(name):
    """Five steps, the optimiser's state_dict loaded into a new one, five more: each member equals torch's
    optimiser on its own float64 parameter, its lr scaled by the member's factor (what MultiStepLR does
    to the param group), trained ten steps without interruption."""
    torch.manual_seed(0)
    start = torch.randn(len(SETTINGS), SIZE, dtype=torch.float64)
    targets = torch.randn(len(SETTINGS), SIZE, dtype=torch.float64)
    flat = start.clone()
    optimizer = stacked(name, flat)
    optimizer.lr_scale = list(SCALE)
    singles = []
    for member, setting in enumerate(SETTINGS):
        param = torch.nn.Parameter(start[member].clone())
        single = torch_optimizer(name, param, setting)
        for group in single.param_groups:
            group["lr"] *= SCALE[member]
        singles.append((param, single))
    for step in range(10):
        if step == 5:  # as a group checkpoint restores it: a new optimiser over the same parameters
            saved = optimizer.state_dict()
            optimizer = stacked(name, flat)
            optimizer.load_state_dict(saved)
        optimizer.step(gradient(flat, targets), [True] * len(SETTINGS))
        for member, (param, single) in enumerate(singles):
            single.zero_grad()
            ((param - targets[member]) ** 4 / 4).sum().backward()
            single.step()
    for member, (param, _) in enumerate(singles):
        torch.testing.assert_close(flat[member], param.detach(), rtol=1e-12, atol=1e-14)


def test_norm_clipping_of_each_member_is_torchs_clip_grad_norm_even_for_small_gradients():
    """Member gradients of norm 1e-4 to 10 against clip values below and above them: torch scales by
    clip / (norm + 1e-6), which at a norm of 1e-4 is 2 % away from clip / (norm - 1e-6)."""
    torch.manual_seed(1)
    grad = torch.randn(4, SIZE, dtype=torch.float64)
    grad = grad / grad.norm(dim=1, keepdim=True) * torch.tensor([[1e-4], [0.3], [10.0], [2.0]], dtype=torch.float64)
    clip = torch.tensor([1e-5, 1.0, 0.5, 5.0], dtype=torch.float64)
    clipped = clip_gradients(grad, clip, "norm")
    for member in range(4):
        param = torch.nn.Parameter(torch.zeros(SIZE, dtype=torch.float64))
        param.grad = grad[member].clone()
        torch.nn.utils.clip_grad_norm_([param], float(clip[member]))
        torch.testing.assert_close(clipped[member], param.grad, rtol=1e-12, atol=0)


def test_value_clipping_clamps_each_member_to_its_own_bound_as_clip_grad_value_does():
    torch.manual_seed(2)
    grad = torch.randn(3, SIZE, dtype=torch.float64) * 2
    clip = torch.tensor([0.1, 1.0, 3.0], dtype=torch.float64)
    clipped = clip_gradients(grad, clip, "value")
    for member in range(3):
        param = torch.nn.Parameter(torch.zeros(SIZE, dtype=torch.float64))
        param.grad = grad[member].clone()
        torch.nn.utils.clip_grad_value_([param], float(clip[member]))
        assert torch.equal(clipped[member], param.grad)
    assert (clipped.abs() < grad.abs()).any() and (clipped == grad).any()  # some entries clamped, some not
