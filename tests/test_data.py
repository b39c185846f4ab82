"""Data sets: the IDX reader on the real MNIST / Fashion-MNIST files, splits, binarisation, the
download path against a local HTTP server, and the dSprites reader on a small file of the same layout."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import shutil
import socket
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from ae_lab.data import build_datamodule
from ae_lab.data.files import DataError, ensure_file, read_idx
from ae_lab.data.mnist import FILES, read_arrays
from paths import SHARED, needs_shared


@pytest.fixture(scope="session")
def mnist_config(compose_config):
    def mnist_config(*overrides: str, name: str = "mnist", root: Path = SHARED):
        return compose_config([f"dataset={name}", f"dataset.root={root}", *overrides]).dataset

    return mnist_config


@needs_shared
def test_mnist_files_decode_to_the_published_counts_and_statistics(mnist_config):
    arrays, _ = read_arrays(mnist_config())
    assert arrays["train_images"].shape == (60000, 28, 28) and arrays["train_images"].dtype == np.uint8
    assert arrays["test_images"].shape == (10000, 28, 28)
    assert np.bincount(arrays["train_labels"]).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918,
                                                           6265, 5851, 5949]
    assert np.bincount(arrays["test_labels"]).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028,
                                                          974, 1009]
    pixels = arrays["train_images"].astype(np.float64) / 255
    assert pixels.mean() == pytest.approx(0.1307, abs=5e-4)
    assert pixels.std() == pytest.approx(0.3081, abs=5e-4)


@needs_shared
def test_fashion_mnist_files_decode_to_balanced_classes(mnist_config):
    arrays, _ = read_arrays(mnist_config(name="fashion_mnist"))
    assert arrays["train_images"].shape == (60000, 28, 28)
    assert np.bincount(arrays["train_labels"]).tolist() == [6000] * 10
    assert np.bincount(arrays["test_labels"]).tolist() == [1000] * 10


@needs_shared
def test_validation_split_is_seeded_and_disjoint(mnist_config):
    first = build_datamodule(mnist_config("dataset.val_size=1000"))
    again = build_datamodule(mnist_config("dataset.val_size=1000"))
    other = build_datamodule(mnist_config("dataset.val_size=1000", "dataset.split_seed=1"))
    train, val = first.splits["train"].index, first.splits["val"].index
    assert len(train) == 59000 and len(val) == 1000 and len(first.splits["test"]) == 10000
    assert torch.equal(val, again.splits["val"].index)
    assert not torch.equal(val, other.splits["val"].index)
    assert sorted(torch.cat([train, val]).tolist()) == list(range(60000))
    batch = first.splits["val"].batch(torch.arange(5))
    assert batch["x"].shape == (5, 1, 28, 28) and batch["x"].dtype == torch.float32
    assert 0 <= batch["x"].min() and batch["x"].max() <= 1


@needs_shared
def test_binarisation_modes(mnist_config):
    grey = build_datamodule(mnist_config()).splits["train"].batch(torch.arange(2000))["x"]
    static = build_datamodule(mnist_config("dataset.binarize=static"))
    static_again = build_datamodule(mnist_config("dataset.binarize=static"))
    reseeded = build_datamodule(mnist_config("dataset.binarize=static", "dataset.binarize_seed=7"))
    positions = torch.arange(2000)
    x = static.splits["train"].batch(positions)["x"]
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(x, static_again.splits["train"].batch(positions)["x"])  # one fixed draw
    assert not torch.equal(x, reseeded.splits["train"].batch(positions)["x"])
    assert x.mean().item() == pytest.approx(grey.mean().item(), abs=0.005)  # E[Bernoulli(p)] = p

    dynamic = build_datamodule(mnist_config("dataset.binarize=dynamic")).splits
    first, second = dynamic["train"].batch(positions)["x"], dynamic["train"].batch(positions)["x"]
    assert set(first.unique().tolist()) == {0.0, 1.0} and not torch.equal(first, second)
    assert torch.equal(dynamic["test"].batch(positions)["x"], dynamic["test"].batch(positions)["x"])

    threshold = build_datamodule(mnist_config("dataset.binarize=threshold")).splits["train"]
    assert torch.equal(threshold.batch(positions)["x"], (grey >= 128 / 255).float())


@needs_shared
def test_decoded_cache_is_reused_and_tied_to_the_source(tmp_path, mnist_config):
    shutil.copytree(SHARED / "mnist", tmp_path / "mnist")
    first = build_datamodule(mnist_config(root=tmp_path))
    [cache] = (tmp_path / "mnist").glob("decoded-*")
    assert (cache / "complete").exists()
    second = build_datamodule(mnist_config(root=tmp_path))
    positions = torch.arange(100)
    assert torch.equal(first.splits["train"].batch(positions)["x"], second.splits["train"].batch(positions)["x"])
    assert first.checksum == second.checksum


def test_idx_reader_rejects_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "good.gz"
    header = bytes([0, 0, 0x08, 3]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + (4).to_bytes(4, "big")
    good.write_bytes(gzip.compress(header + bytes(range(24))))
    assert read_idx(good).tolist() == np.arange(24, dtype=np.uint8).reshape(2, 3, 4).tolist()
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(gzip.compress(header + bytes(20)))
    with pytest.raises(DataError, match="header promises 24"):
        read_idx(truncated)
    foreign = tmp_path / "foreign.gz"
    foreign.write_bytes(gzip.compress(b"PK\x03\x04 not an idx file"))
    with pytest.raises(DataError, match="bad magic"):
        read_idx(foreign)


class _Mirror:
    """A local HTTP server on 127.0.0.1 serving a folder; `corrupt` names files it serves damaged."""

    def __init__(self, folder: Path) -> None:
        self.requests: list[str] = []
        self.corrupt: set[str] = set()
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                mirror.requests.append(self.path)
                name = self.path.rsplit("/", 1)[-1]
                if name in mirror.corrupt:
                    payload = bytearray((folder / name).read_bytes())
                    payload[len(payload) // 2] ^= 0xFF
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(bytes(payload))
                    return
                super().do_GET()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                      partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirror():
    if not (SHARED / "mnist").is_dir():
        pytest.skip(f"the MNIST files are not in {SHARED}")
    server = _Mirror(SHARED / "mnist")
    yield server
    server.close()


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the probe is closed


def test_download_verifies_and_does_not_repeat(mirror, tmp_path, mnist_config):
    cfg = mnist_config(f"dataset.mirrors=[{mirror.url}]", "dataset.download_timeout=10", root=tmp_path)
    data = build_datamodule(cfg)
    assert len(mirror.requests) == 4
    for remote in FILES["mnist"].values():
        path = tmp_path / "mnist" / remote.name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == remote.sha256
    assert not list((tmp_path / "mnist").glob(".*part"))
    assert len(data.splits["test"]) == 10000
    build_datamodule(cfg)
    assert len(mirror.requests) == 4, "files already present must not be downloaded again"


def test_corrupt_download_leaves_nothing_under_the_final_name(mirror, tmp_path):
    remote = FILES["mnist"]["test_labels"]
    mirror.corrupt.add(remote.name)
    with pytest.raises(DataError, match="checksum mismatch"):
        ensure_file(remote, tmp_path, [mirror.url], download=True, timeout=10)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_mirror_is_skipped_for_the_next(mirror, tmp_path):
    remote = FILES["mnist"]["test_labels"]
    path, checksum = ensure_file(remote, tmp_path, [_closed_port_url(), mirror.url], download=True,
                                 timeout=10)
    assert checksum == remote.sha256 and path.read_bytes() == (SHARED / "mnist" / remote.name).read_bytes()


def test_offline_error_says_what_is_missing_where_and_how_to_fix_it(tmp_path):
    remote = FILES["mnist"]["train_images"]
    with pytest.raises(DataError) as error:
        ensure_file(remote, tmp_path / "mnist", [_closed_port_url()], download=True, timeout=5)
    message = str(error.value)
    assert remote.name in message and str(tmp_path / "mnist" / remote.name) in message
    assert "by hand" in message and remote.sha256 in message
    assert not (tmp_path / "mnist" / remote.name).exists()


def test_corrupt_local_file_is_reported_not_used(tmp_path):
    remote = FILES["mnist"]["test_labels"]
    (tmp_path / remote.name).write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(DataError, match="corrupt or truncated"):
        ensure_file(remote, tmp_path, [], download=False, timeout=5)


def test_a_missing_data_file_refuses_the_run_and_leaves_no_run_folder(tmp_path, run_cli):

    (tmp_path / "data").mkdir()
    done = run_cli(["dataset=mnist", f"dataset.root={tmp_path / 'data'}", "dataset.download=false", "logger=none"],
                   cwd=tmp_path)
    assert done.returncode == 2 and "is missing: looked for" in done.stderr and "Traceback" not in done.stderr
    assert list((tmp_path / "outputs" / "runs").iterdir()) == []  # no folder with an empty ae_lab.log


def _write_small_dsprites(path: Path) -> dict[str, np.ndarray]:
    """A small npz with dSprites' keys, dtypes and layout (including the pickled metadata entry)."""
    rng = np.random.default_rng(0)
    sizes = (1, 3, 6, 40, 32, 32)
    classes = np.stack([rng.integers(0, size, 200) for size in sizes], axis=1).astype(np.int64)
    values = classes.astype(np.float64) / np.maximum(np.array(sizes) - 1, 1)
    imgs = (rng.random((200, 64, 64)) < 0.1).astype(np.uint8)
    metadata = np.array({"description": "test double", "latents_sizes": np.array(sizes)}, dtype=object)
    np.savez(path, imgs=imgs, latents_values=values, latents_classes=classes, metadata=metadata)
    return {"imgs": imgs, "latents_values": values, "latents_classes": classes}


