"""One training step of ae_lab against the same step written in plain torch (no ae_lab code): a tiny
denoising VAE and a tiny contractive autoencoder with the same fixed weights and batch give the same
loss, terms and parameter gradients; and the optimiser the step is taken with is torch's, with the configured
settings. The vectorised ensemble inherits these checks through its equality tests with the module
(tests/test_vectorized.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ae_lab.module import Autoencoder

SHAPE = (1, 3, 4)  # 12 pixels
BATCH, HIDDEN, LATENT = 6, 5, 3
PIXELS = 12
TOLERANCE = dict(rtol=1e-6, atol=1e-6)


def fixed_weights(latent_outputs: int) -> dict[str, torch.Tensor]:
    """The weights of an MLP 12 -> 5 -> (head: `latent_outputs`) and back 3 -> 5 -> 12, named as ae_lab's
    module names them (Flatten at encoder.0, Unflatten at the decoder's end)."""
    generator = torch.Generator().manual_seed(7)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * 0.5

    return {"encoder.1.weight": draw(HIDDEN, PIXELS), "encoder.1.bias": draw(HIDDEN),
            "head.linear.weight": draw(latent_outputs, HIDDEN), "head.linear.bias": draw(latent_outputs),
            "decoder.0.weight": draw(HIDDEN, LATENT), "decoder.0.bias": draw(HIDDEN),
            "decoder.2.weight": draw(PIXELS, HIDDEN), "decoder.2.bias": draw(PIXELS)}


@pytest.fixture(scope="session")
def ae_lab_step(compose_config):
    """`ae_lab_step(...)`: ae_lab's training step on batch `x` with `weights` (float64): the terms it logs and the..."""
    def ae_lab_step(overrides: list[str], weights: dict[str, torch.Tensor], x: torch.Tensor,
                    seed: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """ae_lab's training step on batch `x` with `weights` (float64): the terms it logs and the
        parameters' gradients."""
        cfg = compose_config(["logger=none", "model.arch=mlp", f"model.hidden_dims=[{HIDDEN}]",
                              f"model.latent_dim={LATENT}", "model.activation=tanh", *overrides])
        module = Autoencoder.from_config(cfg, SHAPE).double()
        assert {name for name, _ in module.named_parameters()} == set(weights)  # the layout the reference assumes
        module.load_state_dict(weights, strict=False)
        torch.manual_seed(seed)
        module.training_step({"x": x}, 0).backward()
        terms = {name.removeprefix("train__"): float(mean.compute()) for name, mean in module.epoch_means.items()
                 if name.startswith("train__") and mean.update_called}
        return terms, {name: parameter.grad for name, parameter in module.named_parameters()}

    return ae_lab_step


def reference_gradients(loss: torch.Tensor, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(zip(weights, torch.autograd.grad(loss, list(weights.values()), retain_graph=True)))


def assert_same_step(terms: dict[str, float], grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                     reference_grads: dict[str, torch.Tensor]) -> None:
    assert set(terms) == set(reference)
    for name, value in reference.items():
        # the logged terms are the epoch means' float32 sums
        assert terms[name] == pytest.approx(float(value.detach()), rel=1e-6, abs=1e-6), name
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, **TOLERANCE, msg=name)


def test_denoising_vae_step_matches_plain_torch(ae_lab_step):
    """Gaussian noise (std 0.3) on the input, a Gaussian head, beta = 0.7, Bernoulli decoder: the
    reconstruction error and KL are against the *clean* batch and the posterior drawn from the corrupted
    one; the noise and the posterior sample are the RNG's first two draws, in that order."""
    std, beta, seed = 0.3, 0.7, 11
    weights = fixed_weights(2 * LATENT)
    x = torch.rand(BATCH, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    terms, grads = ae_lab_step(["model=vae", f"loss.beta={beta}", "loss.recon=bce", "noise=gaussian",
                                f"noise.std={std}"], weights, x, seed)

    w = {name: value.clone().requires_grad_(True) for name, value in weights.items()}
    torch.manual_seed(seed)
    noise = torch.randn(BATCH, *SHAPE, dtype=torch.float64)
    eps = torch.randn(BATCH, LATENT, dtype=torch.float64)
    corrupted = (x + std * noise).reshape(BATCH, PIXELS)
    h = torch.tanh(corrupted @ w["encoder.1.weight"].T + w["encoder.1.bias"])
    out = h @ w["head.linear.weight"].T + w["head.linear.bias"]
    mean, logvar = out[:, :LATENT], out[:, LATENT:]
    z = mean + torch.sqrt(torch.exp(logvar)) * eps
    logits = torch.tanh(z @ w["decoder.0.weight"].T + w["decoder.0.bias"]) @ w["decoder.2.weight"].T \
        + w["decoder.2.bias"]
    clean = x.reshape(BATCH, PIXELS)
    # -log Bernoulli(x; sigmoid(l)) = softplus(l) - x l
    recon = (F.softplus(logits) - clean * logits).sum(1).mean()
    kl = (0.5 * (mean ** 2 + torch.exp(logvar) - 1 - logvar)).sum(1).mean()
    loss = recon + beta * kl
    reference = {"recon": recon, "kl": kl, "elbo": -(recon + kl), "loss": loss}
    assert_same_step(terms, grads, reference, reference_gradients(loss, w))


def test_contractive_autoencoder_step_matches_plain_torch(ae_lab_step):
    """A sigmoid code, squared-error reconstruction of sigmoid outputs, contractive weight 0.3: the
    penalty is ||J||_F^2 of the closed-form Jacobian J = diag(c (1 - c)) W_head diag(1 - h^2) W_1."""
    weight = 0.3
    weights = fixed_weights(LATENT)
    x = torch.rand(BATCH, *SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    terms, grads = ae_lab_step(["loss=contractive", f"loss.contractive_weight={weight}", "loss.recon=mse",
                                "model.code_activation=sigmoid"], weights, x, seed=0)

    w = {name: value.clone().requires_grad_(True) for name, value in weights.items()}
    flat = x.reshape(BATCH, PIXELS)
    h = torch.tanh(flat @ w["encoder.1.weight"].T + w["encoder.1.bias"])
    code = torch.sigmoid(h @ w["head.linear.weight"].T + w["head.linear.bias"])
    logits = torch.tanh(code @ w["decoder.0.weight"].T + w["decoder.0.bias"]) @ w["decoder.2.weight"].T \
        + w["decoder.2.bias"]
    recon = ((torch.sigmoid(logits) - flat) ** 2).sum(1).mean()
    # (B, latent, hidden) @ (hidden, pixels): d code / d x per example
    jacobian = ((code * (1 - code))[:, :, None] * w["head.linear.weight"] * (1 - h ** 2)[:, None, :]) \
        @ w["encoder.1.weight"]
    contractive = (jacobian ** 2).sum((1, 2)).mean()
    loss = recon + weight * contractive
    reference = {"recon": recon, "contractive": contractive, "loss": loss}
    assert_same_step(terms, grads, reference, reference_gradients(loss, w))


@pytest.mark.parametrize("name,kind", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                        ("adamw", torch.optim.AdamW)])
def test_the_step_uses_the_configured_torch_optimiser_with_its_settings(name, kind, compose_config):
    cfg = compose_config(["logger=none", f"optim.name={name}", "optim.lr=0.03", "optim.weight_decay=0.002",
                          "optim.momentum=0.7", "optim.eps=1e-5", "optim.milestones=[3]", "optim.gamma=0.5"])
    module = Autoencoder.from_config(cfg, SHAPE)
    configured = module.configure_optimizers()
    optimizer, schedule = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert type(optimizer) is kind
    [group] = optimizer.param_groups
    assert {id(p) for p in group["params"]} == {id(p) for p in module.parameters()}
    expected = {"lr": 0.03, "weight_decay": 0.002, **({"momentum": 0.7} if name == "sgd" else {"eps": 1e-5})}
    assert {key: group[key] for key in expected} == expected
    assert dict(schedule.milestones) == {3: 1} and schedule.gamma == 0.5
    assert configured["lr_scheduler"]["interval"] == "epoch"
    without_milestones = Autoencoder.from_config(compose_config(["logger=none", f"optim.name={name}"]), SHAPE)
    assert "lr_scheduler" not in without_milestones.configure_optimizers()
