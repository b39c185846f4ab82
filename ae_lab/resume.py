"""Resuming a killed run: `python -m ae_lab resume=outputs/runs/<run>` continues it, in its folder,
from its newest checkpoint (`checkpoints/last.ckpt`, see ae_lab/checkpoints.py), with the config
recorded there, and ends with the numbers an uninterrupted run of that config gives (exactly, on CPU).

`check_resume` refuses, before anything is written, a resume that cannot continue its run exactly.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ae_lab.config import flatten
from ae_lab.errors import ConfigError

RESUME_POINT = Path("checkpoints") / "last.ckpt"
# what a resume may set besides `resume`: how a run shows progress and checkpoints, never its numbers
RESUME_MAY_SET = ("checkpoint_every_n_steps", "trainer.enable_progress_bar", "trainer.enable_model_summary")


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues from: its checkpoint and position, and the run's previous record."""

    checkpoint: Path
    global_step: int
    epoch: int
    record: dict[str, Any]


def _refuse(value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"resume={str(value)!r} is not allowed: {allowed}")


def _overridden(task_overrides: list[str]) -> list[tuple[str, str]]:
    """(key, override) of each command-line override of the job's config (not Hydra's own)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    return [(override.key_or_group, text) for override, text in zip(parsed, task_overrides)
            if not override.is_hydra_override()]


def recorded_job(run_dir: Path) -> tuple[dict[str, Any], list[str]] | None:
    """The run's config-group choices and command-line overrides as recorded when it started
    (`.hydra/hydra.yaml`), or None for a run that was not started by Hydra."""
    path = run_dir / ".hydra" / "hydra.yaml"
    if not path.exists():
        return None
    hydra = OmegaConf.load(path).hydra
    return dict(hydra.runtime.choices), list(hydra.overrides.task)


def recorded_config(run_dir: Path) -> DictConfig:
    """The run's `.hydra/config.yaml` on ae_lab's schema (keys added since the run get their defaults)."""
    from ae_lab.config import Config

    return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(run_dir / ".hydra" / "config.yaml"))


def config_differences(saved: dict[str, Any], recorded: dict[str, Any]) -> list[str]:
    """The keys whose values differ between a checkpoint's config and the run's, those that change results
    first (then those of ae_lab.config.NON_RESULT_KEYS: logging, paths). A key added to the schema since the
    checkpoint was written (absent there) counts as unchanged when the run has its default: new keys
    default to the behaviour runs had before them."""
    from ae_lab.config import Config, changes_results

    defaults = flatten(OmegaConf.to_container(OmegaConf.structured(Config), enum_to_str=True))
    saved, recorded = flatten(saved), flatten(recorded)
    keys = sorted((set(saved) | set(recorded)) - {"resume", *RESUME_MAY_SET},
                  key=lambda key: (not changes_results(key), key))
    added = {key for key in keys if key not in saved and key in defaults and recorded.get(key) == defaults[key]}

    def difference(key: str) -> str:
        there = f"{key}={saved[key]!r}" if key in saved else f"{key} absent"
        return f"{there} there, {repr(recorded[key]) if key in recorded else 'absent'} in the run"

    return [difference(key) for key in keys if key not in added and saved.get(key, "<absent>") != recorded.get(key, "<absent>")]


def _running_elsewhere(record: dict[str, Any]) -> bool:
    """Whether the process that runs the recorded run (on this host) is still alive: not dead, only running."""
    pid = record.get("pid")
    if record.get("status") != "running" or record.get("host") != socket.gethostname() or pid in (None, os.getpid()):
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, another user's
        return True
    return True


def check_resume(config: DictConfig, first_rank: bool = True) -> bool:
    """Refuse, with a ConfigError naming `resume` and what it needs, a resume that cannot continue the
    run exactly; before anything is written. Returns True when the run has completed already.

    `config` is the composed config with its `hydra` section. Ranks > 0 of a DDP run skip the checks
    of the run's state (rank 0 has made it `running` by the time they start).
    """
    value = config.resume
    run_dir = Path(str(value))
    if Path(str(config.hydra.run.dir)).resolve() != run_dir.resolve():
        raise ConfigError(f"hydra.run.dir={str(config.hydra.run.dir)!r} is not allowed with resume: "
                          "a resumed run continues in its own folder (give resume=RUN_FOLDER only)")
    expected = "a run folder holding run.json and .hydra/config.yaml"
    if not run_dir.is_dir():
        raise _refuse(value, f"{expected}; there is no folder {run_dir}")
    for needed in (Path("run.json"), Path(".hydra") / "config.yaml"):
        if not (run_dir / needed).is_file():
            hint = (" (a sweep folder? resume one job's folder, or run the sweep again with "
                    "hydra.sweep.dir)") if any(run_dir.glob("*/run.json")) else ""
            raise _refuse(value, f"{expected}; {run_dir} has no {needed}{hint}")
    changed = [text for key, text in _overridden(config.hydra.overrides.task)
               if key != "resume" and key not in RESUME_MAY_SET]
    if changed:
        raise _refuse(value, f"together with {', '.join(changed)}: a resumed run keeps its recorded config "
                             f"(what may be given with resume: {', '.join(RESUME_MAY_SET)})")
    record = json.loads((run_dir / "run.json").read_text())
    if first_rank and record.get("status") == "completed":
        return True
    if record.get("ensemble"):  # a vectorised sweep's member: its checkpoint is its group's
        raise _refuse(value, f"a run trained on its own; {run_dir} is member {record['ensemble']['member']} of "
                             f"the vectorised group {record['ensemble']['group']}, whose members train "
                             f"together: run its sweep again with hydra.sweep.dir={run_dir.parent} (the "
                             "same command otherwise) to resume the group")
    if first_rank and _running_elsewhere(record):
        raise _refuse(value, f"a run that is not running; process {record['pid']} on this host is still "
                             f"running it (started {record.get('started')})")
    checkpoint = run_dir / RESUME_POINT
    if not checkpoint.is_file():
        raise _refuse(value, f"a run with a checkpoint to resume from; {run_dir} has no {RESUME_POINT} "
                             "(it stopped before its first checkpoint): start it again")
    _check_checkpoint(value, checkpoint, recorded_config(run_dir))
    return False


def _check_checkpoint(value: Any, checkpoint: Path, recorded: DictConfig) -> None:
    """Refuse a recorded config that is no longer valid, and a checkpoint unreadable or of another config."""
    import torch

    from ae_lab.checkpoints import ResumeState
    from ae_lab.checks import validate
    from ae_lab.data import input_shape

    validate(recorded, input_shape(recorded.dataset))
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is refused the same way
        raise _refuse(value, f"a run whose checkpoint can be read; {checkpoint} cannot: {error}") from None
    state = saved.get("callbacks", {}).get(ResumeState.__qualname__) if isinstance(saved, dict) else None
    if not state:
        raise _refuse(value, f"a run with a resumable checkpoint; {checkpoint} was not written by ae_lab "
                             "(or by a version from before resuming)")
    differing = config_differences(state["config"], OmegaConf.to_container(recorded, resolve=True, enum_to_str=True))
    if differing:
        shown = "; ".join(differing[:5]) + (f"; and {len(differing) - 5} more" if len(differing) > 5 else "")
        raise _refuse(value, f"a checkpoint of the run's own config; {checkpoint} is from another config: {shown}")


def unfinished_run(config: DictConfig, run_dir: Path, first_rank: bool = True) -> ResumePoint | None:
    """Where a sweep job goes on when its folder holds an unfinished run of its config with a checkpoint
    (a job the cluster requeued, or one cut off and run again with its sweep); None when there is none.

    Decided by the checkpoint alone, so that every rank of a DDP job decides alike (rank 0 puts the
    previous `run.json` aside as it starts). A completed run is not resumed (`train` returns its metrics).
    Raises ConfigError when the checkpoint is of another config.
    """
    import torch

    checkpoint = run_dir / RESUME_POINT
    if not checkpoint.is_file():
        return None
    try:  # on ranks > 0 maybe the record rank 0 has just begun (it is written atomically)
        record = json.loads((run_dir / "run.json").read_text())
    except FileNotFoundError:  # no record, or rank 0 is putting it aside
        record = {}
    if record.get("status") == "completed":
        return None
    _check_checkpoint(str(run_dir), checkpoint, config)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    return ResumePoint(checkpoint, saved["global_step"], saved["epoch"], record if first_rank else {})


def resume_point(config: DictConfig, task_overrides: list[str]) -> tuple[DictConfig, ResumePoint]:
    """The config a resumed run trains (the recorded one, with the settings of RESUME_MAY_SET given on
    the command line) and where it resumes from. `check_resume` has passed."""
    import torch

    run_dir = Path(str(config.resume))
    recorded = recorded_config(run_dir)
    for key, _ in _overridden(task_overrides):
        if key in RESUME_MAY_SET:
            OmegaConf.update(recorded, key, OmegaConf.select(config, key))
    checkpoint = run_dir / RESUME_POINT
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    record = json.loads((run_dir / "run.json").read_text())
    return recorded, ResumePoint(checkpoint, saved["global_step"], saved["epoch"], record)
