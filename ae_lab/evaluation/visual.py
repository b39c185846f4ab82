"""The run's figures: what to show for this model and data (drawing itself is in `ae_lab/figures.py`).

Images (C, H, W) are drawn as image grids, rows (D,) and sequences (C, T) as small bar and line plots.
A user's data are shown in their own units (`dataset.normalize` undone).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig
from sklearn.decomposition import PCA

from ae_lab.data import ArrayDataModule
from ae_lab.evaluation.encoded import Encoded
from ae_lab.figures import histogram, image_rows, scatter, signal_rows
from ae_lab.module import Autoencoder
from ae_lab.objectives import gaussian_kl_per_unit


@torch.no_grad()
def draw_figures(module: Autoencoder, data: ArrayDataModule, test: Encoded, cfg: DictConfig,
                 folder: Path) -> dict[str, Path]:
    """Reconstructions, latent traversals, interpolations and the code scatter for every model; prior
    samples for a VAE; the activation histogram for sparse codes. Returns name -> PNG path."""
    ev = cfg.eval
    split = data.splits["test"]
    count = min(ev.num_reconstructions, len(split))
    x = split.batch(torch.arange(count))["x"].to(module.device)
    draw = _drawer(data)
    figures = {"reconstructions": _reconstructions(module, x, draw, folder / "reconstructions.png")}
    figures["traversals"] = _traversals(module, test, x[0], ev, draw, folder / "traversals.png")
    figures["interpolations"] = _interpolations(module, test, ev, draw, folder / "interpolations.png")
    figures["codes"] = _code_scatter(test, data, folder / "codes.png")
    if test.mean is not None:
        z = torch.randn(ev.num_samples, test.codes.shape[1], device=module.device)
        figures["samples"] = draw({"sample": module.output(module.decoder(z))}, folder / "samples.png",
                                  title="Decoded samples from the prior N(0, I)")
    if cfg.loss.sparsity_weight > 0:
        figures["activations"] = histogram(
            test.codes, folder / "activations.png", xlabel="code activation",
            title=f"Code activations on the test split ({test.codes.shape[1]} units)")
    return figures


Draw = Callable[..., Path]


def _drawer(data: ArrayDataModule) -> Draw:
    """`image_rows` or `signal_rows` by the data's rank, fed data in its own units: `dataset.normalize`
    undone, and images of another range than [0, 1] mapped onto it by their training range."""
    scaling, images = data.scaling, len(data.input_shape) == 3

    def shown(batch: torch.Tensor) -> torch.Tensor:
        if scaling is None:
            return batch
        raw = scaling.undo(batch)
        if images and (scaling.low < 0 or scaling.high > 1):
            raw = (raw - scaling.low) / max(scaling.high - scaling.low, 1e-12)
        return raw

    def draw(rows: dict[str, torch.Tensor], path: Path, overlay: bool = False, **labels: object) -> Path:
        rows = {label: shown(batch) for label, batch in rows.items()}
        return image_rows(rows, path, **labels) if images else signal_rows(rows, path, overlay=overlay, **labels)

    return draw


def _reconstructions(module: Autoencoder, x: torch.Tensor, draw: Draw, path: Path) -> Path:
    if module.corrupt is None:
        return draw({"input": x, "reconstruction": module.reconstruct(x)}, path, overlay=True,
                    title="Test inputs and their reconstructions")
    corrupted = module.corrupt(x)
    return draw({"clean": x, "corrupted": corrupted, "denoised": module.reconstruct(corrupted)}, path, overlay=True,
                title="Clean test inputs, their corruption, and the reconstruction of the corrupted input")


def _traversals(module: Autoencoder, test: Encoded, x: torch.Tensor, ev: DictConfig, draw: Draw, path: Path) -> Path:
    """One row per latent unit, most informative first (highest mean KL for a VAE, highest code variance
    otherwise): the first test image's code with that unit swept over +-range standard deviations (of the
    prior N(0, 1) for a VAE, of the unit's test codes otherwise), the other units fixed."""
    if test.mean is not None:
        informativeness = gaussian_kl_per_unit(test.mean, test.logvar).mean(0)
        centre, scale, measure = torch.zeros_like(informativeness), torch.ones_like(informativeness), "KL"
    else:
        informativeness = test.codes.std(0)
        centre, scale, measure = test.codes.mean(0), informativeness, "sd"
    order = informativeness.argsort(descending=True)[:ev.traversal_dims]
    offsets = torch.linspace(-ev.traversal_range, ev.traversal_range, ev.traversal_steps)
    base = module.head.code(module.encoder(x.unsqueeze(0))).cpu()
    rows = {}
    for unit in order.tolist():
        codes = base.repeat(ev.traversal_steps, 1)
        codes[:, unit] = centre[unit] + offsets * scale[unit]
        rows[f"z{unit} ({measure} {informativeness[unit]:.2f})"] = module.output(module.decoder(codes.to(module.device)))
    return draw(rows, path, columns=[f"{offset:+.2g} sd" for offset in offsets.tolist()],
                      title="Latent traversals of one test image, most informative units first")


