"""A dSprites-style data set, rendered procedurally: 737,280 binary 64x64 images of one 2-D shape.

The factor grid is dSprites' own: color (1) x shape (3: square, ellipse, heart) x scale (6) x
orientation (40) x pos_x (32) x pos_y (32), and a flat index enumerates it in the order of dSprites'
`latents_classes` (row-major, pos_y fastest). One difference in the values: orientations are
`linspace(0, 2*pi, 40, endpoint=False)`, so no two orientation classes give the same rotation
(dSprites' own 40 values run up to 2*pi inclusive, making its first and last orientation coincide).

Every image is a pure function of its class tuple (no randomness, and the same pixels whatever batch
it is rendered in), so the set needs no download and no storage: render a batch when it is needed.

Geometry, in pixel units, with pixel (row i, column j) covering [j, j+1] x [i, i+1] and sampled at
its centre (j + 0.5, i + 0.5):

- The shape's centre is `MARGIN + pos * (IMAGE_SIZE - 2 * MARGIN)` along x (columns, pos_x) and
  along y (rows, downwards, pos_y): 13 to 51 px, in 32 steps of ~1.23 px.
- Shapes at scale 1: a square of side 16, an ellipse with semi-axes 10 x 5 (2:1, long axis along x
  at orientation 0), and an upright heart 18.2 px wide and 17.9 px tall. The largest of them, turned
  by any angle, lies within 8*sqrt(2) ~ 11.3 px of its centre, so with MARGIN = 13 the outer two
  rows and columns of every image are always empty.
- Orientation turns the shape counter-clockwise as seen on screen, about its centre.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from ae_lab.data.base import ArrayDataModule, Split, sha256_of_arrays, split_indices
from ae_lab.data.units import Units

FACTOR_NAMES: tuple[str, ...] = ("color", "shape", "scale", "orientation", "pos_x", "pos_y")
FACTOR_SIZES: tuple[int, ...] = (1, 3, 6, 40, 32, 32)
IMAGE_SIZE = 64
NUM_IMAGES = 737_280
MARGIN = 13.0
"""Pixel coordinate of the shape's centre at position 0 (and IMAGE_SIZE - MARGIN at position 1)."""

SQUARE_HALF_SIDE = 8.0
ELLIPSE_SEMI_AXES = (10.0, 5.0)
HEART_UNIT = 8.0
"""Pixels per unit of the heart (x^2 + y^2 - 1)^3 <= x^2 y^3, which spans x in [-1.139, 1.139] and
y in [-1, 1.237] (y up)."""
HEART_CENTRE_Y = 0.118
"""The heart turns about, and is positioned by, the centre of its bounding box: (0, HEART_CENTRE_Y)."""

_STRIDES = torch.tensor([math.prod(FACTOR_SIZES[k + 1:]) for k in range(len(FACTOR_SIZES))])
_SIZES = torch.tensor(FACTOR_SIZES)

# Per-class tables, computed in float64 and rounded once, so every image sees the same numbers.
_SCALES64 = torch.linspace(0.5, 1.0, 6, dtype=torch.float64)
_ORIENTATIONS64 = torch.arange(40, dtype=torch.float64) * (2 * math.pi / 40)  # endpoint=False
_POSITIONS64 = torch.linspace(0.0, 1.0, 32, dtype=torch.float64)
_VALUES = tuple(values.float() for values in (
    torch.ones(1), torch.tensor([1.0, 2.0, 3.0]), _SCALES64, _ORIENTATIONS64, _POSITIONS64,
    _POSITIONS64))
_COS = torch.cos(_ORIENTATIONS64).float()
_SIN = torch.sin(_ORIENTATIONS64).float()
_INV_SCALE = (1.0 / _SCALES64).float()
_CENTRES64 = MARGIN + _POSITIONS64 * (IMAGE_SIZE - 2 * MARGIN)
_CENTRES = _CENTRES64.float()

