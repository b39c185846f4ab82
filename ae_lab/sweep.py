"""A sweep's folder: its jobs, their status and metrics, and the summary written when it ends."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

SUMMARY_METRICS = ("test/loss", "test/recon", "test/kl", "test/elbo")
# set by the sweep's start (ae_lab.hydra_callbacks) for its jobs, in-process or not: JSON of `sweep_identity`
IDENTITY_VARIABLE = "AE_LAB_SWEEP_IDENTITY"


def config_hash(*, _root_: Any) -> str:
    """OmegaConf resolver: 8 hex digits of the job's resolved config (without `hydra`).

    Naming each job folder after it means re-running a sweep into the same folder finds the finished
    jobs again, and a job whose config changed gets a new folder instead of overwriting an old one.
    """
    job_keys = [key for key in _root_ if key != "hydra"]  # hydra holds this very interpolation
    config = OmegaConf.to_container(OmegaConf.masked_copy(_root_, job_keys), resolve=True, enum_to_str=True)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]


def noise_level(default: float, *, _root_: Any) -> float:
    """OmegaConf resolver: the top-level `noise_level` when set, else the noise kind's own default.

    Lets one sweep cross noise kinds with noise levels (`noise=gaussian,masking noise_level=0.1,0.3`)
    although the kinds name their strength differently (`std`, `p`).
    """
    level = _root_.get("noise_level")
    return default if level is None else level


def slurm_gpus(accelerator: str, devices: Any) -> Any:
    """OmegaConf resolver for `hydra/launcher=slurm`'s `gpus_per_node`: the trainer's devices when it
    trains on GPUs (`gpu`, `cuda`), else none (null: no GPU request at all, as a CPU-only cluster needs;
    `auto` asks for none too, since what a compute node has is not known where the sweep is launched)."""
    return devices if str(accelerator) in ("gpu", "cuda") else None


def sweep_identity(config: Any) -> dict[str, Any]:
    """What a sweep is, from its multirun config: `keys`, the swept keys (those the command line gives
    several values, `loss.beta=1,4` or `range(...)`, and the sweeper's `params`, as a `+sweeps=` file
    sets them), and `name`: the `+sweeps=` (or `hparams_search=`) choice, else the swept keys' last parts
    joined by `+` (`beta+latent_dim`), then the sweep folder's name (its start time by default; that
    alone for a sweep of one job)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides([str(o) for o in config.hydra.overrides.task])
    keys = [override.key_or_group for override in overrides if override.is_sweep_override()]
    keys += [str(key) for key in (OmegaConf.select(config, "hydra.sweeper.params") or {}) if str(key) not in keys]
    choices = config.hydra.runtime.choices
    preset = choices.get("sweeps") or choices.get("hparams_search")
    what = preset or "+".join(key.rsplit(".", 1)[-1] for key in keys)
    folder = Path(str(config.hydra.sweep.dir)).name
    return {"name": f"{what} {folder}" if what else folder, "keys": keys}


@dataclass
class Job:
    folder: Path
    overrides: list[str]
    status: str
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def job_order(path: Path) -> list[Any]:
    """Sort key of run folders in job order: numbers compared as numbers, so `2_<hash>` comes before
    `10_<hash>` (a plain sort of the names puts job 10 after job 1)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def jobs_in(sweep_dir: Path) -> list[Job]:
    """Every job folder (one holding a run.json) directly under `sweep_dir`, in job order."""
    jobs = []
    for record_path in sorted(sweep_dir.glob("*/run.json"), key=job_order):
        folder = record_path.parent
        record = json.loads(record_path.read_text())
        overrides_path = folder / ".hydra" / "overrides.yaml"
        overrides = list(OmegaConf.load(overrides_path)) if overrides_path.exists() else []
        metrics_path = folder / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        jobs.append(Job(folder, [str(o) for o in overrides], record.get("status", "unknown"),
                        record.get("error"), metrics))
    return jobs


def write_summary(sweep_dir: Path, jobs: list[Job]) -> Path:
    """`summary.md` (a table a person reads) and `summary.json` (for tools) in the sweep folder."""
    shown = [name for name in SUMMARY_METRICS if any(name in job.metrics for job in jobs)]

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    lines = [row(["job", "overrides", "status", *shown]), "|" + "---|" * (3 + len(shown))]
    for job in jobs:
        values = [f"{job.metrics[name]:.4f}" if name in job.metrics else "" for name in shown]
        status = job.status if job.error is None else f"{job.status}: {job.error}"
        lines.append(row([job.folder.name, " ".join(job.overrides), status, *values]))
    counts = {status: sum(job.status == status for job in jobs) for status in ("completed", "failed", "interrupted")}
    lines += ["", f"{len(jobs)} jobs: {counts['completed']} completed, {counts['failed']} failed, "
                  f"{counts['interrupted']} interrupted, "
                  f"{len(jobs) - sum(counts.values())} other"]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    (sweep_dir / "summary.json").write_text(json.dumps(
        [{"folder": job.folder.name, "overrides": job.overrides, "status": job.status,
          "error": job.error, "metrics": job.metrics} for job in jobs], indent=2) + "\n")
    return sweep_dir / "summary.md"


def summarize(sweep_dir: Path) -> list[Job]:
    """Write and print the sweep's summary (and the command that uploads its W&B runs); return its jobs."""
    from rich.console import Console

    jobs = jobs_in(sweep_dir)
    summary = write_summary(sweep_dir, jobs)
    Console().print(summary.read_text(), soft_wrap=True, markup=False)
    print(f"sweep folder: {sweep_dir} (summary: {summary})")
    if any(sweep_dir.glob("*/wandb/offline-run-*")):
        print(f"W&B runs saved offline; upload them all with: wandb sync {sweep_dir}/*/wandb/offline-run-*")
    return jobs
