"""Evaluation numbers against references written here: the anomaly scores of a VAE (its -ELBO from the
closed-form KL and the Bernoulli error of each decoded draw, by hand), the shared ELBO draws, the ROC
curve's points and the thresholds of the code statistics and of active units at their boundary."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ae_lab.compose import compose_config
from ae_lab.evaluation.anomaly import anomaly_scores, elbo_noise, score_kinds
from ae_lab.evaluation.codes import sparse_code_statistics
from ae_lab.evaluation.downstream import anomaly_auroc, roc_points
from ae_lab.evaluation.likelihood import active_units
from ae_lab.module import Autoencoder

SHAPE = (1, 4, 4)
LATENT = 3


def vae(overrides: list[str] = ()) -> Autoencoder:
    torch.manual_seed(0)
    cfg = compose_config(["logger=none", "model=vae", "model.arch=mlp", "model.hidden_dims=[6]",
                          f"model.latent_dim={LATENT}", *overrides])
    return Autoencoder.from_config(cfg, SHAPE).eval()


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x | logits) summed over pixels, per example: softplus(l) - x l."""
    return (torch.nn.functional.softplus(logits) - x * logits).flatten(1).sum(1)


@pytest.mark.parametrize("max_decode_batch", [2, 7])  # draws decoded one and two at a time for a batch of 3
def test_a_vaes_anomaly_scores_are_its_reconstruction_error_and_its_elbo_by_hand(max_decode_batch):
    module = vae()
    assert score_kinds(module) == ("recon", "elbo")
    x = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(1))
    samples, seed = 5, 11
    scores = anomaly_scores(module, x, samples=samples, seed=seed, max_decode_batch=max_decode_batch)
    with torch.no_grad():
        mean, logvar = module.head.linear(module.encoder(x)).chunk(2, dim=1)
        recon = bernoulli_nll(module.decoder(mean), x)
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(1)
        eps = elbo_noise(samples, LATENT, seed)
        nll = torch.stack([bernoulli_nll(module.decoder(mean + (0.5 * logvar).exp() * e), x) for e in eps])
    torch.testing.assert_close(scores["recon"], recon, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores["elbo"], kl + nll.mean(0), rtol=1e-5, atol=1e-5)
    # an example's score does not depend on the batch it is in (the draws are shared, not per example)
    alone = anomaly_scores(module, x[1:2], samples=samples, seed=seed, max_decode_batch=max_decode_batch)
    torch.testing.assert_close(alone["elbo"], scores["elbo"][1:2], rtol=1e-5, atol=1e-5)


def test_the_elbo_noise_is_standard_normal_repeats_with_its_seed_and_leaves_the_global_generator_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    draws = elbo_noise(20_000, 2, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    assert draws.shape == (20_000, 2)
    assert torch.equal(draws, elbo_noise(20_000, 2, seed=3)) and not torch.equal(draws, elbo_noise(20_000, 2, seed=4))
    # mean within 5 standard errors of 0, variance within 5 % of 1
    assert draws.mean(0).abs().max() < 5 / 20_000 ** 0.5 and (draws.var(0) - 1).abs().max() < 0.05


def test_a_plain_autoencoders_only_score_is_its_reconstruction_error():
    torch.manual_seed(0)
    cfg = compose_config(["logger=none", "loss.recon=mse", "model.arch=mlp", "model.hidden_dims=[6]",
                          f"model.latent_dim={LATENT}"])
    module = Autoencoder.from_config(cfg, SHAPE).eval()
    assert score_kinds(module) == ("recon",)
    x = torch.rand(4, *SHAPE)
    scores = anomaly_scores(module, x, samples=3, seed=0, max_decode_batch=8)
    with torch.no_grad():
        x_hat = torch.sigmoid(module.decoder(module.head.linear(module.encoder(x))))
    assert set(scores) == {"recon"}
    torch.testing.assert_close(scores["recon"], (x_hat - x).pow(2).flatten(1).sum(1))


def test_roc_points_are_the_rates_at_each_threshold_counted_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.55, 0.3, 0.2])
    is_anomaly = np.array([True, False, True, True, False, False, False])
    false_positive, true_positive = roc_points(scores, is_anomaly)
    # thresholds at each distinct score, from above the highest down: rates of scores >= threshold
    by_hand = [((scores[~is_anomaly] >= t).mean(), (scores[is_anomaly] >= t).mean()) for t in np.r_[np.inf, scores]]
    points = set(zip(false_positive.round(12), true_positive.round(12)))
    assert {(round(f, 12), round(t, 12)) for f, t in by_hand} >= points and (0.0, 0.0) in points
    assert (1.0, 1.0) in points
    # the area under those points is the AUROC
    assert np.trapezoid(true_positive, false_positive) == pytest.approx(anomaly_auroc(scores, is_anomaly))
    assert anomaly_auroc(scores, is_anomaly) == pytest.approx(roc_auc_score(is_anomaly, scores))