# Pixels are evaluated only in a WINDOW x WINDOW block starting at floor(centre - WINDOW_REACH):
# the nearest pixel centres outside it lie at least 12.5 px before and 11.5 px after the shape's
# centre, beyond the 11.3 px any shape reaches, and the block always lies within pixels 1 to 62.
_WINDOW = 24
_WINDOW_REACH = 12.0
_ORIGINS = torch.floor(_CENTRES64 - _WINDOW_REACH).long()
_OFFSETS = torch.arange(_WINDOW, dtype=torch.float32) + 0.5

# Per shape (square, ellipse, heart): the u and v units of the inside-tests below, and the v
# (upward) coordinate, in those units, that the shape's centre sits at.
_U_UNIT = torch.tensor([SQUARE_HALF_SIDE, ELLIPSE_SEMI_AXES[0], HEART_UNIT])
_V_UNIT = torch.tensor([SQUARE_HALF_SIDE, ELLIPSE_SEMI_AXES[1], HEART_UNIT])
_V_CENTRE = torch.tensor([0.0, 0.0, HEART_CENTRE_Y])

_CHUNK = 4096


def _check_classes(classes: torch.Tensor) -> torch.Tensor:
    classes = torch.as_tensor(classes)
    if classes.ndim != 2 or classes.shape[1] != len(FACTOR_SIZES) or classes.is_floating_point():
        raise ValueError(f"classes must be an integer tensor of shape (N, {len(FACTOR_SIZES)}), "
                         f"got {classes.dtype} {tuple(classes.shape)}")
    classes = classes.long()
    if ((classes < 0) | (classes >= _SIZES)).any():
        raise ValueError(f"class indices out of range for factor sizes {FACTOR_SIZES}")
    return classes


def factor_values(classes: torch.Tensor) -> torch.Tensor:
    """(N, 6) class indices -> (N, 6) float32 factor values (color, shape 1..3, scale, radians, x, y)."""
    classes = _check_classes(classes)
    return torch.stack([table[classes[:, k]] for k, table in enumerate(_VALUES)], dim=1)


def index_to_classes(index: torch.Tensor) -> torch.Tensor:
    """(N,) flat indices in [0, NUM_IMAGES) -> (N, 6) class indices, last factor fastest."""
    index = torch.as_tensor(index)
    if index.ndim != 1 or index.is_floating_point():
        raise ValueError(f"index must be a 1-D integer tensor, got {index.dtype} {tuple(index.shape)}")
    index = index.long()
    if ((index < 0) | (index >= NUM_IMAGES)).any():
        raise ValueError(f"indices must lie in [0, {NUM_IMAGES})")
    return index[:, None] // _STRIDES % _SIZES


def classes_to_index(classes: torch.Tensor) -> torch.Tensor:
    """(N, 6) class indices -> (N,) flat indices; the inverse of `index_to_classes`."""
    return (_check_classes(classes) * _STRIDES).sum(dim=1)


def render(classes: torch.Tensor) -> torch.Tensor:
    """(N, 6) class indices -> (N, 1, 64, 64) float32 images of exactly 0.0 and 1.0.

    Works through the batch in chunks of 4,096 images, so its working memory beyond the output
    stays around 100 MB.
    """
    classes = _check_classes(classes)
    out = torch.zeros(classes.shape[0], IMAGE_SIZE * IMAGE_SIZE)
    for start in range(0, classes.shape[0], _CHUNK):
        _draw(classes[start:start + _CHUNK], out[start:start + _CHUNK])
    return out.view(-1, 1, IMAGE_SIZE, IMAGE_SIZE)


