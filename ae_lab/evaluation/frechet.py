"""The Fréchet distance between two sets of features, each summarised by a Gaussian: FID's formula
(Heusel et al. 2017), here in the features of a classifier trained on the data set (`classifier.py`)
instead of Inception's, whose weights cannot be had offline.

    FD = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

the squared 2-Wasserstein distance between N(mu_1, S_1) and N(mu_2, S_2). 0 for equal statistics;
estimated from n samples it is biased upwards by about tr(S_1 + S_2)/n-order terms, so values are
comparable only at the same sample size (recorded beside them).
"""

from __future__ import annotations

import numpy as np


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (F,) and covariance (F, F; unbiased, divided by n - 1) of `features` (n, F), in float64."""
    values = np.asarray(features, dtype=np.float64)
    return values.mean(0), np.cov(values, rowvar=False).reshape(values.shape[1], values.shape[1])


def frechet_distance(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray) -> float:
    """FD between N(mean_a, cov_a) and N(mean_b, cov_b), for symmetric positive semi-definite covariances.

    tr (S_a S_b)^(1/2) is computed as the sum of the square roots of the eigenvalues of the symmetric
    S_a^(1/2) S_b S_a^(1/2), which has the same eigenvalues as S_a S_b: real and >= 0 in exact
    arithmetic. `scipy.linalg.sqrtm(S_a @ S_b)` (pytorch-fid's way) takes the square root of a
    non-symmetric matrix and returns complex parts and NaNs when covariances are singular, as they are
    for features with dead ReLU units or fewer samples than features; the symmetric form needs no
    offset, and rounding's tiny negative eigenvalues are clipped to 0."""
    mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
    root_a = _psd_sqrt(np.asarray(cov_a, np.float64))
    inner = root_a @ np.asarray(cov_b, np.float64) @ root_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a positive semi-definite matrix (its eigenvalues clipped at 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def feature_frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FD between the Gaussians fitted to two feature sets (n_a, F) and (n_b, F)."""
    return frechet_distance(*gaussian_statistics(features_a), *gaussian_statistics(features_b))
