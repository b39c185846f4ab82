"""Evaluation metrics against independent references (closed forms, brute force, other libraries), and
the evaluation of real runs: which metrics appear for which model, and the figures it draws."""

from __future__ import annotations

import math

import matplotlib.image
import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio

from conftest import QUICK, read_json, train_in_process
from wandb_records import run_contents
from ae_lab.evaluation.codes import encoder_jacobian_norm, sparse_code_statistics
from ae_lab.evaluation.downstream import anomaly_auroc
from ae_lab.evaluation.likelihood import active_units, bernoulli_log_likelihood, importance_weighted_bound
from ae_lab.kl_forms import gaussian_log_density
from ae_lab.evaluation.reconstruction import psnr


class LinearGaussian:
    """p(z) = N(0, I), p(x|z) = N(W z + b, s^2 I): log p(x) = log N(x; b, W W^T + s^2 I) in closed form,
    and the exact posterior is Gaussian; q is a deliberately poor diagonal Gaussian near it."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.W = torch.randn(3, 2, generator=generator, dtype=torch.float64)
        self.b = torch.randn(3, generator=generator, dtype=torch.float64)
        self.s2 = 0.5
        self.x = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
        precision = torch.eye(2, dtype=torch.float64) + self.W.T @ self.W / self.s2
        covariance = torch.linalg.inv(precision)
        # q: the posterior's mean shifted by 0.5 and its diagonal variance doubled, so the ELBO is loose
        self.q_mean = covariance @ self.W.T @ (self.x - self.b) / self.s2 + 0.5
        self.q_var = 2 * torch.diagonal(covariance)

    def log_px(self) -> float:
        marginal = torch.distributions.MultivariateNormal(
            self.b, self.W @ self.W.T + self.s2 * torch.eye(3, dtype=torch.float64))
        return float(marginal.log_prob(self.x))

    def elbo(self) -> float:
        """E_q log p(x|z) - KL(q || p), both in closed form."""
        residual = self.x - self.W @ self.q_mean - self.b
        expected_sq = residual @ residual + (self.W ** 2 @ self.q_var).sum()
        log_lik = -0.5 * (expected_sq / self.s2 + 3 * math.log(2 * math.pi * self.s2))
        kl = 0.5 * (self.q_mean @ self.q_mean + self.q_var.sum() - 2 - torch.log(self.q_var).sum())
        return float(log_lik - kl)

    def bound(self, samples: int, repeats: int, chunk: int = 1000) -> dict[str, torch.Tensor]:
        """The IW bound for `repeats` independent copies of x (a batch), k = `samples` each."""
        def log_likelihood(z: torch.Tensor) -> torch.Tensor:
            return gaussian_log_density(self.x, z @ self.W.T + self.b,
                                        torch.full((3,), math.log(self.s2), dtype=torch.float64)).sum(-1)

        mean = self.q_mean.expand(repeats, 2)
        logvar = torch.log(self.q_var).expand(repeats, 2)
        return importance_weighted_bound(mean, logvar, log_likelihood, samples, chunk)


def test_bernoulli_log_likelihood_matches_torch_distributions():
    decoder = nn.Sequential(nn.Linear(3, 12), nn.Unflatten(1, (1, 3, 4)))
    x = torch.bernoulli(torch.full((5, 1, 3, 4), 0.5))
    z = torch.randn(7, 5, 3)
    logits = decoder(z.reshape(35, 3)).reshape(7, 5, 1, 3, 4)
    reference = torch.distributions.Bernoulli(logits=logits).log_prob(x.expand_as(logits)).flatten(2).sum(2)
    torch.testing.assert_close(bernoulli_log_likelihood(decoder, x)(z), reference)


def test_iw_bound_with_one_sample_is_the_elbo_estimate():
    model = LinearGaussian()
    torch.manual_seed(0)
    one = model.bound(samples=1, repeats=20000)
    torch.testing.assert_close(one["iw_bound"], one["elbo"])  # the same draws: identical
    standard_error = float(one["elbo"].std()) / math.sqrt(20000)
    assert abs(float(one["elbo"].mean()) - model.elbo()) < 4 * standard_error


def test_iw_bound_increases_with_k_and_converges_to_the_closed_form_log_likelihood():
    model = LinearGaussian()
    torch.manual_seed(0)
    means = [float(model.bound(samples=k, repeats=200, chunk=500)["iw_bound"].mean()) for k in (1, 10, 100, 5000)]
    assert means == sorted(means)
    assert model.log_px() - model.elbo() > 3  # a loose ELBO (k = 1) ...
    assert abs(means[-1] - model.log_px()) < 0.01  # ... closed by k = 5000


def test_iw_bound_does_not_depend_on_the_chunk_size():
    model = LinearGaussian()
    torch.manual_seed(1)
    whole = model.bound(samples=64, repeats=2000, chunk=64)["iw_bound"]
    pieces = model.bound(samples=64, repeats=2000, chunk=5)["iw_bound"]  # 13 chunks, the last of 4
    standard_error = math.sqrt((whole.var() + pieces.var()) / 2000)
    assert abs(float(whole.mean() - pieces.mean())) < 4 * standard_error


def test_active_units_counts_units_whose_posterior_mean_varies():
    generator = torch.Generator().manual_seed(0)
    mean = torch.cat([torch.randn(1000, 2, generator=generator),  # variance ~1: active
                      0.05 * torch.randn(1000, 3, generator=generator)], 1)  # variance ~0.0025: not
    count, variance = active_units(mean, threshold=0.01)
    assert count == 2
    np.testing.assert_allclose(variance.numpy(), np.var(mean.numpy(), axis=0), rtol=1e-5)


def test_psnr_matches_torchmetrics_per_image():
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(6, 1, 8, 8, generator=generator)
    noisy = (target + 0.1 * torch.randn(6, 1, 8, 8, generator=generator)).clamp(0, 1)
    reference = peak_signal_noise_ratio(noisy, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    torch.testing.assert_close(psnr(noisy, target), reference)
    assert float(psnr(target, target)[0]) == pytest.approx(100.0)


def _auroc_by_pair_counting(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half."""
    wins = 0.0
    for p in scores[positive]:
        for n in scores[~positive]:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (positive.sum() * (~positive).sum())


