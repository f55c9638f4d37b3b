"""Distribution distances: cheap ones for tests and toys on flattened samples ``(N, D)`` (sliced Wasserstein, MMD
with a Gaussian kernel), and the Fréchet distance between Gaussian feature statistics that FID and FD-MNISTCNN use
(`mmf_diffusers.evaluation` supplies the features)."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch


def sliced_wasserstein(
    x: torch.Tensor, y: torch.Tensor, num_projections: int = 256, generator: Optional[torch.Generator] = None
) -> float:
    """Sliced Wasserstein-2 distance between two equal-size point clouds of shape ``(N, D)``.

    Projects both on ``num_projections`` random unit directions, sorts, and returns
    ``sqrt(mean over directions and points of (sorted_x - sorted_y)^2)``. It is 0 for identical sets and, for a
    shift ``c`` of one set, equals ``|c| / sqrt(D)`` on average over directions (tested).
    """
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    directions = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ directions, dim=0)
    py, _ = torch.sort(y @ directions, dim=0)
    return (px - py).pow(2).mean().sqrt().item()


def gaussian_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (unbiased, ``N - 1``) of features ``(N, D)``, in float64 numpy."""
    features = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"gaussian_statistics needs features (N >= 2, D), got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def _clip_rounding(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with rounding noise (below ``D * eps * max``) set to 0: square roots of noise of
    size 1e-16 would add about 1e-8 each, which over thousands of null directions (FID from few images) adds up."""
    threshold = eigenvalues.size * np.finfo(np.float64).eps * max(eigenvalues.max(initial=0.0), 0.0)
    return np.where(eigenvalues > threshold, eigenvalues, 0.0)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein) distance, squared, between the Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``:

        ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1^1/2 sigma2 sigma1^1/2)^1/2)

    (FID is this on InceptionV3 pool features). Computed in float64 with two symmetric eigen-decompositions instead of
    ``scipy.linalg.sqrtm(sigma1 @ sigma2)``: ``sigma1^1/2`` from ``eigh(sigma1)``, then the eigenvalues of the
    symmetric positive semi-definite ``sigma1^1/2 sigma2 sigma1^1/2``, whose square roots sum to the trace term.
    Eigenvalues below ``D * eps * largest`` (rounding, rank-deficient covariances from few samples) are set to 0, so
    no complex parts or ``offset`` hacks are needed. Equal statistics give 0 up to rounding (tested, with the closed
    form for two Gaussians against scipy's sqrtm).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: inconsistent shapes {mu1.shape}, {sigma1.shape}, {mu2.shape}, "
                         f"{sigma2.shape}")
    w1, v1 = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    sqrt_sigma1 = (v1 * np.sqrt(_clip_rounding(w1))) @ v1.T
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sqrt(_clip_rounding(np.linalg.eigvalsh((middle + middle.T) / 2))).sum()
    value = float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)
    # Rounding can leave a tiny negative number for equal statistics; the distance itself is >= 0.
    return max(value, 0.0)


def rbf_median_bandwidth(x: torch.Tensor) -> float:
    """Median pairwise Euclidean distance between distinct rows of ``x`` ``(N, ...)`` (the median heuristic)."""
    x = x.reshape(x.shape[0], -1).double()
    d = torch.cdist(x, x)
    return d[torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)].median().item()


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidth: Optional[float] = None, unbiased: bool = True) -> float:
    """Squared maximum mean discrepancy MMD^2 between samples ``x`` ``(M, ...)`` and ``y`` ``(N, ...)`` (flattened)
    with the Gaussian kernel ``k(a, b) = exp(-||a - b||^2 / (2 bandwidth^2))``, in float64.

    ``unbiased=True`` (default): the U-statistic ``mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j)
    - 2 mean k(x_i, y_j)``, whose expectation is the population MMD^2 (0 when both come from one distribution; a
    single estimate can be slightly negative, and a set against *itself* gives a negative value).
    ``unbiased=False``: the V-statistic (diagonals included), exactly 0 for identical sets, biased upwards.
    ``bandwidth=None`` uses `rbf_median_bandwidth` of ``y`` (pass ``y`` = the reference set, so that every set
    compared to one reference uses one kernel). Memory and time are O((M + N)^2).
    """
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd_rbf needs the same dimension, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(len(x), len(y)) < 2:
        raise ValueError("mmd_rbf needs at least 2 samples in each set")
    if bandwidth is None:
        bandwidth = rbf_median_bandwidth(y)
    if not bandwidth > 0:
        raise ValueError(f"mmd_rbf needs a positive bandwidth, got {bandwidth}")
    gamma = 1.0 / (2.0 * bandwidth ** 2)
    k_xx = torch.exp(-gamma * torch.cdist(x, x).pow(2))
    k_yy = torch.exp(-gamma * torch.cdist(y, y).pow(2))
    k_xy = torch.exp(-gamma * torch.cdist(x, y).pow(2))
    m, n = len(x), len(y)
    if unbiased:
        term_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
        term_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    else:
        term_xx, term_yy = k_xx.mean(), k_yy.mean()
    return (term_xx + term_yy - 2 * k_xy.mean()).item()
