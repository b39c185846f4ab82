"""The disentanglement metrics against references that do not use their code: hand-computed values,
brute-force counting, values that follow from the definitions, and disentanglement_lib's golden
ranges (its tests' identity data: 10 factors with 10 equally likely values, observed directly)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from ae_lab.evaluation.disentanglement import (dci, dci_scores_from_importance,
                                               disentanglement_metrics, factor_vae_score, mig, sap)


def uniform_factors(rng: np.random.Generator, num_values: list[int], rows: int) -> np.ndarray:
    return np.stack([rng.integers(values, size=rows) for values in num_values], axis=1)


def permuted_and_scaled(codes: np.ndarray) -> np.ndarray:
    """Columns reversed and each multiplied by a different positive constant."""
    return codes[:, ::-1] * np.linspace(0.5, 4.0, codes.shape[1])


@pytest.fixture(scope="module")
def identity_data() -> np.ndarray:
    """disentanglement_lib's IdentityObservationsData: 3000 points of 10 factors x 10 values."""
    return uniform_factors(np.random.default_rng(0), [10] * 10, 3000)


@pytest.fixture(scope="module")
def small_factors() -> tuple[np.ndarray, np.ndarray]:
    """Train (600) and test (300) rows of three factors with 3, 4 and 2 values."""
    factors = uniform_factors(np.random.default_rng(1), [3, 4, 2], 900)
    return factors[:600], factors[600:]


# ----------------------------------------------------------------------------------------- MIG


def brute_force_mig(codes: list[list[float]], factors: list[list[int]], num_bins: int) -> float:
    """MIG from its definition with plain loops: equal-width bins, counted frequencies, nats."""
    rows = len(codes)

    def entropy(labels: list) -> float:
        return -sum(count / rows * math.log(count / rows) for count in Counter(labels).values())

    def mutual_information(a: list, b: list) -> float:
        joint, pa, pb = Counter(zip(a, b)), Counter(a), Counter(b)
        return sum(n / rows * math.log((n / rows) / (pa[x] / rows * pb[y] / rows))
                   for (x, y), n in joint.items())

    binned = []
    for d in range(len(codes[0])):
        column = [row[d] for row in codes]
        low, width = min(column), (max(column) - min(column)) / num_bins
        binned.append([min(int((x - low) / width), num_bins - 1) for x in column])
    gaps = []
    for k in range(len(factors[0])):
        factor = [row[k] for row in factors]
        information = sorted((mutual_information(column, factor) for column in binned),
                             reverse=True)
        gaps.append((information[0] - information[1]) / entropy(factor))
    return sum(gaps) / len(gaps)


def test_mig_equals_brute_force_count_on_a_tiny_case() -> None:
    # 12 examples, 3 code dimensions, 2 factors; code values sit well inside their 4 bins, so the
    # hand discretisation cannot disagree with numpy's edges by rounding
    factors = [[0, 0], [0, 1], [0, 0], [0, 1], [1, 0], [1, 1], [1, 0], [1, 1], [2, 0], [2, 1],
               [2, 1], [2, 1]]
    codes = [[0.0, 0.0, 6], [0.1, 3.0, -1], [0.2, 0.0, 2], [0.9, 3.0, 2], [1.0, 0.5, 7],
             [1.1, 2.5, -1], [1.2, 1.0, 0], [1.9, 3.0, 4], [2.0, 0.0, 6], [2.1, 3.0, 4],
             [2.8, 2.0, 2], [3.0, 1.0, 0]]
    expected = brute_force_mig(codes, factors, num_bins=4)
    assert 0.05 < expected < 0.95  # a case with neither trivial answer
    assert mig(np.array(codes), np.array(factors), num_bins=4) == pytest.approx(expected, rel=1e-12)


def test_mig_is_one_for_the_factors_themselves(identity_data: np.ndarray) -> None:
    score = mig(identity_data.astype(np.float64), identity_data)
    assert 0.9 <= score <= 1.0  # disentanglement_lib's golden range
    assert score > 0.98  # what is left is the plug-in bias of the other dimensions' MI


def test_mig_is_near_zero_for_independent_noise(identity_data: np.ndarray) -> None:
    codes = np.random.default_rng(2).normal(size=(identity_data.shape[0], 10))
    assert 0.0 <= mig(codes, identity_data) < 0.03


def test_mig_golden_ranges_for_zero_and_duplicated_codes(identity_data: np.ndarray) -> None:
    assert 0.0 <= mig(np.zeros(identity_data.shape), identity_data) <= 0.2
    duplicated = np.hstack([identity_data, identity_data]).astype(np.float64)
    assert 0.0 <= mig(duplicated, identity_data) <= 0.1


# ----------------------------------------------------------------------------------- FactorVAE


