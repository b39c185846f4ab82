"""The one LightningModule: corruption -> encoder -> latent head -> decoder, trained on a sum of terms.

Every variant (plain, under/overcomplete, denoising, sparse, contractive, VAE, beta-VAE) is this module
with different parts, chosen by config.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics import MeanMetric

from ae_lab.greedy import StackedLayers, layer_count, pretraining_layer
from ae_lab.nets import Latent, build_decoder, build_encoder, build_latent_head, output_function
from ae_lab.noise import build_corruption
from ae_lab.objectives import Objective, non_finite_message

MODULE_SECTIONS = ("model", "loss", "noise", "optim")  # what of a run's config the module holds


class Autoencoder(pl.LightningModule):
    """`config` holds the plain (string/number) `model`, `loss`, `noise` and `optim` sections;
    `dataset_size`, the number of training examples, is read by the beta-TCVAE objective only."""

    def __init__(self, config: dict[str, Any], input_shape: tuple[int, ...], dataset_size: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        cfg = OmegaConf.create(config)
        self.optim_cfg = cfg.optim
        self.model_cfg = cfg.model
        self.recon_kind = cfg.loss.recon
        self.corrupt = build_corruption(cfg.noise)
        self.encoder, features = build_encoder(cfg.model, tuple(input_shape))
        self.head = build_latent_head(cfg.model, features)
        self.decoder = build_decoder(cfg.model, tuple(input_shape))
        self.output = output_function(cfg.model.get("output", "sigmoid"))  # logits -> reconstruction
        self.objective = Objective(cfg.loss, gaussian_head=cfg.model.latent == "gaussian", dataset_size=dataset_size,
                                   output=self.output)
        self.network = torch.compile(self.forward) if cfg.model.compile else self.forward
        # greedy layer-wise pretraining (ae_lab/greedy.py): a view on the layers above, not new modules
        self.stack = StackedLayers(self.encoder, self.head, self.decoder) if cfg.model.pretrain == "greedy" else None
        pretraining = [f"pretrain_layer{k}" for k in range(1, layer_count(cfg.model) + 1)] if self.stack else []
        self.logged_names = [*self.objective.term_names, *pretraining]
        # Epoch metrics: means over every example of the split, weighted by batch size and summed
        # across DDP ranks, so they equal the single-process value whatever the batching or sharding.
        self.epoch_means = nn.ModuleDict({
            f"{stage}__{name}": MeanMetric(nan_strategy="disable")  # NaN propagates; no sync
            for stage in ("train", "val", "test") for name in self.logged_names})

    @classmethod
    def from_config(cls, cfg: DictConfig | dict[str, Any], input_shape: tuple[int, ...],
                    dataset_size: int | None = None) -> "Autoencoder":
        """The module of a full run config (resolved): it keeps the sections in `MODULE_SECTIONS`."""
        plain = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        return cls({key: plain[key] for key in MODULE_SECTIONS}, input_shape, dataset_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Latent]:
        latent = self.head(self.encoder(x))
        return self.decoder(latent.z), latent

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x_hat from the code (the posterior mean for a VAE), without noise or sampling."""
        return self.output(self.decoder(self.head.code(self.encoder(x))))

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        x = batch["x"]
        layer = pretraining_layer(self.model_cfg, self.current_epoch) if self.stack else None
        if layer is not None:  # a greedy phase: training trains only this layer; evaluation also runs the network
            phase_loss = self._pretraining_step(x, layer, stage)
            if stage == "train":
                return phase_loss
        inputs = self.corrupt(x) if stage == "train" and self.corrupt is not None else x
        # the contractive term differentiates the code w.r.t. the input, in evaluation too
        grad_context = torch.enable_grad() if self.objective.needs_input_grad else nullcontext()
        with grad_context:
            if self.objective.needs_input_grad:
                inputs = inputs.detach().requires_grad_(True)
            logits, latent = self.network(inputs)
            terms = self.objective(logits, x, latent, inputs, self.objective.weights(self.global_step),
                                   create_graph=stage == "train")
        if stage == "train" and not torch.isfinite(terms["loss"]):
            raise FloatingPointError(non_finite_message({name: value.item() for name, value in terms.items()},
                                                        self.global_step, self.current_epoch))
        for name, value in terms.items():  # accumulated on the device; logged once per epoch
            # one copy per example: MeanMetric ignores `weight=` under nan_strategy="disable"
            self.epoch_means[f"{stage}__{name}"].update(value.detach().expand(x.shape[0]))
        return terms["loss"]

    def _pretraining_step(self, x: torch.Tensor, layer: int, stage: str) -> torch.Tensor:
        """Layer `layer`'s autoencoder error on the batch (its input corrupted in training only)."""
        with nullcontext() if stage == "train" else torch.no_grad():
            phase_loss = self.stack.loss(x, layer, self.corrupt if stage == "train" else None, self.recon_kind)
        if stage == "train" and not torch.isfinite(phase_loss):
            raise FloatingPointError(f"the pretraining loss of layer {layer} became {phase_loss.item()} at step "
                                     f"{self.global_step} (epoch {self.current_epoch})")
        self.epoch_means[f"{stage}__pretrain_layer{layer}"].update(phase_loss.detach().expand(x.shape[0]))
        return phase_loss

    def epoch_values(self, stage: str) -> dict[str, torch.Tensor]:
        """The epoch's means so far of `stage`'s terms (those updated), under their logged names; a greedy
        phase's error goes to the history only (`pretrain/layer1_train`), not to metrics.json."""
        values = {}
        for name in self.logged_names:
            mean = self.epoch_means[f"{stage}__{name}"]
            if mean.update_called:
                key = (f"pretrain/{name.removeprefix('pretrain_')}_{stage}" if name.startswith("pretrain_")
                       else f"{stage}/{name}")
                values[key] = mean.compute()
        return values

    def scheduled_values(self) -> dict[str, torch.Tensor | float]:
        """The scheduled weights of the epoch's last step, e.g. `scheduled/beta` (a pure function of the step)."""
        return self.objective.scheduled_values(self.global_step)

    def _log_epoch(self, stage: str) -> None:
        """Log the epoch's means. Logging once per epoch, not per step, keeps Lightning's per-call
        logging cost (about a millisecond) out of the training step."""
        for key, value in self.epoch_values(stage).items():
            self.log(key, value, prog_bar=key == f"{stage}/loss")
        for name in self.logged_names:
            self.epoch_means[f"{stage}__{name}"].reset()

    def epoch_sums(self) -> dict[str, dict[str, torch.Tensor]]:
        """The running epoch means' states (weighted sums and weights), for a checkpoint taken mid-epoch."""
        return {key: {name: value.detach().cpu() for name, value in mean.metric_state.items()}
                for key, mean in self.epoch_means.items()}

    def load_epoch_sums(self, sums: dict[str, dict[str, torch.Tensor]]) -> None:
        """Go on accumulating the epoch's means from a checkpoint's `epoch_sums` (a resumed run)."""
        for key, state in sums.items():
            mean = self.epoch_means[key]
            mean.reset()
            mean.merge_state({name: value.to(mean.device) for name, value in state.items()})  # 0 + sums: exact
            # merge_state counts no update, and the epoch's end logs only updated means
            mean._update_count = int(mean.weight > 0)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")
        for key, value in self.scheduled_values().items():
            self.log(key, value)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim_cfg
        if cfg.name == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                        weight_decay=cfg.weight_decay)
        else:
            adam = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
            optimizer = adam(self.parameters(), lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
        if not cfg.milestones:
            return {"optimizer": optimizer}
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.milestones), cfg.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}
