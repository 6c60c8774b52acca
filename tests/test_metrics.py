"""dit_jax.metrics: FD against SciPy's matrix square root, KID against a naive double loop and
its unbiasedness, and the cached-reference route against both."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg

from dit_jax import metrics


def _features(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / math.sqrt(d)
    return shift + scale * rng.normal(size=(n, d)) @ mixing


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * root))


def naive_mmd2_unbiased(a: np.ndarray, b: np.ndarray) -> float:
    d = a.shape[1]

    def k(x, y):
        return (float(x @ y) / d + 1.0) ** 3

    m, n = len(a), len(b)
    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_frechet_distance_against_scipy():
    a, b = _features(60, 8, 0), _features(80, 8, 1, shift=0.5, scale=1.5)
    expected = scipy_frechet(a, b)
    assert expected > 1.0
    assert abs(metrics.frechet_distance(a, b) - expected) / expected < 1e-6
    assert abs(metrics.frechet_distance(a, a)) < 1e-9 * np.trace(np.cov(a, rowvar=False))
    # fewer samples than dimensions: singular covariances stay finite, real and non-negative
    small = metrics.frechet_distance(_features(5, 16, 2), _features(7, 16, 3))
    assert np.isfinite(small) and small > 0
    with pytest.raises(ValueError, match=r"\(N >= 2, D\)"):
        metrics.frechet_distance(a[:1], b)


def test_kid_against_naive_reference_and_unbiased():
    a, b = _features(12, 5, 0), _features(9, 5, 1, shift=0.3)
    assert abs(metrics.mmd2_unbiased(a, b) - naive_mmd2_unbiased(a, b)) < 1e-10
    with pytest.raises(ValueError, match="feature sizes differ"):
        metrics.mmd2_unbiased(a, b[:, :4])

    # Unbiased: over many pairs of small samples of one distribution the estimates average to 0,
    # where the biased (V-statistic) estimate sits clearly above 0.
    rng = np.random.default_rng(0)
    unbiased, biased = [], []
    for _ in range(300):
        x, y = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
        unbiased.append(metrics.mmd2_unbiased(x, y))
        kxx, kyy, kxy = (metrics.polynomial_kernel(p, q) for p, q in ((x, x), (y, y), (x, y)))
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    se = np.std(unbiased) / math.sqrt(len(unbiased))
    assert abs(np.mean(unbiased)) < 3 * se
    assert np.mean(biased) > 10 * np.std(biased) / math.sqrt(len(biased))


def test_reference_scores():
    ref_features, sample = _features(50, 6, 0), _features(20, 6, 1, shift=0.4)
    ref = metrics.Reference.of(ref_features)
    fd, kid, se = ref.scores(sample)
    assert abs(fd - scipy_frechet(sample, ref_features)) < 1e-6 * fd
    few = sample[:4]  # fewer samples than dimensions: the n x n route
    assert abs(ref.frechet_distance(few) - metrics.frechet_distance(few, ref_features)) < 1e-8 * fd
    scale = 1.0 / np.sqrt(np.mean(ref_features**2))
    assert abs(kid - metrics.mmd2_unbiased(scale * sample, scale * ref_features)) < 1e-12
    assert ref.scores(10.0 * sample)[1] != kid  # KID sees the scale of the samples, relative to the reference
    assert se > 0
    assert math.isnan(ref.scores(sample[:8])[2])  # folds of fewer than 2 samples: no standard error
