"""Greedy layer-wise pretraining (model.pretrain=greedy): each phase trains its layer only, the joined
network starts from exactly the pretrained weights, each phase is recorded, and a run killed inside a
phase resumes inside it."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from ae_lab.data import build_datamodule
from ae_lab.greedy import PhaseCheckpoints, pretraining_layer
from ae_lab.module import Autoencoder

# three layers (two hidden and the code), one epoch each, then one epoch of fine-tuning; masking noise:
# a stacked denoising autoencoder. digits, 3 training batches an epoch.
GREEDY = ["model.pretrain=greedy", "model.epochs_per_layer=1", "model.hidden_dims=[32,16]", "model.latent_dim=6",
          "noise=masking", "trainer.max_epochs=4", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
          "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
          "eval=minimal", "seed=4"]
# each layer's parameters in the state dict: encoder Linear, and the decoder Linear mapping back to its input
LAYERS = {1: ("encoder.1.", "decoder.4."), 2: ("encoder.3.", "decoder.2."), 3: ("head.", "decoder.0.")}


class Snapshots(pl.Callback):
    """The network's weights at the start and end of every training epoch."""

    def __init__(self) -> None:
        self.start: dict[int, dict[str, torch.Tensor]] = {}
        self.end: dict[int, dict[str, torch.Tensor]] = {}

    @staticmethod
    def _copy(module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {name: value.detach().clone() for name, value in module.state_dict().items()
                if not name.startswith("epoch_means")}

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.start[trainer.current_epoch] = self._copy(module)

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.end[trainer.current_epoch] = self._copy(module)


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], layer: int) -> list[bool]:
    names = [name for name in before if name.startswith(LAYERS[layer])]
    assert len(names) == 4  # weight and bias of the encoder and of the decoder layer
    return [not torch.equal(before[name], after[name]) for name in names]


def test_each_phase_trains_only_its_layer_and_fine_tuning_starts_from_the_pretrained_weights(tmp_path, compose_config):
    cfg = compose_config([*GREEDY, "logger=none"])
    assert [pretraining_layer(cfg.model, epoch) for epoch in range(5)] == [1, 2, 3, None, None]
    pl.seed_everything(0)
    data = build_datamodule(cfg.dataset)
    module = Autoencoder.from_config(cfg, data.input_shape)
    snapshots = Snapshots()
    trainer = pl.Trainer(max_epochs=4, limit_train_batches=3, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[snapshots, PhaseCheckpoints(tmp_path, module.model_cfg)])
    trainer.fit(module, datamodule=data)
    for epoch, layer in ((0, 1), (1, 2), (2, 3)):
        before, after = snapshots.start[epoch], snapshots.end[epoch]
        assert all(_changed(before, after, layer)), f"layer {layer} did not train in its phase"
        for other in set(LAYERS) - {layer}:
            assert not any(_changed(before, after, other)), f"layer {other} changed in layer {layer}'s phase"
        checkpoint = torch.load(tmp_path / f"pretrain_layer{layer}.ckpt", weights_only=True)
        assert "optimizer_states" in checkpoint  # a whole checkpoint, not the weights alone
        assert all(torch.equal(checkpoint["state_dict"][name], value) for name, value in after.items())
    # the joined network is the pretrained layers, untouched, when fine-tuning begins; then all of it trains
    assert all(torch.equal(snapshots.start[3][name], value) for name, value in snapshots.end[2].items())
    assert all(all(_changed(snapshots.start[3], snapshots.end[3], layer)) for layer in LAYERS)


