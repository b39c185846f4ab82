"""Disentanglement metrics: how a code's dimensions line up with ground-truth factors of variation.

All four take the codes of a pool of examples, `codes` (N, D), and those examples' factor classes,
`factors` (N, K) (for dSprites, a split's `factor_classes`), and follow the definitions of
disentanglement_lib (Locatello et al. 2019, https://github.com/google-research/disentanglement_lib):

- MIG, Mutual Information Gap (Chen et al. 2018, "Isolating Sources of Disentanglement in VAEs"):
  for each factor, how much more it is captured by its most informative code dimension than by the
  runner-up, as a fraction of its entropy. 1: each factor lives in one dimension only.
- FactorVAE score (Kim & Mnih 2018, "Disentangling by Factorising"): accuracy of a majority-vote
  classifier that names the factor held fixed in a batch from the code dimension whose (normalised)
  variance drops the most. 1: fixing any factor silences one dimension of its own.
- DCI (Eastwood & Williams 2018, "A Framework for the Quantitative Evaluation of Disentangled
  Representations"): from the feature importances of gradient-boosted trees that predict each
  factor from the code, *disentanglement* (each dimension predicts at most one factor),
  *completeness* (each factor is predicted by one dimension) and *informativeness* (the trees' test
  accuracy).
- SAP, Separated Attribute Predictability (Kumar et al. 2018, "Variational Inference of
  Disentangled Latent Concepts from Unlabeled Observations"): for each factor, the gap in test
  accuracy between the best and the second-best one-dimensional linear classifier. With discrete
  factors it is bounded by 1 minus chance accuracy (0.5 for a balanced binary factor), not by 1.

Comparable with disentanglement_lib: MIG (its `discrete_mig`), DCI and SAP (its discrete-factor
variant, `continuous_factors=False`) are the same estimators with the same defaults, computed from
the points given; on points drawn as it draws them (uniformly over the factor combinations, as in a
random split of dSprites) they agree with its numbers up to sampling noise. The FactorVAE score
draws its fixed-factor batches from the pool instead of rendering new images (`factor_vae_score`):
the same distribution when the pool is a uniform random subset of a full-product data set such as
dSprites, a different one otherwise.

For every metric, factors that take a single value in the data it learns from (dSprites' colour)
are dropped: they carry no information, would divide MIG by a zero entropy and give FactorVAE votes
no dimension can win (disentanglement_lib's dSprites leaves colour out of its factors too). Codes
need at least two dimensions: the gaps compare a best dimension with a runner-up.
"""

from __future__ import annotations

import numpy as np
from joblib import Parallel, delayed
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.metrics import mutual_info_score
from sklearn.svm import LinearSVC

__all__ = ["dci", "dci_scores_from_importance", "disentanglement_metrics", "factor_vae_score",
           "mig", "minimum_train_size", "sample_sizes", "sap"]

# votes sampled at once by factor_vae_score: bounds the (votes, batch, dims) array to ~32 MB
_VOTE_CHUNK_ELEMENTS = 1 << 22


