"""Config composition, the shared sweep keys, and bad input refused before training."""

from __future__ import annotations

import inspect

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from ae_lab.checks import validate
from ae_lab.config import TrainerConfig
from ae_lab.errors import ConfigError
from paths import CONF

GROUP_OPTIONS = {group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
                 for group in ("model", "loss", "noise", "dataset", "trainer", "logger")}


@pytest.mark.parametrize("group", sorted(GROUP_OPTIONS))
def test_sweep_keys_exist_in_every_composition(group, compose_config):
    for option in GROUP_OPTIONS[group]:
        cfg = compose_config([f"{group}={option}"])
        for key in ("model.latent_dim", "loss.beta", "loss.sparsity_weight", "seed"):
            assert OmegaConf.select(cfg, key) is not None, f"{key} missing with {group}={option}"


def test_vae_sets_gaussian_head_and_beta(compose_config):
    assert compose_config([]).loss.beta == 0
    vae = compose_config(["model=vae"])
    assert vae.model.latent == "gaussian" and vae.loss.beta == 1
    beta_vae = compose_config(["model=vae", "loss.beta=4"])
    assert beta_vae.loss.beta == 4
    # loss presets compose with either model
    assert compose_config(["model=vae", "loss=contractive"]).loss.contractive_weight > 0


def test_every_trainer_key_is_a_lightning_trainer_argument():
    arguments = inspect.signature(pl.Trainer.__init__).parameters
    for key in TrainerConfig.__dataclass_fields__:
        assert key in arguments, f"trainer.{key} is not a pytorch_lightning.Trainer argument"


def test_trainer_settings_reach_the_trainer(compose_config):
    cfg = compose_config(["trainer.gradient_clip_val=0.5", "trainer.precision=bf16-mixed",
                          "trainer.limit_train_batches=3", "trainer.accumulate_grad_batches=2",
                          "trainer.max_epochs=7", "trainer.accelerator=cpu"])
    trainer = pl.Trainer(**OmegaConf.to_container(cfg.trainer), logger=False)
    assert trainer.gradient_clip_val == 0.5
    assert trainer.precision == "bf16-mixed"
    assert trainer.limit_train_batches == 3
    assert trainer.accumulate_grad_batches == 2
    assert trainer.max_epochs == 7


BAD_VALUES = [
    (["loss.beta=-1"], "loss.beta"),
    (["model.latent_dim=0"], "model.latent_dim"),
    (["loss.sparsity_target=1.5"], "loss.sparsity_target"),
    (["loss.sparsity_target=0"], "loss.sparsity_target"),
    (["noise=gaussian", "noise.std=-0.1"], "noise.std"),
    (["noise=masking", "noise.p=1.2"], "noise.p"),
    (["loss.sparsity_weight=-0.5"], "loss.sparsity_weight"),
    (["loss.contractive_weight=-1"], "loss.contractive_weight"),
    (["loss.contractive_projections=0"], "loss.contractive_projections"),
    (["dataset.batch_size=0"], "dataset.batch_size"),
    (["dataset.val_fraction=0.9"], "dataset.val_fraction"),
    (["optim.lr=0"], "optim.lr"),
    (["trainer.max_epochs=0"], "trainer.max_epochs"),
    (["trainer.max_steps=-2"], "trainer.max_steps"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val"),
    (["checkpoint_every_n_steps=-1"], "checkpoint_every_n_steps"),
    (["model.hidden_dims=[64,0]"], "model.hidden_dims"),
    (["model.kernel_size=8"], "model.kernel_size"),
    (["model.fc_dims=[0]"], "model.fc_dims"),
    (["loss=sparse_kl", "model=vae"], "loss.sparsity"),
    (["loss.sparsity=kl", "loss.sparsity_weight=1"], "loss.sparsity"),
    (["+model.latnt_dim=3"], "model.latnt_dim"),  # `+` adds a key even to a typed config
    (["+loss.beta_schedule.stpes=3"], "loss.beta_schedule.stpes"),
]


@pytest.mark.parametrize("overrides,key", BAD_VALUES)
def test_bad_values_are_refused_naming_the_key(overrides, key, compose_config):
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}="):
        validate(compose_config(overrides), (1, 8, 8))


# values Lightning's Trainer refuses, each refused by asking Lightning (ae_lab/trainer_check.py)
LIGHTNING_REFUSES = [
    (["trainer.precision=7"], "trainer.precision=7 is not allowed by Lightning: Precision 7 is invalid. Allowed"),
    (["trainer.devices=0"], "trainer.devices=0 is not allowed by Lightning"),
    (["trainer.strategy=foo"], "trainer.strategy='foo' is not allowed by Lightning: .*strategies: auto, ddp,"),
    (["trainer.gradient_clip_algorithm=foo"], "trainer.gradient_clip_algorithm='foo' is not allowed by Lightning"),
    (["trainer.limit_val_batches=2.5"], "trainer.limit_val_batches=2.5 is not allowed by Lightning"),
    (["trainer.num_nodes=0"], "trainer.num_nodes=0 is not allowed by Lightning"),
    (["trainer.accelerator=foo"], "trainer.accelerator='foo' is not allowed by Lightning: .*available on this machine"),
]


