"""What a run imports before it trains, and the W&B run that starts while it trains."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from paths import ROOT

# used only after training (the evaluation) or by the W&B run's start, which runs in the background
# (Lightning itself imports matplotlib and scipy)
AFTER_TRAINING = ("sklearn", "wandb", "ae_lab.evaluation", "ae_lab.figures")


def _imported(code: str) -> list[str]:
    """The modules of AFTER_TRAINING, torch and Lightning that a fresh Python holds after `code`."""
    probe = (f"{code}\nimport json, sys\n"
             f"print(json.dumps(sorted(m for m in {(*AFTER_TRAINING, 'torch', 'pytorch_lightning')!r} "
             "if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_a_run_reaches_its_first_step_without_the_evaluation_scikit_learn_or_wandb():
    """What the run imports and reads before its first step (the run's module, the digits) leaves the
    evaluation's libraries out: they are imported after training."""
    code = "import ae_lab.run, ae_lab.__main__\nfrom ae_lab.data.digits import read_digits\nread_digits()"
    assert _imported(code) == ["pytorch_lightning", "torch"]


def test_help_imports_neither_torch_nor_what_training_needs():
    code = "import runpy, sys\nsys.argv = ['ae_lab', '--help']\nrunpy.run_module('ae_lab', run_name='__main__')"
    assert _imported(code) == []


def test_the_digits_are_those_scikit_learn_gives():
    import numpy as np
    from sklearn.datasets import load_digits

    from ae_lab.data.digits import read_digits

    images, labels = read_digits()
    digits = load_digits()
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.array_equal(images, digits.images) and np.array_equal(labels, digits.target)


class _SlowStart:
    """Stands in for Lightning's `WandbLogger.experiment` (wandb.init): it waits for `go`, then returns
    `run` or raises `error`, and counts the starts."""

    def __init__(self, error: Exception | None = None) -> None:
        self.go, self.calls, self.error, self.run = threading.Event(), 0, error, object()

    def start(self, logger):
        if logger._experiment is not None:  # started: Lightning's property returns the run
            return logger._experiment
        self.calls += 1
        assert self.go.wait(timeout=60)
        if self.error is not None:
            raise self.error
        logger._experiment = self.run
        return self.run


@pytest.fixture
def slow_start(monkeypatch):
    from pytorch_lightning.loggers import WandbLogger

    def install(error: Exception | None = None) -> _SlowStart:
        start = _SlowStart(error)
        monkeypatch.setattr(WandbLogger, "experiment", property(start.start))
        return start

    return install


def test_the_wandb_run_starts_in_the_background_and_its_users_wait_for_it(slow_start, tmp_path):
    from ae_lab.wandb_logger import WandbLogger

    start = slow_start()
    logger = WandbLogger(save_dir=str(tmp_path), mode="offline")
    run_id = logger.start()  # returns while wandb.init is still blocked
    assert len(run_id) == 8 and run_id.isalnum() and run_id == run_id.lower() and logger.version == run_id
    assert logger.start() == run_id  # started once
    start.go.set()
    assert logger.experiment is start.run and start.calls == 1


def test_a_failed_background_start_fails_the_first_use_of_the_run(slow_start, tmp_path):
    from ae_lab.wandb_logger import WandbLogger

    start = slow_start(RuntimeError("no W&B today"))
    logger = WandbLogger(save_dir=str(tmp_path), mode="offline", id="given12")
    assert logger.start() == "given12"
    start.go.set()
    with pytest.raises(RuntimeError, match="no W&B today"):
        logger.wait()
