"""Two-sample tests for drift, written in torch: MMD with an RBF kernel, chi-square, Jensen-Shannon, KS.

Why not a library: alibi-detect (the reference for the MMD test below) is under the Business Source Licence,
which forbids production use without a commercial licence; Evidently and NannyML are separate services with
their own stores and dashboards, and their pins (numpy, pandas, scikit-learn, pydantic) do not fit ours;
scipy is not a dependency of this package either. The tests here are a few dozen lines each, run on the
tensors the server already holds, on its device, and are checked against scipy in tests/health/test_stats.py.

Shapes: samples are ``x`` (n, d) and ``y`` (m, d) for MMD; 1-D tensors for KS; count vectors (C,) for
chi-square and probability vectors (C,) for Jensen-Shannon.
"""

from __future__ import annotations

import math

import torch


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||x_i - y_j||^2 (n, m), clamped at 0 (the expansion below can go slightly negative in float)."""
    x, y = x.double(), y.double()
    d = (x * x).sum(1, keepdim=True) - 2.0 * x @ y.T + (y * y).sum(1)
    return d.clamp(min=0.0)


def median_sigma(x: torch.Tensor, y: torch.Tensor) -> float:
    """The median heuristic for the RBF width, as alibi-detect's ``sigma_median`` computes it.

    sigma = sqrt(median(||x_i - y_j||^2) / 2), the median taken over the n*m squared distances, skipping the
    n zeros of the diagonal when ``x`` and ``y`` are the same sample (its distances to itself).
    A sample of identical points gives sigma 1 rather than 0 (no width to divide by).
    """
    dist = squared_distances(x, y)
    n = min(x.shape[0], y.shape[0])
    n = n if x.shape == y.shape and bool((x[:n] == y[:n]).all()) else 0
    flat = dist.flatten().sort().values
    index = n + (flat.numel() - n) // 2 - 1
    sigma = math.sqrt(0.5 * float(flat[max(index, 0)]))
    return sigma if sigma > 0 else 1.0


def rbf_kernel(x: torch.Tensor, y: torch.Tensor, sigma: float) -> torch.Tensor:
    """k(x, y) = exp(-||x - y||^2 / (2 sigma^2)), (n, m) in float64."""
    return torch.exp(-squared_distances(x, y) / (2.0 * sigma * sigma))


def rbf_mmd2(x: torch.Tensor, y: torch.Tensor, sigma: float) -> float:
    """The unbiased estimate of MMD^2 between samples x (n, d) and y (m, d) (Gretton et al. 2012, eq. 3):

    MMD^2_u = 1/(n(n-1)) sum_{i!=j} k(x_i, x_j) + 1/(m(m-1)) sum_{i!=j} k(y_i, y_j)
              - 2/(nm) sum_ij k(x_i, y_j)
    """
    kernel = rbf_kernel(torch.cat([x, y]), torch.cat([x, y]), sigma)
    return float(_mmd2_of_splits(kernel.fill_diagonal_(0.0), _ys(x.shape[0], y.shape[0]))[0])


def _ys(n: int, m: int) -> torch.Tensor:
    """The indicator (1, n + m) of the y rows of the unpermuted split (x first, then y)."""
    ind = torch.zeros(1, n + m, dtype=torch.float64)
    ind[0, n:] = 1.0
    return ind


def _mmd2_of_splits(kernel: torch.Tensor, y_rows: torch.Tensor) -> torch.Tensor:
    """MMD^2_u of every split (P,) of the pooled sample, from its zero-diagonal kernel (T, T) and the splits'
    y indicators (P, T).

    Each split's three kernel sums are quadratic forms of its indicator, so P permutations cost one (P, T) x
    (T, T) product instead of P gathers of the (T, T) matrix: with y the indicator and 1 - y that of x,
    y'Ky, x'Ky = 1'Ky - y'Ky and x'Kx = 1'K1 - 2 1'Ky + y'Ky.
    """
    m = float(y_rows[0].sum())
    n = y_rows.shape[1] - m
    ky = y_rows @ kernel  # (P, T)
    yy = (ky * y_rows).sum(1)
    one_y = ky.sum(1)
    total = kernel.sum()
    xy = one_y - yy
    xx = total - 2.0 * one_y + yy
    return xx / (n * (n - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (n * m)


def mmd_test(
    x: torch.Tensor,
    y: torch.Tensor,
    permutations: int = 500,
    generator: torch.Generator | None = None,
    sigma: float | None = None,
) -> tuple[float, float]:
    """(MMD^2_u, permutation p-value) of samples x (reference, n >= 2) and y (live, m >= 2).

    As alibi-detect's ``MMDDrift`` (PyTorch backend) defines it: an RBF kernel whose width is the median
    heuristic on the reference (``median_sigma(x, x)``, its default ``configure_kernel_from_x_ref``) unless
    ``sigma`` is given; the kernel matrix of the pooled sample with its diagonal zeroed; each permutation a
    random re-split of the pooled rows into n and m; p = the share of permutations whose MMD^2 is at least
    the observed one (so the smallest p is 0, not 1/(P+1)).
    """
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        return 0.0, 1.0
    width = sigma if sigma is not None else median_sigma(x, x)
    pooled = torch.cat([x, y])
    kernel = rbf_kernel(pooled, pooled, width).fill_diagonal_(0.0)
    observed = _mmd2_of_splits(kernel, _ys(n, m))[0]
    order = torch.rand(permutations, n + m, generator=generator).argsort(dim=1)
    splits = (order >= n).to(torch.float64)  # rows sent to the last m places of a random permutation
    permuted = _mmd2_of_splits(kernel, splits)
    return float(observed), float((observed <= permuted).double().mean())


def chi_square_test(ref_counts: torch.Tensor, live_counts: torch.Tensor) -> tuple[float, float]:
    """(statistic, p-value) of Pearson's chi-square test that two count vectors (C,) share one distribution.

    The 2 x C contingency table's test of homogeneity, without Yates' correction (scipy's
    ``chi2_contingency(..., correction=False)``); labels neither sample has are left out of the degrees of
    freedom. p = Q(dof/2, stat/2), the regularised upper incomplete gamma function (the chi-square tail).
    """
    table = torch.stack([ref_counts.double(), live_counts.double()])
    table = table[:, table.sum(0) > 0]
    rows, total = table.sum(1, keepdim=True), table.sum()
    dof = table.shape[1] - 1
    if dof < 1 or bool((rows == 0).any()):
        return 0.0, 1.0
    expected = rows * table.sum(0, keepdim=True) / total
    stat = ((table - expected) ** 2 / expected).sum()
    p = torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2.0)
    return float(stat), float(p)


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> float:
    """The Jensen-Shannon distance of two distributions: the square root of the divergence, base 2 (0 to 1).

    Inputs are normalised first, as scipy's ``jensenshannon(p, q, base=2)`` does.
    """
    p, q = p.double() / p.double().sum(), q.double() / q.double().sum()
    mid = (p + q) / 2

    def kl(a: torch.Tensor) -> torch.Tensor:
        nonzero = a > 0
        return (a[nonzero] * torch.log2(a[nonzero] / mid[nonzero])).sum()

    return math.sqrt(max(float((kl(p) + kl(q)) / 2), 0.0))


def kolmogorov_sf(t: float, terms: int = 100) -> float:
    """P(K > t) of the Kolmogorov distribution: 2 sum_{k>=1} (-1)^(k-1) exp(-2 k^2 t^2)."""
    if t <= 0:
        return 1.0
    if t < 0.2:  # the alternating series converges slowly here, and the tail is 1 to double precision
        return 1.0
    k = torch.arange(1, terms + 1, dtype=torch.float64)
    series = 2.0 * ((-1.0) ** (k - 1) * torch.exp(-2.0 * k * k * t * t)).sum()
    return float(series.clamp(0.0, 1.0))


def ks_test(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(D, asymptotic p-value) of the two-sample Kolmogorov-Smirnov test of 1-D samples ``a`` and ``b``.

    D = sup_x |F_a(x) - F_b(x)|, taken at every observed value (ties handled: right-continuous ECDFs);
    p = P(K > sqrt(n m / (n + m)) D) of the Kolmogorov distribution (scipy's ``kstwobign``), the
    large-sample approximation, which is what windows of a few hundred rows need.
    """
    a, b = a.double().flatten().sort().values, b.double().flatten().sort().values
    n, m = a.numel(), b.numel()
    if n == 0 or m == 0:
        return 0.0, 1.0
    points = torch.cat([a, b])
    fa = torch.searchsorted(a, points, right=True).double() / n
    fb = torch.searchsorted(b, points, right=True).double() / m
    d = float((fa - fb).abs().max())
    return d, kolmogorov_sf(math.sqrt(n * m / (n + m)) * d)