@pytest.mark.parametrize("overrides,message", LIGHTNING_REFUSES)
def test_values_lightning_refuses_are_refused_naming_the_key(overrides, message, compose_config):
    with pytest.raises(ConfigError, match=f"^{message}"):
        validate(compose_config(overrides), (1, 8, 8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a machine with a GPU, accelerator=gpu is allowed")
def test_a_gpu_accelerator_without_a_gpu_blames_the_accelerator_not_the_devices(compose_config):
    for overrides in (["trainer=gpu"], ["trainer.accelerator=gpu", "trainer.devices=2"]):
        with pytest.raises(ConfigError, match=r"^trainer[.]accelerator='gpu' is not allowed .*available on this "
                                              r"machine: auto, cpu\)$"):
            validate(compose_config(overrides), (1, 8, 8))


def test_a_precision_lightning_substitutes_is_said(compose_config):
    notes = validate(compose_config(["trainer.precision=16", "trainer.accelerator=cpu"]), (1, 8, 8))
    assert notes == ["trainer.precision=16 runs as bf16-mixed on this machine's CPU "
                     "(Lightning's substitute: it has no 16-mixed there)"]
    assert validate(compose_config(["trainer.precision=bf16-mixed", "trainer.accelerator=cpu"]), (1, 8, 8)) == []


def test_conv_deeper_than_the_image_allows_is_refused(compose_config):
    cfg = compose_config(["model.arch=conv", "model.channels=[8,8,8,8]"])
    with pytest.raises(ConfigError, match="at most 3 stride-2 conv layers with kernel_size=3 for 8x8"):
        validate(cfg, (1, 8, 8))
    validate(cfg, (1, 28, 28))  # four halvings of 28 are fine


def test_online_wandb_without_a_key_is_refused(monkeypatch, tmp_path, compose_config):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(ConfigError, match="logger.mode='online'.*wandb login"):
        validate(compose_config(["logger.mode=online"]), (1, 8, 8))


def test_beta_without_gaussian_head_is_allowed_but_warned(compose_config):
    warnings = validate(compose_config(["loss.beta=2"]), (1, 8, 8))
    assert any("loss.beta" in warning and "model.latent=gaussian" in warning for warning in warnings)
    assert validate(compose_config(["model=vae", "loss.beta=2"]), (1, 8, 8)) == []


CLI_BAD_INPUTS = [
    (["loss.beta=-1"], "loss.beta"),
    (["model.latent_dim=0"], "model.latent_dim"),
    (["loss.sparsity_target=1.5"], "loss.sparsity_target"),
    (["noise=gaussian", "noise.std=-0.1"], "noise.std"),
    (["model.arch=foo"], "model.arch"),
    (["model.no_such_key=1"], "model.no_such_key"),
    (["+model.latnt_dim=3"], "did you mean model.latent_dim?"),
    (["noise=gaussian", "noise.p=0.3"], "noise.p"),
    (["model=nonexistent"], "model=nonexistent"),
    (["model.latent_dim=eight"], "model.latent_dim"),
    (["model.arch=conv", "model.channels=[8,8,8,8]"], "model.channels"),
    # more GPUs than there are (Lightning's refusal, asked before anything is written): the devices are at
    # fault, or the accelerator on a machine without a GPU
    (["trainer.accelerator=gpu", f"trainer.devices={torch.cuda.device_count() + 1}"],
     "trainer.devices=" if torch.cuda.is_available() else "trainer.accelerator='gpu'"),
    (["hydra.run.dir=a_file/run"], "hydra.run.dir"),
]


@pytest.fixture(scope="module")
def refusals(tmp_path_factory, run_cli_many) -> dict[tuple[str, ...], tuple]:
    """Each command line of CLI_BAD_INPUTS run in a folder of its own, which holds a file where a run
    folder's parent should be: its result and folder, by its overrides. Each is a process of its own, all
    forked after one start-up (`run_cli_many`); `test_cli_refuses_a_folder_that_already_holds_a_run` runs
    `python -m ae_lab` itself."""
    folders = [tmp_path_factory.mktemp("refused") for _ in CLI_BAD_INPUTS]
    for folder in folders:
        (folder / "a_file").write_text("a file where a run folder's parent should be\n")
    results = run_cli_many([(overrides, folder) for (overrides, _), folder in zip(CLI_BAD_INPUTS, folders)])
    return {tuple(overrides): (done, folder)
            for (overrides, _), done, folder in zip(CLI_BAD_INPUTS, results, folders)}


@pytest.mark.parametrize("overrides,key", CLI_BAD_INPUTS)
def test_cli_refuses_bad_input_before_training(overrides, key, refusals):
    done, folder = refusals[tuple(overrides)]
    assert done.returncode == 2
    assert key in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert len(done.stderr.strip().splitlines()) <= 12  # a message, not a wall
    assert not (folder / "outputs").exists(), "a refused run must not create a run folder"


def test_cli_refuses_a_folder_that_already_holds_a_run(tmp_path, run_cli):
    run_dir = tmp_path / "earlier"
    run_dir.mkdir()
    (run_dir / "run.json").write_text('{"status": "completed"}')
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("precious: true\n")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    done = run_cli(["trainer=debug", "logger=none", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert done.returncode == 2
    assert "already holds a run" in done.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_quick_is_the_debug_trainer_written_as_keys(compose_config, quick):
    """The suite's smallest run (conftest.QUICK) is `trainer=debug`, as keys that hold under any trainer group."""
    assert compose_config(quick).trainer == compose_config(["trainer=debug"]).trainer
    assert compose_config(["trainer=ddp", *quick]).trainer == {**compose_config(["trainer=debug"]).trainer,
                                                              "devices": 2, "strategy": "ddp"}
