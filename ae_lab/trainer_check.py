"""The `trainer.*` keys checked by Lightning itself, before anything starts.

`check_trainer` builds the `pytorch_lightning.Trainer` that the run would build from these keys (no
model, data, logger or callbacks of ae_lab's; nothing is written and no device is set up: Lightning's
accelerator, strategy and precision connectors only parse and validate). Whatever its constructor
refuses (`precision=7`, `devices=0`, `strategy=foo`, `accelerator=gpu` on a machine without one, a
`limit_train_batches` of 1.5, ...) is refused here, naming the key at fault, so that no list of
Lightning's rules has to be kept in step with Lightning by hand.
"""

from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from ae_lab.config import TrainerConfig
from ae_lab.errors import ConfigError

# keys Lightning takes but does not check (torch flags it sets process-wide, and which `isolated_job`
# undoes); they are left out of the trial build
_UNCHECKED = ("deterministic", "benchmark")


def check_trainer(trainer: DictConfig) -> list[str]:
    """Raise ConfigError when Lightning would refuse these `trainer.*` values; return notes for values it
    accepts but changes (`precision=16` on a CPU runs as bf16-mixed)."""
    arguments = {key: value for key, value in OmegaConf.to_container(trainer).items() if key not in _UNCHECKED}
    built = _build(arguments)
    if isinstance(built, Exception):
        raise ConfigError(_refusal(arguments, built))
    # Lightning's own reading of a precision ("16" -> "16-mixed"): private, checked against lightning_fabric 2.6.6
    from lightning_fabric.connector import _convert_precision_to_unified_args

    with _silent():  # its note that `16` stands for `16-mixed`
        asked = _convert_precision_to_unified_args(arguments["precision"])
    if built.precision != asked:
        device = type(built.accelerator).__name__.removesuffix("Accelerator")
        return [f"trainer.precision={arguments['precision']} runs as {built.precision} on this machine's {device} "
                f"(Lightning's substitute: it has no {asked} there)"]
    return []


def _build(arguments: dict[str, Any]) -> Any:
    """The Trainer these arguments make, or the exception Lightning raised; Lightning's messages on the
    way (device info, batch-limit notes) are dropped: the run's own Trainer logs them again."""
    import pytorch_lightning as pl

    from ae_lab.distributed import isolated_job, resolve_strategy

    with isolated_job(), _silent():
        try:
            return pl.Trainer(**{**arguments, "strategy": resolve_strategy(arguments["strategy"])},
                              logger=False, callbacks=[])
        except Exception as error:  # noqa: BLE001 - Lightning's refusal, whatever its type
            return error


@contextmanager
def _silent() -> Iterator[None]:
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(before)


def _refusal(arguments: dict[str, Any], error: Exception) -> str:
    """One line naming the key at fault: the key whose return to its default lets Lightning build the
    Trainer, tried from the keys that depend on others (devices, precision, strategy) to those they depend
    on (accelerator), so that `accelerator=gpu devices=2` without a GPU blames the accelerator, and with
    one GPU the devices."""
    defaults = OmegaConf.to_container(OmegaConf.structured(TrainerConfig))
    changed = [key for key in reversed(list(arguments)) if arguments[key] != defaults[key]]
    reason = _one_line(error)
    for key in changed:
        if not isinstance(_build({**arguments, key: defaults[key]}), Exception):
            return (f"trainer.{key}={arguments[key]!r} is not allowed by Lightning: {reason}"
                    f"{_allowed(key, arguments[key])}")
    given = ", ".join(f"trainer.{key}={arguments[key]!r}" for key in reversed(changed))
    return f"{given or 'the trainer defaults'} are not allowed together by Lightning: {reason}"


def _one_line(error: Exception) -> str:
    """Lightning's message on one line, without its pointers to examples and the documentation."""
    text = " ".join(str(error).split())
    return re.sub(r"\s*(Example choices: .*?\.\.\.|Find a complete list of options in our documentation at \S+)",
                  "", text)


def _allowed(key: str, value: Any) -> str:
    """What Lightning allows for `key` on this machine, where its message does not say."""
    if key == "accelerator":
        from pytorch_lightning.accelerators import AcceleratorRegistry

        names = [name for name in sorted(AcceleratorRegistry.available_accelerators())
                 if AcceleratorRegistry[name]["accelerator"].is_available()]
        return f" (accelerators available on this machine: auto, {', '.join(names)})"
    from pytorch_lightning.strategies import StrategyRegistry

    if key == "strategy" and value not in StrategyRegistry:
        return f" (Lightning's strategies: auto, {', '.join(StrategyRegistry.available_strategies())})"
    if key == "devices":
        return " (a number of devices >= 1, a list of device indices, or -1 or auto for all of them)"
    return ""


def limited_batches(batches: int, limit: Any) -> int:
    """How many of an epoch's `batches` Lightning runs under `trainer.limit_*_batches` (an int: at most
    that many; a float: that fraction, rounded down). The ensemble loop and the schedule check count
    with this."""
    if isinstance(limit, int) and not isinstance(limit, bool):
        return min(batches, limit)
    return batches if float(limit) == 1.0 else int(batches * float(limit))
