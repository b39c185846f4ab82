"""The published-setting presets (conf/experiment/): each composes, trains, and has its source's
architecture and learning-rate schedule (parameter counts and learning rates derived by hand from the
papers' descriptions, not from our configs)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
from omegaconf import OmegaConf

from ae_lab.data import build_datamodule
from ae_lab.module import Autoencoder
from paths import CONF, SHARED, needs_shared

PRESETS = sorted(path.stem for path in (CONF / "experiment").glob("*.yaml"))
MINIMAL_EVAL = ["logger=none", "eval=minimal", "eval.test_examples=64"]  # on top of `quick`


def _module(cfg, input_shape: tuple[int, ...] = (1, 28, 28)) -> Autoencoder:
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return Autoencoder.from_config(plain, input_shape)


def test_presets_exist():
    assert {"iwae_vae_mnist", "pythae_vae_mnist", "locatello_beta_vae", "classic_ae_mnist"} <= set(PRESETS)


@needs_shared
@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_trains(name, tmp_path, compose_config, train_in_process, quick):
    """A smoke test: each preset composes, trains a few batches and reports finite numbers (the presets'
    networks are checked against their papers below)."""
    data_root = [f"dataset.root={SHARED}"] if "root" in compose_config([f"experiment={name}"]).dataset else []
    metrics = train_in_process([f"experiment={name}", *data_root, *quick, *MINIMAL_EVAL], tmp_path)
    assert np.isfinite(metrics["test/loss"]) and np.isfinite(metrics["eval/psnr"])


def _parameters(module: Autoencoder) -> int:
    return sum(p.numel() for p in module.parameters())


def test_iwae_preset_is_burdas_784_200_200_50_tanh_network(compose_config):
    cfg = compose_config(["experiment=iwae_vae_mnist"])
    by_hand = (784 * 200 + 200) + (200 * 200 + 200) + (200 * 2 * 50 + 2 * 50) \
        + (50 * 200 + 200) + (200 * 200 + 200) + (200 * 784 + 784)
    module = _module(cfg)
    assert _parameters(module) == by_hand
    assert sum(type(m).__name__ == "Tanh" for m in module.modules()) == 4
    assert cfg.dataset.binarize == "dynamic" and cfg.dataset.batch_size == 20 and cfg.eval.iw_samples == 5000


def test_pythae_preset_is_the_784_400_40_relu_network(compose_config):
    cfg = compose_config(["experiment=pythae_vae_mnist"])
    by_hand = (784 * 400 + 400) + (400 * 80 + 80) + (40 * 400 + 400) + (400 * 784 + 784)
    assert _parameters(_module(cfg)) == by_hand
    assert cfg.dataset.binarize == "static" and cfg.dataset.batch_size == 100 and cfg.optim.lr == 1e-4
    assert cfg.trainer.max_epochs == 500 and cfg.eval.iw_samples == 200


def test_classic_preset_is_a_one_layer_sigmoid_autoencoder(compose_config):
    cfg = compose_config(["experiment=classic_ae_mnist"])
    assert _parameters(_module(cfg)) == (784 * 1000 + 1000) + (1000 * 784 + 784)


def test_locatello_preset_and_sweep(compose_config):
    cfg = compose_config(["experiment=locatello_beta_vae"])
    assert cfg.trainer.max_epochs == -1
    assert (cfg.model.latent_dim, cfg.dataset.batch_size, cfg.optim.lr, cfg.trainer.max_steps) == (10, 64, 1e-4, 300000)
    assert cfg.dataset.subsample is None and cfg.eval.disentanglement_train_size == 10000
    swept = compose_config(["+sweeps=locatello_beta"])
    assert swept.model == cfg.model
    params = OmegaConf.load(CONF.parent / "sweeps" / "locatello_beta.yaml").hydra.sweeper.params
    assert [float(b) for b in params["loss.beta"].split(",")] == [1, 2, 4, 6, 8, 16]


class LearningRates(pl.Callback):
    def __init__(self) -> None:
        self.by_epoch: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.by_epoch.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_iwae_preset_follows_burdas_learning_rate_schedule(compose_config):
    """Burda et al., section 5: 'for i = 0..7, 3^i epochs with learning rate 0.001 * 10^(-i/7)'."""
    cfg = compose_config(["experiment=iwae_vae_mnist"])
    digits = compose_config(["trainer=debug"])
    module = _module(cfg, input_shape=(1, 8, 8))
    recorder = LearningRates()
    epochs = 45
    trainer = pl.Trainer(max_epochs=epochs, limit_train_batches=1, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[recorder])
    trainer.fit(module, datamodule=build_datamodule(digits.dataset))
    stage_starts = np.cumsum([0] + [3 ** i for i in range(8)])
    expected = [1e-3 * 10 ** (-(np.searchsorted(stage_starts, epoch, side="right") - 1) / 7) for epoch in range(epochs)]
    np.testing.assert_allclose(recorder.by_epoch, expected, rtol=1e-9)
    assert math.isclose(recorder.by_epoch[-1], 1e-3 * 10 ** (-4 / 7))  # epochs 40..120: stage 4


@needs_shared
def test_fidelity_report_shows_each_runs_recorded_command_and_numbers(tmp_path, read_json, run_cli, quick):
    """benchmarks/fidelity.py --report: the completed run is archived, and the report has a row per
    archived setting and budget, its figures from metrics.json and its command from the run's own record."""
    import subprocess
    import sys

    from paths import ROOT

    run = tmp_path / "runs" / "classic_dae"
    done = run_cli(["experiment=classic_ae_mnist", f"dataset.root={SHARED}", "noise=masking", *quick, *MINIMAL_EVAL,
                    f"hydra.run.dir={run}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    output = tmp_path / "FIDELITY.md"
    report = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fidelity.py"), "--report", "--runs",
                             str(tmp_path / "runs"), "--archive", str(tmp_path / "archive"), "--output", str(output)],
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stderr[-3000:]
    [row] = [line for line in output.read_text().splitlines() if line.startswith("| classic_dae |")]
    gain = read_json(run / "metrics.json")["eval/psnr_gain"]
    assert f"gain {gain:+.2f} dB" in row
    assert "`python -m ae_lab experiment=classic_ae_mnist dataset.root=DATA noise=masking trainer.max_epochs=1" in row
    assert "| cpu | M1 |" in row and read_json(tmp_path / "archive" / "cpu" / "classic_dae" / "metrics.json") == \
        read_json(run / "metrics.json")


def test_fidelity_report_puts_the_pythae_control_beside_our_run(tmp_path, read_json):
    """The control run (pythae's own trainer on our arrays, archived beside our full-budget run): its NLL
    and ours in one table, from the archived files, and the verdict follows their difference."""
    import json
    import shutil
    import subprocess
    import sys

    from paths import ROOT

    archive = tmp_path / "archive"
    shutil.copytree(ROOT / "benchmarks" / "fidelity" / "full" / "pythae_vae_mnist", archive / "full" / "pythae_vae_mnist")
    control = archive / "full" / "pythae_vae_mnist" / "pythae_control"

    def report() -> str:
        output = tmp_path / "FIDELITY.md"
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fidelity.py"), "--report", "--budget", "full",
                               "--runs", str(tmp_path / "no-runs"), "--archive", str(archive), "--output", str(output)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        return output.read_text()

    ours = read_json(archive / "full" / "pythae_vae_mnist" / "metrics.json")["eval/iw_nll"]
    theirs = read_json(control / "result.json")
    text = report()
    assert f"| ae_lab (`experiment=pythae_vae_mnist`) | {ours:.2f} |" in text
    assert f"| pythae's trainer | {theirs['test_nll_k200']:.2f} " in text
    assert f"Difference: {ours - theirs['test_nll_k200']:+.2f} nats; the two trainers agree" in text
    (control / "result.json").write_text(json.dumps({**theirs, "test_nll_k200": ours - 2.5}))
    assert "the trainers differ by more than a nat" in report()


def test_fidelity_sweep_section_says_whether_the_trend_appears_and_what_the_budget_would_cost():
    import sys

    from paths import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from fidelity import budget_lines

    summary = {"jobs": 18, "steps_per_job": 3000, "training_seconds": 8640.0,
               "rank_correlation_with_beta": {"eval/mig": {"rho": 0.8, "p": 0.001, "jobs": 18},
                                              "eval/factor_vae": {"rho": 0.3, "p": 0.2, "jobs": 18}}}
    mig, factor, budget, _ = budget_lines(summary)
    assert "ρ = +0.800" in mig and "appears at this budget" in mig and "does not" not in mig
    assert "does not appear" in factor
    # 300,000 / 3,000 = 100 times the 0.1 day measured
    assert "3000 steps per run, 1.00% of the source's 300,000" in budget and "about 10 days" in budget
