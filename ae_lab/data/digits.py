"""scikit-learn's handwritten digits: 1,797 8x8 grey images (UCI optdigits test set), 10 classes.

Shipped inside scikit-learn, so it needs no network. Pixel counts 0..16 are scaled to [0, 1].
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from ae_lab.data.base import ArrayDataModule, Split, sha256_of_arrays, split_indices
from ae_lab.data.units import Units

INPUT_SHAPE = (1, 8, 8)
CLASSES = range(10)  # the digits 0-9
MAX_COUNT = 16.0  # a pixel's count of set bits (of 4x4 in the 32x32 bitmap): 0..16


def units(cfg: DictConfig, run_dir: Path, input_shape: tuple[int, ...]) -> Units:
    """Raw digits are pixel counts 0..16 (scikit-learn's `images`); the model sees them divided by 16."""
    return Units(scale=MAX_COUNT, pixels=True)


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """The images (1797, 8, 8) as uint8 counts 0..16 and their labels (int64), as
    `sklearn.datasets.load_digits` gives them: read from the file it reads, without importing
    scikit-learn (its import, 0.1-0.4 s, would delay the first training step)."""
    package = Path(importlib.util.find_spec("sklearn").submodule_search_locations[0])
    with gzip.open(package / "datasets" / "data" / "digits.csv.gz") as file:
        table = np.loadtxt(file, delimiter=",")  # 64 pixel counts, then the label
    return table[:, :-1].reshape(-1, 8, 8).astype(np.uint8), table[:, -1].astype(np.int64)


def load(cfg: DictConfig) -> ArrayDataModule:
    raw, labels = read_digits()
    images, targets = torch.from_numpy(raw).unsqueeze(1), torch.from_numpy(labels)
    parts = split_indices(len(raw), cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    splits = {name: Split(images, targets, index=torch.from_numpy(index), pixel_scale=MAX_COUNT)
              for name, index in parts.items()}
    return ArrayDataModule("digits", splits, cfg.batch_size, cfg.num_workers,
                           checksum=sha256_of_arrays(raw, labels))
