"""The launchers' shared components (hydra_plugins/ae_lab_plugins/gpu_queue.py) where Hydra's behaviour is
assumed: the sweeper's compositions reach the launcher through `ComposedOnce` only while Hydra's sweeper
still composes each job with the same call the launcher makes. Guards that assumption against a Hydra
upgrade."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

from hydra.core.config_loader import ConfigLoader
from hydra.plugins.sweeper import Sweeper

from hydra_plugins.ae_lab_plugins.gpu_queue import ComposedOnce


class _CountingLoader:
    """A config loader that composes a fresh object per call and counts the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, tuple[str, ...]]] = []

    def load_sweep_config(self, master_config, sweep_overrides):
        self.calls.append((master_config, tuple(sweep_overrides)))
        return {"composed": len(self.calls)}


def test_the_sweepers_composition_of_each_job_is_the_one_the_launcher_gets():
    loader, master = _CountingLoader(), object()
    ComposedOnce.install(SimpleNamespace(config_loader=loader))
    ComposedOnce.install(SimpleNamespace(config_loader=loader))  # installing twice wraps once
    batch = [["seed=0"], ["seed=1"]]
    # Hydra's own validation of a batch, as BasicSweeper runs it before it hands the batch to the launcher
    sweeper = SimpleNamespace(hydra_context=SimpleNamespace(config_loader=loader), config=master)
    Sweeper.validate_batch_is_legal(sweeper, batch)
    wrapped = loader.load_sweep_config
    assert isinstance(wrapped, ComposedOnce) and not isinstance(wrapped.load, ComposedOnce)
    # the sweeper composed each job, with the arguments the launcher passes, and each is kept
    assert loader.calls == [(master, ("seed=0",)), (master, ("seed=1",))] and len(wrapped.kept) == 2
    # the launcher's call (gpu_queue.SweepJobs._job) gets those compositions, composing nothing again
    composed = [wrapped(master_config=master, sweep_overrides=overrides) for overrides in batch]
    assert composed == [{"composed": 1}, {"composed": 2}] and not wrapped.kept
    # a third call with the same arguments composes anew (nothing is kept for ever)
    assert wrapped(master_config=master, sweep_overrides=["seed=0"]) == {"composed": 3}


def test_hydras_config_loader_still_takes_the_keywords_the_wrapper_passes():
    parameters = list(inspect.signature(ConfigLoader.load_sweep_config).parameters)
    assert parameters[1:] == ["master_config", "sweep_overrides"]
