"""The data module interface every data set serves: in-memory (or memory-mapped) arrays and their targets.

A batch is a dict: `x` (B, *input_shape) float, and per example `label` (int class) and/or `factors`
(B, K) ground-truth factor values when the data set has them. The built-in sets are images (C, H, W) in
[0, 1]; a user's arrays may be rows (D,), sequences (C, T) or images, scaled by `dataset.normalize`.
Models read only `x`, so any data set works with any model.
"""

from __future__ import annotations

import hashlib
import dataclasses
import itertools
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


@dataclass
class Split:
    """One split's examples: rows `index` of `images` (all rows when None).

    `images` is a tensor (N, C, H, W), uint8 or float, possibly shared by several splits so that a large
    set is held once; or any object that returns a float batch for `images[rows]` (e.g. a renderer).
    A batch's pixels are `images[rows] / pixel_scale`; with `resample_binary` each batch is a fresh
    Bernoulli draw of those pixel intensities (dynamic binarisation). `scaling` (a user's data,
    `dataset.normalize`) is applied to every batch.
    """

    images: Any
    labels: torch.Tensor | None = None
    factors: torch.Tensor | None = None
    factor_classes: torch.Tensor | None = None
    index: torch.Tensor | None = None
    pixel_scale: float = 1.0
    resample_binary: bool = False
    scaling: Any = None  # ae_lab.data.scaling.Scaling

    def __len__(self) -> int:
        return len(self.index) if self.index is not None else self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return positions
        return self.index[positions.to(self.index.device)]

    def batch(self, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = self.rows(positions)
        x = self.images[rows].to(torch.float32)
        if self.pixel_scale != 1.0:
            x = x / self.pixel_scale
        if self.resample_binary:
            x = torch.bernoulli(x)
        if self.scaling is not None:
            x = self.scaling.apply(x)
        batch = {"x": x}
        for key in ("labels", "factors", "factor_classes"):
            values = getattr(self, key)
            if values is not None:
                batch["label" if key == "labels" else key] = values[rows]
        return batch

    def head(self, count: int) -> "Split":
        """The first `count` examples (all when there are fewer)."""
        return dataclasses.replace(self, index=self.rows(torch.arange(min(count, len(self)))))

    def without_class(self, label: int) -> "Split":
        """The same split with every example of class `label` left out (for anomaly detection)."""
        rows = self.rows(torch.arange(len(self)))
        kept = rows[self.labels[rows] != label]
        return dataclasses.replace(self, index=kept)

    def to(self, device: torch.device) -> "Split":
        def move(value: Any) -> Any:
            return value.to(device) if value is not None and hasattr(value, "to") else value

        return dataclasses.replace(self, images=move(self.images), labels=move(self.labels),
                                   factors=move(self.factors), factor_classes=move(self.factor_classes),
                                   index=move(self.index))


class BatchedTensors(Dataset):
    """A split indexed a whole batch at a time.

    DataLoader calls `__getitems__` with the batch's indices, so a batch is one fancy-indexing op per
    tensor instead of one Python call per example. Any sampler can order it (see `ArrayDataModule._loader`).
    """

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.__getitems__([index]).items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.split.batch(torch.as_tensor(indices))


class ShardSampler(Sampler[int]):
    """Every `world_size`-th example from `rank`, without padding: the ranks' shards partition the split,
    so evaluation metrics summed across ranks cover each example exactly once (Lightning's default
    DistributedSampler pads with repeated examples)."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochSampler(DistributedSampler):
    """The training order: this rank's share of a permutation drawn from (seed, epoch) alone (the
    permutation and sharding of DistributedSampler, which one process uses too), so a resumed run can
    draw the same epoch again and start it part-way (`start`, used once) instead of at its beginning."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        return itertools.islice(super().__iter__(), start, None)


class ResumableLoader(DataLoader):
    """The training loader, resumable mid-epoch. Its `state_dict` (the epoch and how many of its
    batches were served) is what Lightning saves in a checkpoint for a loader that has one, and
    Lightning loads it into the new loader before a resumed run iterates: the run goes on with the
    next batch of the same order. `len` stays the whole epoch's, as Lightning counts batches itself."""

    sampler: EpochSampler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.served = 0

    def __iter__(self) -> Iterator[Any]:
        self.served = self.sampler.start // self.batch_size
        for batch in super().__iter__():
            self.served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(state["epoch"])
        self.sampler.start = state["batches"] * self.batch_size


def keep_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Collate function for `BatchedTensors`: the batch is already assembled."""
    return batch


class ArrayDataModule(pl.LightningDataModule):
    """Train/val/test splits held in memory, served in batches."""

    def __init__(self, name: str, splits: dict[str, Split], batch_size: int, num_workers: int,
                 checksum: str, on_device: bool = False, factor_names: tuple[str, ...] = (),
                 scaling: Any = None, sample_grid: Callable[[int, int], Split] | None = None) -> None:
        super().__init__()
        self.name = name
        self.splits = splits
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.checksum = checksum
        self.on_device = on_device
        self.factor_names = factor_names  # names of the columns of `factors` / `factor_classes`
        self.scaling = scaling  # a user's data: the `dataset.normalize` fitted on train (Scaling), else None
        # sample_grid(count, seed): `count` distinct examples drawn uniformly from the data set's whole
        # factor grid (data sets that are a full product of their factors), as disentanglement_lib draws
        self.sample_grid = sample_grid
        self.held_out_class: int | None = None
        self.notes: list[Any] = []  # log records of reading a user's data, said again in each run (ae_lab.data)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.splits["train"].image_shape

    def hold_out_class(self, label: int) -> None:
        """Train and validate without class `label`; the test split keeps it as the anomaly to find."""
        self.held_out_class = label
        for name in ("train", "val"):
            self.splits[name] = self.splits[name].without_class(label)

    def setup(self, stage: str) -> None:
        """With `dataset.on_device=true`, move the whole set to the accelerator once (batches are then
        sliced there: no host-to-device copy per step)."""
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        if self.on_device and device is not None and device.type != "cpu":
            self.splits = {name: split.to(device) for name, split in self.splits.items()}

    def _loader(self, split: str) -> DataLoader:
        """Batches of one split. The training split is shuffled by an EpochSampler seeded with the
        run's seed (and sharded by it under DDP: the Trainer runs with use_distributed_sampler=False),
        evaluation splits are read in order (sharded by ShardSampler under DDP).

        Each loader has its own generator, so making an iterator (every epoch, every validation) draws
        nothing from torch's global RNG: that one is left to the model's and the data's random draws
        (noise, sampling, dynamic binarisation), which a resumed run restores.
        """
        dataset = BatchedTensors(self.splits[split])
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # the run's seed (pl.seed_everything sets it)
        workers = 0 if self.on_device else self.num_workers  # CUDA tensors stay in this process
        options = {"batch_size": self.batch_size, "num_workers": workers, "collate_fn": keep_batch,
                   "persistent_workers": workers > 0, "generator": torch.Generator().manual_seed(seed)}
        if split == "train":
            return ResumableLoader(dataset, sampler=EpochSampler(dataset, rank, world_size, seed), **options)
        sampler = ShardSampler(len(dataset), rank, world_size) if world_size > 1 else None
        return DataLoader(dataset, sampler=sampler, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


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
