"""What a finished run prints: its final metrics, where its folder is, and how to upload its W&B run."""

from __future__ import annotations

import math
import re
from pathlib import Path

from rich.console import Console
from rich.table import Table

SPLITS = ("train", "val", "test")
# a sample size recorded beside a metric: `eval/sap_n_train` is how many codes SAP's classifiers fit
SAMPLE_SIZE = re.compile(r"(?P<metric>.+)_n_(?P<part>[a-z]+)")


def format_value(value: float) -> str:
    """A metric with the digits it needs: a whole number as such (counts, epochs), anything else to
    four significant digits without an exponent (0.9123, 35.12, 1234, 0.001234)."""
    if not math.isfinite(value):
        return str(value)
    if value == int(value) and abs(value) < 1e9:
        return str(int(value))
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude < -6:
        return f"{value:.3e}"
    return f"{value:.{max(0, 3 - magnitude)}f}"


def sample_sizes(metrics: dict[str, float], prefix: str = "eval/") -> dict[str, str]:
    """For each metric under `prefix`, the sample sizes recorded beside it, e.g. "train 2000, test 1000".
    A size `<metric>_n_<part>` belongs to `<metric>` and to every metric named `<metric>_*` (DCI's three)."""
    names = [key for key in metrics if key.startswith(prefix) and not SAMPLE_SIZE.fullmatch(key[len(prefix):])]
    sizes: dict[str, list[str]] = {}
    for key in sorted(metrics):
        match = SAMPLE_SIZE.fullmatch(key[len(prefix):]) if key.startswith(prefix) else None
        if match is None:
            continue
        owner = prefix + match["metric"]
        for name in names:
            if name == owner or name.startswith(f"{owner}_"):
                sizes.setdefault(name, []).append(f"{match['part']} {format_value(metrics[key])}")
    return {name: ", ".join(parts) for name, parts in sizes.items()}


def metrics_tables(metrics: dict[str, float]) -> list[Table]:
    """The loss terms per split (`train/`, `val/`, `test/`), then the evaluation (`eval/*`, on the
    test split) with the sample sizes of the metrics that record them."""
    per_split = Table(title="final metrics")
    per_split.add_column("metric")
    for split in SPLITS:
        per_split.add_column(split, justify="right")
    names = sorted({key.split("/", 1)[1] for key in metrics if key.split("/", 1)[0] in SPLITS})
    for name in names:
        per_split.add_row(name, *(format_value(metrics[f"{split}/{name}"]) if f"{split}/{name}" in metrics
                                  else "" for split in SPLITS))
    tables = [per_split]
    evaluated = {key: value for key, value in metrics.items() if key.startswith("eval/")}
    if evaluated:
        sizes = sample_sizes(evaluated)
        table = Table(title="evaluation (test split)")
        table.add_column("metric")
        table.add_column("value", justify="right")
        if sizes:
            table.add_column("samples")
        for key in sorted(evaluated):
            name = key.removeprefix("eval/")
            if SAMPLE_SIZE.fullmatch(name):
                continue
            table.add_row(name, format_value(evaluated[key]), *([sizes.get(key, "")] if sizes else []))
        tables.append(table)
    return tables


def print_summary(run_dir: Path, metrics: dict[str, float], console: Console | None = None) -> None:
    console = console or Console()
    for table in metrics_tables(metrics):
        console.print(table)
    console.print(f"run folder: {run_dir}", soft_wrap=True)
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    if len(offline) == 1:
        console.print(f"W&B run saved offline; upload it with: wandb sync {offline[0]}", soft_wrap=True)
    elif offline:  # a resumed run: one folder per attempt, all of the same W&B run
        console.print(f"W&B run saved offline in {len(offline)} parts (it was resumed); upload them, in order, "
                      f"into the one run with: wandb sync {run_dir / 'wandb'}/offline-run-*", soft_wrap=True)
