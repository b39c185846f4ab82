"""Where the repository's config folders are: `conf/` (what Hydra composes) and `sweeps/` (the ready
sweeps, `+sweeps=<name>`). Imports nothing from ae_lab."""

from __future__ import annotations

from pathlib import Path

CONF = Path(__file__).resolve().parent.parent / "conf"
SWEEPS = CONF.parent / "sweeps"
