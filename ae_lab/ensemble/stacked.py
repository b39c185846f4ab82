"""The stacked-MLP path of an ensemble's step: the members' MLP run as batched matrix products straight on
the stacked weights, then the module's own objective vmapped over the members.

Under vmap, each `nn.Linear` of M members becomes a batched matrix product and a separate bias add (and
the views and copies of the batching rules) in the forward and the backward. Here each one is a single
`torch.baddbmm` on the stacked weight (M, out, in) as stored, bias included, and every other layer of the
module (`nn.Flatten`, `nn.Unflatten`, an elementwise activation, the latent head after its linear layer)
runs as it is on the stacked activations (M, B, ...). The terms come from the same `Objective` as in the
general path, vmapped over the members, so the model stays one: only how its layers are evaluated
differs (benchmarks/VECTORIZED.md has the speed; tests/test_vectorized.py checks the two paths equal).

`choose_path` is the one place that decides which path a group takes, and why.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.func import vmap

from ae_lab.ensemble.streams import Draw, Replay
from ae_lab.module import Autoencoder
from ae_lab.nets import _ACTIVATIONS, DeterministicHead, GaussianHead, Latent

STACKED = "stacked-mlp"
VMAP = "vmap"
_LAYERS = (nn.Linear, nn.Flatten, nn.Unflatten, *_ACTIVATIONS.values())  # activations: elementwise


def choose_path(config: dict[str, Any], module: Autoencoder) -> tuple[str, str]:
    """The path of a group's step, `STACKED` or `VMAP`, and the reason (the group's members share their
    structure, so `config` and `module` are any member's).

    The stacked path runs MLPs whose layers are all ones it evaluates on stacked weights, in steps whose
    only random draw is the Gaussian head's and whose terms need nothing of the network but its outputs.
    Every other variant takes the general vmap path: conv nets (vmap batches their convolutions),
    corruption (its draws and per-member strength), the contractive penalty (the network runs under
    `torch.func.vjp`), sparsity, `model.compile`."""
    model, loss = config["model"], config["loss"]
    if model["arch"] != "mlp":
        return VMAP, f"model.arch={model['arch']}: only MLPs have a stacked path"
    if config["noise"]["kind"] != "none":
        return VMAP, f"noise.kind={config['noise']['kind']}: the corruption runs per member under vmap"
    if loss["contractive_weight"] > 0:
        return VMAP, "the contractive penalty differentiates the network under torch.func.vjp"
    if loss["sparsity_weight"] > 0:
        return VMAP, "the sparsity penalty runs through the general path"
    if model["compile"]:
        return VMAP, "model.compile=true compiles the module's forward, which the stacked path does not run"
    layers = [*module.encoder, *module.decoder]
    if not isinstance(module.head, (DeterministicHead, GaussianHead)) or \
            not all(isinstance(layer, _LAYERS) for layer in layers):
        return VMAP, "a layer the stacked path does not evaluate"
    return STACKED, "an MLP without corruption or penalties on its code: batched matrix products on the stacked weights"


class _Linear(torch.autograd.Function):
    """h W^T + b for every member: (M, B, in) -> (M, B, out). Its backward writes the weight's and the
    bias's gradients straight into `into` (views of the rows of the ensemble's gradient buffer, see
    `Ensemble.gradient`) and hands autograd none for them: no gradient tensor to copy there afterwards."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                into: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        ctx.into = into
        return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        h, weight = ctx.saved_tensors
        weight_grad, bias_grad = ctx.into
        torch.bmm(grad.transpose(1, 2), h, out=weight_grad)
        torch.sum(grad, dim=1, out=bias_grad)
        return torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None, None, None, None


class StackedMLP:
    """The module's MLP evaluated for M members at once on stacked parameters (name -> (M, *shape)).
    `gradient` (name -> (M, *shape), views of the ensemble's gradient buffer) receives each step's
    gradient in the backward of a training step's terms."""

    def __init__(self, module: Autoencoder, gradient: dict[str, torch.Tensor]) -> None:
        self.module = module
        self.gradient = gradient

    def _linear(self, params: dict[str, torch.Tensor], prefix: str, h: torch.Tensor) -> torch.Tensor:
        weight, bias = params[prefix + "weight"], params[prefix + "bias"]
        if not torch.is_grad_enabled():
            return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
        return _Linear.apply(h, weight, bias, (self.gradient[prefix + "weight"], self.gradient[prefix + "bias"]))

    def _run(self, layers: nn.Sequential, prefix: str, params: dict[str, torch.Tensor],
             h: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(layers):
            if isinstance(layer, nn.Linear):
                h = self._linear(params, f"{prefix}{index}.", h)
            elif isinstance(layer, nn.Flatten):  # the member dimension comes first: one more to skip
                h = h.flatten(layer.start_dim + 1, layer.end_dim)
            elif isinstance(layer, nn.Unflatten):
                h = h.unflatten(layer.dim + 1, layer.unflattened_size)
            else:
                h = layer(h)
        return h

    def forward(self, params: dict[str, torch.Tensor], x: torch.Tensor, plan: list[Draw],
                draws: list[torch.Tensor]) -> tuple[torch.Tensor, Latent]:
        """Every member's logits and latent from its batch x (M, B, ...); the head's draws are `draws`
        (each (M, *shape), made in the members' streams for `plan`, one member's draws)."""
        features = self._run(self.module.encoder, "encoder.", params, x)
        out = self._linear(params, "head.linear.", features)
        if plan:
            stacked = [dataclasses.replace(draw, shape=torch.Size((len(x), *draw.shape))) for draw in plan]
            with Replay(stacked, draws):
                latent = self.module.head.latent(out)
        else:
            latent = self.module.head.latent(out)
        return self._run(self.module.decoder, "decoder.", params, latent.z), latent

    def terms(self, params: dict[str, torch.Tensor], x: torch.Tensor, weights: dict[str, torch.Tensor],
              plan: list[Draw], draws: list[torch.Tensor], per_member_x: bool, train: bool) -> dict[str, torch.Tensor]:
        """Every member's terms (name -> (M,)); `x` is (M, B, ...), or (B, ...) for all members."""
        members = next(iter(params.values())).shape[0]
        stacked_x = x if per_member_x else x.expand(members, *x.shape)
        logits, latent = self.forward(params, stacked_x, plan, draws)
        fields = {name: value for name, value in latent._asdict().items() if value is not None}
        objective = self.module.objective

        def member_terms(logits: torch.Tensor, x: torch.Tensor, fields: dict[str, torch.Tensor],
                         weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return objective(logits, x, Latent(**fields), x, weights, create_graph=train)

        return vmap(member_terms, in_dims=(0, 0 if per_member_x else None, 0, 0))(logits, x, fields, weights)
