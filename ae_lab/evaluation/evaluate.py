"""Evaluation after fit: the metrics researchers report for autoencoders, and the run's figures.

`evaluate` runs on one process with the best weights, on the test split (its first
`eval.test_examples`, when set) plus a sample of the training split for the probe. Its randomness (test-time corruption, importance samples, subsets) comes from
`eval.seed` inside a forked RNG, so evaluating changes no training state and repeats exactly.

Metrics (`eval/*` in metrics.json and the W&B summary; `test/*` are the training loss terms on test):

- every model: `mse`, `bce` (per example, summed over pixels) and `psnr` (dB, mean over images) of the
  reconstruction from the code (the posterior mean for a VAE); `jacobian_frobenius_sq`, the mean
  ||d code / d x||_F^2 on `eval.jacobian_examples` test images;
- denoising (`noise` set): `psnr_corrupted` (the corrupted test input, clipped to [0, 1], against the
  clean one), `psnr_denoised` (the reconstruction of the corrupted input against the clean one) and
  `psnr_gain`, their difference;
- Gaussian head: `kl`, `active_units`; with a Bernoulli decoder also `elbo`, `elbo_recon_nll`, and
  `iw_nll`, minus the importance-weighted bound with k = `eval.iw_samples` (an upper bound on -log p(x));
- labelled data: `probe_accuracy` of a logistic regression on the codes and `probe_accuracy_pixels`
  on raw pixels; with `dataset.held_out_class`, `anomaly_auroc_recon` (and `anomaly_auroc_elbo`), the
  AUROC of the scores of `anomaly.py` (the very scores `TrainedModel.score` gives), which go per test
  example into `scores` (the run folder's `scores.npz`) and, with `eval.figures`, into `figures/roc.png`;
- labelled data (`eval.fd_samples` > 0): sample quality as Fréchet distances to test examples in a
  trained classifier's features (`sample_quality.py`): `fd_gmm` (samples from a Gaussian mixture on
  the training codes), `fd_prior` (Gaussian head: from N(0, I)), `fd_real` (training examples: the
  floor at this sample size), with `fd_n` and the classifier's `fd_classifier_accuracy`;
- data with ground-truth factors: MIG, FactorVAE score, SAP, and DCI with `eval.dci` (slow: gradient-
  boosted trees) (`disentanglement.py`), each with the sample sizes it used beside it
  (`mig_n_train`, `factor_vae_n_pool`, `factor_vae_n_train`, `factor_vae_n_eval`, `sap_n_train`,
  `sap_n_test`, `dci_n_train`, `dci_n_test`), so that runs measured at different sizes are told apart;
- sparse codes (`loss.sparsity_weight` > 0): `code_mean_activation`, `code_near_zero_fraction`,
  `code_dead_units`.

Per-unit vectors (KL per latent unit, variance of each code unit) go to `evaluation.json`, and so does
`resolution`: for each metric that counts (units, test examples, pairs, votes), the step one count
makes, e.g. 1/n for an accuracy over n test examples; `ae_lab.reproduce` allows a count of difference
where float rounding may tip one decision.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from ae_lab.data import ArrayDataModule, Split
from ae_lab.evaluation.anomaly import anomaly_scores, score_kinds
from ae_lab.evaluation.codes import encoder_jacobian_norm, sparse_code_statistics
from ae_lab.evaluation.disentanglement import disentanglement_metrics, minimum_train_size, sample_sizes
from ae_lab.evaluation.encoded import Encoded
from ae_lab.evaluation.downstream import anomaly_auroc, probe_accuracy, roc_points
from ae_lab.evaluation.likelihood import active_units, bernoulli_log_likelihood, importance_weighted_bound
from ae_lab.evaluation.reconstruction import psnr
from ae_lab.evaluation.sample_quality import sample_quality
from ae_lab.evaluation.visual import draw_figures
from ae_lab.figures import roc_curves
from ae_lab.module import Autoencoder
from ae_lab.objectives import gaussian_kl_per_unit, reconstruction_error

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    metrics: dict[str, float]
    details: dict[str, Any]
    figures: dict[str, Path] = field(default_factory=dict)
    # with a held-out class, per test example: each anomaly score, `labels` and `is_anomaly` (scores.npz)
    scores: dict[str, np.ndarray] = field(default_factory=dict)


def evaluate(module: Autoencoder, data: ArrayDataModule, cfg: DictConfig, run_dir: Path,
             checkpoint: Path | None = None) -> Evaluation:
    """Measure the trained `module` on `data`'s test split as `cfg.eval` says; draw its figures into
    `run_dir/figures` when `eval.figures` is set. `checkpoint`, the file the module's weights were
    loaded from (None: weights no file holds), is what the Gaussian-mixture sampler saved in `run_dir`
    records it was fitted from."""
    module.eval()
    devices = [module.device] if module.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.eval.seed)
        test_split = data.splits["test"]
        if cfg.eval.test_examples is not None:
            test_split = test_split.head(cfg.eval.test_examples)
        test = encode_split(module, test_split, cfg)
        metrics = {name: float(values.mean()) for name, values in test.values.items()}
        details: dict[str, Any] = {}
        if "psnr_denoised" in metrics:
            metrics["psnr_gain"] = metrics["psnr_denoised"] - metrics["psnr_corrupted"]
        metrics.update(_latent_metrics(test, cfg, details))
        metrics.update(_downstream_metrics(module, data, test_split, test, cfg, details))
        scores = _anomaly_scores(module, data, test_split, test, cfg)
        kinds = score_kinds(module) if scores else ()
        metrics.update({f"anomaly_auroc_{kind}": anomaly_auroc(scores[kind], scores["is_anomaly"]) for kind in kinds})
        if scores:
            anomalies = int(scores["is_anomaly"].sum())
            pairs = max(anomalies * (len(scores["is_anomaly"]) - anomalies), 1)  # one pair ranked the other way
            _resolution(details, **{f"anomaly_auroc_{kind}": 1 / pairs for kind in kinds})
        metrics.update(_sample_quality(module, data, test_split, test, cfg, run_dir, checkpoint, details))
        if test.factor_classes is None:
            _skip(details, "disentanglement (MIG, FactorVAE, SAP, DCI)", "the data have no ground-truth factor classes")
        elif cfg.eval.disentanglement_pool > 0:
            metrics.update(_disentanglement(*_disentanglement_pool(module, data, test, cfg.eval), cfg.eval))
        if cfg.loss.sparsity_weight > 0:
            metrics.update(sparse_code_statistics(test.codes, cfg.eval.near_zero))
            _resolution(details, code_dead_units=1, code_near_zero_fraction=1 / test.codes.numel())
        if "factor_vae_n_eval" in metrics:
            _resolution(details, factor_vae=1 / metrics["factor_vae_n_eval"])
        if cfg.eval.jacobian_examples > 0:
            metrics["jacobian_frobenius_sq"] = _jacobian_norm(module, test_split, cfg.eval)
        figures = draw_figures(module, data, test, cfg, run_dir / "figures") if cfg.eval.figures else {}
        if cfg.eval.figures and scores:
            curves = {f"{kind} (AUROC {metrics[f'anomaly_auroc_{kind}']:.3f})":
                      roc_points(scores[kind], scores["is_anomaly"]) for kind in kinds}
            figures["roc"] = roc_curves(curves, run_dir / "figures" / "roc.png",
                                        title=f"Finding held-out class {data.held_out_class} in the test split")
    return Evaluation({f"eval/{name}": value for name, value in sorted(metrics.items())}, details, figures, scores)


def _anomaly_scores(module: Autoencoder, data: ArrayDataModule, test_split: Split, test: Encoded,
                    cfg: DictConfig) -> dict[str, np.ndarray]:
    """With a held-out class (and labels), every test example's anomaly scores (`anomaly.py`, with the
    ELBO's k = `eval.iw_samples` draws, at least 1, from `eval.seed`), its label and whether it is of
    the held-out class; else nothing."""
    if data.held_out_class is None or test.labels is None:
        return {}
    ev = cfg.eval
    parts = [anomaly_scores(module, batch["x"], max(ev.iw_samples, 1), ev.seed, ev.max_decode_batch)
             for batch in _batches(test_split, len(test_split), ev.batch_size, module.device)]
    scores = {kind: torch.cat([part[kind] for part in parts]).cpu().numpy() for kind in parts[0]}
    return {**scores, "labels": test.labels.numpy(), "is_anomaly": (test.labels == data.held_out_class).numpy()}


def _disentanglement_pool(module: Autoencoder, data: ArrayDataModule, test: Encoded,
                          ev: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    """The codes and factor classes of the disentanglement pool: the first `eval.disentanglement_pool`
    test codes, or with `eval.disentanglement_pool_source=grid` that many examples drawn from the data
    set's whole factor grid (by `eval.seed`) and encoded here; a data set without a grid uses its test
    split."""
    if ev.disentanglement_pool_source == "grid" and data.sample_grid is not None:
        pool = data.sample_grid(ev.disentanglement_pool, ev.seed)
        codes, factors = [], []
        with torch.no_grad():
            for batch in _batches(pool, len(pool), ev.batch_size, module.device):
                codes.append(module.head.code(module.encoder(batch["x"])).cpu())
                factors.append(batch["factor_classes"].cpu())
        return torch.cat(codes).numpy(), torch.cat(factors).numpy()
    return test.codes[:ev.disentanglement_pool].numpy(), test.factor_classes[:ev.disentanglement_pool].numpy()


def _disentanglement(codes: np.ndarray, factors: np.ndarray, ev: DictConfig) -> dict[str, float]:
    """MIG, FactorVAE, SAP (and DCI) of a pool of codes, with the sample sizes each used
    (`<metric>_n_<part>`); nothing, with a warning, when the pool is too small for SAP's and DCI's
    classifiers."""
    sizes = {"num_train": ev.disentanglement_train_size, "num_test": ev.disentanglement_test_size,
             "factor_vae_num_train": ev.disentanglement_train_size,
             "factor_vae_num_eval": ev.disentanglement_test_size, "with_dci": ev.dci}
    used = sample_sizes(len(codes), **sizes)
    needed = minimum_train_size(factors)
    if used["sap_n_train"] < needed:
        log.warning("disentanglement metrics skipped: a pool of %d codes gives SAP's classifiers %d training "
                    "codes, fewer than the %d its factors need (a larger test split, e.g. a larger "
                    "dataset.subsample, or eval.disentanglement_pool_source=grid gives more)",
                    len(codes), used["sap_n_train"], needed)
        return {}
    return {**disentanglement_metrics(codes, factors, np.random.default_rng(ev.seed), **sizes), **used}


def _batches(split: Split, count: int, batch_size: int, device: torch.device):
    """The first `count` examples of `split` in batches, moved to `device`."""
    for start in range(0, count, batch_size):
        batch = split.batch(torch.arange(start, min(start + batch_size, count)))
        yield {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def encode_split(module: Autoencoder, split: Split, cfg: DictConfig) -> Encoded:
    """One pass over `split`: codes, posterior parameters and every per-example metric."""
    gaussian = module.objective.gaussian_head
    likelihood = gaussian and cfg.loss.recon == "bce"
    bounded = isinstance(module.output, torch.nn.Sigmoid)
    collected: dict[str, list[torch.Tensor]] = {}

    def keep(name: str, value: torch.Tensor) -> None:
        collected.setdefault(name, []).append(value.detach().cpu())

    for batch in _batches(split, len(split), cfg.eval.batch_size, module.device):
        x = batch["x"]
        features = module.encoder(x)
        if gaussian:
            mean, logvar = module.head.posterior(features)
            keep("mean", mean)
            keep("logvar", logvar)
            code = mean
        else:
            code = module.head.code(features)
        keep("codes", code)
        logits = module.decoder(code)
        if bounded:  # a Bernoulli likelihood only for outputs in (0, 1)
            keep("bce", reconstruction_error(logits, x, "bce"))
        keep("mse", reconstruction_error(logits, x, "mse", module.output))
        keep("psnr", psnr(module.output(logits), x))
        if module.corrupt is not None:
            corrupted = module.corrupt(x)
            keep("psnr_corrupted", psnr(corrupted.clamp(0, 1) if bounded else corrupted, x))
            keep("psnr_denoised", psnr(module.reconstruct(corrupted), x))
        if likelihood:
            samples = max(cfg.eval.iw_samples, 1)
            chunk = max(1, cfg.eval.max_decode_batch // x.shape[0])
            bound = importance_weighted_bound(mean, logvar, bernoulli_log_likelihood(module.decoder, x),
                                              samples, chunk)
            keep("elbo_recon_nll", -bound["log_likelihood"])
            keep("iw_bound", bound["iw_bound"])
        for key in ("label", "factor_classes"):
            if key in batch:
                keep(key, batch[key])
    tensors = {name: torch.cat(parts) for name, parts in collected.items()}
    values = {name: tensors[name] for name in ("bce", "mse", "psnr", "psnr_corrupted", "psnr_denoised")
              if name in tensors}
    if gaussian:
        values["kl"] = gaussian_kl_per_unit(tensors["mean"], tensors["logvar"]).sum(1)
    if likelihood:  # the ELBO with its KL in closed form and its reconstruction part from k samples
        values["elbo_recon_nll"] = tensors["elbo_recon_nll"]
        values["elbo"] = -(values["elbo_recon_nll"] + values["kl"])
        if cfg.eval.iw_samples > 0:
            values["iw_nll"] = -tensors["iw_bound"]
    return Encoded(tensors["codes"], values, tensors.get("label"), tensors.get("factor_classes"),
                   tensors.get("mean"), tensors.get("logvar"))


def _latent_metrics(test: Encoded, cfg: DictConfig, details: dict[str, Any]) -> dict[str, float]:
    """Active units (Gaussian head) and the per-unit vectors that go into evaluation.json."""
    details["code_variance_per_unit"] = test.codes.var(0, unbiased=False).tolist()
    if test.mean is None:
        return {}
    count, variance = active_units(test.mean, cfg.eval.active_unit_threshold)
    details["kl_per_unit"] = gaussian_kl_per_unit(test.mean, test.logvar).mean(0).tolist()
    details["active_units"] = [d for d, v in enumerate(variance.tolist()) if v > cfg.eval.active_unit_threshold]
    _resolution(details, active_units=1)
    return {"active_units": float(count)}


def _resolution(details: dict[str, Any], **steps: float) -> None:
    """Record the step one count makes in each of these metrics (evaluation.json's `resolution`)."""
    details.setdefault("resolution", {}).update({f"eval/{name}": step for name, step in steps.items()})


def _skip(details: dict[str, Any], metrics: str, reason: str) -> None:
    """Note a metric that does not apply, in the log and in evaluation.json's `skipped`."""
    log.info("evaluation: %s skipped: %s", metrics, reason)
    details.setdefault("skipped", {})[metrics] = reason


def _downstream_metrics(module: Autoencoder, data: ArrayDataModule, test_split: Split, test: Encoded,
                        cfg: DictConfig, details: dict[str, Any]) -> dict[str, float]:
    """The linear probe (labelled data), on the classes trained on."""
    if test.labels is None:
        _skip(details, "probe_accuracy, anomaly_auroc", "the data have no labels")
        return {}
    metrics: dict[str, float] = {}
    held_out = data.held_out_class
    train = data.splits["train"]
    count = min(cfg.eval.probe_train_size, len(train))
    if count == 0:
        return metrics
    if len(train.labels[train.rows(torch.arange(len(train)))].unique()) < 2:
        _skip(details, "probe_accuracy", "the training split has fewer than two classes")
        return metrics
    positions = torch.randperm(len(train))[:count]
    codes, pixels, labels = [], [], []
    with torch.no_grad():
        for start in range(0, count, cfg.eval.batch_size):
            batch = train.batch(positions[start:start + cfg.eval.batch_size])
            x = batch["x"].to(module.device)
            codes.append(module.head.code(module.encoder(x)).cpu())
            pixels.append(batch["x"].flatten(1).cpu())  # a split held on the GPU (dataset.on_device) gives GPU batches
            labels.append(batch["label"].cpu())
    known = (test.labels != held_out) if held_out is not None else torch.ones_like(test.labels, dtype=torch.bool)
    test_pixels = torch.cat([batch["x"].flatten(1) for batch in _batches(
        test_split, len(test_split), cfg.eval.batch_size, torch.device("cpu"))])
    train_labels = torch.cat(labels).numpy()
    test_labels = test.labels[known].numpy()
    metrics["probe_accuracy"] = probe_accuracy(torch.cat(codes).numpy(), train_labels,
                                               test.codes[known].numpy(), test_labels)
    metrics["probe_accuracy_pixels"] = probe_accuracy(torch.cat(pixels).numpy(), train_labels,
                                                      test_pixels[known].numpy(), test_labels)
    _resolution(details, probe_accuracy=1 / len(test_labels), probe_accuracy_pixels=1 / len(test_labels))
    return metrics


def _sample_quality(module: Autoencoder, data: ArrayDataModule, test_split: Split, test: Encoded,
                    cfg: DictConfig, run_dir: Path, checkpoint: Path | None,
                    details: dict[str, Any]) -> dict[str, float]:
    """The Fréchet distances of the module's samples (labelled data, `eval.fd_samples` > 0)."""
    if cfg.eval.fd_samples == 0:
        return {}
    if test.labels is None:
        _skip(details, "fd_prior, fd_gmm", "the data have no labels to train the feature classifier on")
        return {}
    codes = min(len(data.splits["train"]), cfg.eval.gmm_train_size)
    with_gmm = cfg.eval.gmm_components <= codes
    if not with_gmm:
        _skip(details, "fd_gmm", f"eval.gmm_components={cfg.eval.gmm_components} is more than the {codes} "
                                 "training codes the mixture would be fitted on")
    return sample_quality(module, data, test_split, cfg, run_dir, checkpoint, with_gmm, details)


def _jacobian_norm(module: Autoencoder, split: Split, ev: DictConfig) -> float:
    def encode(x: torch.Tensor) -> torch.Tensor:
        return module.head.code(module.encoder(x))

    norms = [encoder_jacobian_norm(encode, batch["x"])
             for batch in _batches(split, min(ev.jacobian_examples, len(split)), ev.batch_size, module.device)]
    return float(torch.cat(norms).mean())
