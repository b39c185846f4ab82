"""Each loss term against an independent reference."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from sklearn.metrics import log_loss

from ae_lab.nets import build_encoder, build_latent_head
from ae_lab.objectives import (Objective, contractive_penalty, gaussian_kl, kl_sparsity, l1_sparsity,
                               reconstruction_error)


def test_gaussian_kl_matches_monte_carlo():
    generator = torch.Generator().manual_seed(0)
    mean = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, -1.5, 0.7]], dtype=torch.float64)
    samples = 400_000
    std = torch.exp(0.5 * logvar)
    z = mean + std * torch.randn(samples, 3, generator=generator, dtype=torch.float64)
    log_q = torch.distributions.Normal(mean, std).log_prob(z).sum(1)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    estimate = (log_q - log_p).mean().item()
    stderr = (log_q - log_p).std().item() / math.sqrt(samples)
    closed_form = gaussian_kl(mean, logvar).item()
    assert abs(estimate - closed_form) < 4 * stderr


def test_gaussian_kl_is_per_example_as_torch_distributions_gives_it():
    generator = torch.Generator().manual_seed(2)
    mean, logvar = torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator)
    posterior, prior = torch.distributions.Normal(mean, torch.exp(0.5 * logvar)), torch.distributions.Normal(0.0, 1.0)
    torch.testing.assert_close(gaussian_kl(mean, logvar), torch.distributions.kl_divergence(posterior, prior).sum(1))


def test_kl_sparsity_stays_finite_for_dead_and_saturated_units():
    """A unit that never fires (rate 0) or always does (rate 1) counts as firing at 1e-6 or 1 - 1e-6."""
    code = torch.tensor([[0.0, 1.0, 0.2], [0.0, 1.0, 0.4]])
    rho = 0.05

    def divergence(rate: float) -> float:
        return rho * math.log(rho / rate) + (1 - rho) * math.log((1 - rho) / (1 - rate))

    top = float(torch.tensor(1 - 1e-6))  # as float32 holds it: 1 - 1.013e-6
    expected = divergence(1e-6) + divergence(top) + divergence(0.3)
    assert kl_sparsity(code, rho).item() == pytest.approx(expected, rel=1e-4)


def test_the_tc_objective_needs_the_training_set_size(compose_config):
    loss = compose_config(["model=vae", "loss.kl=tc"]).loss
    message = r"^loss\.kl=tc needs the training set size \(Objective\(dataset_size=\.\.\.\)\)$"
    with pytest.raises(ValueError, match=message):
        Objective(loss, gaussian_head=True)
    assert "tc" not in Objective(loss, gaussian_head=False).term_names  # no Gaussian head: no TC term


def test_kl_sparsity_by_hand():
    code = torch.tensor([[0.1, 0.9], [0.3, 0.5], [0.2, 0.1]])
    rho = 0.05
    expected = 0.0
    for unit in range(2):
        rate = sum(float(code[i, unit]) for i in range(3)) / 3
        expected += rho * math.log(rho / rate) + (1 - rho) * math.log((1 - rho) / (1 - rate))
    assert kl_sparsity(code, rho).item() == pytest.approx(expected, rel=1e-6)
    # the divergence vanishes when every unit fires at the target rate
    assert kl_sparsity(torch.full((4, 3), rho), rho).item() == pytest.approx(0.0, abs=1e-6)


def test_l1_sparsity_by_hand():
    code = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, -3.0]])
    assert l1_sparsity(code).tolist() == [3.5, 3.0]


def test_reconstruction_errors_match_references():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 1, 3, 3, generator=generator, dtype=torch.float64)
    x = torch.rand(4, 1, 3, 3, generator=generator, dtype=torch.float64).round()  # binary targets
    probabilities = torch.sigmoid(logits).flatten().numpy()
    # scikit-learn's mean log-loss over all pixels, times pixels per example = per-example sum
    reference = log_loss(x.flatten().numpy(), probabilities, labels=[0, 1]) * 9
    assert reconstruction_error(logits, x, "bce").mean().item() == pytest.approx(reference, rel=1e-9)
    squared = ((torch.sigmoid(logits) - x) ** 2).reshape(4, -1).sum(1)
    assert torch.allclose(reconstruction_error(logits, x, "mse"), squared)


def _encoder(arch: str, latent: str, code_activation: str = "none"):
    torch.manual_seed(0)
    cfg = OmegaConf.create(dict(arch=arch, latent=latent, latent_dim=5, hidden_dims=[12, 7],
                                channels=[4, 3], kernel_size=3, fc_dims=[6], activation="tanh",
                                code_activation=code_activation))
    encoder, features = build_encoder(cfg, (2, 9, 7))
    head = build_latent_head(cfg, features)
    encoder.double()
    head.double()
    return lambda x: head.code(encoder(x))


@pytest.mark.parametrize("arch,latent", [("mlp", "deterministic"), ("conv", "deterministic"),
                                         ("mlp", "gaussian"), ("conv", "gaussian")])
def test_exact_contractive_penalty_equals_full_jacobian(arch, latent):
    code_of = _encoder(arch, latent, "sigmoid" if latent == "deterministic" else "none")
    x = torch.rand(4, 2, 9, 7, dtype=torch.float64, requires_grad=True)
    penalty = contractive_penalty(code_of(x), x, "exact")
    for i in range(4):
        jacobian = torch.autograd.functional.jacobian(lambda xi: code_of(xi.unsqueeze(0))[0], x[i].detach())
        assert penalty[i].item() == pytest.approx(jacobian.pow(2).sum().item(), rel=1e-10)


def test_exact_contractive_penalty_equals_one_layer_closed_form():
    """pylearn2's ContractiveAutoencoder: ||J||_F^2 = sum_j s'(a_j)^2 ||W_j||^2 for z = sigmoid(W x + b)."""
    torch.manual_seed(0)
    weight = torch.randn(6, 10, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    x = torch.rand(3, 10, dtype=torch.float64, requires_grad=True)
    code = torch.sigmoid(x @ weight.T + bias)
    slope = code * (1 - code)
    closed_form = (slope.pow(2) * weight.pow(2).sum(1)).sum(1)
    assert torch.allclose(contractive_penalty(code, x, "exact"), closed_form, rtol=1e-12)
    assert torch.allclose(contractive_penalty(code, x), closed_form, rtol=1e-12)  # exact is the default


def test_the_projection_estimate_takes_one_draw_by_default():
    """One v ~ N(0, I) per example by default: ||v^T J||^2 with J in closed form (z = sigmoid(W x + b):
    J = diag(s'(a)) W) and v the draw torch's generator gives from the same seed."""
    torch.manual_seed(0)
    weight = torch.randn(6, 10, dtype=torch.float64)
    x = torch.rand(3, 10, dtype=torch.float64, requires_grad=True)
    code = torch.sigmoid(x @ weight.T)
    jacobians = (code * (1 - code)).detach()[:, :, None] * weight  # (batch, 6, 10)
    torch.manual_seed(4)
    penalty = contractive_penalty(code, x, "projection", create_graph=False)
    torch.manual_seed(4)
    v = torch.randn(1, 3, 6, dtype=torch.float64)[0]
    torch.testing.assert_close(penalty, torch.einsum("bz,bzd->bd", v, jacobians).pow(2).sum(1), rtol=1e-12, atol=0)


def test_projection_estimator_is_unbiased():
    code_of = _encoder("conv", "deterministic", "tanh")
    x = torch.rand(2, 2, 9, 7, dtype=torch.float64, requires_grad=True)
    exact = contractive_penalty(code_of(x), x, "exact").detach()
    torch.manual_seed(3)
    draws = 20_000
    estimates = contractive_penalty(code_of(x), x, "projection", projections=draws,
                                    create_graph=False)
    # recompute per-draw values for the standard error of the mean
    directions = torch.randn(2000, 2, 5, dtype=torch.float64)
    rows = torch.autograd.grad(code_of(x), x, directions, is_grads_batched=True)[0]
    spread = rows.pow(2).flatten(2).sum(2).std(0)
    for i in range(2):
        assert abs(estimates[i].item() - exact[i].item()) < 4 * spread[i].item() / math.sqrt(draws)
    # and it is not trivially exact: one draw differs from the exact value
    one = contractive_penalty(code_of(x), x, "projection", projections=1, create_graph=False)
    assert not torch.allclose(one, exact)


def test_contractive_penalty_trains_the_encoder():
    """The penalty is differentiable w.r.t. the encoder's weights (double backward)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    x = torch.rand(5, 4, requires_grad=True)
    contractive_penalty(torch.sigmoid(layer(x)), x, "exact").sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_the_contractive_term_takes_the_jacobian_rows_it_is_given(compose_config):
    """The vectorised ensemble hands the objective its own vector-Jacobian products: given rows v^T M of a
    fixed matrix M, the contractive term is ||M||_F^2 (exact estimator), not the encoder's own norm."""
    from ae_lab.module import Autoencoder

    cfg = compose_config(["logger=none", "loss=contractive", "model.arch=mlp", "model.hidden_dims=[5]",
                          "model.latent_dim=3"])
    torch.manual_seed(0)
    module = Autoencoder.from_config(cfg, (1, 2, 3))
    x = torch.rand(4, 1, 2, 3, requires_grad=True)
    logits, latent = module(x)
    matrix = torch.randn(3, 1, 2, 3)
    weights = module.objective.weights(0)
    given = module.objective(logits, x, latent, x, weights, create_graph=False,
                             jacobian_rows=lambda directions: torch.einsum("kbz,zchw->kbchw", directions, matrix))
    assert float(given["contractive"]) == pytest.approx(float(matrix.pow(2).sum()), rel=1e-6)
    by_autograd = module.objective(logits, x, latent, x, weights, create_graph=False)
    assert float(by_autograd["contractive"]) != pytest.approx(float(matrix.pow(2).sum()), rel=1e-2)
