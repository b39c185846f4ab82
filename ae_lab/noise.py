"""Corruption processes for denoising autoencoders: applied to training inputs only.

Each takes a batch in [0, 1] and returns a corrupted copy drawn from torch's global RNG (seeded per run).
"""

from __future__ import annotations

from typing import Callable

import torch
from omegaconf import DictConfig

Corruption = Callable[[torch.Tensor], torch.Tensor]


def gaussian(x: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    """Additive white noise N(0, std^2), not clipped (the classic DAE corruption)."""
    return x + std * torch.randn_like(x)


def masking(x: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Each pixel independently set to 0 with probability p."""
    return x * (torch.rand_like(x) >= p)


def salt_pepper(x: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Each pixel independently replaced, with probability p, by 0 or 1 (each with probability 1/2)."""
    hit = torch.rand_like(x) < p
    salt = (torch.rand_like(x) < 0.5).to(x.dtype)
    return torch.where(hit, salt, x)


# each kind: its corruption and the config key of its one strength (the scalar a sweep varies)
KINDS: dict[str, tuple[Callable[[torch.Tensor, float | torch.Tensor], torch.Tensor], str]] = {
    "gaussian": (gaussian, "std"),
    "masking": (masking, "p"),
    "salt_pepper": (salt_pepper, "p"),
}


def build_corruption(cfg: DictConfig) -> Corruption | None:
    """The corruption named by `noise.kind` at its configured strength, or None for `noise=none`."""
    if cfg.kind not in KINDS:
        return None
    corrupt, strength_key = KINDS[cfg.kind]
    strength = cfg[strength_key]
    return lambda x: corrupt(x, strength)
