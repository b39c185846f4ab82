"""The data module interface every data set serves: in-memory image tensors and their targets.

A batch is a dict: `x` (B, C, H, W) float in [0, 1], and per example `label` (int class) and/or
`factors` (B, K) ground-truth factor values when the data set has them. Models read only `x`,
so any data set works with any model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset


@dataclass
class Split:
    images: torch.Tensor
    labels: torch.Tensor | None = None
    factors: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]


class BatchedTensors(Dataset):
    """A dataset of tensors indexed a whole batch at a time.

    DataLoader calls `__getitems__` with the batch's indices, so a batch is one fancy-indexing op per
    tensor instead of one Python call per example. The sampler stays a standard one, so Lightning can
    still swap in a DistributedSampler under DDP.
    """

    def __init__(self, split: Split) -> None:
        self.tensors = {"x": split.images}
        if split.labels is not None:
            self.tensors["label"] = split.labels
        if split.factors is not None:
            self.tensors["factors"] = split.factors

    def __len__(self) -> int:
        return self.tensors["x"].shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: t[index] for key, t in self.tensors.items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices)
        return {key: t[index] for key, t in self.tensors.items()}


def keep_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Collate function for `BatchedTensors`: the batch is already assembled."""
    return batch


class ArrayDataModule(pl.LightningDataModule):
    """Train/val/test splits held in memory, served in batches."""

    def __init__(self, name: str, splits: dict[str, Split], batch_size: int, num_workers: int,
                 checksum: str) -> None:
        super().__init__()
        self.name = name
        self.splits = splits
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.checksum = checksum

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.splits["train"].images.shape[1:])

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(BatchedTensors(self.splits[split]), batch_size=self.batch_size,
                          shuffle=shuffle, num_workers=self.num_workers, collate_fn=keep_batch,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def sha256_of_arrays(*arrays: np.ndarray) -> str:
    """Checksum of the raw data a run trained on, recorded in run.json."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(str(array.dtype).encode())
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """A fixed random train/val/test partition of range(n), drawn from `seed`."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    return {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
