"""A run's learning curves, kept by the run itself: `history.csv` and `figures/curves.png`.

Both engines fill the same rows through `add_row`: the Lightning Trainer through `HistoryLogger` (the
epoch values it logs) and `HistoryRecorder` (the step losses, and the rows inside every checkpoint, so a
resumed run's history is whole), the vectorised ensemble per member (ae_lab/ensemble/group.py); `History`
writes them. Columns of `history.csv`, one row per (epoch, step) at which something was logged:

- `epoch`, `step`: the epoch (from 0) and the global step (from 0): for an epoch's values the epoch's
  last step, for `train/loss_step` the step whose batch it is;
- `train/<term>`, `val/<term>`: the epoch means of every loss term (`val/*` only after a validation);
- `train/loss_step`: the training loss of the batch of every `trainer.log_every_n_steps`-th step (steps
  n - 1, 2n - 1, ..., Lightning's logging steps), before that step's update;
- `scheduled/<weight>` (scheduled loss weights at the epoch's last step), `pretrain/<layer>_<split>`.

A cell is empty where its key was not logged at that row.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only

from ae_lab.storage import atomic_write

FILE = "history.csv"
STEP_LOSS = "train/loss_step"
# what sees every row as it is added (the W&B run: ae_lab.tracking.WandbHistory): epoch, step, values
Sink = Callable[[int, int, dict[str, float]], None]


def takes_step_loss(step: int, every_n_steps: int) -> bool:
    """Whether the training loss of global step `step` (from 0) goes into the history: Lightning's rule
    for `log_every_n_steps`."""
    return (step + 1) % every_n_steps == 0


def add_row(rows: list[dict[str, float]], epoch: int, step: int, values: dict[str, float]) -> None:
    """Add `values` logged at (`epoch`, `step`) to `rows` (in the order logged): into the last row when
    it is of the same epoch and step, else as a new row."""
    if rows and rows[-1]["epoch"] == epoch and rows[-1]["step"] == step:
        rows[-1].update(values)
    else:
        rows.append({"epoch": epoch, "step": step, **values})


def columns(rows: list[dict[str, float]]) -> list[str]:
    """`epoch`, `step`, then `train/*`, `val/*` and the other keys, each group sorted."""
    keys = {key for row in rows for key in row} - {"epoch", "step"}
    group = {"train": 0, "val": 1}
    return ["epoch", "step", *sorted(keys, key=lambda key: (group.get(key.split("/")[0], 2), key))]


class History:
    """The rows of one run (see the module docstring), the `sink` told of each row added."""

    def __init__(self, rows: list[dict[str, float]] | None = None, sink: Sink | None = None) -> None:
        self.rows = rows if rows is not None else []
        self.sink = sink

    def add(self, epoch: int, step: int, values: dict[str, float]) -> None:
        add_row(self.rows, epoch, step, values)
        if self.sink is not None:
            self.sink(epoch, step, values)

    def resend(self) -> None:
        """Tell the sink of every row again (a resumed run's W&B run, which keeps what it holds already)."""
        if self.sink is not None:
            for row in self.rows:
                self.sink(int(row["epoch"]), int(row["step"]), {k: v for k, v in row.items() if k not in ("epoch", "step")})

    def write(self, run_dir: Path) -> Path:
        """`history.csv` in `run_dir`, written atomically."""
        text = io.StringIO()
        table = csv.DictWriter(text, fieldnames=columns(self.rows), lineterminator="\n")
        table.writeheader()
        table.writerows(self.rows)
        path = run_dir / FILE
        atomic_write(path, lambda file: file.write(text.getvalue().encode()))
        return path


def read_history(run_dir: Path) -> list[dict[str, float]]:
    """The rows of `run_dir/history.csv` (empty cells left out); [] when the run has none."""
    path = run_dir / FILE
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        return [{key: int(value) if key in ("epoch", "step") else float(value) for key, value in row.items() if value}
                for row in csv.DictReader(file)]


def best_epoch(rows: list[dict[str, float]]) -> int | None:
    """The epoch of the lowest finite `val/loss` (the first of equals: the best checkpoint's rule)."""
    best = None
    for row in rows:
        value = row.get("val/loss")
        if value is not None and math.isfinite(value) and (best is None or value < best[1]):
            best = (int(row["epoch"]), value)
    return None if best is None else best[0]


class HistoryLogger(Logger):
    """A Lightning logger that adds what the Trainer logs during fit (epoch means, scheduled weights) to a
    `History`, and writes `history.csv` into `run_dir` after each (Lightning's `save`, rank 0). The
    Trainer's evaluations after fit are not logged (see ae_lab/run.py)."""

    def __init__(self, history: History, run_dir: Path) -> None:
        super().__init__()
        self.history, self.run_dir = history, run_dir

    @property
    def name(self) -> str:
        return "history"

    @property
    def version(self) -> str:
        return ""

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        values = {key: float(value) for key, value in metrics.items() if key != "epoch"}
        self.history.add(int(metrics["epoch"]), int(step), values)

    @rank_zero_only
    def save(self) -> None:
        self.history.write(self.run_dir)


class HistoryRecorder(pl.Callback):
    """Adds the step losses to the run's `History` (rank 0) and keeps its rows in every checkpoint: a
    resumed run goes on from the checkpoint's rows, and its sink is told of them again."""

    def __init__(self, history: History, every_n_steps: int) -> None:
        self.history, self.every_n_steps = history, every_n_steps
        self.loaded: list[dict[str, float]] | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step - 1
        if trainer.is_global_zero and takes_step_loss(step, self.every_n_steps):
            self.history.add(trainer.current_epoch, step, {STEP_LOSS: float(outputs["loss"])})

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The epoch's train means and scheduled weights, as the module logs them just after this: the
        checkpoint taken at the epoch's end holds them then, and a run resumed from it does not log
        them again (Lightning 2.6 resumes it past the epoch's end)."""
        values = {key: float(value) for key, value in {**pl_module.epoch_values("train"),
                                                        **pl_module.scheduled_values()}.items()}
        if trainer.is_global_zero:  # (computed on every rank: under DDP the means are gathered)
            self.history.add(trainer.current_epoch, trainer.global_step - 1, values)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A resumed fit: from the checkpoint's rows. (Lightning also hands every callback its state when
        it loads a checkpoint to evaluate it after fit: that is not taken.)"""
        if self.loaded is not None and trainer.is_global_zero:
            self.history.rows[:] = self.loaded
            self.history.resend()
        self.loaded = None

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(row) for row in self.history.rows]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded = state_dict["rows"]