def _interpolations(module: Autoencoder, test: Encoded, ev: DictConfig, draw: Draw, path: Path) -> Path:
    """Decoded codes on the straight line between three pairs of test images: of different classes
    where the data have labels (`interpolation_pairs`), else images 0 and 1, 2 and 3, 4 and 5."""
    weights = torch.linspace(0, 1, ev.interpolation_steps).unsqueeze(1)
    rows = {}
    for first, second in interpolation_pairs(test.labels, len(test.codes)):
        start, end = test.codes[first], test.codes[second]
        codes = (1 - weights) * start + weights * end
        label = (f"test {first} → {second}" if test.labels is None else
                 f"test {first} ({int(test.labels[first])}) → {second} ({int(test.labels[second])})")
        rows[label] = module.output(module.decoder(codes.to(module.device)))
    return draw(rows, path, columns=[f"{weight:.2f}" for weight in weights[:, 0].tolist()],
                      title="Interpolation in code space between pairs of test images")


def interpolation_pairs(labels: torch.Tensor | None, count: int, pairs: int = 3) -> list[tuple[int, int]]:
    """Up to `pairs` pairs of distinct test examples (indices below `count`) to interpolate between. With
    labels of two classes or more, each pair joins two classes: the earliest unused example and the
    earliest unused one of another class after it; else consecutive examples 0 and 1, 2 and 3, ..."""
    if labels is None or labels[:count].unique().numel() < 2:
        return [(first, first + 1) for first in range(0, min(2 * pairs, count - 1), 2)]
    values, chosen, used = labels[:count].tolist(), [], set()
    for first in range(count):
        if len(chosen) == pairs:
            break
        partner = None if first in used else next(
            (second for second in range(first + 1, count) if second not in used and values[second] != values[first]), None)
        if partner is not None:
            chosen.append((first, partner))
            used.update((first, partner))
    return chosen


def _code_scatter(test: Encoded, data: ArrayDataModule, path: Path) -> Path:
    """The test codes in 2-D (the first two principal components when there are more than two units),
    coloured by the label, or by the first ground-truth factor that varies."""
    codes = test.codes
    if codes.shape[1] > 2:
        pca = PCA(n_components=2).fit(codes.numpy())
        points = torch.from_numpy(pca.transform(codes.numpy()))
        explained = pca.explained_variance_ratio_ * 100
        axes = (f"PC 1 ({explained[0]:.0f}% of variance)", f"PC 2 ({explained[1]:.0f}%)")
        title = f"Test codes ({codes.shape[1]} units), first two principal components"
    else:
        points = codes if codes.shape[1] == 2 else torch.cat([codes, torch.zeros_like(codes)], 1)
        axes, title = ("z0", "z1"), "Test codes"
    if test.labels is not None:
        colours, name = test.labels, "label"
    elif test.factor_classes is not None:
        varying = [k for k in range(test.factor_classes.shape[1]) if test.factor_classes[:, k].unique().numel() > 1]
        factor = varying[0] if varying else 0
        colours, name = test.factor_classes[:, factor], data.factor_names[factor]
    else:
        colours, name = torch.zeros(len(codes), dtype=torch.long), "none"
    return scatter(points.float(), colours, path, title=title, axis_labels=axes, colour_label=name)
