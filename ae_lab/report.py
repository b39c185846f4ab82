"""What a finished run prints: where its folder is and its final metrics."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def print_summary(run_dir: Path, metrics: dict[str, float]) -> None:
    console = Console()
    table = Table(title="final metrics")
    table.add_column("metric")
    for split in ("train", "val", "test"):
        table.add_column(split, justify="right")
    names = sorted({key.split("/", 1)[1] for key in metrics if "/" in key})
    for name in names:
        table.add_row(name, *(f"{metrics[f'{split}/{name}']:.4f}" if f"{split}/{name}" in metrics else ""
                              for split in ("train", "val", "test")))
    console.print(table)
    console.print(f"run folder: {run_dir}", soft_wrap=True)
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    if len(offline) == 1:
        console.print(f"W&B run saved offline; upload it with: wandb sync {offline[0]}", soft_wrap=True)
    elif offline:  # a resumed run: one folder per attempt, all of the same W&B run
        console.print(f"W&B run saved offline in {len(offline)} parts (it was resumed); upload them, in order, "
                      f"into the one run with: wandb sync {run_dir / 'wandb'}/offline-run-*", soft_wrap=True)
