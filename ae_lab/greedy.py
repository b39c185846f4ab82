"""Greedy layer-wise pretraining of a stacked autoencoder (`model.pretrain=greedy`, `model.arch=mlp`,
deterministic latent head), the classic recipe (Bengio et al. 2007; with noise, the stacked denoising
autoencoder of Vincent et al. 2010):

    phase k = 1..L (L = len(hidden_dims) + 1, the latent head being the top layer), epochs_per_layer each:
        h_{k-1} = layers 1..k-1 of the encoder applied to the clean input (fixed, no gradient)
        train encoder layer k and its mirror decoder layer as a one-hidden-layer autoencoder of h_{k-1},
        its input corrupted by the configured noise (if any)
    then: the whole network, end to end, on the configured objective for the remaining epochs.

The one-hidden-layer autoencoders are no copies: their layers *are* the encoder's and decoder's
modules (encoder layer k = Linear + activation, the head for k = L; its decoder = the decoder's layer
mapping back to h_{k-1}: Linear + activation, or the output Linear (logits) for k = 1), so the joined
network starts from exactly the pretrained weights. Layer 1 is trained on the configured
reconstruction error (`loss.recon`), upper layers on the squared error of the codes (sum over units,
per example); the objective's other terms (sparsity, contractive) act in fine-tuning only.

The phase is a function of the epoch (`pretraining_layer`), so a killed run resumes inside the right
phase with no extra state. One optimiser serves all phases: a parameter outside the phase gets no
gradient (None), so the optimiser leaves it and its state untouched; Adam's state of a layer starts at
its phase and carries into fine-tuning. Each phase ends with `checkpoints/pretrain_layer<k>.ckpt`;
its epochs log `pretrain/layer<k>_train` and `pretrain/layer<k>_val` (per example) to the history
(W&B, CSV), not to metrics.json, which holds the fine-tuned network's numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from torch import nn

from ae_lab.objectives import reconstruction_error


def layer_count(model_cfg: Any) -> int:
    """Layers pretrained one at a time: the hidden layers and the latent head."""
    return len(model_cfg.hidden_dims) + 1


def pretraining_layer(model_cfg: Any, epoch: int) -> int | None:
    """The layer (1-based) epoch `epoch` pretrains; None when fine-tuning or without greedy pretraining."""
    if model_cfg.pretrain != "greedy":
        return None
    layer = epoch // model_cfg.epochs_per_layer + 1
    return layer if layer <= layer_count(model_cfg) else None


class StackedLayers:
    """The encoder's layers and their mirror decoder layers, as the one-hidden-layer autoencoders of
    the greedy phases (views on the network's own modules: training one trains the network)."""

    def __init__(self, encoder: nn.Sequential, head: nn.Module, decoder: nn.Sequential) -> None:
        self.flatten = encoder[0]
        hidden = (len(encoder) - 1) // 2  # Flatten, then (Linear, activation) per hidden layer
        self.encoders: list[Callable[[torch.Tensor], torch.Tensor]] = [
            nn.Sequential(encoder[1 + 2 * i], encoder[2 + 2 * i]) for i in range(hidden)] + [head.code]
        # the decoder: (Linear, activation) from the code down to the first hidden layer, then the output
        # Linear and Unflatten; listed from layer 1 (the output) up
        self.decoders = [nn.Sequential(decoder[-2], decoder[-1])] + [
            nn.Sequential(decoder[2 * i], decoder[2 * i + 1]) for i in reversed(range(hidden))]

    def loss(self, x: torch.Tensor, layer: int, corrupt: Callable[[torch.Tensor], torch.Tensor] | None,
             recon: str) -> torch.Tensor:
        """Per-example reconstruction error of layer `layer`'s autoencoder on the batch `x` (mean)."""
        with torch.no_grad():
            target = self.flatten(x)
            for encode in self.encoders[:layer - 1]:
                target = encode(target)
        inputs = corrupt(target) if corrupt is not None else target
        output = self.decoders[layer - 1](self.encoders[layer - 1](inputs))
        if layer == 1:
            return reconstruction_error(output, x, recon).mean()
        return (output - target).pow(2).sum(1).mean()


class PhaseCheckpoints(pl.Callback):
    """Writes `pretrain_layer<k>.ckpt` into `folder` at the end of each pretraining phase."""

    def __init__(self, folder: Path, model_cfg: Any) -> None:
        self.folder = Path(folder)
        self.model_cfg = model_cfg

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        layer = pretraining_layer(self.model_cfg, epoch)
        if layer is not None and pretraining_layer(self.model_cfg, epoch + 1) != layer:
            trainer.save_checkpoint(self.folder / f"pretrain_layer{layer}.ckpt", weights_only=False)
