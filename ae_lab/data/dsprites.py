"""DeepMind's dSprites: 737,280 binary 64x64 images of 2-D shapes from six factors
(color, shape, scale, orientation, pos_x, pos_y), every combination exactly once.

The batches carry the factor values (`factors`) and class indices (`factor_classes`) that the
disentanglement metrics need. Memory: the images are held once, as uint8 (3.0 GB); after the first
load they are memory-mapped from the decoded cache, so the operating system pages them in as needed
and several runs on one machine share them. Splits are index sets into that one array, never copies.

No SHA-256 of the upstream file could be verified when this was written: `dataset.sha256` is null
by default, so the file's own checksum is recorded in run.json (set the key to pin it).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from ae_lab.data.base import ArrayDataModule, Split, split_indices
from ae_lab.data.files import DataError, RemoteFile, cached_arrays, ensure_file
from ae_lab.data.shapes import FACTOR_NAMES
from ae_lab.data.units import Units

INPUT_SHAPE = (1, 64, 64)
FILE_NAME = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
KEYS = ("imgs", "latents_values", "latents_classes")


def units(cfg: DictConfig, run_dir: Path, input_shape: tuple[int, ...]) -> Units:
    """Raw images are the file's pixels, 0 or 1, as the model sees them."""
    return Units(pixels=True)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """The three arrays of a dSprites npz. The pickled `metadata` entry is never unpickled."""
    with np.load(path, allow_pickle=False) as npz:
        missing = [key for key in KEYS if key not in npz.files]
        if missing:
            raise DataError(f"{path} is not a dSprites file: it lacks {', '.join(missing)}")
        arrays = {key: npz[key] for key in KEYS}
    count = arrays["imgs"].shape[0]
    if (arrays["imgs"].ndim != 3 or arrays["latents_values"].shape != (count, 6)
            or arrays["latents_classes"].shape != (count, 6)):
        raise DataError(f"{path} has unexpected shapes: imgs {arrays['imgs'].shape}, latents "
                        f"{arrays['latents_values'].shape} / {arrays['latents_classes'].shape}")
    return arrays


def load(cfg: DictConfig) -> ArrayDataModule:
    folder = Path(cfg.root) / "dsprites"
    path, checksum = ensure_file(RemoteFile(FILE_NAME, cfg.sha256), folder, list(cfg.mirrors),
                                 cfg.download, cfg.download_timeout)
    arrays = cached_arrays(folder, checksum, lambda: read_npz(path), enabled=cfg.cache)
    with warnings.catch_warnings():  # memory-mapped cache arrays are read-only; nothing writes to them
        warnings.simplefilter("ignore", UserWarning)
        images = torch.from_numpy(arrays["imgs"]).unsqueeze(1)
        values = torch.from_numpy(np.asarray(arrays["latents_values"], dtype=np.float32))
        classes = torch.from_numpy(np.asarray(arrays["latents_classes"], dtype=np.int64))
    parts = split_indices(images.shape[0], cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    splits = {name: Split(images, factors=values, factor_classes=classes,
                          index=torch.from_numpy(index)) for name, index in parts.items()}

    def sample_grid(count: int, seed: int) -> Split:
        """`count` distinct images drawn uniformly from all 737,280 (the whole factor grid) by `seed`."""
        rows = np.random.default_rng(seed).choice(images.shape[0], size=min(count, images.shape[0]), replace=False)
        return Split(images, factors=values, factor_classes=classes, index=torch.from_numpy(rows))

    return ArrayDataModule("dsprites", splits, cfg.batch_size, cfg.num_workers, checksum,
                           on_device=cfg.on_device, factor_names=FACTOR_NAMES, sample_grid=sample_grid)