def _draw(classes: torch.Tensor, out: torch.Tensor) -> None:
    """Set the pixels inside each image's shape to 1 in `out`, (n, IMAGE_SIZE**2) and all zero."""
    scale, orientation, pos_x, pos_y = classes[:, 2], classes[:, 3], classes[:, 4], classes[:, 5]
    col0, row0 = _ORIGINS[pos_x], _ORIGINS[pos_y]
    # Offsets of the window's pixel centres from the shape's centre, with y pointing up.
    dx = (col0[:, None] + _OFFSETS) - _CENTRES[pos_x][:, None]
    dy = _CENTRES[pos_y][:, None] - (row0[:, None] + _OFFSETS)
    # Shape frame: (u, v) = R(-orientation) (dx, dy) / scale. Each is a per-column term plus a
    # per-row term, so only (n, WINDOW) tensors need multiplying before the broadcast sum.
    cos = (_COS[orientation] * _INV_SCALE[scale])[:, None]
    sin = (_SIN[orientation] * _INV_SCALE[scale])[:, None]
    u_col, u_row = cos * dx, sin * dy
    v_col, v_row = -sin * dx, cos * dy
    window = torch.arange(_WINDOW)
    pixel = ((row0[:, None] + window) * IMAGE_SIZE)[:, :, None] + (col0[:, None] + window)[:, None, :]

    for k, inside in enumerate((_inside_square, _inside_ellipse, _inside_heart)):
        chosen = (classes[:, 1] == k).nonzero().squeeze(1)
        # In the units of the shape's inside-test, whose origin (the heart's) need not be the centre.
        u = (u_col[chosen] / _U_UNIT[k])[:, None, :] + (u_row[chosen] / _U_UNIT[k])[:, :, None]
        v = ((v_col[chosen] / _V_UNIT[k])[:, None, :]
             + (v_row[chosen] / _V_UNIT[k] + _V_CENTRE[k])[:, :, None])
        flat = (pixel[chosen] + (chosen * IMAGE_SIZE * IMAGE_SIZE)[:, None, None]).view(-1)
        out.view(-1).scatter_(0, flat, inside(u, v).view(-1).float())


def _inside_square(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.maximum(u.abs(), v.abs()) <= 1.0


def _inside_ellipse(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u * u + v * v <= 1.0


def _inside_heart(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(u^2 + v^2 - 1)^3 <= u^2 v^3: lobes up, point down at v = -1 (v points up)."""
    u2, v2 = u * u, v * v
    q = u2 + v2 - 1.0
    return q * q * q <= u2 * (v2 * v)


INPUT_SHAPE = (1, IMAGE_SIZE, IMAGE_SIZE)


def units(cfg: DictConfig, run_dir: Path, input_shape: tuple[int, ...]) -> Units:
    """Raw images are the rendered pixels, 0 or 1, as the model sees them."""
    return Units(pixels=True)


class RenderedImages:
    """The images of a table of class tuples, rendered when indexed (`images[rows]`), never stored."""

    def __init__(self, classes: torch.Tensor) -> None:
        self.classes = classes

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.classes), *INPUT_SHAPE)

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        return render(self.classes[rows])


def load(cfg: DictConfig) -> ArrayDataModule:
    """`dataset=shapes`: `subsample` images drawn without replacement from the grid by `split_seed`
    (all 737,280 when null), split into train/val/test. Memory: the factor table only (~60 bytes per
    image); images are rendered per batch. The checksum covers the renderer's source and the chosen
    images, so a change to either shows in run.json."""
    rng = np.random.default_rng(cfg.split_seed)
    if cfg.subsample is None:
        chosen = np.arange(NUM_IMAGES)
    else:
        chosen = np.sort(rng.choice(NUM_IMAGES, size=cfg.subsample, replace=False))
    classes = index_to_classes(torch.from_numpy(chosen))
    images = RenderedImages(classes)
    values = factor_values(classes)
    parts = split_indices(len(chosen), cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    splits = {name: Split(images, factors=values, factor_classes=classes, index=torch.from_numpy(index))
              for name, index in parts.items()}
    source = np.frombuffer(Path(__file__).read_bytes(), dtype=np.uint8)
    return ArrayDataModule("shapes", splits, cfg.batch_size, cfg.num_workers,
                           checksum=sha256_of_arrays(source, chosen), factor_names=FACTOR_NAMES,
                           sample_grid=sample_grid)


def sample_grid(count: int, seed: int) -> Split:
    """`count` distinct images drawn uniformly from the whole 737,280-image grid by `seed`, rendered
    when indexed (the disentanglement pool of `eval.disentanglement_pool_source=grid`)."""
    chosen = np.random.default_rng(seed).choice(NUM_IMAGES, size=min(count, NUM_IMAGES), replace=False)
    classes = index_to_classes(torch.from_numpy(chosen))
    return Split(RenderedImages(classes), factors=factor_values(classes), factor_classes=classes)
