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
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _plain(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def write_config_files(run_dir: Path, cfg: DictConfig) -> None:
    """`.hydra/config.yaml`, and under Hydra also `overrides.yaml` and `hydra.yaml`. Written by the run
    itself (hydra.output_subdir is null), after its checks, so a refused run overwrites nothing."""
    folder = run_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        OmegaConf.save(hydra.overrides.task, folder / "overrides.yaml")
        OmegaConf.save(OmegaConf.create({"hydra": hydra}), folder / "hydra.yaml")


def completed_metrics(run_dir: Path, cfg: DictConfig) -> dict[str, float] | None:
    """The metrics of a completed run of `cfg` in `run_dir`, None when there is none (or it failed).

    Raises ConfigError when the folder holds a completed run of another config: it is not overwritten.
    """
    from ae_lab.config import ConfigError

    record, metrics, config = run_dir / "run.json", run_dir / "metrics.json", run_dir / ".hydra" / "config.yaml"
    if not record.exists() or json.loads(record.read_text()).get("status") != "completed":
        return None
    if not config.exists() or _plain(OmegaConf.load(config)) != _plain(cfg):
        raise ConfigError(f"{run_dir} already holds a completed run of a different config: "
                          "it is kept as it is; run into another folder")
    return json.loads(metrics.read_text())


def record_refused(run_dir: Path, cfg: DictConfig, error: BaseException) -> None:
    """Mark a sweep job whose config was refused as failed, unless its folder holds another run."""
    record = run_dir / "run.json"
    if not record.exists():
        write_config_files(run_dir, cfg)
        write_json(record, {"status": "failed", "seed": cfg.seed, "error": str(error), "ended": _now()})


class RunRecord:
    """`run.json`: status (running | completed | failed), seed, code and package versions, data checksum,
    start and end times, and the error when the run failed."""

    def __init__(self, run_dir: Path, cfg: DictConfig, data_name: str, data_checksum: str) -> None:
        self.path = run_dir / "run.json"
        if self.path.exists():  # an earlier attempt that failed or was cut off: keep its record
            os.replace(self.path, run_dir / f"run.attempt-{int(self.path.stat().st_mtime)}.json")
        self.payload: dict[str, Any] = {
            "status": "running",
            "seed": cfg.seed,
            "git": git_state(),
            "packages": package_versions(),
            "data": {"name": data_name, "sha256": data_checksum},
            "command": [sys.executable, *sys.argv],
            "host": socket.gethostname(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "started": _now(),
            "ended": None,
        }
        self._write()

    def _write(self) -> None:
        write_json(self.path, self.payload)

    def update(self, **fields: Any) -> None:
        self.payload.update(fields)
        self._write()

    def completed(self, **fields: Any) -> None:
        self.update(status="completed", ended=_now(), **fields)

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
