"""Adam, AdamW and SGD over an ensemble's flat parameters (M, P), every hyperparameter per member.

Member m's row follows what `torch.optim.{Adam,AdamW,SGD}` with member m's settings does to one
model, up to float rounding (tests/test_vectorized.py checks it against torch.optim). Members whose
`alive` entry is False keep their parameters exactly (a member frozen after its loss turned
non-finite never trains again).
"""

from __future__ import annotations

from typing import Any

import torch

BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which ae_lab's single runs use


class StackedOptimizer:
    """One optimiser for M members whose parameters are the rows of `flat` (M, P).

    `name` is shared (it is structure); `lr`, `weight_decay`, `eps`, `momentum` are lists of M floats.
    `lr_scale` (M floats) multiplies the learning rates (the MultiStepLR factor of the current epoch).
    Adam and AdamW run torch's fused kernel (`torch._fused_adam_` / `_fused_adamw_`, what
    `torch.optim.Adam(fused=True)` calls) on the member rows, once for all members of equal numbers (lr,
    weight decay, eps): one pass over their parameters and state. SGD is a few whole-ensemble operations with per-member columns.
    """

    def __init__(self, flat: torch.Tensor, name: str, lr: list[float], weight_decay: list[float],
                 eps: list[float], momentum: list[float]) -> None:
        self.flat = flat
        self.name = name
        self.lr, self.weight_decay, self.eps, self.momentum = lr, weight_decay, eps, momentum
        self.lr_scale = [1.0] * len(lr)
        keys = ("momentum_buffer",) if name == "sgd" else ("exp_avg", "exp_avg_sq")
        self.state: dict[str, Any] = {key: torch.zeros_like(flat) for key in keys}
        # per member, as torch.optim keeps it: a frozen member stops counting
        self.state["step"] = [torch.zeros((), dtype=flat.dtype, device=flat.device) for _ in lr]

    def _column(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=self.flat.dtype, device=self.flat.device).unsqueeze(1)

    @torch.no_grad()
    def step(self, grad: torch.Tensor, alive: list[bool]) -> None:
        """Apply `grad` (M, P) to the members that are alive; the others keep parameters and state."""
        if self.name == "sgd":
            self._sgd(grad, alive)
            return
        kernel = torch._fused_adamw_ if self.name == "adamw" else torch._fused_adam_
        beta1, beta2 = BETAS
        settings: dict[tuple[float, float, float], list[int]] = {}  # members of equal numbers: one call
        for member, training in enumerate(alive):
            if training:
                key = (self.lr[member] * self.lr_scale[member], self.weight_decay[member], self.eps[member])
                settings.setdefault(key, []).append(member)
        for (lr, weight_decay, eps), members in settings.items():
            steps = [self.state["step"][member] for member in members]
            torch._foreach_add_(steps, 1)  # the caller counts the step, as torch.optim.Adam does
            kernel([self.flat[m] for m in members], [grad[m] for m in members],
                   [self.state["exp_avg"][m] for m in members], [self.state["exp_avg_sq"][m] for m in members],
                   [], steps, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                   amsgrad=False, maximize=False)

    def _sgd(self, grad: torch.Tensor, alive: list[bool]) -> None:
        keep = torch.tensor(alive, device=grad.device).unsqueeze(1)
        grad = torch.where(keep, grad, torch.zeros_like(grad))  # a frozen member's NaN stays out of its state
        if any(self.weight_decay):
            grad = grad + self._column(self.weight_decay) * self.flat
        buffer = self.state["momentum_buffer"]
        buffer.mul_(self._column(self.momentum)).add_(grad)  # the first step gives `grad`, as torch's clone does
        rates = [rate * scale * training for rate, scale, training in zip(self.lr, self.lr_scale, alive)]
        self.flat.sub_(self._column(rates) * buffer)  # rate 0: a frozen member stays as it is

    def state_dict(self) -> dict[str, Any]:
        return {"lr_scale": self.lr_scale, "state": self.state}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
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
