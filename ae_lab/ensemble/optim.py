"""Adam, AdamW and SGD over stacked parameters (leading member axis), every hyperparameter per member.

The update is torch.optim's single-tensor algorithm written once for a member axis: member m's slice
follows exactly what `torch.optim.{Adam,AdamW,SGD}` with member m's settings does to one model
(tests/test_vectorized.py checks it against torch.optim). Members whose `alive` entry is False keep
their parameters and state (a member frozen after its loss turned non-finite).
"""

from __future__ import annotations

from typing import Any

import torch

BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which ae_lab's single runs use


def _per_member(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def _expand(values: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """(M,) -> (M, 1, ..., 1) to broadcast over a stacked leaf."""
    return values.view(-1, *([1] * (leaf.dim() - 1)))


class StackedOptimizer:
    """One optimiser for M members whose parameters are stacked along dim 0.

    `name` is shared (it is structure); `lr`, `weight_decay`, `eps`, `momentum` are lists of M floats.
    `lr_scale` (M,) multiplies the learning rates (the MultiStepLR factor of the current epoch).
    """

    def __init__(self, leaves: list[torch.Tensor], name: str, lr: list[float], weight_decay: list[float],
                 eps: list[float], momentum: list[float]) -> None:
        self.leaves = leaves
        self.name = name
        like = leaves[0]
        self.lr = _per_member(lr, like)
        self.weight_decay = _per_member(weight_decay, like)
        self.eps = _per_member(eps, like)
        self.momentum = _per_member(momentum, like)
        self.lr_scale = torch.ones_like(self.lr)
        self.step_count = torch.zeros_like(self.lr)  # per member: a frozen member stops counting
        if name == "sgd":
            self.state = {"momentum_buffer": [torch.zeros_like(leaf) for leaf in leaves]}
        else:
            self.state = {"exp_avg": [torch.zeros_like(leaf) for leaf in leaves],
                          "exp_avg_sq": [torch.zeros_like(leaf) for leaf in leaves]}

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], alive: torch.Tensor) -> None:
        lr = self.lr * self.lr_scale
        first_step = self.step_count == 0
        self.step_count += alive.to(self.step_count.dtype)
        for index, (leaf, grad) in enumerate(zip(self.leaves, grads)):
            keep = _expand(alive, leaf)
            if self.name == "sgd":
                new_leaf, new_state = self._sgd(leaf, grad, index, lr, first_step)
            else:
                new_leaf, new_state = self._adam(leaf, grad, index, lr)
            leaf.copy_(torch.where(keep, new_leaf, leaf))
            for key, value in new_state.items():
                self.state[key][index] = torch.where(keep, value, self.state[key][index])

    def _adam(self, leaf: torch.Tensor, grad: torch.Tensor, index: int, lr: torch.Tensor
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        beta1, beta2 = BETAS
        decay, rate, eps = (_expand(value, leaf) for value in (self.weight_decay, lr, self.eps))
        param = leaf
        if self.name == "adamw":
            param = param * (1 - rate * decay)
        else:
            grad = grad + decay * param
        exp_avg = self.state["exp_avg"][index].lerp(grad, 1 - beta1)
        exp_avg_sq = self.state["exp_avg_sq"][index] * beta2 + (1 - beta2) * grad * grad
        step = _expand(self.step_count, leaf)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = (1 - beta2 ** step).sqrt()
        denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + eps
        return param - (rate / bias_correction1) * exp_avg / denom, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    def _sgd(self, leaf: torch.Tensor, grad: torch.Tensor, index: int, lr: torch.Tensor, first_step: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        grad = grad + _expand(self.weight_decay, leaf) * leaf
        momentum = _expand(self.momentum, leaf)
        buffer = torch.where(_expand(first_step, leaf), grad, self.state["momentum_buffer"][index] * momentum + grad)
        direction = torch.where(momentum != 0, buffer, grad)
        return leaf - _expand(lr, leaf) * direction, {"momentum_buffer": buffer}

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "lr_scale": self.lr_scale, "state": self.state}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.step_count.copy_(saved["step_count"])
        self.lr_scale.copy_(saved["lr_scale"])
        self.state = saved["state"]


def clip_gradients(grads: list[torch.Tensor], clip: torch.Tensor, algorithm: str) -> list[torch.Tensor]:
    """Lightning's `gradient_clip_val` per member: `norm` scales member m's gradients so that their
    total 2-norm is at most clip[m] (torch.nn.utils.clip_grad_norm_), `value` clamps each entry."""
    if algorithm == "value":
        return [grad.clamp(-_expand(clip, grad), _expand(clip, grad)) for grad in grads]
    norms = torch.stack([grad.flatten(1).pow(2).sum(1) for grad in grads]).sum(0).sqrt()
    scale = (clip / (norms + 1e-6)).clamp(max=1.0)
    return [grad * _expand(scale, grad) for grad in grads]
