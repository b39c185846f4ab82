"""Figures written into a run's `figures/` folder (matplotlib, no torchvision)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _show(axis: plt.Axes, image: torch.Tensor) -> None:
    """One (C, H, W) image in [0, 1], grey for one channel, unsmoothed pixels, no ticks."""
    pixels = image.detach().cpu().clamp(0, 1)
    if pixels.shape[0] == 1:
        axis.imshow(pixels[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        axis.imshow(pixels.permute(1, 2, 0).numpy(), interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])


def image_rows(rows: dict[str, torch.Tensor], path: Path, title: str = "") -> Path:
    """Save a grid with one labelled row per entry of `rows` (each a batch (N, C, H, W)), column i
    showing example i in every row."""
    count = next(iter(rows.values())).shape[0]
    figure, axes = plt.subplots(len(rows), count, figsize=(1.1 * count + 1.2, 1.2 * len(rows) + 0.4),
                                squeeze=False)
    for row, (label, images) in enumerate(rows.items()):
        for column in range(count):
            _show(axes[row, column], images[column])
        axes[row, 0].set_ylabel(label, rotation=0, ha="right", va="center")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
