"""The epoch metrics a run logs, trained in process on a few hand-made batches (no data set): the mean over
the epoch's examples of each term, whatever the batch sizes, under the names the history and metrics.json
use; the scheduled weights of the epoch's last step; the progress bar's metric; the sums a mid-epoch
checkpoint keeps; and the message of a non-finite loss. The references are written by hand here (the
per-example errors in plain torch, the schedules' closed forms)."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger
from torch.utils.data import DataLoader

from ae_lab.compose import compose_config
from ae_lab.module import Autoencoder

SHAPE = (1, 4, 4)
SMALL = ["logger=none", "loss.recon=mse", "model.arch=mlp", "model.hidden_dims=[6]", "model.latent_dim=3", "optim.lr=0"]


class Recorder(Logger):
    """Every dict of metrics Lightning hands to a logger, in order (one per epoch end here)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    name, version = "recorder", 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def module_of(overrides: list[str]) -> Autoencoder:
    torch.manual_seed(0)
    return Autoencoder.from_config(compose_config([*SMALL, *overrides]), SHAPE)


def batches(sizes: list[int], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"x": torch.rand(size, *SHAPE, generator=generator)} for size in sizes]


def loader(split: list[dict[str, torch.Tensor]]) -> DataLoader:
    return DataLoader(split, batch_size=None)  # each element is a batch already


