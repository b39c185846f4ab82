"""Figures written into a run's `figures/` folder (matplotlib, no torchvision)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _show(axis: plt.Axes, image: torch.Tensor) -> None:
    """One (C, H, W) image in [0, 1], grey for one channel, colour for three, other channel counts as
    grey channels side by side; unsmoothed pixels, no ticks."""
    pixels = image.detach().cpu().clamp(0, 1)
    if pixels.shape[0] not in (1, 3):
        pixels = torch.cat(list(pixels), dim=-1).unsqueeze(0)
    if pixels.shape[0] == 1:
        axis.imshow(pixels[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        axis.imshow(pixels.permute(1, 2, 0).numpy(), interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])


def image_rows(rows: dict[str, torch.Tensor], path: Path, title: str = "",
               columns: list[str] | None = None) -> Path:
    """Save a grid with one labelled row per entry of `rows` (each a batch (N, C, H, W)), column i
    showing example i in every row; `columns` labels the columns above the first row.

    Each row is one strip of its images (a pixel's gap between them) drawn on one axis: a row of N
    separate axes cost matplotlib about N times as much to lay out and draw, and a run's figures are
    drawn after every run (every member of a vectorised sweep too)."""
    count = next(iter(rows.values())).shape[0]
    figure, axes = plt.subplots(len(rows), 1, figsize=(1.1 * count + 1.2, 1.2 * len(rows) + 0.4), squeeze=False)
    for row, (label, images) in enumerate(rows.items()):
        axis = axes[row, 0]
        pixels = images.detach().cpu().clamp(0, 1)
        gap = torch.ones(*pixels.shape[1:3], 1)
        strip = torch.cat([part for image in pixels for part in (image, gap)][:-1], dim=2)  # (C, H, N (W + 1) - 1)
        _show(axis, strip)
        axis.set_ylabel(label, rotation=0, ha="right", va="center")
        if row == 0 and columns:
            width = pixels.shape[3] + 1
            axis.set_xticks([width * column + (width - 2) / 2 for column in range(len(columns))])
            axis.set_xticklabels(columns, fontsize="small")
            axis.xaxis.tick_top()
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def _plot(axis: plt.Axes, series: dict[str, torch.Tensor]) -> None:
    """Examples of one panel: (D,) rows as bars (the first series) and markers (the others), (C, T)
    sequences as one line per channel (the first series solid, the others dashed)."""
    for order, (label, example) in enumerate(series.items()):
        values = example.detach().cpu().float()
        if values.dim() == 1:
            positions = torch.arange(len(values)).numpy()
            if order == 0:
                axis.bar(positions, values.numpy(), color="0.7", label=label)
            else:
                axis.plot(positions, values.numpy(), "o", markersize=3, label=label)
        else:
            for channel, line in enumerate(values):
                axis.plot(line.numpy(), color=f"C{channel}", linestyle="-" if order == 0 else "--", linewidth=1,
                          label=label if channel == 0 else None)
    axis.tick_params(labelsize="x-small")


def signal_rows(rows: dict[str, torch.Tensor], path: Path, title: str = "", columns: list[str] | None = None,
                overlay: bool = False) -> Path:
    """`image_rows` for rows of numbers (N, D) and sequences (N, C, T): a grid of small plots, one labelled
    row per entry of `rows`; with `overlay`, one row where each plot draws every entry of `rows` for its
    example (e.g. input as bars or solid lines, reconstruction as markers or dashed lines)."""
    count = next(iter(rows.values())).shape[0]
    panels = [dict(rows)] if overlay else [{label: batch} for label, batch in rows.items()]
    figure, axes = plt.subplots(len(panels), count, figsize=(2.2 * count + 1.2, 1.8 * len(panels) + 0.6),
                                squeeze=False)
    for row, series in enumerate(panels):
        for column in range(count):
            _plot(axes[row, column], {label: batch[column] for label, batch in series.items()})
        if not overlay:
            axes[row, 0].set_ylabel(next(iter(series)), rotation=0, ha="right", va="center")
    if overlay:
        axes[0, 0].legend(fontsize="x-small")
    for column, label in enumerate(columns or []):
        axes[0, column].set_title(label, fontsize="small")
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def scatter(points: torch.Tensor, colours: torch.Tensor, path: Path, title: str, axis_labels: tuple[str, str],
            colour_label: str) -> Path:
    """A 2-D scatter of `points` (N, 2) coloured by the integer `colours` (N,), with a legend of them
    when there are at most 12 values and a colour bar otherwise."""
    figure, axis = plt.subplots(figsize=(6.4, 5.4))
    values = torch.unique(colours)
    cmap = "tab10" if len(values) <= 10 else "viridis"
    drawn = axis.scatter(points[:, 0].numpy(), points[:, 1].numpy(), c=colours.numpy(), cmap=cmap, s=6,
                         alpha=0.7, linewidths=0)
    if len(values) <= 12:
        axis.legend(*drawn.legend_elements(), title=colour_label, loc="best", fontsize="small",
                    markerscale=1.2)
    else:
        figure.colorbar(drawn, ax=axis, label=colour_label)
    axis.set_xlabel(axis_labels[0])
    axis.set_ylabel(axis_labels[1])
    axis.set_title(title)
    return _save(figure, path)


def histogram(values: torch.Tensor, path: Path, title: str, xlabel: str, bins: int = 60) -> Path:
    """A histogram of `values` with a log count axis, so rare large activations stay visible."""
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    axis.hist(values.flatten().numpy(), bins=bins, log=True)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("count (log scale)")
    axis.set_title(title)
    return _save(figure, path)
