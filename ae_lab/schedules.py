"""Loss-weight schedules: a weight as a pure function of the global training step.

`loss.beta_schedule` and `loss.sparsity_schedule` (`WeightSchedule` in ae_lab/config.py) move the
configured weight (`loss.beta`, `loss.sparsity_weight`, the *target*) with the step `t` (0-based: the
step whose gradient the weight scales). Being functions of the step alone, they carry no state: a
resumed run continues them exactly, and they are never written back into the config.

- constant: the target at every step (the default).
- linear (Bowman et al. 2016, KL annealing): from `start` to the target over `steps`,
  w(t) = start + (target - start) * min(1, t / steps).
- cyclical (Fu et al. 2019): `steps` split into `cycles` periods of P = steps / cycles; within each,
  the first fraction `rise` ramps from `start` to the target (`shape` linear, or cosine:
  (1 - cos(pi u)) / 2), the rest holds the target: w(t) = start + (target - start) * f(tau),
  tau = (t mod P) / P, f = ramp(tau / rise) while tau < rise, else 1. After `steps`: the target.
- capacity (Burgess et al. 2018, beta only): the KL term becomes gamma * |KL - C(t)| with gamma =
  `loss.beta` (constant) and C(t) = capacity * min(1, t / steps) nats, rising linearly to `capacity`.
"""

from __future__ import annotations

import math
from typing import Any

RAMPS = {"linear": lambda u: u, "cosine": lambda u: 0.5 * (1.0 - math.cos(math.pi * u))}


def scheduled_weight(schedule: Any, target: float, step: int) -> float:
    """The weight at global step `step` under `schedule` (a `WeightSchedule` section) for `target`."""
    kind = schedule.kind
    if kind in ("constant", "capacity"):
        return float(target)
    if step >= schedule.steps:
        return float(target)
    if kind == "linear":
        fraction = step / schedule.steps
    else:  # cyclical
        period = schedule.steps / schedule.cycles
        tau = math.fmod(step, period) / period
        fraction = RAMPS[schedule.shape](tau / schedule.rise) if tau < schedule.rise else 1.0
    return float(schedule.start + (target - schedule.start) * fraction)


def capacity(schedule: Any, step: int) -> float:
    """C(t) of the capacity objective, in nats (0 for every other kind of schedule)."""
    if schedule.kind != "capacity":
        return 0.0
    return float(schedule.capacity * min(1.0, step / schedule.steps))


def moves(schedule: Any) -> bool:
    """Whether the schedule makes its weight (or C) depend on the step."""
    return schedule.kind != "constant"
