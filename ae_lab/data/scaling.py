"""`dataset.normalize`: per-feature scaling of a user's data, fitted on the training split only.

The statistics are taken per column of (N, D) rows and per channel of (N, C, T) sequences and
(N, C, H, W) images, over the training examples alone, so that nothing of the validation or test data
leaks into training; the same shift and scale are then applied to every split (val and test values may
therefore fall outside [0, 1] after `minmax`). Figures undo it, to show data in its own units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

NORMALIZE = ("none", "minmax", "standard")
CHUNK_ROWS = 4096  # examples read at a time when passing over a (memory-mapped) array


def chunks(rows: np.ndarray, read: Callable[[np.ndarray], np.ndarray]) -> Iterator[np.ndarray]:
    """`read(rows)` a bounded number of rows at a time (rows sorted, so a memory map is read in order)."""
    ordered = np.sort(rows)
    for start in range(0, len(ordered), CHUNK_ROWS):
        yield np.asarray(read(ordered[start:start + CHUNK_ROWS]), dtype=np.float64)


@dataclass(frozen=True)
class Scaling:
    """x -> (x - shift) / scale, with shift and scale broadcast over an example (D,), (C, 1) or (C, 1, 1).

    `low` and `high` are the raw training data's smallest and largest values, `scaled_low` and
    `scaled_high` the same data's after scaling (what the model is trained on).
    """

    kind: str
    shift: torch.Tensor
    scale: torch.Tensor
    examples: int
    low: float
    high: float
    scaled_low: float
    scaled_high: float

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return x
        return (x - self.shift.to(x.device)) / self.scale.to(x.device)

    def undo(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return x
        return x * self.scale.to(x.device) + self.shift.to(x.device)

    @classmethod
    def from_record(cls, record: dict[str, Any], example_shape: tuple[int, ...]) -> "Scaling":
        """The scaling a run folder's `scaling.json` (`record`) holds, for examples of `example_shape`."""
        shape = example_shape if len(example_shape) == 1 else (example_shape[0], *[1] * (len(example_shape) - 1))
        as_tensor = lambda values: torch.tensor(values, dtype=torch.float32).reshape(shape)  # noqa: E731
        return cls(record["normalize"], as_tensor(record["shift"]), as_tensor(record["scale"]),
                   record["train_examples"], *record["train_range"], *record["train_range_scaled"])

    def record(self) -> dict[str, Any]:
        """What goes into the run folder's `scaling.json`."""
        return {"normalize": self.kind, "fitted_on": "train", "train_examples": self.examples,
                "shift": self.shift.flatten().tolist(), "scale": self.scale.flatten().tolist(),
                "train_range": [self.low, self.high], "train_range_scaled": [self.scaled_low, self.scaled_high]}


def feature_axes(example_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Axes of a batch (N, *example_shape) that one statistic pools: the examples, and for sequences and
    images their positions (statistics are per column of rows, per channel otherwise)."""
    return (0,) if len(example_shape) == 1 else (0, *range(2, len(example_shape) + 1))


def fit(kind: str, train_rows: np.ndarray, read: Callable[[np.ndarray], np.ndarray],
        example_shape: tuple[int, ...]) -> Scaling:
    """Fit `kind` on the examples `train_rows` (read with `read(rows)`), in one pass of bounded memory."""
    axes = feature_axes(example_shape)
    low = high = total = squares = None
    count = 0
    for block in chunks(train_rows, read):
        block_low, block_high = block.min(axis=axes, keepdims=True)[0], block.max(axis=axes, keepdims=True)[0]
        block_total, block_squares = block.sum(axis=axes, keepdims=True)[0], (block ** 2).sum(axis=axes, keepdims=True)[0]
        if low is None:
            low, high, total, squares = block_low, block_high, block_total, block_squares
        else:
            low, high = np.minimum(low, block_low), np.maximum(high, block_high)
            total, squares = total + block_total, squares + block_squares
        count += block.size // block_low.size
    if kind == "minmax":
        shift, scale = low, high - low
    elif kind == "standard":
        mean = total / count
        shift, scale = mean, np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    else:
        shift, scale = np.zeros_like(low), np.ones_like(low)
    scale = np.where(scale > 0, scale, 1.0)  # a constant feature is shifted, not divided by zero
    scaled_low, scaled_high = (low - shift) / scale, (high - shift) / scale
    as_tensor = lambda a: torch.from_numpy(a.astype(np.float32))  # noqa: E731
    return Scaling(kind, as_tensor(shift), as_tensor(scale), len(train_rows), float(low.min()), float(high.max()),
                   float(scaled_low.min()), float(scaled_high.max()))
