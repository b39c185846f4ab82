"""Adam, AdamW and SGD over an ensemble's flat parameters (M, P), every hyperparameter per member.

The update is torch.optim's single-tensor algorithm written once for a member axis: member m's row
follows what `torch.optim.{Adam,AdamW,SGD}` with member m's settings does to one model, up to float
rounding (tests/test_vectorized.py checks it against torch.optim). One flat tensor keeps the update to
a dozen whole-ensemble operations per step. Members whose `alive` entry is False keep their
parameters exactly (a member frozen after its loss turned non-finite never trains again).
"""

from __future__ import annotations

from typing import Any

import torch

BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which ae_lab's single runs use


class StackedOptimizer:
    """One optimiser for M members whose parameters are the rows of `flat` (M, P).

    `name` is shared (it is structure); `lr`, `weight_decay`, `eps`, `momentum` are lists of M floats.
    `lr_scale` (M,) multiplies the learning rates (the MultiStepLR factor of the current epoch).
    """

    def __init__(self, flat: torch.Tensor, name: str, lr: list[float], weight_decay: list[float],
                 eps: list[float], momentum: list[float]) -> None:
        self.flat = flat
        self.name = name

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=flat.dtype, device=flat.device).unsqueeze(1)

        self.lr, self.weight_decay, self.eps, self.momentum = map(column, (lr, weight_decay, eps, momentum))
        self.lr_scale = torch.ones_like(self.lr)
        self.step_count = 0
        keys = ("momentum_buffer",) if name == "sgd" else ("exp_avg", "exp_avg_sq")
        self.state = {key: torch.zeros_like(flat) for key in keys}

    @torch.no_grad()
    def step(self, grad: torch.Tensor, alive: torch.Tensor) -> None:
        """Apply `grad` (M, P) to the members that are alive."""
        alive = alive.unsqueeze(1)
        grad = torch.where(alive, grad, torch.zeros_like(grad))  # a frozen member's NaN stays out of its state
        lr = self.lr * self.lr_scale * alive  # 0 for a frozen member: its parameters stay as they are
        self.step_count += 1
        param = self.flat
        if self.name == "sgd":
            grad = grad + self.weight_decay * param
            buffer = self.state["momentum_buffer"]
            buffer.mul_(self.momentum).add_(grad)  # the first step gives `grad`, as torch's clone does
            param.sub_(lr * buffer)
            return
        beta1, beta2 = BETAS
        if self.name == "adamw":
            param.mul_(1 - lr * self.weight_decay)
        else:
            grad = grad + self.weight_decay * param
        exp_avg, exp_avg_sq = self.state["exp_avg"], self.state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** self.step_count
        bias_correction2_sqrt = (1 - beta2 ** self.step_count) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        param.sub_(exp_avg / denom * (lr / bias_correction1))

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "lr_scale": self.lr_scale, "state": self.state}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.step_count = saved["step_count"]
        self.lr_scale = saved["lr_scale"]
        self.state = saved["state"]


def clip_gradients(grad: torch.Tensor, clip: torch.Tensor, algorithm: str) -> torch.Tensor:
    """Lightning's `gradient_clip_val` per member on the flat gradients (M, P): `norm` scales member m's
    gradients so that their total 2-norm is at most clip[m] (torch.nn.utils.clip_grad_norm_), `value`
    clamps each entry to [-clip[m], clip[m]]."""
    clip = clip.unsqueeze(1)
    if algorithm == "value":
        return grad.clamp(-clip, clip)
    scale = (clip / (grad.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)
    return grad * scale