def test_an_activation_exactly_at_the_near_zero_bound_is_not_near_zero():
    codes = torch.tensor([[0.25, 0.5], [-0.25, 0.0]])
    stats = sparse_code_statistics(codes, near_zero=0.25)
    assert stats["code_near_zero_fraction"] == 0.25 and stats["code_dead_units"] == 0.0


def test_a_unit_whose_posterior_mean_variance_equals_the_threshold_is_not_active():
    mean = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 0.0]])  # population variances 0.25, 1 and 0
    count, variance = active_units(mean, threshold=0.25)
    assert count == 1
    torch.testing.assert_close(variance, torch.tensor([0.25, 1.0, 0.0]))


def test_evaluation_of_a_denoising_sparse_autoencoder_matches_references_on_its_reconstructions(tmp_path):
    """`evaluate` on an untrained sparse denoising autoencoder (digits) whose noise blanks every pixel
    (masking with p = 1, so the corrupted test input is known: zeros), against values computed here:
    the PSNRs of the corrupted input and of its reconstruction by torchmetrics, the code statistics and
    the encoder Jacobian's squared norm on the first 20 test images by brute-force autograd."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    from ae_lab.data import build_datamodule
    from ae_lab.evaluation.evaluate import evaluate

    cfg = compose_config(["logger=none", "loss=sparse_l1", "noise=masking", "noise.p=1.0", "model.hidden_dims=[16]",
                          "model.latent_dim=5", "eval=minimal", "eval.jacobian_examples=20", "eval.near_zero=0.5"])
    data = build_datamodule(cfg.dataset)
    torch.manual_seed(0)
    module = Autoencoder.from_config(cfg, data.input_shape)
    evaluation = evaluate(module, data, cfg, tmp_path)
    metrics = evaluation.metrics

    x = data.splits["test"].batch(torch.arange(len(data.splits["test"])))["x"]
    with torch.no_grad():
        codes = module.head.linear(module.encoder(x))
        blank = torch.sigmoid(module.decoder(module.head.linear(module.encoder(torch.zeros_like(x)))))

    def image_psnr(images: torch.Tensor) -> float:
        return float(peak_signal_noise_ratio(images, x, data_range=1.0, reduction="none", dim=(1, 2, 3)).mean())

    def jacobian_norm(example: torch.Tensor) -> torch.Tensor:
        jacobian = torch.autograd.functional.jacobian(
            lambda v: module.head.linear(module.encoder(v.unsqueeze(0)))[0], example)
        return jacobian.pow(2).sum()

    silent = codes.abs() < 0.5
    expected = {"psnr_corrupted": image_psnr(torch.zeros_like(x)), "psnr_denoised": image_psnr(blank),
                "jacobian_frobenius_sq": float(torch.stack([jacobian_norm(e) for e in x[:20]]).mean()),
                "code_mean_activation": float(codes.abs().mean()),
                "code_near_zero_fraction": float(silent.float().mean()), "code_dead_units": float(silent.all(0).sum())}
    expected["psnr_gain"] = expected["psnr_denoised"] - expected["psnr_corrupted"]
    assert 0 < expected["code_near_zero_fraction"] < 1  # the threshold splits the activations
    for name, value in expected.items():
        assert metrics[f"eval/{name}"] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert evaluation.details["resolution"]["eval/code_near_zero_fraction"] == pytest.approx(1 / codes.numel())
    assert evaluation.details["code_variance_per_unit"] == pytest.approx(codes.var(0, unbiased=False).tolist(),
                                                                         rel=1e-5)


def test_each_probe_input_gets_its_own_fit_and_the_same_input_its_kept_result():
    """The probe keeps its accuracy per input (a sweep fits the raw-pixel probe once): two different
    inputs get the accuracies scikit-learn's pipeline gives each, fitted here; the same input again the
    same accuracy."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from ae_lab.evaluation.downstream import probe_accuracy

    x, y = load_digits(return_X_y=True)
    train, test = slice(0, 300), slice(300, 500)
    for features in (x[:, :20], x[:, 20:44]):
        fitted = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(features[train], y[train])
        expected = fitted.score(features[test], y[test])
        assert probe_accuracy(features[train], y[train], features[test], y[test]) == expected
    assert probe_accuracy(x[train, :20], y[train], x[test, :20], y[test]) == make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=1000)).fit(x[train, :20], y[train]).score(x[test, :20], y[test])


def test_the_frechet_distance_of_float32_features_is_computed_in_float64():
    """A classifier's features come as float32: the distance is the float64 one (pytorch-fid's formula with
    scipy's sqrtm on the float64 statistics, well conditioned here), not float32 arithmetic's."""
    from scipy.linalg import sqrtm

    from ae_lab.evaluation.frechet import feature_frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)).astype(np.float32)
    b = (rng.normal(size=(400, 6)) * 1.1 + 0.05).astype(np.float32)
    mean_a, mean_b = a.astype(np.float64).mean(0), b.astype(np.float64).mean(0)
    cov_a, cov_b = np.cov(a.astype(np.float64), rowvar=False), np.cov(b.astype(np.float64), rowvar=False)
    expected = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * sqrtm(cov_a @ cov_b).real)
    assert feature_frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)
