"""Lightning's W&B logger, with its run started in a background thread so that training does not wait.

`wandb.init` takes a second or more even offline (wandb 0.31: most of it importing wandb's own modules,
which gets slower the more modules the process holds, and listing the installed packages), and a run
started it just before its first step. `WandbLogger.start` runs it in a thread instead, while the first
steps train; the run's id is drawn up front (as W&B draws one), so that run.json can record it at once.
Everything that uses the W&B run (`experiment`, and through it every logged value) waits for the start
to end, and gets its error if it failed; `wait` waits without starting a run.
"""

from __future__ import annotations

import random
import string
import threading
from typing import Any

from pytorch_lightning.loggers import WandbLogger as LightningWandbLogger


def new_run_id() -> str:
    """A W&B run id as W&B draws one (`wandb.util.generate_id`: 8 of a-z and 0-9), without importing wandb."""
    return "".join(random.SystemRandom().choices(string.ascii_lowercase + string.digits, k=8))


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger (same arguments) whose run `start` begins in the background; without an
    `id` (a new run) it draws one."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{**kwargs, "id": kwargs.get("id") or new_run_id()})
        self._start: threading.Thread | None = None
        self._start_error: BaseException | None = None

    def start(self) -> str:
        """Begin the W&B run (`wandb.init`) in a background thread, unless it has begun; return its id."""
        if self._experiment is None and self._start is None:
            self._start = threading.Thread(target=self._init, name="wandb-start", daemon=True)
            self._start.start()
        return self._id

    def _init(self) -> None:
        try:
            LightningWandbLogger.experiment.fget(self)
        except BaseException as error:  # noqa: BLE001 - handed to the thread that uses the run
            self._start_error = error

    def wait(self) -> None:
        """Wait for a start under way to end; raise its error if it failed."""
        if self._start is not None:
            self._start.join()
            self._start = None
        error, self._start_error = self._start_error, None
        if error is not None:
            raise error

    @property
    def experiment(self) -> Any:
        self.wait()
        return super().experiment
