"""What a run records about itself (`run.json`, `metrics.json`) and the experiment logger (W&B by default)."""

from __future__ import annotations

import csv
import io
import itertools
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
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from ae_lab.config import flatten
from ae_lab.errors import ConfigError
from ae_lab.job import JobContext
from ae_lab.storage import atomic_write, write_json

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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _plain(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def write_config_files(job: JobContext, cfg: DictConfig) -> None:
    """`.hydra/config.yaml` in the job's folder, and for a job Hydra composed also `overrides.yaml` and
    `hydra.yaml`. Written by the run itself (hydra.output_subdir is null), after its checks, so a refused
    run overwrites nothing."""
    folder = job.run_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    if job.hydra is not None:
        OmegaConf.save(job.hydra.overrides.task, folder / "overrides.yaml")
        OmegaConf.save(OmegaConf.create({"hydra": job.hydra}), folder / "hydra.yaml")


def completed_metrics(run_dir: Path, cfg: DictConfig) -> dict[str, float] | None:
    """The metrics of a completed run of `cfg` in `run_dir`, None when there is none (or it failed).

    Raises ConfigError when the folder holds a completed run of another config: it is not overwritten.
    """
    record, metrics, config = run_dir / "run.json", run_dir / "metrics.json", run_dir / ".hydra" / "config.yaml"
    try:  # (another DDP rank may be putting an unfinished run's record aside right now)
        status = json.loads(record.read_text()).get("status")
    except FileNotFoundError:
        return None
    if status != "completed":
        return None
    if not config.exists() or _plain(OmegaConf.load(config)) != _plain(cfg):
        raise ConfigError(f"{run_dir} already holds a completed run of a different config: "
                          "it is kept as it is; run into another folder")
    return json.loads(metrics.read_text())


def record_refused(job: JobContext, cfg: DictConfig, error: BaseException) -> None:
    """Mark a sweep job whose config was refused as failed, unless its folder holds another run."""
    record = job.run_dir / "run.json"
    if not record.exists():
        write_config_files(job, cfg)
        write_json(record, {"status": "failed", "seed": cfg.seed, "error": str(error), "ended": _now()})


def record_lost(run_dir: Path, error: str) -> None:
    """Mark failed, with `error`, a run whose record was left `running` by a process that died before it
    could say so (killed, out of memory): an ensemble group's worker."""
    path = run_dir / "run.json"
    payload = json.loads(path.read_text())
    payload.update(status="failed", ended=_now(), error=error)
    write_json(path, payload)


class RunRecord:
    """`run.json`: status (running | completed | failed | interrupted | requeued), seed, code and package
    versions, data checksum, start and end times, and the error when the run failed.

    An earlier attempt's record in the folder (a failed or cut-off job run again, a resumed run) is kept
    as `run.attempt-<time>.json`; a resumed run's record says where it resumed from (`resumed_from`).
    """

    def __init__(self, run_dir: Path, cfg: DictConfig, data_name: str, data_checksum: str,
                 resumed_from: dict[str, Any] | None = None, sweep: dict[str, Any] | None = None) -> None:
        self.path = run_dir / "run.json"
        previous = self._keep_previous(run_dir)
        self.payload: dict[str, Any] = {
            "status": "running",
            "seed": cfg.seed,
            "git": git_state(),
            "packages": package_versions(),
            "data": {"name": data_name, "sha256": data_checksum},
            "command": [sys.executable, *sys.argv],
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "started": _now(),
            "ended": None,
        }
        if resumed_from is not None:
            self.payload["resumed_from"] = {**resumed_from, "previous_record": previous}
        if sweep is not None:  # the sweep's identity (`JobContext.sweep_identity`), kept for the job's resumes
            self.payload["sweep"] = sweep
        self._write()

    def _keep_previous(self, run_dir: Path) -> str | None:
        """Rename an earlier attempt's run.json to a name no other attempt has; return that name."""
        if not self.path.exists():
            return None
        stem = f"run.attempt-{int(self.path.stat().st_mtime)}"
        kept = run_dir / f"{stem}.json"
        for number in itertools.count(2):
            if not kept.exists():
                break
            kept = run_dir / f"{stem}-{number}.json"
        os.replace(self.path, kept)
        return kept.name

    def _write(self) -> None:
        write_json(self.path, self.payload)

    def update(self, **fields: Any) -> None:
        self.payload.update(fields)
        self._write()

    def completed(self, **fields: Any) -> None:
        self.update(status="completed", ended=_now(), **fields)

    def interrupted(self, checkpoint: Path | None) -> None:
        self.update(status="interrupted", ended=_now(), error="interrupted by the user (Ctrl-C)",
                    interrupted_checkpoint=str(checkpoint) if checkpoint else None)

    def requeued(self, stop: Any) -> None:
        """Stopped by the cluster's signal (time limit or preemption) after writing `stop.checkpoint`
        (`stop`: ae_lab.preemption.Requeued); the requeued job goes on from it. Should submitit then not
        requeue the job, `stop` tells this record (`not_requeued`)."""
        self.update(status="requeued", ended=_now(), requeued_checkpoint=str(stop.checkpoint))
        stop.if_not_requeued.append(lambda reason: self.not_requeued(stop.checkpoint, reason, stop.continued_by))

    def not_requeued(self, checkpoint: Path, reason: str, continued_by: str | None = None) -> None:
        """Stopped by the cluster's signal after writing `checkpoint`, but the job was not requeued
        (submitit's `reason`): interrupted, and `continued_by` (by default `resume=<run folder>`) goes on
        from the checkpoint."""
        continued_by = continued_by or f"resume={self.path.parent}"
        self.update(status="interrupted", ended=_now(), interrupted_checkpoint=str(checkpoint),
                    error=f"stopped by the cluster and not requeued ({reason}); {continued_by} goes on")

    def failed(self, error: BaseException) -> None:
        message = "".join(traceback.format_exception_only(type(error), error)).strip()
        self.update(status="failed", ended=_now(), error=message or type(error).__name__)


def variant_name(cfg: dict[str, Any], input_size: int) -> str:
    """The family member a (plain) config trains, e.g. `beta_vae`, `denoising_ae`, `sparse_kl_ae`,
    `beta_tcvae`, `stacked_denoising_ae` (greedy layer-wise pretraining)."""
    model, loss = cfg["model"], cfg["loss"]
    if model["latent"] == "gaussian":
        name = "beta_tcvae" if loss["kl"] == "tc" else "vae" if loss["beta"] == 1 else "beta_vae"
    else:
        name = "overcomplete_ae" if model["latent_dim"] > input_size else "ae"
    if loss["sparsity_weight"] > 0:
        name = f"sparse_{loss['sparsity']}_{name}"
    if loss["contractive_weight"] > 0:
        name = f"contractive_{name}"
    if cfg["noise"]["kind"] != "none":
        name = f"denoising_{name}"
    if model["pretrain"] == "greedy":
        name = f"stacked_{name}"
    return name


def build_logger(cfg: DictConfig, job: JobContext, input_size: int, run_id: str | None = None,
                 resumed_at_step: int | None = None, sweep: dict[str, Any] | None = None):
    """The Lightning logger named by `logger.kind`, writing into `job`'s folder.

    W&B: one run per ae_lab run, written into the run folder; named after the run's overrides, grouped
    by `logger.group` or else the sweep (`sweep`, `JobContext.sweep_identity`: its `+sweeps=` name or swept
    keys, and the job's sweep folder's name), `job_type` = the variant, tags = `logger.tags` + arch and data set, config =
    the resolved config with flattened keys, and in a sweep `sweep/name` and `sweep/keys` (the swept
    keys, by which a sweep's panels are built). `run_id` (a resumed run) continues that W&B
    run (`resume="allow"`), named and grouped as it was (`JobContext.as_recorded`); offline, each attempt writes its own `wandb/offline-run-*` folder with
    that id, and `wandb sync` given all of them uploads them, in order, into the one run.
    CSV: `csv/metrics.csv`; a resumed run (`resumed_at_step`, its checkpoint's global step) keeps the
    rows logged before that step and goes on writing into the same file.
    """
    run_dir = job.run_dir
    if cfg.logger.kind == "none":
        return False
    if cfg.logger.kind == "csv":
        from pytorch_lightning.loggers import CSVLogger

        logger = CSVLogger(save_dir=str(run_dir), name="csv", version="")
        if resumed_at_step is not None:
            _keep_csv_history(logger, resumed_at_step)
        return logger
    from ae_lab.wandb_logger import WandbLogger  # Lightning's, its run started in the background (`start`)

    os.environ.setdefault("WANDB_SILENT", "true")
    naming = job.as_recorded() if run_id is not None else job
    plain = _plain(cfg)
    config = flatten(plain)
    if sweep is not None:
        config.update({"sweep/name": sweep["name"], "sweep/keys": list(sweep["keys"])})
    logger = WandbLogger(
        project=cfg.logger.project, entity=cfg.logger.entity, mode=cfg.logger.mode,
        group=cfg.logger.group or (sweep["name"] if sweep else naming.sweep), job_type=variant_name(plain, input_size),
        name=naming.wandb_name, tags=[*cfg.logger.tags, plain["model"]["arch"], cfg.dataset.name],
        save_dir=str(run_dir), config=config,
        **({"id": run_id, "resume": "allow"} if run_id else {}),
    )
    # Lightning 2.6 always passes `anonymous` to wandb.init, which wandb 0.31 answers, on the console, with
    # "The anonymous setting has no effect": it has none, so it is not passed
    logger._wandb_init.pop("anonymous", None)
    return logger


def _keep_csv_history(logger: Any, before_step: int) -> None:
    """Lightning's CSV writer deletes an existing metrics.csv when it starts, which lost a resumed run's
    history. Keep the rows logged before the checkpoint's step (the resumed run logs the later ones
    again) and let the writer append to them."""
    from pytorch_lightning.utilities import rank_zero_only

    path = Path(logger.log_dir) / "metrics.csv"
    if rank_zero_only.rank != 0 or not path.is_file():
        return
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        header, rows = list(reader.fieldnames or []), [row for row in reader if float(row["step"]) < before_step]
    text = io.StringIO()
    table = csv.DictWriter(text, fieldnames=header)
    table.writeheader()
    table.writerows(rows)
    logger.experiment.metrics_keys = header  # creating the writer deletes the file
    atomic_write(path, lambda file: file.write(text.getvalue().encode()))


class WandbHistory:
    """The sink of a run's `History` (ae_lab/history.py) that logs its rows into the run's W&B run, each
    value once over all the run's attempts: what the transaction logs of the earlier attempts
    (`wandb/*run-*-<id>/run-<id>.wandb`) hold already is not logged again. So a run killed and resumed
    ends with every (step, key) once: the values the killed attempt logged but W&B had not yet written
    (it writes its file every 15 s, ae_lab/wandb_log.py) are logged by the resumed attempt, from the
    rows its checkpoint holds, and those it regenerates after the checkpoint only if they are missing.
    Each row goes in with `trainer/global_step` = its step and its `epoch` (`logger`: a WandbLogger).
    The transaction logs are read with ae_lab/wandb_log.py (`history_sink`)."""

    def __init__(self, logger: Any, logged: Callable[[], set[tuple[int, str]]]) -> None:
        self.logger = logger
        self._logged = logged  # -> (step, key) the run's W&B run holds; asked when the first row comes
        self.logged: set[tuple[int, str]] | None = None
        self.last: tuple[int, int] = (0, 0)  # (step, epoch) of the newest row

    def __call__(self, epoch: int, step: int, values: dict[str, float]) -> None:
        if self.logged is None:
            self.logged = self._logged()
        self.last = max(self.last, (step, epoch))
        new = {key: value for key, value in values.items() if (step, key) not in self.logged}
        if new:
            self.logged.update((step, key) for key in new)
            self.logger.log_metrics({**new, "epoch": epoch}, step=step)


def history_sink(logger: Any, run_dir: Path) -> WandbHistory | None:
    """The W&B sink of a run's history (None unless `logger` is a WandbLogger); the W&B run starts with
    its first row."""
    from ae_lab.wandb_log import logged_points

    if not is_wandb(logger):
        return None
    return WandbHistory(logger, lambda: logged_points(run_dir, logger.experiment.id))


def replay_sink(logger: Any, run_dir: Path) -> Callable[[int, int, dict[str, float]], None] | None:
    """The sink of a history that no Trainer logged (an ensemble member's, written out after training):
    `history_sink` for W&B, and for `logger=csv` the CSV logger's rows as a single run's Trainer logs
    them."""
    if type(logger).__name__ == "CSVLogger":  # (the step losses are history.csv's: Lightning does not log them)
        from ae_lab.history import STEP_LOSS

        return lambda epoch, step, values: logger.log_metrics(
            {**{key: value for key, value in values.items() if key != STEP_LOSS}, "epoch": epoch}, step=step)
    return history_sink(logger, run_dir)


def is_wandb(logger: Any) -> bool:
    return bool(logger) and type(logger).__name__ == "WandbLogger"


def wandb_run_id(logger: Any) -> str | None:
    """The W&B run id of a WandbLogger (starting its run if need be); None for other loggers."""
    if not is_wandb(logger):
        return None
    return logger.experiment.id


def log_results(logger: Any, cfg: DictConfig, run_dir: Path, metrics: dict[str, float], figures: dict[str, Path],
                sink: WandbHistory | None = None) -> str | None:
    """Put the run's results into its W&B run; return the W&B run id (None for other loggers):

    - the final metrics into the summary (the names of metrics.json);
    - the final evaluation, of the best weights, into the history once, at the last step (through
      `sink`): `test/*`, and the validation again as `best/val/*` (not a point of `val/*` after the last
      epoch's);
    - the figures as images; `evaluation.json`'s per-unit vectors (`kl_per_unit`, `code_variance_per_unit`)
      as the table `eval/per_unit` and a bar chart each;
    - the checkpoints `logger.checkpoints` names as versions of the artifact `model-<run id>` (type
      `model`): best.ckpt with the alias `best`, with `all` also last.ckpt with `last`. Offline they are
      recorded for `wandb sync`, which uploads them from the run folder (they are not copied).
    """
    run_id = wandb_run_id(logger)
    if run_id is None:
        return None
    import wandb

    if sink is not None:
        step, epoch = sink.last
        sink(epoch, step, {**{key: value for key, value in metrics.items() if key.startswith("test/")},
                           **{f"best/{key}": value for key, value in metrics.items() if key.startswith("val/")}})
    run = logger.experiment
    run.summary.update(metrics)
    media: dict[str, Any] = {f"figures/{name}": wandb.Image(str(path)) for name, path in figures.items()}
    details = run_dir / "evaluation.json"
    vectors = {key: value for key, value in (json.loads(details.read_text()) if details.exists() else {}).items()
               if key in ("kl_per_unit", "code_variance_per_unit") and value}
    if vectors:
        units = len(next(iter(vectors.values())))
        table = wandb.Table(columns=["unit", *vectors], data=[[unit, *(vectors[key][unit] for key in vectors)]
                                                              for unit in range(units)])
        media["eval/per_unit"] = table
        media.update({f"eval/{key}": wandb.plot.bar(table, "unit", key, title=key.replace("_", " "))
                      for key in vectors})
    run.log(media)
    kept = {"none": (), "best": ("best",), "all": ("best", "last")}[_plain(cfg.logger)["checkpoints"]]
    for alias in kept:
        path = run_dir / "checkpoints" / f"{alias}.ckpt"
        if path.is_file():  # (no best.ckpt when no validation ran)
            artifact = wandb.Artifact(f"model-{run_id}", type="model", metadata={"checkpoint": path.name})
            artifact.add_file(str(path), name=path.name, policy="immutable")
            run.log_artifact(artifact, aliases=[alias])
    return run_id


def finish_logger(logger: Any) -> None:
    """End the W&B run so that the next job of a sweep starts a fresh one."""
    if is_wandb(logger):
        import wandb

        logger.wait()  # a run still starting in the background
        if wandb.run is not None:
            wandb.finish()
