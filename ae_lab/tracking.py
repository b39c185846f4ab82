"""What a run records about itself (`run.json`, `metrics.json`) and the experiment logger (W&B by default)."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

PACKAGES = ("ae_lab", "torch", "pytorch-lightning", "hydra-core", "omegaconf", "wandb", "numpy",
            "scikit-learn", "matplotlib")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state() -> dict[str, Any]:
    """Commit of the ae_lab source tree and whether it has uncommitted changes (None outside git)."""
    source = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True,
                                  timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a reader (or a crash) never sees a half-written file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(temporary, path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunRecord:
    """`run.json`: status (running | completed | failed), seed, code and package versions, data checksum,
    start and end times, and the error when the run failed."""

    def __init__(self, run_dir: Path, cfg: DictConfig, data_name: str, data_checksum: str) -> None:
        self.path = run_dir / "run.json"
        self.payload: dict[str, Any] = {
            "status": "running",
            "seed": cfg.seed,
            "git": git_state(),
            "packages": package_versions(),
            "data": {"name": data_name, "sha256": data_checksum},
            "command": [sys.executable, *sys.argv],
            "host": socket.gethostname(),
            "started": _now(),
            "ended": None,
        }
        self._write()

    def _write(self) -> None:
        write_json(self.path, self.payload)

    def update(self, **fields: Any) -> None:
        self.payload.update(fields)
        self._write()

    def completed(self) -> None:
        self.update(status="completed", ended=_now())

    def failed(self, error: BaseException) -> None:
        message = "".join(traceback.format_exception_only(type(error), error)).strip()
        self.update(status="failed", ended=_now(), error=message or type(error).__name__)


def build_logger(cfg: DictConfig, run_dir: Path):
    """The Lightning logger named by `logger.kind`; W&B writes into the run folder."""
    if cfg.logger.kind == "none":
        return False
    if cfg.logger.kind == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
    from pytorch_lightning.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(
        project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.logger.group,
        tags=list(cfg.logger.tags), mode=cfg.logger.mode, save_dir=str(run_dir), name=run_dir.name,
        config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
    )


def finish_logger(logger: Any) -> None:
    """End the W&B run so that the next job of a sweep starts a fresh one."""
    if logger and type(logger).__name__ == "WandbLogger":
        import wandb

        if wandb.run is not None:
            wandb.finish()
