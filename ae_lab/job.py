"""What identifies one job: a small value built from Hydra's config once and passed explicitly.

`python -m ae_lab` builds it from the current Hydra job (`JobContext.current`); the vectorised launcher
builds one per member from that member's composed config (`JobContext.from_hydra`), so nothing swaps
Hydra's global config to make a member "current". A run outside Hydra (the Python API, tests) has the
context of its folder alone (`JobContext.outside_hydra`): no `.hydra/overrides.yaml`, no log file of its
own, no sweep. Everything that used to read `HydraConfig` takes this value instead: the config files
(`ae_lab.tracking.write_config_files`), the W&B name and group (`ae_lab.tracking.build_logger`), a
member's log file (`ae_lab.ensemble.logs`), the command line of a DDP rank (`ae_lab.distributed`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from ae_lab.sweep import IDENTITY_VARIABLE

# set by a launcher that starts each sweep job as its own single run (gpu_queue): the sweep's name, the
# W&B group of the job's run
SWEEP_VARIABLE = "AE_LAB_SWEEP"
# overrides of how a job runs, left out of its name
INFRASTRUCTURE = ("trainer", "logger", "hydra")


@dataclass(frozen=True)
class LogFile:
    """The log file a Hydra job's logging config names (`hydra.job_logging.handlers.file`)."""

    path: Path
    mode: str = "a"
    format: str | None = None

    def handler(self) -> logging.FileHandler:
        """A handler writing into the file, opened at its first record."""
        handler = logging.FileHandler(str(self.path), mode=self.mode, delay=True)
        handler.setFormatter(logging.Formatter(self.format))
        return handler


@dataclass(frozen=True)
class JobContext:
    """One job's identity: its run folder, command-line overrides, config-group choices, sweep and log file.

    `hydra` is Hydra's node of the job (saved as `.hydra/hydra.yaml`; None outside Hydra), `cwd` the
    directory the command was started in. `sweep` is the sweep's name (its folder's; a `gpu_queue` job, a
    single run in a process of its own, learns it from SWEEP_VARIABLE), None for a single run;
    `sweep_identity` the sweep's W&B group and swept keys (`ae_lab.sweep.sweep_identity`).
    """

    run_dir: Path
    overrides: tuple[str, ...] = ()
    choices: dict[str, Any] = field(default_factory=dict)
    sweep: str | None = None
    sweep_identity: dict[str, Any] | None = None
    log_file: LogFile | None = None
    cwd: Path | None = None
    hydra: DictConfig | None = field(default=None, repr=False, compare=False)

    @classmethod
    def outside_hydra(cls, run_dir: Path) -> "JobContext":
        """A run started from Python, not by Hydra: its folder is all there is to it."""
        return cls(Path(run_dir))

    @classmethod
    def current(cls) -> "JobContext":
        """The job Hydra is running in this process (in `ae_lab.__main__.main`)."""
        from hydra.core.hydra_config import HydraConfig

        return cls.from_hydra(HydraConfig.get())

    @classmethod
    def from_hydra(cls, hydra: DictConfig, run_dir: Path | None = None) -> "JobContext":
        """The job whose Hydra node is `hydra` (a composed config's `hydra`), run in `run_dir` (default: the
        node's `runtime.output_dir`, which Hydra sets when it runs the job)."""
        run_dir = Path(run_dir if run_dir is not None else hydra.runtime.output_dir)
        multirun = getattr(hydra.mode, "name", hydra.mode) == "MULTIRUN"
        sweep = _sweep_name(Path(str(hydra.sweep.dir)).name if multirun else None)
        identity = os.environ.get(IDENTITY_VARIABLE)
        return cls(run_dir, tuple(str(override) for override in hydra.overrides.task), dict(hydra.runtime.choices),
                   sweep, json.loads(identity) if identity and sweep else None, _log_file(hydra),
                   Path(str(hydra.runtime.cwd)) if hydra.runtime.cwd else None, hydra)

    @property
    def wandb_name(self) -> str:
        """The name of the job's W&B run, from its overrides (`run_name`)."""
        return run_name(list(self.overrides), set(self.choices))

    def as_recorded(self) -> "JobContext":
        """The job as recorded when its run started (its `.hydra/hydra.yaml`): what names a resumed run,
        whose own command line is `resume=…`. Itself when nothing was recorded."""
        path = self.run_dir / ".hydra" / "hydra.yaml"
        if not path.exists():
            return self
        hydra = OmegaConf.load(path).hydra
        sweep = self.run_dir.parent.name if hydra.mode == "MULTIRUN" else None  # sweep.dir is kept unresolved
        return replace(self, overrides=tuple(str(override) for override in hydra.overrides.task),
                       choices=dict(hydra.runtime.choices), sweep=_sweep_name(sweep))


def _sweep_name(folder: str | None) -> str | None:
    return folder or os.environ.get(SWEEP_VARIABLE) or None


def _log_file(hydra: DictConfig) -> LogFile | None:
    """The file the job's logging config writes into, None when it writes none."""
    logging_config = hydra.job_logging
    file = OmegaConf.select(logging_config, "handlers.file")
    if file is None or "filename" not in file:
        return None
    try:
        path = Path(str(file.filename))
    except (MissingMandatoryValue, InterpolationToMissingValueError):  # (its folder is set when the job runs:
        # the context of a job refused before has no log file)
        return None
    pattern = OmegaConf.select(logging_config, f"formatters.{file.get('formatter', 'simple')}.format")
    return LogFile(path, str(file.get("mode", "a")), pattern)


def run_name(overrides: list[str], groups: set[str]) -> str:
    """A short name from a run's overrides: `model=vae loss.beta=4 model.latent_dim=8` ->
    `vae_beta=4_latent_dim=8` (a config group's choice by its option, a key by its last part).
    Overrides of how it runs (`trainer`, `logger`, `hydra`) are left out of the name."""
    parts = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key.split(".")[0].split("/")[0] in INFRASTRUCTURE or not value:
            continue
        parts.append(value if key in groups else f"{key.rsplit('.', 1)[-1]}={value}")
    return "_".join(parts) or "defaults"
