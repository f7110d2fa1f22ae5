"""Metrics the USegMix experiments report: quadratic-weighted kappa (vs scikit-learn) and KID (vs a direct
O(N²) computation of the unbiased MMD² written with scikit-learn's polynomial kernel and explicit loops)."""

import warnings

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score
from sklearn.metrics.pairwise import polynomial_kernel

from histoweak import metrics as M


def _sk_kappa(y, p, n):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns on the undefined single-class case
        return cohen_kappa_score(y, p, weights="quadratic", labels=list(range(n)))


@pytest.mark.parametrize("seed", range(5))
def test_kappa_against_sklearn_random(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 7))
    y = rng.integers(0, n, 150)
    p = np.clip(y + rng.integers(-1, 2, 150) * (rng.random(150) < 0.4), 0, n - 1)  # ordinal errors
    assert M.quadratic_kappa(y, p, n) == pytest.approx(_sk_kappa(y, p, n))
    q = rng.integers(0, n, 150)  # unrelated predictions: near chance
    assert M.quadratic_kappa(y, q, n) == pytest.approx(_sk_kappa(y, q, n))


@pytest.mark.parametrize("y, p, n", [
    ([0, 1, 2, 3], [0, 1, 2, 3], 4),  # perfect: 1
    ([0, 1, 2, 3], [3, 2, 1, 0], 4),  # reversed: -1
    ([0, 0, 3, 3], [0, 3, 0, 3], 4),  # classes 1 and 2 absent: the distance between 0 and 3 is still 3
    ([0, 0, 1, 1], [0, 0, 0, 0], 2),  # prediction constant: 0
    ([2, 2, 2], [2, 2, 1], 3),  # truth constant
    ([1], [0], 2),
])
def test_kappa_against_sklearn_edge_cases(y, p, n):
    assert M.quadratic_kappa(y, p, n) == pytest.approx(_sk_kappa(y, p, n))


def test_kappa_undefined_and_default_classes():
    assert np.isnan(M.quadratic_kappa([1, 1], [1, 1], 3))  # one class on both sides: no chance disagreement
    assert np.isnan(_sk_kappa([1, 1], [1, 1], 3))
    assert np.isnan(M.quadratic_kappa([], []))
    y, p = np.array([0, 2, 2, 1, 0]), np.array([0, 2, 1, 1, 1])
    assert M.quadratic_kappa(y, p) == pytest.approx(_sk_kappa(y, p, 3))  # n_classes = max label + 1
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        M.quadratic_kappa([0, 2], [0, 1], 2)


def _mmd2_direct(x, y, degree=3, gamma=None, coef=1.0):
    """Unbiased MMD² from the definition, double loops over the off-diagonal pairs."""
    kxx = polynomial_kernel(x, x, degree=degree, gamma=gamma, coef0=coef)
    kyy = polynomial_kernel(y, y, degree=degree, gamma=gamma, coef0=coef)
    kxy = polynomial_kernel(x, y, degree=degree, gamma=gamma, coef0=coef)
    m = len(x)
    sxx = sum(kxx[i, j] for i in range(m) for j in range(m) if i != j)
    syy = sum(kyy[i, j] for i in range(m) for j in range(m) if i != j)
    return sxx / (m * (m - 1)) + syy / (m * (m - 1)) - 2 * kxy.sum() / (m * m)


def test_kid_one_subset_of_everything_equals_the_direct_mmd():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 8)), rng.normal(0.3, 1.2, size=(30, 8))
    mean, std = M.kid(a, b, subsets=1, subset_size=30)  # the whole sets, permuted: the same sums
    assert mean == pytest.approx(_mmd2_direct(a, b), rel=1e-9) and std == 0.0
    mean, _ = M.kid(a, b, subsets=1, subset_size=30, degree=2, gamma=0.5, coef=0.1)
    assert mean == pytest.approx(_mmd2_direct(a, b, degree=2, gamma=0.5, coef=0.1), rel=1e-9)


def test_kid_subsets_average_the_direct_mmd_of_the_same_draws():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(40, 6)), rng.normal(0.5, 1.0, size=(25, 6))
    mean, std = M.kid(a, b, subsets=4, subset_size=10, seed=3)
    draw = np.random.default_rng(3)  # the documented draw: per subset, rows of a then rows of b, no replacement
    vals = [_mmd2_direct(a[draw.choice(40, 10, replace=False)], b[draw.choice(25, 10, replace=False)])
            for _ in range(4)]
    assert mean == pytest.approx(np.mean(vals), rel=1e-9) and std == pytest.approx(np.std(vals), rel=1e-9)
    assert M.kid(a, b, subsets=2, subset_size=1000)[0] == pytest.approx(  # capped at min(N, M) = 25
        M.kid(a, b, subsets=2, subset_size=25)[0])


def test_kid_near_zero_for_one_distribution_and_growing_with_a_mean_shift():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    same, same_std = M.kid(a, b, subsets=20, subset_size=100)
    shifts = [M.kid(a, rng.normal(d, 1.0, size=(200, 16)), subsets=20, subset_size=100)[0] for d in (0.25, 0.5, 1.0)]
    assert abs(same) < 3 * same_std + 1e-3
    assert 0 < shifts[0] < shifts[1] < shifts[2]
    assert shifts[0] > abs(same) + 3 * same_std


def test_kid_bad_input_named():
    with pytest.raises(ValueError, match=r"one D"):
        M.kid(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"at least 2 rows"):
        M.kid(np.zeros((1, 3)), np.zeros((5, 3)))
