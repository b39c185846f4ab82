"""What a run shows on the console: its config and folder at the start, its final metrics, where its
folder is and how to upload its W&B run at the end; and which log messages reach the console."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

from rich.console import Console
from rich.table import Table

SPLITS = ("train", "val", "test")
# a sample size recorded beside a metric: `eval/sap_n_train` is how many codes SAP's classifiers fit
SAMPLE_SIZE = re.compile(r"(?P<metric>.+)_n_(?P<part>[a-z]+)")


# loggers whose INFO and WARNING messages reach the console by default: ae_lab's own, and Hydra's (a
# sweep's launches); every other library's go to the run's ae_lab.log only, errors to both
CONSOLE_LOGGERS = ("ae_lab", "__main__", "hydra")


class QuietConsole(logging.Filter):
    """The console handler's filter (conf/hydra/job_logging/ae_lab.yaml): lets through ae_lab's and
    Hydra's messages and every error, not what libraries say at INFO or WARNING (Lightning's tips and
    its `Trainer(limit_…=1.0)` notes, Python warnings captured from libraries); `verbose=true` lets
    everything through."""

    def __init__(self, verbose: bool = False) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        return (self.verbose or record.levelno >= logging.ERROR
                or record.name.split(".")[0] in CONSOLE_LOGGERS)


def print_config_summary(choices: dict[str, str], overrides: list[str], run_dir: Path,
                         console: Console | None = None) -> None:
    """The run's config in two lines (its option of each config group, then the command line's
    overrides) and its folder, where `.hydra/config.yaml` holds the whole config."""
    console = console or Console()
    chosen = " ".join(f"{group}={option}" for group, option in reversed(choices.items())
                      if option is not None and not group.startswith(("hydra", "schema")))
    console.print(f"config: {chosen}", soft_wrap=True, highlight=False)
    console.print(f"overrides: {' '.join(overrides) or '(none)'}", soft_wrap=True, highlight=False)
    console.print(f"run folder: {run_dir} (full config: .hydra/config.yaml)", soft_wrap=True, highlight=False)


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


def recorded_sizes(metrics: dict[str, float], prefix: str = "eval/") -> dict[str, str]:
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
        sizes = recorded_sizes(evaluated)
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
