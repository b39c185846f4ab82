"""Test helper, not part of ae_lab: Python runs this at start-up when this folder is on PYTHONPATH.

With AE_LAB_STALL_AFTER_STEP=N in the environment, a training process stops making progress once
training step N has ended (and its checkpoints, if any, are written; an ensemble group's training
process: once its group checkpoint at step N is written): it touches the file named by
AE_LAB_STALL_MARKER and waits while that file exists, so a test can kill or signal it at a known point
through the real command line, and let it go on by deleting the file. A process stops there once; a run
resumed past step N (a requeued job inherits the environment) does not stop again.
"""

import os

if os.environ.get("AE_LAB_STALL_AFTER_STEP"):
    import time
    from pathlib import Path

    from ae_lab.ensemble.group import GroupTrainer
    from ae_lab.module import Autoencoder

    STALL_AFTER = int(os.environ["AE_LAB_STALL_AFTER_STEP"])
    _stalled = []  # once per process: a group checkpoint written again at step N (on a signal) goes on

    def _stall() -> None:
        if _stalled:
            return
        _stalled.append(True)
        marker = Path(os.environ["AE_LAB_STALL_MARKER"])
        marker.touch()
        while marker.exists():
            time.sleep(0.1)

    def _stall_after_step(self, outputs, batch, batch_idx):  # called after the callbacks' hooks
        if self.global_step == STALL_AFTER:
            _stall()

    def _stall_after_group_checkpoint(self, save=GroupTrainer.save_checkpoint):
        save(self)
        if self.progress.global_step == STALL_AFTER:
            _stall()

    Autoencoder.on_train_batch_end = _stall_after_step
    GroupTrainer.save_checkpoint = _stall_after_group_checkpoint
