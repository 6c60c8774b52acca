"""Distances between image feature sets: Frechet distance (FD) and the kernel inception distance's
unbiased estimator (KID), both in float64 NumPy.

    ref = Reference.of(reference_features)       # (N, D): statistics reused for every comparison
    fd, kid, kid_se = ref.scores(sample_features)

FD fits a Gaussian to each set; it is biased upwards at small sample counts. KID is an unbiased
polynomial-kernel MMD^2, so it is the one to compare across sample counts; its standard error
comes from disjoint folds of the samples. The quality harness (`dit_jax.evaluate`) scores
samples with both, in a classifier's and in EfficientNet-Lite0's features.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

KID_FOLDS = 5  # the KID standard error comes from this many disjoint folds of the samples


def _as_features(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"{name} must be (N >= 2, D) features, got shape {x.shape}")
    return x


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) in float64, covariance with the N-1 denominator."""
    features = _as_features(features, "features")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    """||mu_a - mu_b||^2 + tr(cov_a + cov_b - 2 (cov_a cov_b)^(1/2)).

    tr((cov_a cov_b)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix cov_a^(1/2) cov_b cov_a^(1/2) (same eigenvalues as cov_a cov_b), which
    stays real and stable when the covariances are singular (fewer samples than dimensions).
    """
    root_a = _psd_sqrt(np.asarray(cov_a, np.float64))
    middle = root_a @ np.asarray(cov_b, np.float64) @ root_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = np.asarray(mu_a, np.float64) - np.asarray(mu_b, np.float64)
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D)."""
    return frechet_distance_from_stats(*feature_stats(features_a), *feature_stats(features_b))


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's kernel (a . b / D + 1)^3 -> (N_a, N_b)."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _offdiagonal_mean(kernel: np.ndarray) -> float:
    n = kernel.shape[0]
    return float((kernel.sum() - np.trace(kernel)) / (n * (n - 1)))


def mmd2_unbiased(features_a: np.ndarray, features_b: np.ndarray, *, kernel_bb_mean: float | None = None) -> float:
    """Unbiased MMD^2 with the polynomial kernel (the kernel inception distance's estimator):
    mean_{i!=j} k(a_i, a_j) + mean_{i!=j} k(b_i, b_j) - 2 mean k(a_i, b_j). Its expectation is 0
    when both sets come from one distribution, at any sample count.

    kernel_bb_mean: the b-b term if already known (the reference set is scored many times).
    """
    a = _as_features(features_a, "features_a")
    b = _as_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]}")
    if kernel_bb_mean is None:
        kernel_bb_mean = _offdiagonal_mean(polynomial_kernel(b, b))
    return _offdiagonal_mean(polynomial_kernel(a, a)) + kernel_bb_mean - 2.0 * float(polynomial_kernel(a, b).mean())


@dataclasses.dataclass(frozen=True)
class Reference:
    """A reference feature set with what every comparison against it reuses.

    KID's cubic kernel depends on the feature scale ((x . y / D + 1)^3): both sets are divided by
    the reference's root-mean-square feature value first, so x . y / D is O(1) in any feature
    space (the classifier's ReLU features are ~4x larger than EfficientNet's, which would
    otherwise blow the kernel up and the estimate's variance with it).
    """

    features: np.ndarray  # (N, D) float64
    mean: np.ndarray  # (D,)
    cov: np.ndarray  # (D, D)
    cov_root: np.ndarray  # (D, D) symmetric square root of cov
    kid_scale: float  # 1 / RMS of the reference features
    kernel_mean: float  # off-diagonal mean of k(ref, ref) on scaled features

    @classmethod
    def of(cls, features: np.ndarray) -> Reference:
        features = _as_features(features, "reference features")
        mean, cov = feature_stats(features)
        scale = 1.0 / max(float(np.sqrt(np.mean(features**2))), 1e-12)
        kernel_mean = _offdiagonal_mean(polynomial_kernel(scale * features, scale * features))
        return cls(features, mean, cov, _psd_sqrt(cov), scale, kernel_mean)

    def frechet_distance(self, features: np.ndarray) -> float:
        """FD of `features` (n, D) to the reference. With the reference's root R cached,
        tr((C R^2)^(1/2)) = sum sqrt(eig(R C R)), and R C R = A^T A for A = (X - mean) R / sqrt(n-1),
        whose non-zero eigenvalues are those of the smaller of A^T A and A A^T (n x n when n < D)."""
        features = _as_features(features, "features")
        n = len(features)
        mean = features.mean(axis=0)
        a = (features - mean) @ self.cov_root / math.sqrt(n - 1)  # (n, D)
        gram = a @ a.T if n < a.shape[1] else a.T @ a
        trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None)).sum()
        trace_cov = float(np.sum((features - mean) ** 2) / (n - 1))
        diff = mean - self.mean
        return float(diff @ diff + trace_cov + np.trace(self.cov) - 2.0 * trace_sqrt)

    def scores(self, features: np.ndarray) -> tuple[float, float, float]:
        """(FD, KID, KID standard error) of `features` against this reference.

        The standard error comes from KID_FOLDS disjoint folds of `features`, each scored against
        the whole reference: std(folds) / sqrt(folds) (nan below 2 samples per fold).
        """
        features = _as_features(features, "features")
        fd = self.frechet_distance(features)
        ref, scaled = self.kid_scale * self.features, self.kid_scale * features
        kid = mmd2_unbiased(scaled, ref, kernel_bb_mean=self.kernel_mean)
        folds = np.array_split(scaled, KID_FOLDS)
        if min(len(f) for f in folds) < 2:
            return fd, kid, math.nan
        fold_kids = [mmd2_unbiased(f, ref, kernel_bb_mean=self.kernel_mean) for f in folds]
        return fd, kid, float(np.std(fold_kids, ddof=1) / math.sqrt(KID_FOLDS))
