"""MNIST and Fashion-MNIST from their four original gzipped IDX files.

Train 60,000 (of which `val_size` are held out as a seeded validation split) and test 10,000 images,
28x28, pixels in [0, 1]; `binarize` gives the binarised variants published likelihoods use.
Memory: the images are held once, as uint8 (47 MB per set), and converted per batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from ae_lab.data.base import ArrayDataModule, Split
from ae_lab.data.files import RemoteFile, cached_arrays, combined_sha256, ensure_file, read_idx
from ae_lab.data.units import Units

INPUT_SHAPE = (1, 28, 28)
TRAIN_IMAGES = 60_000  # in the training file (of MNIST and of Fashion-MNIST); the test file holds 10,000
CLASSES = range(10)  # digits 0-9; Fashion-MNIST's ten kinds of clothing
WHITE = 255.0  # the files' pixels are 0 (background) .. 255
THRESHOLD = 128  # binarize=threshold: a pixel is on from this value (0.5 of white, rounded up)
FILES = {
    "mnist": {
        "train_images": RemoteFile("train-images-idx3-ubyte.gz",
                                   "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        "train_labels": RemoteFile("train-labels-idx1-ubyte.gz",
                                   "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        "test_images": RemoteFile("t10k-images-idx3-ubyte.gz",
                                  "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        "test_labels": RemoteFile("t10k-labels-idx1-ubyte.gz",
                                  "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    },
    "fashion_mnist": {
        "train_images": RemoteFile("train-images-idx3-ubyte.gz",
                                   "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        "train_labels": RemoteFile("train-labels-idx1-ubyte.gz",
                                   "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        "test_images": RemoteFile("t10k-images-idx3-ubyte.gz",
                                  "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        "test_labels": RemoteFile("t10k-labels-idx1-ubyte.gz",
                                  "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    },
}


def read_arrays(cfg: DictConfig) -> tuple[dict[str, np.ndarray], str]:
    """The four arrays of `cfg.name` (downloaded and verified as needed) and their combined checksum."""
    folder = Path(cfg.root) / cfg.name
    paths, checksums = {}, {}
    for key, remote in FILES[cfg.name].items():
        paths[key], checksums[remote.name] = ensure_file(remote, folder, list(cfg.mirrors), cfg.download,
                                                         cfg.download_timeout)
    checksum = combined_sha256(checksums)
    arrays = cached_arrays(folder, checksum, lambda: {key: read_idx(path) for key, path in paths.items()},
                           enabled=cfg.cache)
    return arrays, checksum


def units(cfg: DictConfig, run_dir: Path, input_shape: tuple[int, ...]) -> Units:
    """Raw images are the files' pixels 0..255. The model sees them divided by 255, or with
    `binarize=threshold` thresholded at 128. With `static` and `dynamic` binarisation it was trained on
    Bernoulli draws of those intensities and evaluated on one fixed draw; new inputs are taken as
    intensities (no draw is made: the draws' expectation), so binary images (0 or 255) are what it
    was evaluated on, and grey ones give deterministic results."""
    return Units(scale=WHITE, threshold=THRESHOLD if cfg.binarize == "threshold" else None, pixels=True)


def binarized(images: torch.Tensor, mode: str, seed: int) -> torch.Tensor:
    """uint8 {0, 1} images: `threshold` at 0.5, or one fixed Bernoulli draw from `seed`."""
    if mode == "threshold":
        return (images >= THRESHOLD).to(torch.uint8)
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(images.to(torch.float32) / WHITE, generator=generator).to(torch.uint8)


def load(cfg: DictConfig) -> ArrayDataModule:
    arrays, checksum = read_arrays(cfg)
    train_images = torch.from_numpy(np.array(arrays["train_images"])).unsqueeze(1)
    test_images = torch.from_numpy(np.array(arrays["test_images"])).unsqueeze(1)
    train_labels = torch.from_numpy(arrays["train_labels"].astype(np.int64))
    test_labels = torch.from_numpy(arrays["test_labels"].astype(np.int64))

    order = torch.from_numpy(np.random.default_rng(cfg.split_seed).permutation(len(train_images)))
    val_index, train_index = order[: cfg.val_size], order[cfg.val_size:]

    # threshold/static: every split fixed once; dynamic: training batches redrawn, evaluation fixed
    dynamic = cfg.binarize == "dynamic"
    if cfg.binarize == "none":
        scale, eval_train = WHITE, train_images
    else:
        fixed = "threshold" if cfg.binarize == "threshold" else "static"
        scale = 1.0
        eval_train = binarized(train_images, fixed, cfg.binarize_seed)
        test_images = binarized(test_images, fixed, cfg.binarize_seed + 1)
    train_source = train_images if dynamic else eval_train
    splits = {
        "train": Split(train_source, train_labels, index=train_index,
                       pixel_scale=WHITE if dynamic else scale, resample_binary=dynamic),
        "val": Split(eval_train, train_labels, index=val_index, pixel_scale=scale),
        "test": Split(test_images, test_labels, pixel_scale=scale),
    }
    return ArrayDataModule(cfg.name, splits, cfg.batch_size, cfg.num_workers, checksum,
                           on_device=cfg.on_device)