def fit(module: Autoencoder, train: list, val: list | None = None, epochs: int = 1) -> tuple[pl.Trainer, Recorder]:
    recorder = Recorder()
    trainer = pl.Trainer(max_epochs=epochs, logger=recorder, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(module, train_dataloaders=loader(train), val_dataloaders=loader(val) if val else None)
    return trainer, recorder


def test_epoch_terms_are_means_over_the_examples_whatever_the_batch_sizes_and_the_bar_shows_the_loss():
    """A sparse (L1) autoencoder with a learning rate of 0, so that the weights the reference reads are the
    ones every step used: train/recon is the mean over the epoch's 9 examples of each example's squared
    error summed over pixels, train/sparsity the mean L1 norm of the codes and train/loss their sum with the
    sparsity weighted (batches of 5, 3 and 1 weigh 5, 3 and 1), val/* likewise on its own batches."""
    module = module_of(["loss=sparse_l1", "loss.sparsity_weight=0.5"])
    train, val = batches([5, 3, 1]), batches([2, 4], seed=1)
    trainer, recorder = fit(module, train, val)

    def by_hand(split: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        x = torch.cat([batch["x"] for batch in split])
        with torch.no_grad():
            code = module.head.linear(module.encoder(x))  # a deterministic head: the code is its linear map
            x_hat = torch.sigmoid(module.decoder(code))
        recon = (x_hat - x).pow(2).flatten(1).sum(1).mean()
        sparsity = code.abs().sum(1).mean()
        return {"recon": float(recon), "sparsity": float(sparsity), "loss": float(recon + 0.5 * sparsity)}

    logged = {key: value for row in recorder.rows for key, value in row.items()}
    for stage, split in (("train", train), ("val", val)):
        expected = by_hand(split)
        assert {key for key in logged if key.startswith(f"{stage}/")} == {f"{stage}/{name}" for name in expected}
        for name, value in expected.items():
            assert logged[f"{stage}/{name}"] == pytest.approx(value, rel=1e-5), f"{stage}/{name}"
    assert set(trainer.progress_bar_metrics) == {"train/loss", "val/loss"}
    test = batches([3, 2], seed=2)
    trainer.test(module, dataloaders=loader(test), verbose=False)
    tested = {key: value for key, value in recorder.rows[-1].items() if key.startswith("test/")}
    assert tested == pytest.approx({f"test/{name}": value for name, value in by_hand(test).items()}, rel=1e-5)


def test_the_scheduled_beta_logged_at_an_epochs_end_is_the_closed_form_at_its_last_step():
    """One step an epoch: epoch e ends after step e, where the linear warm-up from 0 to beta = 2 over 4
    steps gives 2 e / 4; the cyclical schedule (2 cycles of 4 steps, rising over 3/4 of each, cosine)
    gives 2 (1 - cos(pi tau / 0.75)) / 2 with tau = (e mod 4) / 4 while tau < 0.75, else 2."""
    def cyclical(step: int) -> float:
        tau = (step % 4) / 4
        return 2 * (1 - math.cos(math.pi * tau / 0.75)) / 2 if tau < 0.75 else 2.0

    for schedule, closed_form in (
            (["loss.beta_schedule.kind=linear", "loss.beta_schedule.steps=4"], lambda step: 2 * min(step / 4, 1)),
            (["loss.beta_schedule.kind=cyclical", "loss.beta_schedule.steps=8", "loss.beta_schedule.cycles=2",
              "loss.beta_schedule.rise=0.75", "loss.beta_schedule.shape=cosine"], cyclical)):
        module = module_of(["model=vae", "loss.beta=2", "loss.beta_schedule.start=0", *schedule])
        _, recorder = fit(module, batches([3]), epochs=6)
        logged = [row["scheduled/beta"] for row in recorder.rows if "scheduled/beta" in row]
        assert logged == pytest.approx([closed_form(epoch) for epoch in range(6)], abs=1e-7), schedule[0]


def test_a_greedy_phase_logs_its_layers_error_as_the_mean_of_its_steps_under_its_own_name():
    """In layer 1's phase an epoch logs pretrain/layer1_train (the example-weighted mean of the phase's
    step losses) and none of the network's train/* terms, which that phase does not train on."""
    module = module_of(["model.pretrain=greedy", "model.epochs_per_layer=1", "model.hidden_dims=[6,5]"])
    losses: list[tuple[float, int]] = []

    class StepLosses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append((float(outputs["loss"]), batch["x"].shape[0]))

    recorder = Recorder()
    trainer = pl.Trainer(max_epochs=1, logger=recorder, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=[StepLosses()])
    trainer.fit(module, train_dataloaders=loader(batches([4, 1])))
    logged = {key: value for row in recorder.rows for key, value in row.items() if "/" in key}
    assert set(logged) == {"pretrain/layer1_train"}
    mean = sum(loss * size for loss, size in losses) / sum(size for _, size in losses)
    assert logged["pretrain/layer1_train"] == pytest.approx(mean, rel=1e-6)


def test_epoch_sums_restored_from_a_mid_epoch_checkpoint_continue_the_epochs_means_exactly():
    """A module that took the epoch's first step (one example) and one restored from its `epoch_sums`
    report the same means, then the same after one more step each; a stage without a step so far (val)
    reports nothing, not a NaN."""
    first, second, third = batches([1, 3, 2])
    uninterrupted = module_of([])
    uninterrupted.training_step(first, 0)
    resumed = module_of([])
    resumed.load_state_dict(uninterrupted.state_dict())
    resumed.load_epoch_sums(uninterrupted.epoch_sums())
    assert resumed.epoch_values("train") == uninterrupted.epoch_values("train") != {}
    assert resumed.epoch_values("val") == {}
    for module in (uninterrupted, resumed):
        module.training_step(second, 1)
        module.training_step(third, 2)
    assert resumed.epoch_values("train") == uninterrupted.epoch_values("train")
    with torch.no_grad():
        x = torch.cat([first["x"], second["x"], third["x"]])
        by_hand = (torch.sigmoid(uninterrupted(x)[0]) - x).pow(2).flatten(1).sum(1).mean()
    assert float(resumed.epoch_values("train")["train/recon"]) == pytest.approx(float(by_hand), rel=1e-5)


def test_a_non_finite_training_loss_stops_the_step_naming_the_non_finite_terms():
    """A NaN pixel makes both terms of a sparse autoencoder NaN: both are named; a beta beyond float32's
    range makes the weighted sum infinite with every term finite: none is named."""
    x = torch.rand(2, *SHAPE)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError) as error:
        module_of(["loss=sparse_l1"]).training_step({"x": x}, 0)
    assert "recon=nan, sparsity=nan" in str(error.value) and "loss=nan" not in str(error.value)
    with pytest.raises(FloatingPointError) as error:
        module_of(["model=vae", "loss.beta=1e39"]).training_step({"x": torch.rand(2, *SHAPE)}, 0)
    assert str(error.value).endswith("; non-finite terms: none (their sum overflowed)")


def test_a_greedy_phase_stops_on_a_non_finite_training_error_and_evaluates_on_the_clean_input():
    """Layer 1's phase (epoch 0): a NaN pixel stops training naming the layer, while validation reports
    the NaN; the validation error with masking noise configured is the one without noise (the input is
    corrupted in training only)."""
    greedy = ["model.pretrain=greedy", "model.epochs_per_layer=1", "model.hidden_dims=[6,5]"]
    x = torch.rand(3, *SHAPE)
    broken = x.clone()
    broken[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="pretraining loss of layer 1"):
        module_of(greedy).training_step({"x": broken}, 0)
    evaluated = module_of(greedy)
    evaluated.validation_step({"x": broken}, 0)
    assert math.isnan(float(evaluated.epoch_values("val")["pretrain/layer1_val"]))
    noisy, clean = module_of([*greedy, "noise=masking", "noise.p=0.5"]), module_of(greedy)
    for module in (noisy, clean):
        module.validation_step({"x": x}, 0)
    assert noisy.epoch_values("val") == clean.epoch_values("val") != {}
