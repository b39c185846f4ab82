"""The launchers where they meet Hydra's sweepers: the sweeper's compositions reach the launcher through
`ComposedOnce` (hydra_plugins/ae_lab_plugins/gpu_queue.py) only while Hydra's sweeper still composes each job
with the same call the launcher makes (guarded here against a Hydra upgrade); an Optuna search with
`n_jobs=K` trains each batch of K trials as ensembles under the vectorized launcher."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
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


def test_an_optuna_search_trains_each_batch_of_n_jobs_trials_as_ensembles(tmp_path, monkeypatch, run_cli, read_json):
    """8 trials in batches of 4; the search varies the latent size between two values (a structure key:
    each batch splits into at most two groups, by latent size) and β and the learning rate (per member)."""
    import optuna

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    sweep = tmp_path / "study"
    done = run_cli(["-m", "hparams_search=vae_elbo", "hydra/launcher=vectorized", "hydra.sweeper.n_jobs=4",
                    "hydra.sweeper.n_trials=8", "hydra.sweeper.params={model.latent_dim:'choice(2,3)'}",
                    "model.hidden_dims=[16]", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                    "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "eval=minimal", "logger=none",
                    "trainer.enable_progress_bar=false", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (done.stdout + done.stderr).count("Vectorized launcher: 4 jobs to run in ") == 2  # once per batch
    trials = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(trials) == 8
    groups: dict[str, list[tuple[int, int]]] = {}  # group -> (batch, latent size) of each member
    for trial in trials:
        record = read_json(trial / "run.json")
        assert record["status"] == "completed"
        number = int(trial.name.split("_")[0])
        latent_dim = int(next(o for o in (trial / ".hydra" / "overrides.yaml").read_text().splitlines()
                              if "model.latent_dim=" in o).split("=")[-1])
        groups.setdefault(record["ensemble"]["group"], []).append((number // 4, latent_dim))
    # a group is one batch's trials of one latent size, and no two groups share a batch and latent size
    assert all(len(set(members)) == 1 for members in groups.values())
    keys = [members[0] for members in groups.values()]
    assert len(keys) == len(set(keys))
    assert max(len(members) for members in groups.values()) >= 2  # (4 trials, 2 latent sizes: one shares)
    # the study got each trial's objective, the member's val/elbo
    study = optuna.load_study(study_name="vae_elbo", storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert sorted(t.value for t in study.trials) == sorted(read_json(t / "metrics.json")["val/elbo"] for t in trials)


@pytest.mark.parametrize("accelerator, gpu_line", [("gpu", "#SBATCH --gpus-per-node=1\n"),
                                                   ("cuda", "#SBATCH --gpus-per-node=1\n"), ("cpu", None),
                                                   ("auto", None)])
def test_a_groups_slurm_job_asks_for_one_gpu_where_the_trainer_asks_for_gpus(tmp_path, accelerator, gpu_line):
    """The sbatch script of a group's job (`hydra.launcher.backend=slurm`), with the SLURM keys' defaults."""
    from omegaconf import OmegaConf

    from hydra_plugins.ae_lab_plugins.slurm_launcher import group_request, slurm_executor
    from hydra_plugins.ae_lab_plugins.vectorized_launcher import SlurmGroupConf

    keys = {**OmegaConf.to_container(OmegaConf.structured(SlurmGroupConf)), "submitit_folder": str(tmp_path)}
    executor = slurm_executor(keys)
    executor.update_parameters(**group_request("b1a8baa3-e2418ea2", accelerator))
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit", "uid")  # what sbatch gets
    for line in ("#SBATCH --job-name=b1a8baa3-e2418ea2\n", "#SBATCH --nodes=1\n", "#SBATCH --ntasks-per-node=1\n",
                 "#SBATCH --cpus-per-task=8\n", "#SBATCH --mem=32GB\n", "#SBATCH --time=240\n",
                 "#SBATCH --signal=USR2@120\n"):
        assert line in script, line
    assert (gpu_line in script) if gpu_line else ("gpu" not in script)
