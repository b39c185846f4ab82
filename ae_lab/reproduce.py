"""`python -m ae_lab.reproduce RUN_FOLDER`: run a finished run again from its record, and compare.

The recorded `.hydra/config.yaml` (the full resolved config, seed included) is trained again into a
new folder, `<RUN_FOLDER>-reproduced-<time>` beside it (or `--output`). Every metric of the original
`metrics.json` is then compared with the new one: on the same machine with the same code and
packages they match exactly (`--rtol` allows a tolerance across machines). Warns when the code
version, the package versions or the data checksum differ from the original record.
Exit code: 0 when every metric matches, 1 when one does not, 2 when RUN_FOLDER is not a finished run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import datetime
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf


def differences(original: dict, reproduced: dict) -> list[str]:
    """What differs between two run records in code version, packages and data."""
    warnings = []
    if original.get("git") != reproduced.get("git"):
        warnings.append(f"code version differs: recorded {original.get('git')}, now {reproduced.get('git')}")
    recorded, now = original.get("packages", {}), reproduced.get("packages", {})
    for name in sorted(set(recorded) | set(now)):
        if recorded.get(name) != now.get(name):
            warnings.append(f"package {name} differs: recorded {recorded.get(name)}, now {now.get(name)}")
    if original.get("data") != reproduced.get("data"):
        warnings.append(f"data differs: recorded {original.get('data')}, now {reproduced.get('data')}")
    return warnings


def compare_metrics(original: dict[str, float], reproduced: dict[str, float], rtol: float) -> list[tuple]:
    """(metric, original, reproduced, matches) for every metric of the original run."""
    rows = []
    for name, value in sorted(original.items()):
        again = reproduced.get(name)
        matches = again is not None and (value == again or math.isclose(value, again, rel_tol=rtol, abs_tol=0.0))
        rows.append((name, value, again, matches))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ae_lab.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run's folder")
    parser.add_argument("--output", type=Path, help="folder for the new run (must not exist)")
    parser.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (default 0: exact)")
    args = parser.parse_args(argv)

    record_path, config_path = args.run / "run.json", args.run / ".hydra" / "config.yaml"
    if not record_path.exists() or not config_path.exists() or not (args.run / "metrics.json").exists():
        parser.exit(2, f"ae_lab.reproduce: error: {args.run} is not a finished run folder "
                       "(it needs run.json, metrics.json and .hydra/config.yaml)\n")
    original = json.loads(record_path.read_text())
    if original.get("status") != "completed":
        parser.exit(2, f"ae_lab.reproduce: error: {args.run} did not complete (status: {original.get('status')})\n")
    output = args.output or args.run.with_name(f"{args.run.name}-reproduced-{datetime.now():%Y%m%d-%H%M%S}")
    if output.exists():
        parser.exit(2, f"ae_lab.reproduce: error: --output {output} already exists: choose a new folder\n")

    from ae_lab.config import Config, register_configs
    from ae_lab.run import train

    register_configs()
    config = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(config_path))
    train(config, output)

    reproduced = json.loads((output / "run.json").read_text())
    for warning in differences(original, reproduced):
        print(f"warning: {warning}", file=sys.stderr)
    rows = compare_metrics(json.loads((args.run / "metrics.json").read_text()),
                           json.loads((output / "metrics.json").read_text()), args.rtol)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.run} reproduced in {output}")
    for column in ("metric", "recorded", "reproduced", "match"):
        table.add_column(column, no_wrap=True)
    for name, value, again, matches in rows:
        table.add_row(name, repr(value), repr(again), "yes" if matches else "NO", style=None if matches else "red")
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    mismatched = [name for name, _, _, matches in rows if not matches]
    print(f"{len(rows) - len(mismatched)} of {len(rows)} metrics match"
          + (f"; differing: {', '.join(mismatched)}" if mismatched else ""))
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
