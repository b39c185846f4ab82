"""The fast data path (whole batches sliced from memory) against the reference path (a per-item
Dataset and PyTorch's default collate): same batches, same order for a seed; sharding under DDP."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ae_lab.data.base import ArrayDataModule, BatchedTensors, ShardSampler, Split, keep_batch
from paths import ROOT


class PerItem(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> None:
        self.images, self.labels, self.index = images, labels, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.index[i]
        return {"x": self.images[row].to(torch.float32) / 255, "label": self.labels[row]}


@pytest.fixture
def split():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1000, 1, 5, 7), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 10, (1000,), generator=generator)
    index = torch.randperm(1000, generator=generator)[:777]
    return Split(images, labels, index=index, pixel_scale=255.0)


def batches(loader: DataLoader, seed: int, epochs: int = 2) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    return [batch for _ in range(epochs) for batch in loader]


@pytest.mark.parametrize("shuffle", [True, False])
def test_fast_path_gives_the_reference_batches_in_the_same_order(split, shuffle):
    fast = DataLoader(BatchedTensors(split), batch_size=64, shuffle=shuffle, collate_fn=keep_batch)
    reference = DataLoader(PerItem(split.images, split.labels, split.index), batch_size=64, shuffle=shuffle)
    ours, theirs = batches(fast, seed=3), batches(reference, seed=3)
    assert len(ours) == len(theirs) == 2 * 13
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["label"], b["label"])
    if shuffle:  # and the seed matters
        assert not torch.equal(batches(fast, seed=4)[0]["x"], ours[0]["x"])


def test_shards_partition_an_evaluation_split_without_padding():
    shards = [list(ShardSampler(10, rank, 3)) for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))
    assert [len(shard) for shard in shards] == [4, 3, 3]
    # Lightning's default DistributedSampler would repeat examples to even the shards out
    padded = [list(DistributedSampler(range(10), 3, rank, shuffle=False)) for rank in range(3)]
    assert len(sum(padded, [])) == 12


def test_data_module_uses_distributed_samplers_under_ddp(split):
    class FakeTrainer:
        world_size, global_rank = 2, 1

    data = ArrayDataModule("test", {"train": split, "val": split, "test": split}, 50, 0, "")
    data.trainer = FakeTrainer()
    assert isinstance(data.train_dataloader().sampler, DistributedSampler)
    val = data.val_dataloader()
    assert isinstance(val.sampler, ShardSampler) and len(val.sampler) == 388


@pytest.mark.slow
def test_benchmark_quick_mode_writes_its_results_table(tmp_path):
    output = tmp_path / "RESULTS.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--output", str(output)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    text = output.read_text()
    for heading in ("## Training throughput", "## Options", "## Contractive penalty", "## Start-up and sweeps"):
        assert heading in text
    for model in ("MLP AE", "MLP VAE", "conv VAE"):
        [row] = [line for line in text.splitlines() if line.startswith(f"| {model} |")]
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(cells[1].replace(",", "")) > 0 and float(cells[2].split()[0]) > 0
    assert "Command: `python benchmarks/run.py --quick`" in text and "GPU figures are still to come" in text
