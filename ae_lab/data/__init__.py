"""Data sets by name: `dataset.name` picks the loader; every loader returns an ArrayDataModule.

Built-in sets know their input shape without loading. A user's data (`dataset=array`, `image_folder`,
or a `_target_` loader) is read and checked once, when its shape is first asked for (before training:
a bad file is refused there, in one line), and that checked module is what `build_datamodule` returns
later in the same process. What the reading said (e.g. that a folder mixes grey and colour images) is
held back and said by `build_datamodule`, inside the run, so that it reaches the run's console and its
ae_lab.log rather than the process's set-up logging.

`units` rebuilds, from a run's config and folder, how its loader turned raw examples into model inputs
(`ae_lab/data/units.py`; each data module's `units` says it for its own set), for `ae_lab.load`.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig, OmegaConf

from ae_lab.data import arrays, digits, dsprites, image_folder, mnist, shapes
from ae_lab.data.base import ArrayDataModule, Split
from ae_lab.data.units import Units

_DATASETS = {"digits": digits, "mnist": mnist, "fashion_mnist": mnist, "dsprites": dsprites,
             "shapes": shapes, "array": arrays, "image_folder": image_folder}
_OWN = ("array", "image_folder")

__all__ = ["ArrayDataModule", "Split", "Units", "build_datamodule", "classes", "input_shape", "is_own_data",
           "own_data", "units"]


def is_own_data(cfg: DictConfig) -> bool:
    """A user's data, read from files or a loader (not a built-in set with a fixed shape)."""
    return _is_custom(cfg) or cfg.name in _OWN


def classes(cfg: DictConfig) -> range | None:
    """The class labels of a built-in data set that has them (its module's `CLASSES`); None for a user's
    data, whose labels are whatever its files hold."""
    return None if is_own_data(cfg) else _module(cfg).CLASSES


def _is_custom(cfg: DictConfig) -> bool:
    return cfg.get("name") == "custom" or "_target_" in cfg


def _module(cfg: DictConfig):
    from ae_lab.errors import ConfigError

    if cfg.name not in _DATASETS:
        raise ConfigError(f"dataset.name={cfg.name!r} is not allowed: one of {', '.join(_DATASETS)}")
    return _DATASETS[cfg.name]


def _custom(cfg: DictConfig) -> ArrayDataModule:
    """Hydra's instantiate of `dataset._target_` with `dataset.kwargs`."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from ae_lab.errors import ConfigError

    if OmegaConf.is_missing(cfg, "_target_"):
        raise ConfigError("dataset._target_ is missing: name the function that returns your data, e.g. "
                          "dataset._target_=my_module.make_data")
    try:
        data = instantiate({"_target_": cfg._target_, **OmegaConf.to_container(cfg.kwargs, resolve=True)})
    except InstantiationException as error:
        reason = str(error).strip().splitlines()[0]
        raise ConfigError(f"dataset._target_={cfg._target_!r} is not allowed: {reason}") from None
    if not isinstance(data, ArrayDataModule):
        raise ConfigError(f"dataset._target_={cfg._target_!r} is not allowed: it returned a "
                          f"{type(data).__name__}, not an ae_lab.data.ArrayDataModule")
    return data


_checked: dict[str, ArrayDataModule] = {}  # the last user data set read in this process, by its key


def _key(cfg: DictConfig) -> str:
    """The config and the size and time of every file it reads: a changed file is read again."""
    paths = [Path(str(cfg[key])).expanduser() for key in ("path", "val_path", "test_path") if cfg.get(key)]
    files = [file for path in paths for file in (sorted(path.rglob("*")) if path.is_dir() else [path])]
    stats = [(str(file), file.stat().st_size, file.stat().st_mtime_ns) for file in files if file.is_file()]
    return OmegaConf.to_yaml(cfg, resolve=True) + repr(stats)


def own_data(cfg: DictConfig) -> ArrayDataModule:
    """A user's data set, read and checked (once per process and content)."""
    key = _key(cfg)
    if key not in _checked:
        _checked.clear()
        with _held_back() as notes:
            data = _custom(cfg) if _is_custom(cfg) else _module(cfg).load(cfg)
        data.notes = notes
        _checked[key] = data
    return _checked[key]


@contextmanager
def _held_back() -> Iterator[list[logging.LogRecord]]:
    """The records ae_lab.data's loggers emit inside the block, kept instead of handled."""
    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notes.append(record)

    notes: list[logging.LogRecord] = []
    logger, keep = logging.getLogger(__name__), Keep()
    propagate, level = logger.propagate, logger.level
    logger.addHandler(keep)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield notes
    finally:
        logger.removeHandler(keep)
        logger.propagate, logger.level = propagate, level


def input_shape(cfg: DictConfig) -> tuple[int, ...]:
    """The shape of one example: (C, H, W) images, (C, T) sequences or (D,) rows. A built-in set's is
    known without loading it; a user's data is read and checked here."""
    if is_own_data(cfg):
        return own_data(cfg).input_shape
    return _module(cfg).INPUT_SHAPE


def units(cfg: DictConfig, run_dir: Path, input_shape: tuple[int, ...]) -> Units:
    """How the run in `run_dir` (trained on `cfg`'s data set, examples of `input_shape`) turned raw
    examples into model inputs, rebuilt from its config and folder without reading the data. A
    `_target_` loader's own code does that, so it is refused (ConfigError)."""
    from ae_lab.errors import ConfigError

    if _is_custom(cfg):
        raise ConfigError(f"{run_dir} was trained on dataset._target_={cfg.get('_target_')!r}, whose preprocessing is "
                          "the loader's own code: ae_lab cannot take raw inputs for it; load the weights with "
                          "ae_lab.module.Autoencoder.load_from_checkpoint and feed the model what your loader's "
                          "batches hold (or train on dataset=array, whose scaling ae_lab records)")
    return _module(cfg).units(cfg, run_dir, input_shape)


def build_datamodule(cfg: DictConfig) -> ArrayDataModule:
    if is_own_data(cfg):
        data = copy.copy(own_data(cfg))  # its own splits: holding out a class changes them
        data.splits = dict(data.splits)
        for record in data.notes:  # what reading it said, now where the run logs
            logging.getLogger(record.name).handle(record)
    else:
        data = _module(cfg).load(cfg)
    if cfg.get("held_out_class") is not None:
        data.hold_out_class(cfg.held_out_class)
    return data