def test_factor_vae_golden_ranges(identity_data: np.ndarray) -> None:
    # disentanglement_lib's test sizes: batch 5, 3000 training and 2000 evaluation votes, variance
    # from 2500 points
    sizes = dict(batch_size=5, num_train=3000, num_eval=2000, num_variance_estimate=2500)
    rng = np.random.default_rng(3)
    assert 0.9 <= factor_vae_score(identity_data.astype(float), identity_data, rng, **sizes) <= 1.0
    assert factor_vae_score(np.zeros(identity_data.shape), identity_data, rng, **sizes) == 0.0


def test_factor_vae_is_one_on_perfect_and_on_permuted_scaled_codes() -> None:
    factors = uniform_factors(np.random.default_rng(4), [3, 6, 10, 2], 4000)
    sizes = dict(num_train=1000, num_eval=500, num_variance_estimate=2000)
    for codes in (factors.astype(np.float64), permuted_and_scaled(factors.astype(np.float64))):
        assert factor_vae_score(codes, factors, np.random.default_rng(5), **sizes) == 1.0


def test_factor_vae_is_chance_on_random_codes() -> None:
    factors = uniform_factors(np.random.default_rng(6), [3, 6, 10, 2], 4000)
    codes = np.random.default_rng(7).normal(size=(4000, 6))
    score = factor_vae_score(codes, factors, np.random.default_rng(8), num_train=2000,
                             num_eval=3000, num_variance_estimate=2000)
    assert score == pytest.approx(1 / 4, abs=0.04)  # the fixed factor is drawn uniformly of 4


def test_factor_vae_prunes_dimensions_by_absolute_standard_deviation() -> None:
    # dimension 0 carries factor 0 perfectly but with std ~0.006 < 0.05: pruned, all votes then go
    # to dimension 1, and the majority classifier is right only for factor 1's half of the votes
    factors = uniform_factors(np.random.default_rng(9), [5, 5], 3000)
    codes = factors * np.array([0.004, 1.0])
    sizes = dict(num_train=1000, num_eval=2000, num_variance_estimate=2000)
    pruned = factor_vae_score(codes, factors, np.random.default_rng(10), **sizes)
    assert pruned == pytest.approx(0.5, abs=0.05)
    assert factor_vae_score(codes, factors, np.random.default_rng(10), prune_threshold=0.0,
                            **sizes) == 1.0


# ----------------------------------------------------------------------------------------- DCI


