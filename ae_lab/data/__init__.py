"""Data sets by name: `dataset.name` picks the loader; every loader returns an ArrayDataModule."""

from __future__ import annotations

from omegaconf import DictConfig

from ae_lab.data import digits, dsprites, mnist, shapes
from ae_lab.data.base import ArrayDataModule, Split

_DATASETS = {"digits": digits, "mnist": mnist, "fashion_mnist": mnist, "dsprites": dsprites,
             "shapes": shapes}

__all__ = ["ArrayDataModule", "Split", "build_datamodule", "input_shape"]


def _module(cfg: DictConfig):
    from ae_lab.errors import ConfigError

    if cfg.name not in _DATASETS:
        raise ConfigError(f"dataset.name={cfg.name!r} is not allowed: one of {', '.join(_DATASETS)}")
    return _DATASETS[cfg.name]


def input_shape(cfg: DictConfig) -> tuple[int, ...]:
    """(C, H, W) of the data set's images, known without loading it."""
    return _module(cfg).INPUT_SHAPE


def build_datamodule(cfg: DictConfig) -> ArrayDataModule:
    data = _module(cfg).load(cfg)
    if cfg.get("held_out_class") is not None:
        data.hold_out_class(cfg.held_out_class)
    return data
