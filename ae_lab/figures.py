"""Figures written into a run's `figures/` folder: image grids with Pillow, plots with matplotlib (no torchvision)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


_FONT_SIZE = 13
_MARGIN = 8  # pixels around the grid and between its labels and images


def label_font(size: int = _FONT_SIZE):
    """The font the image grids' text is drawn in: DejaVu Sans, which matplotlib ships (so it is always
    there) and which has every character the labels use (arrows, signs, Greek). Pillow's own default
    font (Aileron) lacks many of them and draws its missing-glyph box instead."""
    from matplotlib import font_manager
    from PIL import ImageFont

    path = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"), fallback_to_default=False)
    return ImageFont.truetype(path, size)


def _upscaled(image: torch.Tensor, scale: int) -> np.ndarray:
    """One (C, H, W) image in [0, 1] as 8-bit pixels (H * scale, W * scale[, 3]), unsmoothed: grey for one
    channel, colour for three, other channel counts as grey channels side by side."""
    pixels = image.detach().cpu().float().clamp(0, 1)
    if pixels.shape[0] not in (1, 3):
        pixels = torch.cat(list(pixels), dim=-1).unsqueeze(0)
    pixels = pixels.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    array = (pixels * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[2] == 1 else array


def image_rows(rows: dict[str, torch.Tensor], path: Path, title: str = "",
               columns: list[str] | None = None) -> Path:
    """Save a grid with one labelled row per entry of `rows` (each a batch (N, C, H, W) in [0, 1]),
    column i showing example i in every row, the images enlarged to at least 56 pixels high without
    smoothing and 2 pixels apart; `columns` labels the columns above the first row.

    Drawn with Pillow, not matplotlib: every run draws several of these (every member of a vectorised
    sweep too), and laying them out with matplotlib cost about 0.2 s each against milliseconds."""
    from PIL import Image, ImageDraw

    font = label_font()
    first = next(iter(rows.values()))
    scale = max(1, math.ceil(56 / first.shape[2]))
    cells = [[_upscaled(image, scale) for image in batch] for batch in rows.values()]
    cell_height, cell_width = cells[0][0].shape[:2]
    gap = 2
    label_width = max(font.getlength(label) for label in rows) + _MARGIN
    line = _FONT_SIZE + _MARGIN
    top = _MARGIN + (line if title else 0) + (line if columns else 0)
    left = _MARGIN + math.ceil(label_width)
    count = len(cells[0])
    width = max(left + count * (cell_width + gap) - gap + _MARGIN, math.ceil(font.getlength(title)) + 2 * _MARGIN)
    height = top + len(cells) * (cell_height + gap) - gap + _MARGIN
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((_MARGIN, _MARGIN), title, fill="black", font=font)
    for column, label in enumerate(columns or []):
        centre = left + column * (cell_width + gap) + cell_width / 2
        draw.text((centre, top - _MARGIN // 2), label, fill="black", font=font, anchor="mb")
    for row, (label, images) in enumerate(zip(rows, cells)):
        y = top + row * (cell_height + gap)
        draw.text((left - _MARGIN, y + cell_height / 2), label, fill="black", font=font, anchor="rm")
        for column, pixels in enumerate(images):
            canvas.paste(Image.fromarray(pixels).convert("RGB"), (left + column * (cell_width + gap), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


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


def _save(figure: plt.Figure, path: Path, margins: dict[str, float] | None = None) -> Path:
    """Write `figure` as a PNG. Its layout: fixed `margins` (fractions, as `subplots_adjust` takes them)
    when given, for single-axis plots, whose labels fit those; else matplotlib's tight layout, which costs
    about as much as drawing a small plot (figures are drawn after every run)."""
    if margins is None:
        figure.tight_layout()
    else:
        figure.subplots_adjust(**margins)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


_ONE_AXIS = {"left": 0.12, "right": 0.96, "bottom": 0.11, "top": 0.92}


def scatter(points: torch.Tensor, colours: torch.Tensor, path: Path, title: str, axis_labels: tuple[str, str],
            colour_label: str) -> Path:
    """A 2-D scatter of `points` (N, 2) coloured by the integer `colours` (N,), with a legend of them
    when there are at most 12 values and a colour bar otherwise."""
    figure, axis = plt.subplots(figsize=(6.4, 5.4))
    values = torch.unique(colours)
    cmap = "tab10" if len(values) <= 10 else "viridis"
    drawn = axis.scatter(points[:, 0].numpy(), points[:, 1].numpy(), c=colours.numpy(), cmap=cmap, s=6,
                         alpha=0.7, linewidths=0)
    if len(values) <= 12:  # one entry per value; labelled as plain text (legend_elements' own labels are
        handles, _ = drawn.legend_elements(num=None)  # mathtext, which took a third of the drawing)
        axis.legend(handles, [str(value) for value in values.tolist()], title=colour_label, loc="best",
                    fontsize="small", markerscale=1.2)
    else:
        figure.colorbar(drawn, ax=axis, label=colour_label)
    axis.set_xlabel(axis_labels[0])
    axis.set_ylabel(axis_labels[1])
    axis.set_title(title)
    return _save(figure, path, _ONE_AXIS)


def histogram(values: torch.Tensor, path: Path, title: str, xlabel: str, bins: int = 60) -> Path:
    """A histogram of `values` with a log count axis, so rare large activations stay visible."""
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    axis.hist(values.flatten().numpy(), bins=bins, log=True)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("count (log scale)")
    axis.set_title(title)
    return _save(figure, path, _ONE_AXIS)


def roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """ROC curves, one per entry of `curves` (its legend label -> false- and true-positive rates), with
    the diagonal of a score that carries no signal."""
    figure, axis = plt.subplots(figsize=(5.4, 5.0))
    for label, (false_positive, true_positive) in curves.items():
        axis.plot(false_positive, true_positive, label=label, linewidth=1.5)
    axis.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1, label="chance")
    axis.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-positive rate (normal examples flagged)",
             ylabel="true-positive rate (anomalies found)", title=title)
    axis.legend(loc="lower right", fontsize="small")
    return _save(figure, path, {"left": 0.14, "right": 0.96, "bottom": 0.11, "top": 0.92})


def learning_curves(histories: dict[str, list[dict[str, float]]], path: Path, title: str = "") -> Path:
    """Each loss term's epoch means against the epoch, one panel per term (`loss` first): train solid,
    val dashed, the best epoch (lowest val/loss) marked; `train/loss_step` faintly on the `loss` panel
    (a step's value at the fraction of the epoch it ends); scheduled weights and greedy pretraining
    errors on panels of their own. `histories`: run name -> its `history.csv` rows (ae_lab/history.py);
    several runs are drawn over each other, one colour each."""
    from ae_lab.history import STEP_LOSS, best_epoch

    keys = list(dict.fromkeys(key for rows in histories.values() for row in rows for key in row))
    terms = list(dict.fromkeys(key.split("/", 1)[1] for key in keys
                               if key.split("/")[0] in ("train", "val") and key != STEP_LOSS))
    terms.sort(key=lambda term: term != "loss")
    panels = [(term, [f"train/{term}", f"val/{term}"]) for term in terms]
    for group, heading in (("scheduled", "scheduled weights"), ("pretrain", "greedy pretraining")):
        if any(key.startswith(f"{group}/") for key in keys):
            panels.append((heading, [key for key in keys if key.startswith(f"{group}/")]))
    columns = min(3, len(panels))
    rows_of_panels = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows_of_panels, columns, figsize=(4.2 * columns, 3.0 * rows_of_panels + 0.5),
                                squeeze=False)
    colours = plt.get_cmap("tab10")
    for order, (name, rows) in enumerate(histories.items()):
        colour = colours(order % 10)
        best = best_epoch(rows)
        run = f"{name}: " if len(histories) > 1 else ""
        for axis, (heading, series) in zip(axes.flat, panels):
            for index, key in enumerate(series):
                points = [(row["epoch"], row[key]) for row in rows if key in row]
                if points:
                    style = "--" if key.startswith("val/") else "-"
                    shade = colour if len(histories) > 1 else colours(index % 10)  # one run: train C0, val C1
                    axis.plot(*zip(*points), style, color=shade, marker="." if len(points) < 30 else None,
                              label=f"{run}{key.split('/')[0] if heading in terms else key}")
            if best is not None and heading in terms:
                axis.axvline(best, color=colour, linestyle=":", linewidth=1,
                             label=f"{run}best epoch {best}" if heading == terms[0] else None)
        first_epoch_end = next((row["step"] for row in rows if any(key.startswith("train/") and key != STEP_LOSS
                                                                   for key in row)), None)
        steps = [(row["step"], row[STEP_LOSS]) for row in rows if STEP_LOSS in row]
        if steps and first_epoch_end is not None and terms and terms[0] == "loss":
            per_epoch = first_epoch_end + 1
            axes.flat[0].plot([(step + 1) / per_epoch - 1 for step, _ in steps], [value for _, value in steps],
                              color=colour, alpha=0.3, linewidth=0.8, label=f"{run}train, per step")
    for axis, (heading, _) in zip(axes.flat, panels):
        axis.set_title(heading, fontsize="medium")
        axis.set_xlabel("epoch")
        axis.tick_params(labelsize="small")
        axis.legend(fontsize="x-small", loc="upper right")  # ("best" searches: slow)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    if title:
        figure.suptitle(title)
    height = figure.get_figheight()  # fixed margins: tight_layout would cost more than the drawing
    return _save(figure, path, {"left": 0.06, "right": 0.98, "bottom": 0.5 / height, "top": 1 - 0.6 / height,
                                "wspace": 0.25, "hspace": 0.9 / height * rows_of_panels})
