"""Which jobs of a sweep can share one ensemble."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ae_lab.config import flatten
from ae_lab.noise import KINDS

# Per-member scalars: each member gets its own value as a tensor entry, with no change to parameter
# shapes or to which operations run. Loss weights and targets are read from `Objective.weights(step)`
# and passed in per member; the noise strength is the argument of the noise kind's function; the
# optimiser's numbers are per-member tensors of `StackedOptimizer`; `seed` sets a member's initial
# weights and data order; gradient clipping is a per-member norm. A schedule's numbers are per member too
# (`Objective.weights(step)` is evaluated for each member); its kind and shape choose the function.
_SCHEDULE_NUMBERS = ("start", "steps", "cycles", "rise", "capacity")
MEMBER_SCALARS = (
    "seed", "noise_level",
    "loss.beta", "loss.sparsity_weight", "loss.sparsity_target", "loss.contractive_weight",
    "loss.free_bits", "loss.tc_alpha", "loss.tc_gamma",
    *(f"loss.{weight}_schedule.{key}" for weight in ("beta", "sparsity") for key in _SCHEDULE_NUMBERS),
    "optim.lr", "optim.weight_decay", "optim.eps", "optim.momentum", "optim.gamma", "optim.milestones",
    "trainer.gradient_clip_val",
)
# A weight of 0 switches its term off (and a clip value of null switches clipping off): whether it is
# zero is control flow, so it is part of the group's structure while its value is per member.
SWITCHES = ("loss.beta", "loss.sparsity_weight", "loss.contractive_weight", "loss.free_bits",
            "trainer.gradient_clip_val")
# What each member does on its own after training (evaluation, its W&B run, what its sweeper reads):
# these may differ freely within a group.
PER_MEMBER_PREFIXES = ("eval.", "logger.", "objective")


def per_member_keys() -> tuple[str, ...]:
    """Every key that may differ inside one ensemble, as the docs list them: `MEMBER_SCALARS`, each noise
    kind's strength (`noise.std`, `noise.p`, ...), and the keys of what each member does on its own
    (`eval.*`, `logger.*`, `objective`). The docs' list is tested against this one."""
    strengths = dict.fromkeys(f"noise.{key}" for _, key in KINDS.values())
    own = tuple(f"{prefix}*" if prefix.endswith(".") else prefix for prefix in PER_MEMBER_PREFIXES)
    return (*MEMBER_SCALARS, *strengths, *own)


def _noise_strength_key(cfg: dict[str, Any]) -> str | None:
    kind = cfg["noise"]["kind"]
    return f"noise.{KINDS[kind][1]}" if kind in KINDS else None


def structure(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a (resolved, plain) job config that must be equal across an ensemble's members."""
    strength = _noise_strength_key(cfg)
    shared = {}
    for key, value in flatten(cfg).items():
        if key.startswith(PER_MEMBER_PREFIXES) or key == strength:
            continue
        if key in SWITCHES:
            shared[key] = "off" if value in (None, 0, 0.0) else "on"
        elif key not in MEMBER_SCALARS:
            shared[key] = value
    return shared


def group_key(cfg: dict[str, Any]) -> str:
    """A short name of a config's structure: jobs with the same key can share an ensemble."""
    return hashlib.sha256(json.dumps(structure(cfg), sort_keys=True, default=str).encode()).hexdigest()[:8]


def group_jobs(configs: list[dict[str, Any]], max_members: int) -> list[list[int]]:
    """Group sweep jobs (their resolved, plain configs) into ensembles of at most `max_members`; return
    the job indices of each group, groups in order of their first job.

    Jobs vectorise together when they differ only in the keys of `MEMBER_SCALARS`, the noise kind's
    strength (`noise.std` / `noise.p`) and the per-member keys (`eval.*`, `logger.*`, `objective`).
    Everything else is structure and cannot vary inside one ensemble: the model's sizes
    (`model.latent_dim`, `hidden_dims`, `channels`, ...) change parameter shapes, so members could not
    be stacked; the architecture, latent head, reconstruction kind, noise kind, sparsity kind,
    contractive estimator, and a weight switched on or off change which operations run (control flow);
    the number of contractive projections is the shape of the directions every member draws; the data
    set, batch size, epochs and other trainer settings change the loop all members share.
    """
    groups: dict[str, list[int]] = {}
    for index, cfg in enumerate(configs):
        groups.setdefault(group_key(cfg), []).append(index)
    return [members[start:start + max_members]
            for members in groups.values() for start in range(0, len(members), max_members)]


# trainer settings the ensemble loop does not implement: a group with another value trains its
# members one by one through the ordinary run (the reason is logged)
_LOOP_DEFAULTS = {"trainer.accumulate_grad_batches": 1, "trainer.val_check_interval": 1.0,
                  "trainer.check_val_every_n_epoch": 1, "trainer.num_nodes": 1, "trainer.detect_anomaly": False}


def sequential_reason(cfg: dict[str, Any]) -> str | None:
    """Why a group of this structure cannot be vectorised (its members then run one by one), or None.

    Greedy pretraining trains in phases the ensemble loop does not have; the others are loop settings
    the ensemble loop leaves to Lightning.
    """
    if cfg["model"].get("pretrain", "none") != "none":
        return "model.pretrain=greedy (its layer-wise phases run through the ordinary run)"
    flat = flatten(cfg)
    for key, default in _LOOP_DEFAULTS.items():
        if flat.get(key, default) != default:
            return f"{key}={flat[key]!r} (the ensemble loop implements only {default!r})"
    if flat.get("trainer.precision") not in ("32-true", "32", 32):
        return f"trainer.precision={flat['trainer.precision']!r} (the ensemble loop runs in float32)"
    if flat.get("trainer.devices") not in (1, "1", "auto") or flat.get("trainer.strategy") not in ("auto", None):
        return "several devices per job (trainer.devices / trainer.strategy): one ensemble runs on one device"
    return None
