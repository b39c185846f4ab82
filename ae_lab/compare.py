"""`python -m ae_lab.compare PATH...`: runs and sweeps side by side, read from their run folders only.

The table has the run (its folder, relative to the folder that holds all the runs shown), one column
per swept key (a config key whose value differs between the runs and that can change a result: not
ae_lab.config.NON_RESULT_KEYS), the status, and the chosen metrics. Seeds are repeats, not a
hyperparameter: when the runs differ in `seed`, rows that differ only in the seed are merged into mean ±
std with the number of seeds, within each folder of runs (a sweep), so that two sweeps stay apart
(`--by-seed` keeps one row per run). `--plot DIR` draws a metric against one
swept key with a line per value of a second (a log axis for values spanning a decade or more), a heat
map over two swept keys, for VAEs the rate-distortion plane, and the runs' learning curves
(`history.csv`) over each other (`curves.png`); when there is nothing to draw it says why on stderr
and writes nothing.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from ae_lab.composition_errors import closest
from ae_lab.config import changes_results, flatten
from ae_lab.report import SAMPLE_SIZE
from ae_lab.sweep import job_order

KEY_METRICS = ("test/loss", "test/recon", "test/kl", "test/elbo")


@dataclass
class Run:
    folder: Path
    status: str
    config: dict[str, Any]
    metrics: dict[str, float]
    error: str | None


def _load_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    from ae_lab.config import register_configs

    register_configs()  # the resolvers a saved config may use
    config = OmegaConf.load(path)
    try:
        return flatten(OmegaConf.to_container(config, resolve=True))
    except Exception:  # noqa: BLE001 - an interpolation this machine cannot resolve: show it as written
        return flatten(OmegaConf.to_container(config, resolve=False))


def find_runs(paths: Sequence[Path]) -> list[Run]:
    """Every run folder (one holding run.json) at or below the given paths."""
    folders: list[Path] = []
    for path in paths:
        if (path / "run.json").exists():
            folders.append(path)
        else:
            folders += sorted((p.parent for p in path.rglob("run.json") if "wandb" not in p.parts), key=job_order)
    runs = []
    for folder in dict.fromkeys(folders):
        record = json.loads((folder / "run.json").read_text())
        metrics_path = folder / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        runs.append(Run(folder, record.get("status", "unknown"), _load_config(folder / ".hydra" / "config.yaml"),
                        metrics, record.get("error")))
    return runs


def size_mismatches(runs: list[Run]) -> dict[str, dict[float, int]]:
    """The recorded sample sizes (`eval/<metric>_n_<part>`, see ae_lab/evaluation/evaluate.py) that
    differ between the completed runs: size key -> {size: number of runs}."""
    counts: dict[str, dict[float, int]] = {}
    for run in runs:
        if run.status != "completed":
            continue
        for key, value in run.metrics.items():
            if key.startswith("eval/") and SAMPLE_SIZE.fullmatch(key.removeprefix("eval/")):
                counts.setdefault(key, {}).setdefault(value, 0)
                counts[key][value] += 1
    return {key: sizes for key, sizes in sorted(counts.items()) if len(sizes) > 1}


def swept_keys(runs: list[Run]) -> list[str]:
    """Config keys that can change a result and whose values differ between the runs, in config order."""
    keys: dict[str, None] = {}
    for run in runs:
        keys.update(dict.fromkeys(key for key in run.config if changes_results(key)))
    return [key for key in keys if len({json.dumps(run.config.get(key), sort_keys=True) for run in runs}) > 1]


def run_names(runs: list[Run]) -> dict[Path, str]:
    """Each run's folder relative to the folder that holds them all (a lone run: its folder's name), so
    that rows of two sweeps with the same keys are told apart."""
    import os

    folders = [run.folder.resolve() for run in runs]
    common = Path(os.path.commonpath([folder.parent for folder in folders]))
    return {run.folder: str(folder.relative_to(common)) for run, folder in zip(runs, folders)}


@dataclass
class Row:
    """One line of the table: a run, or the runs that differ only in their seed."""

    values: dict[str, Any]  # swept key -> value
    statuses: list[str]
    metrics: dict[str, list[float]]  # metric -> values over the completed runs that have it
    folders: list[Path]
    names: list[str]  # the runs' names (run_names), one per folder

    @property
    def run(self) -> str:
        return ", ".join(self.names)

    @property
    def status(self) -> str:
        counts = {status: self.statuses.count(status) for status in dict.fromkeys(self.statuses)}
        if len(self.statuses) == 1:
            return self.statuses[0]
        return ", ".join(f"{count} {status}" for status, count in counts.items())

    def mean(self, metric: str) -> float:
        values = self.metrics.get(metric, [])
        return statistics.fmean(values) if values else math.nan

    def std(self, metric: str) -> float:
        values = self.metrics.get(metric, [])
        return statistics.stdev(values) if len(values) > 1 else math.nan

    def count(self, metric: str) -> int:
        return len(self.metrics.get(metric, []))


def build_rows(runs: list[Run], keys: list[str], metrics: list[str], by_seed: bool) -> list[Row]:
    group_keys = keys if by_seed else [key for key in keys if key != "seed"]
    names = run_names(runs)
    rows: dict[str, Row] = {}
    for run in runs:
        values = {key: run.config.get(key) for key in group_keys}
        # seeds are aggregated within a sweep (a folder of runs): two sweeps of the same keys stay two rows
        identity = json.dumps(values, sort_keys=True) + str(
            run.folder if by_seed or "seed" not in keys else run.folder.parent)
        row = rows.setdefault(identity, Row(values, [], {metric: [] for metric in metrics}, [], []))
        row.statuses.append(run.status)
        row.folders.append(run.folder)
        row.names.append(names[run.folder])
        if run.status == "completed":  # every metric is kept: the plots may need more than the table
            for metric, value in run.metrics.items():
                row.metrics.setdefault(metric, []).append(value)
    return list(rows.values())


def sort_rows(rows: list[Row], key: str, descending: bool) -> list[Row]:
    """Rows ordered by a metric or swept key; rows without a value (failed, running) come last."""
    def value(row: Row) -> Any:
        return row.mean(key) if key in row.metrics else row.values.get(key)

    def missing(row: Row) -> bool:
        return value(row) is None or (isinstance(value(row), float) and math.isnan(value(row)))

    present = sorted((row for row in rows if not missing(row)), key=lambda row: _order(value(row)),
                     reverse=descending)
    return present + [row for row in rows if missing(row)]


def _cell(row: Row, metric: str, aggregated: bool) -> str:
    mean = row.mean(metric)
    if math.isnan(mean):
        return ""
    if not aggregated:
        return f"{mean:.4f}"
    std = row.std(metric)
    spread = f" ± {std:.4f}" if not math.isnan(std) else ""
    return f"{mean:.4f}{spread} (n={row.count(metric)})"


def render(rows: list[Row], keys: list[str], metrics: list[str], aggregated: bool, fmt: str) -> str:
    header = ["run", *keys, "status", *metrics]
    if fmt == "json":
        return json.dumps([{"run": row.run, **row.values, "status": row.status,
                            **{metric: {"mean": _nan_to_none(row.mean(metric)), "std": _nan_to_none(row.std(metric)),
                                        "n": row.count(metric)} if aggregated else _nan_to_none(row.mean(metric))
                               for metric in metrics},
                            "folders": [str(folder) for folder in row.folders]} for row in rows], indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        extra = [f"{metric}_{part}" for metric in metrics for part in ("std", "n")] if aggregated else []
        writer.writerow([*header, *extra])
        for row in rows:
            writer.writerow([row.run, *(row.values.get(key) for key in keys), row.status,
                             *(_csv_number(row.mean(metric)) for metric in metrics),
                             *([value for metric in metrics for value in (_csv_number(row.std(metric)), row.count(metric))]
                               if aggregated else [])])
        return buffer.getvalue()
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.run, *(str(row.values.get(key)) for key in keys), row.status,
                 *(_cell(row, m, aggregated) for m in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def _csv_number(value: float) -> str:
    return "" if math.isnan(value) else repr(value)


def print_table(rows: list[Row], keys: list[str], metrics: list[str], aggregated: bool,
                console: Any = None) -> None:
    """The table on the terminal, never cutting a metric's name or number short: when the metrics do not
    fit beside the run, key and status columns, they are spread over several tables that each repeat
    those columns (as pandas prints a wide frame); the run and key columns fold their text onto more
    lines where the terminal is narrow. In pipes and files, whole rows (400 characters)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 400)
    labels = [[row.run, *(str(row.values.get(key)) for key in keys), row.status] for row in rows]
    cells = {metric: [_cell(row, metric, aggregated) for row in rows] for metric in metrics}
    widths = {metric: max([len(metric), *map(len, cells[metric])]) for metric in metrics}
    natural = sum(max([len(header), *(len(line[i]) for line in labels)]) + 3
                  for i, header in enumerate(["run", *keys, "status"]))
    room = console.width - 1 - min(natural, console.width // 2)  # the rest folds into its half
    chunks: list[list[str]] = []
    for metric in metrics:
        if chunks and sum(widths[m] + 3 for m in chunks[-1]) + widths[metric] + 3 <= room:
            chunks[-1].append(metric)
        else:
            chunks.append([metric])
    title = f"{sum(len(row.folders) for row in rows)} runs" + (", mean ± std over seeds" if aggregated else "")
    for number, chunk in enumerate(chunks or [[]], 1):
        table = Table(title=title + (f" ({number} of {len(chunks)})" if len(chunks) > 1 else ""))
        table.add_column("run", overflow="fold")
        for key in keys:
            table.add_column(key, overflow="fold")
        table.add_column("status", overflow="fold")
        for metric in chunk:
            table.add_column(metric, justify="right", no_wrap=True, min_width=widths[metric])
        for index, row in enumerate(rows):
            style = None if all(status == "completed" for status in row.statuses) else "red"
            table.add_row(*labels[index], *(cells[metric][index] for metric in chunk), style=style)
        console.print(table)


def plot(rows: list[Row], keys: list[str], metric: str, folder: Path, x_key: str | None,
         hue_key: str | None) -> list[Path]:
    """The plots this field draws from a sweep; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    candidates = [key for key in keys if key != "seed"]
    x_key = x_key or (candidates[0] if candidates else None)
    hue_key = hue_key or next((key for key in candidates if key != x_key), None)
    safe = metric.replace("/", "_")
    written = []
    if x_key is not None:
        figure, axis = plt.subplots(figsize=(6, 4))
        hues = list(dict.fromkeys(row.values.get(hue_key) for row in rows)) if hue_key else [None]
        x_values = sorted({row.values.get(x_key) for row in rows}, key=_order)
        numeric = all(isinstance(value, (int, float)) for value in x_values)
        for hue in hues:
            chosen = [row for row in rows if hue_key is None or row.values.get(hue_key) == hue]
            chosen = sorted((row for row in chosen if not math.isnan(row.mean(metric))),
                            key=lambda row: _order(row.values.get(x_key)))
            if not chosen:
                continue
            xs = [row.values.get(x_key) if numeric else x_values.index(row.values.get(x_key)) for row in chosen]
            errors = [0.0 if math.isnan(row.std(metric)) else row.std(metric) for row in chosen]
            axis.errorbar(xs, [row.mean(metric) for row in chosen], yerr=errors, marker="o", capsize=3,
                          label=f"{hue_key} = {hue}" if hue_key else None)
        if not numeric:
            axis.set_xticks(range(len(x_values)), [str(value) for value in x_values])
        elif log_scale(x_values):
            axis.set_xscale("log")
        axis.set_xlabel(x_key)
        axis.set_ylabel(metric)
        axis.set_title(f"{metric} against {x_key}")
        if hue_key:
            axis.legend()
        axis.grid(alpha=0.3)
        written.append(_save(figure, folder / f"{safe}_vs_{x_key}.png"))
    measured = [row for row in rows if not math.isnan(row.mean(metric))]
    if x_key is not None and hue_key is not None and measured:
        columns = sorted({row.values.get(x_key) for row in measured}, key=_order)
        lines = sorted({row.values.get(hue_key) for row in measured}, key=_order)
        grid = [[math.nan] * len(columns) for _ in lines]
        for row in measured:
            grid[lines.index(row.values.get(hue_key))][columns.index(row.values.get(x_key))] = row.mean(metric)
        figure, axis = plt.subplots(figsize=(1.2 * len(columns) + 2.5, 0.8 * len(lines) + 2))
        image = axis.imshow(grid, cmap="viridis", aspect="auto")
        axis.set_xticks(range(len(columns)), [str(value) for value in columns])
        axis.set_yticks(range(len(lines)), [str(value) for value in lines])
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                if not math.isnan(value):
                    axis.text(j, i, f"{value:.4g}", ha="center", va="center", color="white", fontsize=8)
        axis.set_xlabel(x_key)
        axis.set_ylabel(hue_key)
        axis.set_title(metric)
        figure.colorbar(image, ax=axis)
        written.append(_save(figure, folder / f"heatmap_{safe}_{x_key}_{hue_key}.png"))
    split = metric.split("/", 1)[0] if "/" in metric else "test"
    rate, distortion = f"{split}/kl", f"{split}/recon"
    points = [row for row in rows if not math.isnan(row.mean(rate)) and not math.isnan(row.mean(distortion))]
    if points:
        figure, axis = plt.subplots(figsize=(6, 4.5))
        axis.scatter([row.mean(rate) for row in points], [row.mean(distortion) for row in points])
        for row in points:
            label = ", ".join(f"{key.rsplit('.', 1)[-1]}={row.values.get(key)}" for key in candidates[:2])
            axis.annotate(label, (row.mean(rate), row.mean(distortion)), fontsize=7,
                          xytext=(3, 3), textcoords="offset points")
        axis.set_xlabel(f"rate: {rate} (nats)")
        axis.set_ylabel(f"distortion: {distortion}")
        axis.set_title("rate-distortion plane")
        axis.grid(alpha=0.3)
        written.append(_save(figure, folder / "rate_distortion.png"))
    return written


def log_scale(values: Sequence[float]) -> bool:
    """Whether an axis over these (numeric) values is logarithmic: positive values spanning a decade or more."""
    return min(values) > 0 and max(values) / min(values) >= 10


def plot_learning_curves(runs: list[Run], keys: list[str], folder: Path) -> Path | None:
    """`curves.png` in `folder`: the learning curves (`history.csv`) of the runs over each other, each
    named by its swept keys' values (by its folder without any); None when no run has a history."""
    from ae_lab.figures import learning_curves
    from ae_lab.history import read_history

    histories = {}
    for run in runs:
        rows = read_history(run.folder)
        name = ", ".join(f"{key.rsplit('.', 1)[-1]}={run.config.get(key)}" for key in keys) or run.folder.name
        if rows:
            histories[name if name not in histories else f"{name} ({run.folder.name})"] = rows
    if not histories:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    return learning_curves(histories, folder / "curves.png", title=f"Learning curves of {len(histories)} runs")


def _order(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def _save(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ae_lab.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders, sweep folders, or folders holding them")
    parser.add_argument("--metrics", help=f"comma-separated metric names (default: those of {', '.join(KEY_METRICS)} present)")
    parser.add_argument("--sort", help="a metric or swept key to sort by")
    parser.add_argument("--descending", action="store_true", help="sort from the largest value")
    parser.add_argument("--format", choices=("table", "markdown", "csv", "json"), default="table")
    parser.add_argument("--by-seed", action="store_true", help="one row per run, not aggregated over seeds")
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write PNG plots of the first metric into DIR")
    parser.add_argument("--x", help="swept key on the plots' x axis (default: the first swept key)")
    parser.add_argument("--hue", help="swept key drawn as one line per value (default: the second)")
    args = parser.parse_args(argv)

    missing = [str(path) for path in args.paths if not path.exists()]
    if missing:
        parser.error(f"no such folder: {', '.join(missing)}")
    runs = find_runs(args.paths)
    if not runs:
        parser.error(f"no run folders (holding run.json) under {', '.join(map(str, args.paths))}")
    mismatches = size_mismatches(runs)
    if mismatches:
        differing = "; ".join(f"{key}: " + ", ".join(f"{size:g} ({count} runs)" for size, count in sizes.items())
                              for key, sizes in mismatches.items())
        print(f"warning: these runs measured their disentanglement metrics on different sample sizes, so "
              f"those metrics are not comparable between them ({differing})", file=sys.stderr)
    present = {metric for run in runs for metric in run.metrics}
    metrics = args.metrics.split(",") if args.metrics else [m for m in KEY_METRICS if m in present]
    for metric in metrics:
        if metric not in present:
            near = closest(metric, present)
            parser.error(f"--metrics {metric!r} is not a metric of these runs"
                         + (f" (did you mean {near}?)" if near else f": they have {', '.join(sorted(present)) or 'none'}"))
    keys = swept_keys(runs)
    for key in (args.x, args.hue):
        if key is not None and key not in keys:
            parser.error(f"--x/--hue {key!r} is not a swept key: one of {', '.join(keys) or 'none'}")
    aggregated = "seed" in keys and not args.by_seed
    shown_keys = [key for key in keys if key != "seed" or args.by_seed]
    rows = build_rows(runs, keys, metrics, args.by_seed)
    if args.sort:
        if args.sort not in metrics and args.sort not in shown_keys:
            parser.error(f"--sort {args.sort!r}: not a shown metric or swept key")
        rows = sort_rows(rows, args.sort, args.descending)
    if args.format == "table":
        print_table(rows, shown_keys, metrics, aggregated)
    else:
        sys.stdout.write(render(rows, shown_keys, metrics, aggregated, args.format).rstrip("\n") + "\n")
    if args.plot:
        written = plot(rows, shown_keys, metrics[0], args.plot, args.x, args.hue) if metrics else []
        curves = plot_learning_curves(runs, keys, args.plot)
        for path in [*written, *([curves] if curves else [])]:
            print(f"plot: {path}", file=sys.stderr)
        if not written:
            why = ("no metric was chosen" if not metrics else
                   "no key that changes a result differs between these runs"
                   if not any(key != "seed" for key in shown_keys) else f"no completed run has {metrics[0]}")
            kl = f" (and no {metrics[0].split('/')[0]}/kl for a rate-distortion plane)" if metrics else ""
            print(f"--plot {args.plot}: no metric plot: {why}{kl}; "
                  + ("only the learning curves drawn" if curves else "nothing written (no run has a history.csv)"),
                  file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
