"""The feature extractor of the Fréchet distance: a small classifier trained on the data set's labels,
in place of FID's Inception network (its weights cannot be downloaded here, and it was trained on
natural 299x299 RGB photographs, not 8x8 digits).

The classifier is an MLP (flatten -> Linear+ReLU per `eval.fd_classifier_hidden` -> Linear to the
classes); its features are the last hidden layer's ReLU activations, as FID's are Inception's last
pooling layer's. An MLP rather than a conv net because it reads every input ae_lab trains on (rows,
sequences and images, like `model.arch=mlp`), trains in seconds on a CPU (on MNIST a conv net of
similar accuracy takes minutes there), and its accuracy on these sets is high enough for its features
to tell digits apart (the measured accuracy is recorded beside every FD).

It is trained once per data set and settings, on the CPU with a fixed seed, and kept in a cache folder
(`eval.fd_classifier_cache`; null: `$XDG_CACHE_HOME/ae_lab/fd_classifiers`, i.e.
`~/.cache/ae_lab/fd_classifiers`), like the downloaded Inception weights of FID's implementations: a
user cache rather than each run folder, so that every run and sweep on the data set measures its
samples with the very same network (FDs in different networks are not comparable) and MNIST's is
trained once. Its file is named after a digest of what it was trained from: the data set's name and
checksum, its config section (split, binarisation, scaling, held-out class; not the loader's batch
size, workers or folders), the training and test rows, and the classifier's settings.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from omegaconf import DictConfig, OmegaConf

from ae_lab.data import ArrayDataModule, Split
from ae_lab.storage import atomic_torch_save

log = logging.getLogger(__name__)

BATCH_SIZE, LEARNING_RATE, SEED = 128, 1e-3, 0  # Adam; part of the cache key
# dataset keys that change how the data are read, not what they are: left out of the cache key
LOADER_KEYS = {"batch_size", "num_workers", "root", "mirrors", "download", "download_timeout", "cache", "on_device",
               "path", "val_path", "test_path"}


class FeatureClassifier(nn.Module):
    def __init__(self, input_size: int, hidden: list[int], classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for width_in, width in zip([input_size, *hidden], hidden):
            layers += [nn.Linear(width_in, width), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden[-1], classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *input_shape) -> (B, hidden[-1]) penultimate activations."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class TrainedClassifier:
    network: FeatureClassifier
    classes: torch.Tensor  # the label of each output, sorted
    test_accuracy: float  # on the test examples of those labels
    path: Path  # its cache file

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Features (N, F) of `x` (N, *input_shape), on the CPU, computed on `x`'s device."""
        network = self.network.to(x.device).eval()
        with one_thread():
                return torch.cat([network.features(x[start:start + batch_size]).cpu()
                              for start in range(0, len(x), batch_size)])


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ae_lab" / "fd_classifiers"


def whole(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """Every example of a labelled split as one batch on the CPU: inputs (N, *input_shape), labels (N,).
    A dynamically binarised split draws its pixels here, from `SEED`: the same draw every time."""
    devices = [split.images.device] if getattr(split.images, "is_cuda", False) else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(SEED)
        batch = split.batch(torch.arange(len(split)))
    return batch["x"].cpu(), batch["label"].cpu()


def feature_classifier(data: ArrayDataModule, dataset_cfg: DictConfig, hidden: list[int], epochs: int,
                       cache: str | None) -> TrainedClassifier:
    """The classifier of labelled `data` (read as `dataset_cfg` says) with these settings: read from the
    cache folder `cache` (null: `default_cache()`), or trained on the training split and saved there.
    When the folder cannot be written, the trained classifier is used and a warning says so."""
    train, test = data.splits["train"], data.splits["test"]
    settings = {"hidden": list(hidden), "epochs": epochs, "batch_size": BATCH_SIZE, "lr": LEARNING_RATE,
                "seed": SEED}
    described = {key: value for key, value in OmegaConf.to_container(dataset_cfg, resolve=True, enum_to_str=True).items()
                 if key not in LOADER_KEYS}
    digest = hashlib.sha256(repr((data.name, data.checksum, sorted(described.items()),
                                  sorted(settings.items()))).encode())
    for split in (train, test):
        digest.update(split.rows(torch.arange(len(split))).cpu().numpy().tobytes())
    path = (Path(cache).expanduser() if cache else default_cache()) / f"{data.name}-{digest.hexdigest()[:20]}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        network = FeatureClassifier(saved["input_size"], list(hidden), len(saved["classes"]))
        network.load_state_dict(saved["state_dict"])
        return TrainedClassifier(network, saved["classes"], saved["test_accuracy"], path)
    train_x, train_y = whole(train)
    test_x, test_y = whole(test)
    classes = torch.unique(train_y)
    network = FeatureClassifier(train_x[0].numel(), list(hidden), len(classes))
    started = time.time()
    _train(network, train_x, torch.searchsorted(classes, train_y), epochs)
    known = torch.isin(test_y, classes)
    with torch.no_grad():
        predicted = classes[network.eval()(test_x[known]).argmax(1)]
    accuracy = float((predicted == test_y[known]).float().mean())
    log.info("FD classifier for %s trained in %.1f s: test accuracy %.4f", data.name, time.time() - started,
             accuracy)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(path, {"state_dict": network.state_dict(), "classes": classes,
                                 "input_size": train_x[0].numel(), "test_accuracy": accuracy, "settings": settings,
                                 "data": described})
    except OSError as error:
        log.warning("the FD classifier could not be cached in %s (%s): it is trained again next time; "
                    "set eval.fd_classifier_cache to a writable folder", path.parent, error)
    return TrainedClassifier(network, classes, accuracy, path)


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one CPU thread inside the block. The classifier's products are small (128 x 784 times
    784 x 256 at most), and on a shared machine threads cost more than they save: 20 epochs on digits
    took 0.5-0.9 s on one thread and 16 s on two, with other jobs using the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(network: FeatureClassifier, x: torch.Tensor, targets: torch.Tensor, epochs: int) -> None:
    """Adam on the cross-entropy, minibatches in an order drawn from `SEED` (as is the initialisation),
    on one thread, leaving the caller's random state untouched."""
    with torch.random.fork_rng(devices=[]), one_thread():
        torch.manual_seed(SEED)
        for layer in network.modules():
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        optimizer = torch.optim.Adam(network.parameters(), lr=LEARNING_RATE)
        network.train()
        for _ in range(epochs):
            for rows in torch.randperm(len(x)).split(BATCH_SIZE):
                loss = nn.functional.cross_entropy(network(x[rows]), targets[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
