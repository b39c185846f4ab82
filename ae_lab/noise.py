"""Corruption processes for denoising autoencoders: applied to training inputs only.

Each takes a batch in [0, 1] and returns a corrupted copy drawn from torch's global RNG (seeded per run).
Every one is written in batched tensor ops with a float or tensor strength, so that it also runs inside
torch.func.vmap with per-member strengths. The noise kinds act per value on any shape; the structured
ones (occlusion, watermark) act on the example's positions: (H, W) of images, T of sequences, D of rows.
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


def _window(x: torch.Tensor, fraction: float | torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A random box per example covering `fraction` of each positional axis (the last two of (C, H, W)
    images, the last of (C, T) sequences and (D,) rows): its mask, broadcastable to x, and each axis's
    offset from the box's start (negative before it)."""
    axes = x.shape[-2:] if x.dim() >= 4 else x.shape[-1:]
    batch = x.shape[0]
    mask = torch.ones((), dtype=torch.bool, device=x.device)
    offsets = []
    for axis, length in enumerate(axes):
        width = torch.round(torch.as_tensor(fraction, dtype=x.dtype, device=x.device) * length)
        start = torch.floor(torch.rand(batch, device=x.device, dtype=x.dtype) * (length - width + 1))
        shape = [batch] + [1] * (x.dim() - 1)
        shape[x.dim() - len(axes) + axis] = length
        position = torch.arange(length, device=x.device, dtype=x.dtype)
        offset = (position - start[:, None]).reshape(shape)
        mask = mask & (offset >= 0) & (offset < width)
        offsets.append(offset)
    return mask, offsets


def occlusion(x: torch.Tensor, size: float | torch.Tensor) -> torch.Tensor:
    """Inpainting: one random box per example, `size` of each side of the image (of the sequence, of
    the row) long, set to 0 in every channel."""
    mask, _ = _window(x, size)
    return torch.where(mask, torch.zeros_like(x), x)


WATERMARK_SIZE = 0.5  # the watermark covers half of each side
WATERMARK_PERIOD = 4  # its diagonal stripes repeat every 4 positions


def watermark(x: torch.Tensor, opacity: float | torch.Tensor) -> torch.Tensor:
    """Watermark removal: a fixed pattern (white diagonal stripes over half of each side) blended in with
    weight `opacity` at a random place of each example: x -> (1 - opacity) x + opacity on the stripes."""
    window, offsets = _window(x, WATERMARK_SIZE)
    stripes = torch.remainder(sum(offsets), WATERMARK_PERIOD) < WATERMARK_PERIOD / 2
    return torch.where(window & stripes, (1 - opacity) * x + opacity, x)


LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B


def grayscale(x: torch.Tensor, amount: float | torch.Tensor) -> torch.Tensor:
    """Colourisation: RGB images (B, 3, H, W) turned grey (luma in all three channels), blended with
    weight `amount` (1: fully grey); the model is trained to give back the colour image."""
    weights = torch.tensor(LUMA, dtype=x.dtype, device=x.device).reshape(3, 1, 1)
    grey = (x * weights).sum(-3, keepdim=True).expand_as(x)
    return x + amount * (grey - x)


# each kind: its corruption and the config key of its one strength (the scalar a sweep varies)
KINDS: dict[str, tuple[Callable[[torch.Tensor, float | torch.Tensor], torch.Tensor], str]] = {
    "gaussian": (gaussian, "std"),
    "masking": (masking, "p"),
    "salt_pepper": (salt_pepper, "p"),
    "occlusion": (occlusion, "size"),
    "watermark": (watermark, "opacity"),
    "grayscale": (grayscale, "amount"),
}


def build_corruption(cfg: DictConfig) -> Corruption | None:
    """The corruption named by `noise.kind` at its configured strength, or None for `noise=none`."""
    if cfg.kind not in KINDS:
        return None
    corrupt, strength_key = KINDS[cfg.kind]
    strength = cfg[strength_key]
    return lambda x: corrupt(x, strength)