def test_dsprites_download_and_reader(tmp_path, compose_config):
    served = tmp_path / "served"
    served.mkdir()
    from ae_lab.data.dsprites import FILE_NAME

    arrays = _write_small_dsprites(served / FILE_NAME)
    checksum = hashlib.sha256((served / FILE_NAME).read_bytes()).hexdigest()
    server = _Mirror(served)
    try:
        cfg = compose_config(["dataset=dsprites", f"dataset.root={tmp_path / 'data'}",
                              f"dataset.mirrors=[{server.url}]", f"dataset.sha256={checksum}",
                              "dataset.val_fraction=0.1", "dataset.test_fraction=0.1"]).dataset
        data = build_datamodule(cfg)
    finally:
        server.close()
    assert data.checksum == checksum and data.input_shape == (1, 64, 64)
    assert sum(len(split) for split in data.splits.values()) == 200
    split = data.splits["train"]
    batch = split.batch(torch.arange(8))
    rows = split.index[:8].numpy()
    assert torch.equal(batch["x"], torch.from_numpy(arrays["imgs"][rows]).float().unsqueeze(1))
    assert torch.equal(batch["factor_classes"], torch.from_numpy(arrays["latents_classes"][rows]))
    assert torch.allclose(batch["factors"], torch.from_numpy(arrays["latents_values"][rows]).float())
    # the three splits are views of one image array, not copies
    assert all(s.images.data_ptr() == split.images.data_ptr() for s in data.splits.values())


def test_dsprites_file_without_its_arrays_is_refused(tmp_path):
    from ae_lab.data.dsprites import read_npz

    np.savez(tmp_path / "wrong.npz", images=np.zeros((2, 64, 64), np.uint8))
    with pytest.raises(DataError, match="lacks imgs, latents_values, latents_classes"):
        read_npz(tmp_path / "wrong.npz")


@needs_shared
@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_models_train_on_mnist(arch, tmp_path, quick, read_json, train_in_process):
    from ae_lab.data.files import combined_sha256

    metrics = train_in_process(["dataset=mnist", f"dataset.root={SHARED}", f"model.arch={arch}",
                                "model=vae", "dataset.binarize=dynamic", "dataset.on_device=true",
                                "eval.fd_samples=0", *quick, "logger=none"], tmp_path)  # no FD classifier to train
    assert np.isfinite(metrics["test/elbo"])
    expected = combined_sha256({remote.name: remote.sha256 for remote in FILES["mnist"].values()})
    assert read_json(tmp_path / "run.json")["data"] == {"name": "mnist", "sha256": expected}