def test_anomaly_auroc():
    positive = np.array([True] * 5 + [False] * 20)
    assert anomaly_auroc(np.r_[np.full(5, 3.0), np.zeros(20)], positive) == 1.0
    assert anomaly_auroc(np.ones(25), positive) == 0.5
    scores = np.random.default_rng(0).normal(size=25) + positive
    assert anomaly_auroc(scores, positive) == pytest.approx(_auroc_by_pair_counting(scores, positive))


def _softmax_regression_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                                 test_y: np.ndarray) -> float:
    """The probe's model fitted independently: features standardised on the training set, then
    sum of cross-entropies + ||W||^2 / 2 (C = 1, intercept not penalised) minimised by torch's L-BFGS
    in float64 to a gradient near zero."""
    mean, std = train_x.mean(0), train_x.std(0)
    std[std == 0] = 1.0
    x, t = (torch.from_numpy((a - mean) / std) for a in (train_x, test_x))
    y = torch.from_numpy(train_y).long()
    weights = torch.zeros(x.shape[1], int(y.max()) + 1, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(weights.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights, bias], max_iter=2000, tolerance_grad=1e-10,
                                  tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(x @ weights + bias, y, reduction="sum") + 0.5 * (weights ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    predictions = (t @ weights + bias).argmax(1).numpy()
    return float((predictions == test_y).mean())


def test_probe_accuracy_matches_an_independent_softmax_regression():
    from sklearn.datasets import load_digits

    from ae_lab.evaluation.downstream import probe_accuracy

    x, y = load_digits(return_X_y=True)
    train, test = slice(0, 1200), slice(1200, None)
    accuracy = probe_accuracy(x[train], y[train], x[test], y[test])
    reference = _softmax_regression_accuracy(x[train], y[train], x[test], y[test])
    assert 0.9 < reference < 1.0
    # the probe's lbfgs stops at sklearn's tolerance: at most one test image may fall the other way
    assert abs(accuracy - reference) <= 1 / len(y[test])


def test_sparse_code_statistics_by_hand():
    codes = torch.tensor([[0.0, 0.5, 0.005], [0.0, -1.0, 0.2]])
    stats = sparse_code_statistics(codes, near_zero=0.01)
    assert stats == pytest.approx({"code_mean_activation": (0.5 + 0.005 + 1.0 + 0.2) / 6,
                                   "code_near_zero_fraction": 3 / 6, "code_dead_units": 1.0})


def test_encoder_jacobian_norm_matches_autograd_jacobian():
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(4, 1, 3, 4)
    expected = torch.stack([torch.autograd.functional.jacobian(lambda v: encoder(v.unsqueeze(0))[0], example)
                            .pow(2).sum() for example in x])
    torch.testing.assert_close(encoder_jacobian_norm(encoder, x), expected)


def test_evaluation_metrics_of_a_vae_match_references_on_its_own_reconstructions(tmp_path):
    """`evaluate` on a small untrained VAE (digits, class 3 held out) against metrics computed here from the
    reconstructions sigmoid(decoder(posterior mean)): mse by scikit-learn, psnr by torchmetrics, bce and
    the closed-form KL by hand, and both anomaly AUROCs by roc_auc_score on those scores (the ELBO's:
    -ELBO, higher for anomalies). The posterior's variance is made e^-40, so the ELBO's one sample is the
    mean to 1e-9 and the ELBO is known exactly."""
    from sklearn.metrics import mean_squared_error, roc_auc_score

    from ae_lab.data import build_datamodule
    from ae_lab.evaluation.evaluate import evaluate
    from ae_lab.module import Autoencoder
    from conftest import compose_config

    latent = 4
    cfg = compose_config(["model=vae", "model.hidden_dims=[16]", f"model.latent_dim={latent}", "logger=none",
                          "dataset.held_out_class=3", "eval=minimal"])
    data = build_datamodule(cfg.dataset)
    torch.manual_seed(0)
    module = Autoencoder.from_config(cfg, data.input_shape)
    with torch.no_grad():
        module.head.linear.weight[latent:] = 0.0
        module.head.linear.bias[latent:] = -40.0
    metrics = evaluate(module, data, cfg, tmp_path).metrics

    test = data.splits["test"].batch(torch.arange(len(data.splits["test"])))
    x, is_anomaly = test["x"], (test["label"] == 3).numpy()
    with torch.no_grad():
        mean, logvar = module.head.linear(module.encoder(x)).chunk(2, dim=1)
        logits = module.decoder(mean)
    x_hat, flat = torch.sigmoid(logits).flatten(1), x.flatten(1)
    pixels = flat.shape[1]
    mse = pixels * mean_squared_error(flat.T.numpy(), x_hat.T.numpy(), multioutput="raw_values")
    psnr_images = peak_signal_noise_ratio(torch.sigmoid(logits), x, data_range=1.0, reduction="none",
                                          dim=(1, 2, 3))
    bce = (nn.functional.softplus(logits) - x * logits).flatten(1).sum(1).numpy()
    kl = (0.5 * (mean ** 2 + logvar.exp() - 1 - logvar)).sum(1).numpy()
    elbo = -(bce + kl)
    expected = {"mse": mse.mean(), "psnr": float(psnr_images.mean()), "bce": bce.mean(), "kl": kl.mean(),
                "elbo": elbo.mean(), "elbo_recon_nll": bce.mean(),
                "anomaly_auroc_recon": roc_auc_score(is_anomaly, bce),
                "anomaly_auroc_elbo": roc_auc_score(is_anomaly, -elbo)}
    assert abs(expected["anomaly_auroc_elbo"] - 0.5) > 0.05  # a flipped score would give 1 - AUROC
    for name, value in expected.items():
        assert metrics[f"eval/{name}"] == pytest.approx(value, rel=1e-5), name


# ---- the evaluation of real runs ------------------------------------------------------------------

def _png(path) -> np.ndarray:
    assert path.is_file(), path
    return matplotlib.image.imread(path)


def _assert_drawn(path, count: int, rows: int) -> None:
    """An `image_rows` grid: room for `rows` x `count` images of at least 56 pixels, and not blank."""
    pixels = _png(path)
    assert pixels.shape[0] > 56 * rows and pixels.shape[1] > 56 * count
    assert pixels[..., :3].std() > 0.05


def test_image_rows_puts_each_image_in_its_row_and_column(tmp_path):
    """Every cell is its image, enlarged without smoothing, at its row and column: cell (r, c) is filled
    with its own colour (red level, no green: apart from the labels' grey) and found again in the PNG as
    one solid block of the enlarged size."""
    from PIL import Image

    from ae_lab.figures import image_rows

    rows, count, size = 3, 4, 8
    levels = torch.arange(1, rows * count + 1, dtype=torch.float32).reshape(rows, count) / (rows * count + 1)
    colours = torch.stack([levels, torch.zeros_like(levels), 1 - levels], dim=2)  # (rows, count, RGB)
    batches = {f"row {r}": colours[r].reshape(count, 3, 1, 1).expand(count, 3, size, size) for r in range(rows)}
    path = image_rows(batches, tmp_path / "grid.png", title="a title", columns=[f"c{c}" for c in range(count)])
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    boxes = []
    for colour in colours.reshape(-1, 3):
        found = np.argwhere((pixels == (colour * 255).round().numpy()).all(axis=2))
        top, left = found.min(0)
        bottom, right = found.max(0) + 1
        assert bottom - top == right - left >= 56 and len(found) == (bottom - top) * (right - left)  # one solid block
        boxes.append((top, left))
    tops = [[boxes[r * count + c][0] for c in range(count)] for r in range(rows)]
    lefts = [[boxes[r * count + c][1] for c in range(count)] for r in range(rows)]
    assert all(len(set(row)) == 1 for row in tops) and [row[0] for row in tops] == sorted({row[0] for row in tops})
    assert all(row == lefts[0] for row in lefts) and lefts[0] == sorted(set(lefts[0]))


def _draws_missing_glyph_box(font, character: str) -> bool:
    """Whether `font` draws `character` as its missing-glyph box: the bitmap it draws for a code point
    no font has (U+10FFFD, private use)."""
    box, drawn = font.getmask("\U0010FFFD"), font.getmask(character)
    return drawn.size == box.size and bytes(drawn) == bytes(box)


def _record_drawn_text(monkeypatch) -> list:
    """(text, font) of every text Pillow draws from now on in this test."""
    from PIL import ImageDraw

    drawn, original = [], ImageDraw.ImageDraw.text

    def text(self, xy, content, *args, **kwargs):
        drawn.append((content, kwargs["font"]))
        return original(self, xy, content, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", text)
    return drawn


def _assert_no_missing_glyph(drawn: list) -> None:
    """Every character of every text drawn, in the font it was drawn with, has its own glyph; the check
    itself finds the box Pillow's default font draws for the arrow of the interpolations' labels."""
    from PIL import ImageFont

    labels = {content for content, _ in drawn}
    assert any("→" in label for label in labels) and any("+" in label for label in labels)
    missing = {(content, character) for content, font in drawn for character in set(content)
               if not character.isspace() and _draws_missing_glyph_box(font, character)}
    assert not missing
    assert _draws_missing_glyph_box(ImageFont.load_default(size=13), "→")


def test_interpolation_pairs_join_two_classes_where_there_are_labels():
    from ae_lab.evaluation.visual import interpolation_pairs

    labels = torch.tensor([3, 3, 5, 3, 3, 7, 3, 3])
    pairs = interpolation_pairs(labels, len(labels))
    assert pairs == [(0, 2), (1, 5)]  # no third example of another class is left for a third pair
    assert all(labels[a] != labels[b] for a, b in pairs)
    assert interpolation_pairs(torch.tensor([0, 1, 2, 3, 4, 5, 6]), 7) == [(0, 1), (2, 3), (4, 5)]
    assert interpolation_pairs(None, 7) == [(0, 1), (2, 3), (4, 5)]
    assert interpolation_pairs(torch.zeros(7), 7) == [(0, 1), (2, 3), (4, 5)]  # one class: consecutive


def test_learning_curves_draw_each_term_train_and_val_per_run_with_the_best_epoch(tmp_path, monkeypatch):
    """Two runs' history rows (ae_lab/history.py): a panel per term (loss first) and one for the scheduled
    weight; per run its train and val epoch means at their epochs, the step losses at the fraction of
    the epoch they end (10 steps an epoch), a dotted line at its best epoch (lowest val/loss)."""
    from ae_lab import figures

    drawn = []
    monkeypatch.setattr(figures, "_save", lambda figure, path, margins=None: drawn.append(figure) or path)

    def history(val: list[float]) -> list[dict]:
        rows = []
        for epoch, loss in enumerate(val):
            rows.append({"epoch": epoch, "step": 10 * epoch + 4, "train/loss_step": 9.0 - epoch})
            rows.append({"epoch": epoch, "step": 10 * epoch + 9, "train/loss_step": 8.5 - epoch,
                         "train/loss": loss + 1, "train/kl": 0.5, "val/loss": loss, "val/kl": 0.4,
                         "scheduled/beta": epoch / 2})
        return rows

    figures.learning_curves({"a": history([3.0, 2.0, 2.5]), "b": history([4.0, 3.5, 3.0])}, tmp_path / "c.png")
    axes = [axis for axis in drawn[0].axes if axis.get_visible()]
    assert [axis.get_title() for axis in axes] == ["loss", "kl", "scheduled weights"]
    lines = {line.get_label(): line for line in axes[0].get_lines()}
    assert list(lines["a: val"].get_xdata()) == [0, 1, 2] and list(lines["a: val"].get_ydata()) == [3.0, 2.0, 2.5]
    assert lines["a: val"].get_linestyle() == "--" and lines["a: train"].get_linestyle() == "-"
    assert list(lines["b: train"].get_ydata()) == [5.0, 4.5, 4.0]
    assert list(lines["a: best epoch 1"].get_xdata()) == [1, 1] and list(lines["b: best epoch 2"].get_xdata()) == [2, 2]
    assert list(lines["a: train, per step"].get_xdata()) == pytest.approx([-0.5, 0, 0.5, 1, 1.5, 2])
    assert list(axes[2].get_lines()[0].get_ydata()) == [0.0, 0.5, 1.0]


def test_code_scatter_legend_has_one_entry_per_value_in_its_colour(tmp_path, monkeypatch):
    """Values with gaps (0, 2, 7, 11: a held-out class, a factor's sparse values): each is in the legend,
    labelled with itself, its marker in the colour its points have."""
    import matplotlib.pyplot as plt

    from ae_lab import figures

    drawn = []
    monkeypatch.setattr(figures, "_save", lambda figure, path, margins=None: drawn.append(figure))
    colours = torch.tensor([0, 2, 7, 11] * 5)
    figures.scatter(torch.randn(20, 2), colours, tmp_path / "codes.png", "codes", ("a", "b"), "label")
    [axis] = drawn[0].axes
    legend = axis.get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["0", "2", "7", "11"]
    cmap = plt.get_cmap("tab10")
    for value, handle in zip((0, 2, 7, 11), legend.legend_handles):
        assert np.allclose(handle.get_markerfacecolor()[:3], cmap(value / 11)[:3])
    plt.close(drawn[0])


def test_autoencoder_run_evaluates_and_draws_labels_with_a_glyph_for_every_character(tmp_path, monkeypatch):
    """Which metrics and figures a denoising run's evaluation gives and where they go (a smoke test of their
    values, checked against references above)."""
    drawn = _record_drawn_text(monkeypatch)
    metrics = train_in_process([*QUICK, "noise=masking", "eval.num_reconstructions=6"], tmp_path)
    _assert_no_missing_glyph(drawn)
    for key in ("mse", "bce", "psnr", "psnr_corrupted", "psnr_denoised", "psnr_gain", "probe_accuracy",
                "probe_accuracy_pixels", "jacobian_frobenius_sq"):
        assert np.isfinite(metrics[f"eval/{key}"]), key
    assert metrics["eval/psnr_gain"] == pytest.approx(metrics["eval/psnr_denoised"] - metrics["eval/psnr_corrupted"])
    assert "eval/elbo" not in metrics and "eval/mig" not in metrics  # no Gaussian head, no factors
    assert read_json(tmp_path / "metrics.json") == metrics
    figures = tmp_path / "figures"
    _assert_drawn(figures / "reconstructions.png", count=6, rows=3)  # clean, corrupted, denoised
    _assert_drawn(figures / "traversals.png", count=9, rows=10)
    _assert_drawn(figures / "interpolations.png", count=10, rows=3)
    assert _png(figures / "codes.png")[..., :3].std() > 0.05
    assert _png(figures / "curves.png")[..., :3].std() > 0.05 and (tmp_path / "history.csv").is_file()
    assert not (figures / "samples.png").exists()
    details = read_json(tmp_path / "evaluation.json")
    assert len(details["code_variance_per_unit"]) == 16
    summary = run_contents(tmp_path)["summary"]  # the W&B run: every metric and figure
    assert {key: summary[key] for key in metrics} == metrics
    drawn = {path.stem for path in figures.glob("*.png")}
    assert {key.split("/")[1] for key in summary if key.startswith("figures/") and key.endswith("/_type")} == drawn


def test_probe_on_digits_is_far_above_chance_and_above_an_untrained_encoders(tmp_path):
    """A 4-unit code: 10 classes, chance is 0.1; the code of the same encoder untrained (optim.lr=1e-12)
    gives 0.49 (measured), trained for 5 epochs 0.69."""
    metrics = train_in_process(["trainer.max_epochs=5", "trainer.enable_progress_bar=false", "logger=none",
                                "eval.figures=false", "model.latent_dim=4"], tmp_path)
    assert metrics["eval/probe_accuracy"] > 0.6
    assert metrics["eval/probe_accuracy_pixels"] > 0.9


def test_vae_run_reports_likelihood_metrics(tmp_path):
    metrics = train_in_process([*QUICK, "model=vae", "eval.iw_samples=50", "model.latent_dim=4"], tmp_path)
    # the IW bound is tighter than the ELBO: -log p(x) <= iw_nll <= -elbo
    assert metrics["eval/iw_nll"] < -metrics["eval/elbo"]
    assert metrics["eval/elbo"] == pytest.approx(-(metrics["eval/elbo_recon_nll"] + metrics["eval/kl"]), rel=1e-5)
    assert "eval/active_units" in metrics  # its count: test_active_units_counts_units_whose_posterior_mean_varies
    details = read_json(tmp_path / "evaluation.json")
    assert sum(details["kl_per_unit"]) == pytest.approx(metrics["eval/kl"], rel=1e-4)
    _assert_drawn(tmp_path / "figures" / "samples.png", count=10, rows=1)
    _assert_drawn(tmp_path / "figures" / "traversals.png", count=9, rows=4)


def test_held_out_class_is_left_out_of_training_and_scored_as_the_anomaly(tmp_path):
    from conftest import compose_config
    from ae_lab.data import build_datamodule

    cfg = compose_config([*QUICK, "dataset.held_out_class=3"])
    data = build_datamodule(cfg.dataset)
    for name in ("train", "val"):
        split = data.splits[name]
        assert 3 not in split.batch(torch.arange(len(split)))["label"]
    test = data.splits["test"]
    assert 3 in test.batch(torch.arange(len(test)))["label"]
    metrics = train_in_process([*QUICK, "dataset.held_out_class=3", "model=vae", "eval.figures=false"], tmp_path)
    # their values against roc_auc_score: test_evaluation_metrics_of_a_vae_match_references_on_its_own_reconstructions
    assert {"eval/anomaly_auroc_recon", "eval/anomaly_auroc_elbo"} <= set(metrics)


def test_sparse_and_factor_data_runs(tmp_path):
    """A smoke test of the sparse-code and disentanglement metrics in a run (their values are checked in
    test_sparse_code_statistics_by_hand and tests/test_disentanglement.py), and of the sample sizes used."""
    metrics = train_in_process([*QUICK, "loss=sparse_kl", "dataset=shapes", "dataset.subsample=2000",
                                "model.arch=conv", "model.latent_dim=6", "eval.disentanglement_train_size=300",
                                "eval.disentanglement_test_size=100", "eval.dci=true"], tmp_path)
    for key in ("code_mean_activation", "code_near_zero_fraction", "mig", "factor_vae", "dci_disentanglement",
                "dci_completeness", "dci_informativeness", "sap"):
        assert np.isfinite(metrics[f"eval/{key}"]), key
    assert "eval/probe_accuracy" not in metrics  # shapes have factors, not labels
    # the sizes used, beside the values: a test split of 200 (10% of 2000) cut at 2/3 into 133 training
    # and 67 test codes, both under the caps of 300 and 100
    sizes = {key: value for key, value in metrics.items() if "_n_" in key}
    assert sizes == {"eval/mig_n_train": 133, "eval/factor_vae_n_pool": 200, "eval/factor_vae_n_train": 300,
                     "eval/factor_vae_n_eval": 100, "eval/sap_n_train": 133, "eval/sap_n_test": 67,
                     "eval/dci_n_train": 133, "eval/dci_n_test": 67}
    assert _png(tmp_path / "figures" / "activations.png")[..., :3].std() > 0.05
    assert _png(tmp_path / "figures" / "codes.png")[..., :3].std() > 0.05


def test_evaluation_is_repeatable(tmp_path):
    first = train_in_process([*QUICK, "noise=gaussian", "model=vae", "logger=none", "eval.figures=false"],
                             tmp_path / "a")
    second = train_in_process([*QUICK, "noise=gaussian", "model=vae", "logger=none", "eval.figures=false"],
                              tmp_path / "b")
    assert first == second


def test_disentanglement_pool_from_the_grid_reaches_the_asked_sizes():
    """A 500-image shapes set has a test split of 50: too few for SAP's classifiers (skipped, not run
    on a handful of codes); a pool drawn from the whole grid gives the sizes asked for, recorded."""
    from ae_lab.data import build_datamodule
    from ae_lab.evaluation.disentanglement import sample_sizes
    from ae_lab.evaluation.evaluate import _disentanglement, _disentanglement_pool, encode_split
    from ae_lab.module import Autoencoder
    from conftest import compose_config
    from omegaconf import OmegaConf

    overrides = ["dataset=shapes", "dataset.subsample=500", "model.latent_dim=4", "eval.disentanglement_pool=1500",
                 "eval.disentanglement_train_size=1000", "eval.disentanglement_test_size=500"]
    cfg = compose_config(overrides)
    data = build_datamodule(cfg.dataset)
    module = Autoencoder.from_config(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), data.input_shape)
    module.eval()
    test = encode_split(module, data.splits["test"], cfg)
    codes, factors = _disentanglement_pool(module, data, test, cfg.eval)
    assert len(codes) == len(data.splits["test"]) == 50
    assert _disentanglement(codes, factors, cfg.eval) == {}  # 33 training codes for 40 orientations

    grid = compose_config([*overrides, "eval.disentanglement_pool_source=grid"]).eval
    codes, factors = _disentanglement_pool(module, data, test, grid)
    assert codes.shape == (1500, 4) and len(np.unique(factors, axis=0)) == 1500  # distinct grid images
    assert len(np.unique(factors[:, 3])) == 40  # every orientation, not only the 500 images' ones
    metrics = _disentanglement(codes, factors, grid)
    assert {key: metrics[key] for key in ("mig_n_train", "sap_n_train", "sap_n_test")} == {
        "mig_n_train": 1000, "sap_n_train": 1000, "sap_n_test": 500}
    assert 0 <= metrics["sap"] <= 1 and 0 <= metrics["mig"] <= 1
    # eval=paper: disentanglement_lib's 10,000 training and 5,000 test codes on shapes and dsprites
    for dataset in ("shapes", "dsprites"):
        paper = compose_config([f"dataset={dataset}", "eval=paper"]).eval
        assert paper.disentanglement_pool_source == "grid"
        sizes = sample_sizes(paper.disentanglement_pool, num_train=paper.disentanglement_train_size,
                             num_test=paper.disentanglement_test_size)
        assert (sizes["sap_n_train"], sizes["sap_n_test"], sizes["mig_n_train"]) == (10000, 5000, 10000)