def test_each_phase_trains_on_its_layers_error_for_the_corrupted_input_computed_by_hand(monkeypatch, compose_config):
    """The training loss of each phase against plain torch on the module's weights: layer 1 the Bernoulli
    error of the pixels (loss.recon=bce), layers 2 and 3 the squared error of the codes below them (sum
    over units), each layer's input corrupted (a fixed mask stands for the masking noise here) and its
    target the clean code."""
    cfg = compose_config([*GREEDY, "logger=none", "model.activation=tanh"])
    module = Autoencoder.from_config(cfg, (1, 8, 8))
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(5, 1, 8, 8, generator=generator)
    masks = {width: (torch.rand(5, width, generator=generator) > 0.3).float() for width in (64, 32, 16)}
    module.corrupt = lambda inputs: inputs * masks[inputs.shape[1]]

    def linear(layer: torch.nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
        return inputs @ layer.weight.T + layer.bias

    encoder, decoder, head = module.encoder, module.decoder, module.head.linear
    with torch.no_grad():
        h0 = x.flatten(1)
        h1 = torch.tanh(linear(encoder[1], h0))
        h2 = torch.tanh(linear(encoder[3], h1))
        logits = linear(decoder[4], torch.tanh(linear(encoder[1], h0 * masks[64])))
        by_hand = {
            1: (torch.nn.functional.softplus(logits) - h0 * logits).sum(1).mean(),
            2: (torch.tanh(linear(decoder[2], torch.tanh(linear(encoder[3], h1 * masks[32])))) - h1)
            .pow(2).sum(1).mean(),
            3: (torch.tanh(linear(decoder[0], linear(head, h2 * masks[16]))) - h2).pow(2).sum(1).mean()}
    for layer, expected in by_hand.items():
        monkeypatch.setattr(Autoencoder, "current_epoch", property(lambda self, epoch=layer - 1: epoch))
        loss = module.training_step({"x": x}, 0)
        assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6), f"layer {layer}"


def test_a_phase_checkpoint_is_written_at_the_last_epoch_of_its_phase_only(tmp_path, compose_config):
    """Two layers, two epochs each, then fine-tuning: epochs 1 and 3 end a phase."""
    from types import SimpleNamespace

    model = compose_config([*GREEDY, "model.hidden_dims=[8]", "model.epochs_per_layer=2"]).model
    saved = []
    callback = PhaseCheckpoints(tmp_path, model)
    for epoch in range(7):
        trainer = SimpleNamespace(current_epoch=epoch, save_checkpoint=lambda path, **options: saved.append(
            (epoch, path.name)))
        callback.on_train_epoch_end(trainer, None)
    assert saved == [(1, "pretrain_layer1.ckpt"), (3, "pretrain_layer2.ckpt")]


def _history(run_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))


def test_a_run_killed_in_phase_two_resumes_in_phase_two_and_ends_as_an_uninterrupted_run(tmp_path, kill_after_step,
                                                                                         read_json, run_cli):
    args = [*GREEDY, "logger=csv", "checkpoint_every_n_steps=2"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = run_cli([*args, f"hydra.run.dir={reference}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # the run folder holds what any run's does, and a checkpoint per phase
    assert {"run.json", "metrics.json", "checkpoints", ".hydra"} <= {path.name for path in reference.iterdir()}
    assert {f"pretrain_layer{k}.ckpt" for k in (1, 2, 3)} <= {p.name for p in (reference / "checkpoints").iterdir()}
    history = _history(reference)
    for layer in (1, 2, 3):  # each phase's epoch logged its reconstruction error, train and val
        [row] = [row for row in history if row.get(f"pretrain/layer{layer}_train")]
        assert int(row["epoch"]) == layer - 1
        assert any(r.get(f"pretrain/layer{layer}_val") and int(r["epoch"]) == layer - 1 for r in history)
    assert [int(row["epoch"]) for row in history if row.get("train/loss")] == [3]  # fine-tuning only

    # epoch 1 (layer 2) is steps 4-6: killed after step 5, the newest checkpoint is step 4's, inside phase 2
    kill_after_step([*args, f"hydra.run.dir={killed}"], tmp_path, step=5)
    checkpoint = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert (checkpoint["global_step"], checkpoint["epoch"]) == (4, 1)
    assert not (killed / "checkpoints" / "pretrain_layer2.ckpt").exists()
    done = run_cli([f"resume={killed}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [row["epoch"] for row in _history(killed) if row.get("pretrain/layer2_train")] == ["1"]
    for layer in (2, 3):
        ours = torch.load(killed / "checkpoints" / f"pretrain_layer{layer}.ckpt", weights_only=True)["state_dict"]
        theirs = torch.load(reference / "checkpoints" / f"pretrain_layer{layer}.ckpt", weights_only=True)["state_dict"]
        assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    assert read_json(killed / "metrics.json") == read_json(reference / "metrics.json")