def test_dci_scores_of_hand_computed_importance_matrices() -> None:
    # rows = codes, columns = factors. Code 0 serves factor 0 only, code 1 both equally.
    scores = dci_scores_from_importance(np.array([[2.0, 0.0], [1.0, 1.0]]))
    # disentanglement: row entropies (base 2) 0 and 1, row weights 2/4 and 2/4
    assert scores["disentanglement"] == pytest.approx(0.5 * (1 - 0) + 0.5 * (1 - 1))
    # completeness: column 0 = (2/3, 1/3), column 1 = (0, 1); column weights 3/4 and 1/4
    entropy_col0 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert scores["completeness"] == pytest.approx(0.75 * (1 - entropy_col0) + 0.25 * 1)
    # three codes, two factors: row entropies in base 2, column entropies in base 3
    scores = dci_scores_from_importance(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    assert scores["disentanglement"] == pytest.approx(0.25 * 1 + 0.25 * 1 + 0.5 * 0)
    assert scores["completeness"] == pytest.approx(1 - math.log(2, 3))
    assert dci_scores_from_importance(np.zeros((3, 2))) == {"disentanglement": 0.0,
                                                            "completeness": 0.0}


def test_dci_is_one_on_perfect_and_on_permuted_scaled_codes(small_factors) -> None:
    train, test = small_factors
    for transform in (lambda x: x, permuted_and_scaled):
        scores = dci(transform(train.astype(float)), train, transform(test.astype(float)), test)
        assert scores["disentanglement"] > 0.95 and scores["completeness"] > 0.95
        assert scores["informativeness"] == 1.0 and scores["informativeness_train"] == 1.0


def test_dci_is_low_on_random_codes(small_factors) -> None:
    train, test = small_factors
    rng = np.random.default_rng(11)
    scores = dci(rng.normal(size=(600, 4)), train, rng.normal(size=(300, 4)), test)
    assert scores["disentanglement"] < 0.2 and scores["completeness"] < 0.2
    chance = np.mean([1 / 3, 1 / 4, 1 / 2])
    assert scores["informativeness"] < chance + 0.08
    assert scores["informativeness_train"] > scores["informativeness"]  # the trees overfit noise


def test_dci_joint_encoding_is_complete_but_not_disentangled(small_factors) -> None:
    # dimension 0 = f0 + 3 f1 names both factors at once (each alone is a function of it), dimension
    # 1 is noise. Both factors' importance sits in dimension 0: each factor is captured by a single
    # dimension (completeness ~1) but that dimension splits evenly between two factors
    # (disentanglement ~ 1 - H_2(1/2, 1/2) = 0)
    train, test = small_factors
    rng = np.random.default_rng(12)

    def joint(factors: np.ndarray) -> np.ndarray:
        return np.stack([factors[:, 0] + 3.0 * factors[:, 1], rng.normal(size=len(factors))],
                        axis=1)

    scores = dci(joint(train[:, :2]), train[:, :2], joint(test[:, :2]), test[:, :2])
    assert scores["completeness"] > 0.9
    assert scores["disentanglement"] < 0.1
    assert scores["informativeness"] == 1.0


# ----------------------------------------------------------------------------------------- SAP


def binary_factors(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train (1000) and test (2000) rows of three balanced binary factors."""
    factors = uniform_factors(np.random.default_rng(seed), [2, 2, 2], 3000)
    return factors[:1000], factors[1000:]


def test_sap_is_one_minus_chance_on_perfect_codes_of_binary_factors() -> None:
    # a factor's own dimension predicts it perfectly; any other dimension is independent of it, so
    # whatever a classifier predicts from it is right about half the time: the gap is 1 minus the
    # better of two ~0.5 accuracies, about 1/2 (SAP's maximum here, not 1)
    train, test = binary_factors(13)
    for transform in (lambda x: x, permuted_and_scaled):
        score = sap(transform(train.astype(float)), train, transform(test.astype(float)), test)
        assert score == pytest.approx(0.5, abs=0.03)


def test_sap_is_zero_when_two_dimensions_carry_a_factor_equally() -> None:
    # [f, 2 f + 1] per factor: both dimensions predict it perfectly, the top two are equal
    train, test = binary_factors(14)

    def doubled(factors: np.ndarray) -> np.ndarray:
        return np.hstack([factors, 2.0 * factors + 1.0])

    assert sap(doubled(train), train, doubled(test), test) == pytest.approx(0.0, abs=1e-12)


def test_sap_is_near_zero_on_random_codes() -> None:
    train, test = binary_factors(15)
    rng = np.random.default_rng(16)
    assert sap(rng.normal(size=(1000, 4)), train, rng.normal(size=(2000, 4)), test) < 0.04


# ------------------------------------------------------------------------------ all, together


def test_single_valued_factors_are_ignored_by_every_metric(small_factors) -> None:
    train, test = small_factors
    codes_train, codes_test = train.astype(float), test.astype(float)
    with_colour = [np.hstack([np.full((len(part), 1), 7), part]) for part in (train, test)]
    assert mig(codes_train, with_colour[0]) == mig(codes_train, train)
    sizes = dict(num_train=300, num_eval=300, num_variance_estimate=500)
    assert (factor_vae_score(codes_train, with_colour[0], np.random.default_rng(17), **sizes)
            == factor_vae_score(codes_train, train, np.random.default_rng(17), **sizes))
    assert (sap(codes_train, with_colour[0], codes_test, with_colour[1])
            == sap(codes_train, train, codes_test, test))
    assert (dci(codes_train[:200], with_colour[0][:200], codes_test, with_colour[1])
            == dci(codes_train[:200], train[:200], codes_test, test))


def test_disentanglement_metrics_is_deterministic_per_seed() -> None:
    # a pool of 900 with the default sizes: the split is capped at 600 training and 300 test rows
    factors = uniform_factors(np.random.default_rng(18), [3, 4, 2], 900)
    codes = factors + 0.3 * np.random.default_rng(19).normal(size=factors.shape)
    first = disentanglement_metrics(codes, factors, np.random.default_rng(20))
    assert set(first) == {"mig", "factor_vae", "dci_disentanglement", "dci_completeness",
                          "dci_informativeness", "sap"}
    # same seed, same numbers, with DCI's trees fitted in parallel or not
    assert first == disentanglement_metrics(codes, factors, np.random.default_rng(20), n_jobs=2)
    assert first != disentanglement_metrics(codes, factors, np.random.default_rng(21))


def test_invalid_inputs_are_refused() -> None:
    factors = uniform_factors(np.random.default_rng(22), [3, 2], 50)
    with pytest.raises(ValueError, match="at least 2"):
        mig(np.zeros((50, 1)), factors)
    with pytest.raises(ValueError, match="one row per example"):
        mig(np.zeros((49, 3)), factors)
    with pytest.raises(ValueError, match="NaN"):
        mig(np.full((50, 3), np.nan), factors)
    with pytest.raises(ValueError, match="more than one value"):
        mig(np.zeros((50, 3)), np.ones((50, 2), dtype=int))