def _checked(codes: np.ndarray, factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`codes` as float64 (N, D) and `factors` as (N, K) arrays; a ValueError if they are not."""
    codes = np.asarray(codes, dtype=np.float64)
    factors = np.asarray(factors)
    if codes.ndim != 2 or factors.ndim != 2 or codes.shape[0] != factors.shape[0]:
        raise ValueError(f"codes (N, D) and factors (N, K) must be 2-D with one row per example, "
                         f"got {codes.shape} and {factors.shape}")
    if codes.shape[1] < 2:
        raise ValueError(f"the metrics compare code dimensions and need at least 2, "
                         f"got {codes.shape[1]}")
    if not np.isfinite(codes).all():
        raise ValueError("codes contain NaN or infinite values")
    return codes, factors


def _varying_factors(factors: np.ndarray) -> np.ndarray:
    """Mask of the factors (columns) that take more than one value; a ValueError when none does."""
    varying = (factors != factors[:1]).any(axis=0)
    if not varying.any():
        raise ValueError("no factor takes more than one value in these examples")
    return varying


def _pool(codes: np.ndarray, factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Checked codes and the factors that vary among them."""
    codes, factors = _checked(codes, factors)
    return codes, factors[:, _varying_factors(factors)]


def _train_test(train_codes: np.ndarray, train_factors: np.ndarray, test_codes: np.ndarray,
                test_factors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Checked train and test parts, keeping the factors that vary in the training part."""
    train_codes, train_factors = _checked(train_codes, train_factors)
    test_codes, test_factors = _checked(test_codes, test_factors)
    if (train_codes.shape[1] != test_codes.shape[1]
            or train_factors.shape[1] != test_factors.shape[1]):
        raise ValueError(f"train and test parts differ in shape: codes {train_codes.shape} vs "
                         f"{test_codes.shape}, factors {train_factors.shape} vs "
                         f"{test_factors.shape}")
    varying = _varying_factors(train_factors)
    return train_codes, train_factors[:, varying], test_codes, test_factors[:, varying]


def _discretise(codes: np.ndarray, num_bins: int) -> np.ndarray:
    """Each column cut into `num_bins` equal-width bins over its range, as bin numbers 1..num_bins
    (disentanglement_lib's histogram discretiser: numpy's histogram edges, the maximum in the last
    bin; a constant column falls into one bin)."""
    return np.stack([np.digitize(column, np.histogram_bin_edges(column, num_bins)[:-1])
                     for column in codes.T], axis=1)


def _entropy(weights: np.ndarray, base: float) -> np.ndarray:
    """Entropy, in log base `base`, of the distribution proportional to each row of the non-negative
    `weights` (0 log 0 = 0; an all-zero row counts as uniform; one outcome has entropy 0)."""
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    outcomes = weights.shape[1]
    if outcomes == 1:
        return np.zeros(weights.shape[0])
    totals = weights.sum(axis=1, keepdims=True)
    p = np.divide(weights, totals, out=np.full(weights.shape, 1 / outcomes), where=totals > 0)
    log_p = np.log(p, out=np.zeros_like(p), where=p > 0)
    return -(p * log_p).sum(axis=1) / np.log(base)


def _top_two_gap(scores: np.ndarray) -> np.ndarray:
    """Per column (factor) of a (D, K) score matrix: its largest entry minus its second largest."""
    ordered = np.sort(scores, axis=0)
    return ordered[-1] - ordered[-2]


def mig(codes: np.ndarray, factors: np.ndarray, num_bins: int = 20) -> float:
    """Mutual Information Gap (Chen et al. 2018, arXiv:1802.04942), as disentanglement_lib's
    `discrete_mig`: every code dimension is discretised into `num_bins` (default 20) equal-width
    bins over its range; I[d, k] is the mutual information (nats, scikit-learn's
    `mutual_info_score` of the empirical joint distribution) between discretised dimension d and
    factor k, H[k] the factor's entropy; MIG = mean over factors of (largest I[., k] - second
    largest I[., k]) / H[k].

    Uses every row given (disentanglement_lib draws num_train=10000 points). Factors with a single
    value are dropped. Values lie in [0, 1]. A factor with more values than `num_bins` cannot
    reach 1 (dSprites' 32 positions and 40 orientations share 20 bins). The plug-in estimates are
    biased upwards by about (bins - 1)(values - 1) / 2N nats, so independent codes score slightly
    above 0."""
    codes, factors = _pool(codes, factors)
    binned = _discretise(codes, num_bins)
    information = np.array([[mutual_info_score(factor, dimension) for factor in factors.T]
                            for dimension in binned.T])
    entropy = np.array([_entropy(np.unique(factor, return_counts=True)[1], np.e)[0]
                        for factor in factors.T])
    return float(np.mean(_top_two_gap(information) / entropy))


def _factor_groups(factors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each factor k (K, N) arrays: `order[k]`, the pool rows sorted by their value of factor k;
    `start[k, r]` and `size[k, r]`, where in `order[k]` the rows sharing row r's value begin and how
    many there are."""
    order, start, size = (np.empty(factors.shape[::-1], dtype=np.int64) for _ in range(3))
    for k, factor in enumerate(factors.T):
        _, value, count = np.unique(factor, return_inverse=True, return_counts=True)
        order[k] = np.argsort(value, kind="stable")
        start[k] = (np.cumsum(count) - count)[value]
        size[k] = count[value]
    return order, start, size


def _factor_vae_votes(scaled: np.ndarray, groups: tuple[np.ndarray, np.ndarray, np.ndarray],
                      rng: np.random.Generator, batch_size: int, num_votes: int) -> np.ndarray:
    """(K, D) counts of (fixed factor, dimension of least normalised variance) over `num_votes`
    batches sampled from the pool (see `factor_vae_score`)."""
    order, start, size = groups
    num_factors, num_rows = order.shape
    votes = np.zeros((num_factors, scaled.shape[1]), dtype=np.int64)
    chunk = max(1, _VOTE_CHUNK_ELEMENTS // (batch_size * scaled.shape[1]))
    for done in range(0, num_votes, chunk):
        count = min(chunk, num_votes - done)
        factor = rng.integers(num_factors, size=count)
        row = rng.integers(num_rows, size=count)  # its value of `factor` is the one held fixed
        offsets = rng.integers(0, size[factor, row][:, None], size=(count, batch_size))
        members = order[factor[:, None], start[factor, row][:, None] + offsets]
        least = scaled[members].var(axis=1, ddof=1).argmin(axis=1)
        np.add.at(votes, (factor, least), 1)
    return votes


def factor_vae_score(codes: np.ndarray, factors: np.ndarray, rng: np.random.Generator,
                     batch_size: int = 64, num_train: int = 10_000, num_eval: int = 5_000,
                     num_variance_estimate: int = 10_000, prune_threshold: float = 0.05) -> float:
    """FactorVAE disentanglement score (Kim & Mnih 2018, arXiv:1802.05983), as disentanglement_lib's
    `eval_accuracy`, with its defaults (batch_size=64, num_train=10000, num_eval=5000,
    num_variance_estimate=10000, prune_dims.threshold=0.05 in its study configs).

    1. Global scale: the variance (ddof=1) of each code dimension over `num_variance_estimate` pool
       rows drawn uniformly with replacement. Dimensions whose standard deviation is below
       `prune_threshold` (an absolute threshold, in code units) are pruned as collapsed; with none
       left the score is 0.
    2. A vote: a factor k is drawn uniformly among the factors that vary in the pool, then a value v
       of it, as the value of factor k of a uniformly drawn pool row; `batch_size` rows are drawn
       uniformly with replacement among the pool rows with factor k = v; their codes are divided by
       the global standard deviations, and the vote is (k, the active dimension of least variance
       (ddof=1) over the batch; the first on ties).
    3. The classifier maps each active dimension to the factor it got most votes for among
       `num_train` votes (majority vote); the score is its accuracy on `num_eval` fresh votes.

    Sampling differs from disentanglement_lib, which renders a fresh batch from the generator with
    factor k fixed and the other factors drawn uniformly: here a batch is rows of the given pool (a
    test split, say), so the other factors follow their distribution among pool rows with k = v, and
    v is weighted by its frequency in the pool. On a uniform random subset of a full-product data
    set (dSprites) both designs draw from the same distribution. Rows may repeat within a batch
    (with replacement, as a generator's draws may). Factors with a single value in the pool are
    dropped (no dimension can win their votes). `rng` drives all the sampling."""
    codes, factors = _pool(codes, factors)
    if batch_size < 2 or num_variance_estimate < 2 or num_train < 1 or num_eval < 1:
        raise ValueError("factor_vae_score needs batch_size and num_variance_estimate >= 2, "
                         "num_train and num_eval >= 1")
    variance = codes[rng.integers(codes.shape[0], size=num_variance_estimate)].var(axis=0, ddof=1)
    active = np.sqrt(variance) >= prune_threshold
    if not active.any():
        return 0.0
    scaled = codes[:, active] / np.sqrt(variance[active])
    groups = _factor_groups(factors)
    classifier = _factor_vae_votes(scaled, groups, rng, batch_size, num_train).argmax(axis=0)
    eval_votes = _factor_vae_votes(scaled, groups, rng, batch_size, num_eval)
    return float(eval_votes[classifier, np.arange(scaled.shape[1])].sum() / num_eval)


def dci_scores_from_importance(importance: np.ndarray) -> dict[str, float]:
    """Disentanglement and completeness of a (D codes, K factors) non-negative importance matrix R
    (Eastwood & Williams 2018): with P = R normalised per row and P~ = R normalised per column,
    disentanglement = sum_d rho_d (1 - H_K(P[d, :])), rho_d = R[d, :].sum() / R.sum();
    completeness = sum_k rho_k (1 - H_D(P~[:, k])), rho_k = R[:, k].sum() / R.sum();
    H_n is the entropy in log base n (so each term lies in [0, 1]). An all-zero R scores 0 on both
    (disentanglement_lib adds 1e-11 to R inside the entropies; the results agree to ~1e-9)."""
    importance = np.asarray(importance, dtype=np.float64)
    total = importance.sum()
    if total == 0:
        return {"disentanglement": 0.0, "completeness": 0.0}
    num_codes, num_factors = importance.shape
    per_code = 1 - _entropy(importance, num_factors)
    per_factor = 1 - _entropy(importance.T, num_codes)
    return {"disentanglement": float(per_code @ importance.sum(axis=1) / total),
            "completeness": float(per_factor @ importance.sum(axis=0) / total)}


def _fit_trees(train_codes: np.ndarray, train_factor: np.ndarray, test_codes: np.ndarray,
               test_factor: np.ndarray, random_state: int) -> tuple[np.ndarray, float, float]:
    """DCI's model of one factor: its importances per code dimension, train and test accuracy."""
    model = GradientBoostingClassifier(random_state=random_state).fit(train_codes, train_factor)
    return (np.abs(model.feature_importances_), model.score(train_codes, train_factor),
            model.score(test_codes, test_factor))


def dci(train_codes: np.ndarray, train_factors: np.ndarray, test_codes: np.ndarray,
        test_factors: np.ndarray, random_state: int = 0,
        n_jobs: int | None = None) -> dict[str, float]:
    """DCI (Eastwood & Williams 2018, https://openreview.net/forum?id=By-7dz-AZ), as
    disentanglement_lib's `dci` (which draws num_train=10000 and num_test=5000 points): one
    scikit-learn `GradientBoostingClassifier()` per factor, default settings (100 stages of depth-3
    regression trees, learning rate 0.1, no subsampling) and `random_state`, fitted to predict the
    factor's class from the raw codes; importance R[d, k] = |feature_importances_[d]| of factor k's
    model. Returns `disentanglement` and `completeness` (`dci_scores_from_importance`),
    `informativeness` (mean test accuracy over factors) and `informativeness_train` (mean training
    accuracy). Factors with a single value in the training part are dropped.

    Cost: a factor with V classes fits 100 V trees, so factors with many values dominate (dSprites'
    40 orientations and 32 positions). `n_jobs` fits that many factors' models at once in threads
    (joblib; tree building releases the GIL); the result does not depend on it."""
    train_codes, train_factors, test_codes, test_factors = _train_test(
        train_codes, train_factors, test_codes, test_factors)
    fits = Parallel(n_jobs=n_jobs, prefer="threads")(
        delayed(_fit_trees)(train_codes, train_factor, test_codes, test_factor, random_state)
        for train_factor, test_factor in zip(train_factors.T, test_factors.T))
    importance, train_accuracy, test_accuracy = zip(*fits)
    return {**dci_scores_from_importance(np.stack(importance, axis=1)),
            "informativeness": float(np.mean(test_accuracy)),
            "informativeness_train": float(np.mean(train_accuracy))}


def sap(train_codes: np.ndarray, train_factors: np.ndarray, test_codes: np.ndarray,
        test_factors: np.ndarray) -> float:
    """SAP score (Kumar et al. 2018, https://openreview.net/forum?id=H1kG7GZAW), as
    disentanglement_lib's `SAP_score` for discrete factors (`continuous_factors=False`,
    num_train=10000, num_test=5000): S[d, k] = test accuracy of a scikit-learn
    `LinearSVC(C=0.01, class_weight="balanced")` (one-vs-rest, squared hinge loss, raw codes) fitted
    on code dimension d alone to predict factor k; SAP = mean over factors of the gap between the
    two largest entries of S[:, k].

    A dimension that carries nothing about a factor scores chance accuracy, not 0, so SAP is at most
    1 - chance (0.5 for balanced binary factors). Factors with many values score low even on
    perfect codes: one-vs-rest linear scores on one axis cannot single out the middle classes (a
    code equal to a uniform 40-valued factor gets about 0.25 accuracy, one equal to a 3-valued
    factor 1.0). scikit-learn now picks the primal solver here (disentanglement_lib's version used
    the dual one): the same convex problem, so equal up to solver tolerance, and deterministic.
    Factors with a single value in the training part are dropped."""
    train_codes, train_factors, test_codes, test_factors = _train_test(
        train_codes, train_factors, test_codes, test_factors)
    scores = np.empty((train_codes.shape[1], train_factors.shape[1]))
    for d in range(train_codes.shape[1]):
        train_dimension, test_dimension = train_codes[:, d:d + 1], test_codes[:, d:d + 1]
        for k in range(train_factors.shape[1]):
            model = LinearSVC(C=0.01, class_weight="balanced")
            model.fit(train_dimension, train_factors[:, k])
            scores[d, k] = model.score(test_dimension, test_factors[:, k])
    return float(np.mean(_top_two_gap(scores)))


def _split_sizes(num_rows: int, train_fraction: float, num_train: int, num_test: int) -> tuple[int, int, int]:
    """Where `_split` cuts a pool of `num_rows` and how many rows each side keeps: (cut, train, test)."""
    if not 0 < train_fraction < 1 or num_train < 2 or num_test < 1:
        raise ValueError(f"need 0 < train_fraction < 1, num_train >= 2 and num_test >= 1, got "
                         f"{train_fraction}, {num_train}, {num_test}")
    cut = min(max(round(train_fraction * num_rows), 2), num_rows - 1)
    return cut, min(cut, num_train), min(num_rows - cut, num_test)


def _split(num_rows: int, rng: np.random.Generator, train_fraction: float, num_train: int,
           num_test: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint random train and test rows: the pool is shuffled and cut at `train_fraction`, then
    each side is capped at `num_train` / `num_test` rows."""
    cut, train, test = _split_sizes(num_rows, train_fraction, num_train, num_test)
    rows = rng.permutation(num_rows)
    return rows[:cut][:train], rows[cut:][:test]


def sample_sizes(num_rows: int, *, train_fraction: float = 2 / 3, num_train: int = 10_000,
                 num_test: int = 5_000, factor_vae_num_train: int = 10_000, factor_vae_num_eval: int = 5_000,
                 with_dci: bool = True) -> dict[str, int]:
    """How many codes each metric of `disentanglement_metrics` uses for a pool of `num_rows` with the
    same sizes, named `<metric>_n_<part>`: MIG's points (`mig_n_train`), the FactorVAE pool and its
    training and evaluation votes, SAP's and DCI's training and test codes. SAP, for one, depends on
    them beyond noise (on a perfect code 0.43 with 2,000 training codes, 0.50 with 10,000), so they
    are recorded beside the values."""
    _, train, test = _split_sizes(num_rows, train_fraction, num_train, num_test)
    sizes = {"mig_n_train": train, "factor_vae_n_pool": num_rows, "factor_vae_n_train": factor_vae_num_train,
             "factor_vae_n_eval": factor_vae_num_eval, "sap_n_train": train, "sap_n_test": test}
    if with_dci:
        sizes.update(dci_n_train=train, dci_n_test=test)
    return sizes


def minimum_train_size(factors: np.ndarray) -> int:
    """The fewest training codes SAP's and DCI's classifiers need: two per value of the factor with the
    most values. With fewer, scikit-learn takes that factor for a continuous target (it warns that the
    classes outnumber half the samples) and the scores mean little."""
    return 2 * max(len(np.unique(column)) for column in np.asarray(factors).T)


def disentanglement_metrics(codes: np.ndarray, factors: np.ndarray, rng: np.random.Generator, *,
                            train_fraction: float = 2 / 3, num_train: int = 10_000,
                            num_test: int = 5_000, num_bins: int = 20, batch_size: int = 64,
                            factor_vae_num_train: int = 10_000, factor_vae_num_eval: int = 5_000,
                            num_variance_estimate: int = 10_000, prune_threshold: float = 0.05,
                            with_dci: bool = True, n_jobs: int | None = None) -> dict[str, float]:
    """All four metrics of a pool of codes (N, D) and factor classes (N, K), keys `mig`,
    `factor_vae`, `dci_disentanglement`, `dci_completeness`, `dci_informativeness` and `sap`.

    The pool is shuffled and cut into a training part (`train_fraction` of it) and a test part,
    capped at `num_train` and `num_test` rows (disentanglement_lib's 10000 and 5000: a pool of
    15000 or more gives exactly those). DCI and SAP fit on the training part and score on the test
    part; MIG uses the training part (disentanglement_lib's MIG draws num_train=10000 points);
    FactorVAE samples its batches from the whole pool (`factor_vae_score`, with `batch_size`,
    `factor_vae_num_train`, `factor_vae_num_eval`, `num_variance_estimate`, `prune_threshold`).
    DCI's gradient-boosted trees take nearly all of the time (100 trees per factor value: about a
    minute for 2,000 training rows of dSprites-like factors on two CPU cores); `with_dci=False` leaves
    them out and the other metrics unchanged. `n_jobs` parallelises DCI's per-factor trees. `rng`
    drives the split, the trees' `random_state` and the FactorVAE sampling: one seed, one result."""
    codes, factors = _checked(codes, factors)
    train, test = _split(codes.shape[0], rng, train_fraction, num_train, num_test)
    dci_seed = int(rng.integers(2**31 - 1))
    metrics = {"mig": mig(codes[train], factors[train], num_bins),
               "factor_vae": factor_vae_score(codes, factors, rng, batch_size, factor_vae_num_train,
                                              factor_vae_num_eval, num_variance_estimate,
                                              prune_threshold),
               "sap": sap(codes[train], factors[train], codes[test], factors[test])}
    if with_dci:
        scores = dci(codes[train], factors[train], codes[test], factors[test], random_state=dci_seed,
                     n_jobs=n_jobs)
        metrics.update({f"dci_{name}": scores[name]
                        for name in ("disentanglement", "completeness", "informativeness")})
    return metrics
