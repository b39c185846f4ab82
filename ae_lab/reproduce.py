"""`python -m ae_lab.reproduce RUN_FOLDER`: run a finished run again from its record, and compare.

The recorded `.hydra/config.yaml` (the full resolved config, seed included) is trained again, as a
single run, into a new folder (`--output`, or `<RUN_FOLDER>-reproduced-<time>` beside it; for a job of a
sweep, `<SWEEP>-<job>-reproduced-<time>` beside the sweep folder, so that the sweep does not gain a
row). Every metric of the original `metrics.json` is then compared with the new one, with the tolerance
the run's kind warrants:

- a single run, on the same machine with the same code and packages, repeats bit for bit: exactly;
- a member of a vectorised sweep was trained in a batched ensemble whose float32 sums round differently
  from a single run's (relative differences of 1e-7 to 3e-7 measured): relative tolerance `MEMBER_RTOL`;
- a metric that counts (active units, test examples classified right, ranked pairs: evaluation.json's
  `resolution`) may differ by one count, where a rounding tips one decision.

`--rtol` sets another relative tolerance (across machines). Warns when the code version, the package
versions or the data checksum differ from the original record. The console is a run's: libraries'
messages go to the new folder's ae_lab.log. Exit code: 0 when every metric matches, 1 when one does
not, 2 when RUN_FOLDER is not a finished run.
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


MEMBER_RTOL = 1e-5  # a vectorised member against its single run (measured: 1e-7 to 3e-7)


def compare_metrics(original: dict[str, float], reproduced: dict[str, float], rtol: float,
                    resolution: dict[str, float] | None = None) -> list[tuple]:
    """(metric, original, reproduced, how it matches: "exact", "rtol", "1 count" or "" for not) for every
    metric of the original run; `resolution` gives the step of one count of the metrics that count."""
    rows = []
    for name, value in sorted(original.items()):
        again = reproduced.get(name)
        step = (resolution or {}).get(name)
        if again is None:
            match = ""
        elif value == again:
            match = "exact"
        elif math.isclose(value, again, rel_tol=rtol, abs_tol=0.0):
            match = "rtol"
        elif step is not None and abs(value - again) <= step * (1 + 1e-9):
            match = "1 count"
        else:
            match = ""
        rows.append((name, value, again, match))
    return rows


def default_output(run: Path) -> Path:
    """Where a reproduction goes: beside the run, or beside its sweep folder (Hydra's multirun.yaml marks
    one) for a job of a sweep, so that it is not taken for one of the sweep's jobs."""
    stamp = f"reproduced-{datetime.now():%Y%m%d-%H%M%S}"
    run = run.resolve()
    if (run.parent / "multirun.yaml").exists():
        return run.parent.with_name(f"{run.parent.name}-{run.name}-{stamp}")
    return run.with_name(f"{run.name}-{stamp}")


def log_like_a_run(run_dir: Path, verbose: bool) -> None:
    """Python logging as a run's (conf/hydra/job_logging/ae_lab.yaml): everything into `run_dir`/ae_lab.log,
    on the console only ae_lab's messages unless `verbose`."""
    import logging.config

    from ae_lab.paths import CONF

    root = OmegaConf.create({"verbose": verbose, "hydra": {"runtime": {"output_dir": str(run_dir)},
                                                           "job": {"name": "ae_lab"}}})
    root.logging = OmegaConf.load(CONF / "hydra" / "job_logging" / "ae_lab.yaml")
    run_dir.mkdir(parents=True)
    logging.config.dictConfig(OmegaConf.to_container(root.logging, resolve=True))
    logging.captureWarnings(True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ae_lab.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run's folder")
    parser.add_argument("--output", type=Path, help="folder for the new run (must not exist)")
    parser.add_argument("--rtol", type=float, help="relative tolerance (default: 0, exact, for a single run; "
                        f"{MEMBER_RTOL:g} for a member of a vectorised sweep)")
    args = parser.parse_args(argv)

    record_path, config_path = args.run / "run.json", args.run / ".hydra" / "config.yaml"
    if not record_path.exists() or not config_path.exists() or not (args.run / "metrics.json").exists():
        parser.exit(2, f"ae_lab.reproduce: error: {args.run} is not a finished run folder "
                       "(it needs run.json, metrics.json and .hydra/config.yaml)\n")
    original = json.loads(record_path.read_text())
    if original.get("status") != "completed":
        parser.exit(2, f"ae_lab.reproduce: error: {args.run} did not complete (status: {original.get('status')})\n")
    output = args.output or default_output(args.run)
    if output.exists():
        parser.exit(2, f"ae_lab.reproduce: error: --output {output} already exists: choose a new folder\n")

    recorded = OmegaConf.load(config_path)
    log_like_a_run(output, bool(recorded.get("verbose", False)))  # before Lightning adds its own handler

    from ae_lab.config import Config, register_configs
    from ae_lab.run import train

    register_configs()
    config = OmegaConf.merge(OmegaConf.structured(Config), recorded)
    member = original.get("ensemble") is not None
    rtol = args.rtol if args.rtol is not None else MEMBER_RTOL if member else 0.0
    print(f"reproducing {args.run} in {output}: "
          + ("a member of a vectorised sweep, trained again as a single run" if member else "a single run")
          + (f", compared with relative tolerance {rtol:g}" if rtol else ", compared exactly")
          + ", counting metrics within one count", flush=True)
    train(config, output)

    reproduced = json.loads((output / "run.json").read_text())
    for warning in differences(original, reproduced):
        print(f"warning: {warning}", file=sys.stderr)
    evaluation = args.run / "evaluation.json"
    resolution = json.loads(evaluation.read_text()).get("resolution", {}) if evaluation.exists() else {}
    rows = compare_metrics(json.loads((args.run / "metrics.json").read_text()),
                           json.loads((output / "metrics.json").read_text()), rtol, resolution)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.run} reproduced in {output}")
    for column in ("metric", "recorded", "reproduced", "match"):
        table.add_column(column, no_wrap=True)
    for name, value, again, match in rows:
        table.add_row(name, repr(value), repr(again), match or "NO", style=None if match else "red")
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    mismatched = [name for name, _, _, match in rows if not match]
    print(f"{len(rows) - len(mismatched)} of {len(rows)} metrics match"
          + (f"; differing: {', '.join(mismatched)}" if mismatched else ""))
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
