"""The drift statistics against scipy (installed for the tests only) and against their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from multitune.health.stats import (
    chi_square_test,
    jensen_shannon,
    ks_test,
    median_sigma,
    mmd_test,
    rbf_mmd2,
)

scipy_stats = pytest.importorskip("scipy.stats")


def _naive_mmd2(x: torch.Tensor, y: torch.Tensor, sigma: float) -> float:
    """The unbiased MMD^2 by its three sums, written out (the reference for the quadratic-form version)."""

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-(torch.cdist(a.double(), b.double()) ** 2) / (2 * sigma**2))

    n, m = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    xx = (kxx.sum() - kxx.diag().sum()) / (n * (n - 1))
    yy = (kyy.sum() - kyy.diag().sum()) / (m * (m - 1))
    return float(xx + yy - 2 * k(x, y).mean())


def test_mmd2_equals_its_definition_and_is_near_zero_for_one_distribution() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g), torch.randn(30, 5, generator=g) + 0.5
    assert rbf_mmd2(x, y, 1.3) == pytest.approx(_naive_mmd2(x, y, 1.3), abs=1e-12)
    same = torch.randn(300, 5, generator=g), torch.randn(300, 5, generator=g)
    assert abs(rbf_mmd2(*same, 2.0)) < 0.01 < rbf_mmd2(x, y, 2.0)


def test_median_sigma_is_alibi_detects_heuristic() -> None:
    x = torch.tensor([[0.0], [1.0], [3.0]])
    # squared distances of x to itself: 0,1,9 / 1,0,4 / 9,4,0; the 3 zeros of the diagonal skipped,
    # the median index is 3 + (9 - 3) // 2 - 1 = 5 of the sorted 0,0,0,1,1,4,4,9,9: the value 4
    assert median_sigma(x, x) == pytest.approx(math.sqrt(4 / 2))
    y = torch.tensor([[10.0], [12.0]])
    # cross distances 100, 144, 81, 121, 49, 81 -> sorted 49,81,81,100,121,144; index 0 + 6 // 2 - 1 = 2
    assert median_sigma(x, y) == pytest.approx(math.sqrt(81 / 2))
    assert median_sigma(torch.ones(4, 2), torch.ones(4, 2)) == 1.0  # no width from identical points


def test_mmd_permutation_p_value_is_uniform_under_the_null_and_small_under_a_shift() -> None:
    g = torch.Generator().manual_seed(1)
    p_null = [
        mmd_test(torch.randn(60, 3, generator=g), torch.randn(40, 3, generator=g), 200, generator=g)[1]
        for _ in range(60)
    ]
    assert 0.35 < sum(p_null) / len(p_null) < 0.65  # mean of U(0, 1)
    assert sum(p < 0.05 for p in p_null) <= 8  # about 3 expected
    mmd2, p = mmd_test(
        torch.randn(60, 3, generator=g), torch.randn(40, 3, generator=g) + 1.0, 200, generator=g
    )
    assert p == 0.0 and mmd2 > 0


def test_mmd_permutations_match_re_splitting_the_rows_by_hand() -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(7, 2, generator=g), torch.randn(5, 2, generator=g)
    sigma = median_sigma(x, x)
    observed, p = mmd_test(x, y, 50, generator=torch.Generator().manual_seed(3))
    assert observed == pytest.approx(_naive_mmd2(x, y, sigma), abs=1e-12)
    order = torch.rand(50, 12, generator=torch.Generator().manual_seed(3)).argsort(dim=1)
    pooled = torch.cat([x, y])
    by_hand = [_naive_mmd2(pooled[o < 7], pooled[o >= 7], sigma) for o in order]
    assert p == pytest.approx(sum(observed <= v + 1e-12 for v in by_hand) / 50)


@pytest.mark.parametrize(
    ("ref", "live"), [([50, 50], [30, 70]), ([10, 20, 30, 0], [12, 18, 40, 5]), ([100, 3, 7], [90, 9, 1])]
)
def test_chi_square_equals_scipys_contingency_test(ref: list[int], live: list[int]) -> None:
    stat, p = chi_square_test(torch.tensor(ref), torch.tensor(live))
    expected = scipy_stats.chi2_contingency([ref, live], correction=False)
    assert stat == pytest.approx(expected.statistic, rel=1e-9)
    assert p == pytest.approx(expected.pvalue, rel=1e-6, abs=1e-12)


def test_chi_square_of_degenerate_tables_is_no_evidence() -> None:
    assert chi_square_test(torch.tensor([5, 0]), torch.tensor([7, 0])) == (0.0, 1.0)  # one label only
    assert chi_square_test(torch.tensor([5, 3]), torch.tensor([0, 0])) == (0.0, 1.0)  # no live rows


def test_jensen_shannon_equals_scipys_distance() -> None:
    from scipy.spatial.distance import jensenshannon

    for p, q in ([[0.5, 0.5], [0.9, 0.1]], [[1, 2, 3, 0], [3, 2, 1, 4]], [[1.0, 0.0], [0.0, 1.0]]):
        assert jensen_shannon(
            torch.tensor(p, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)
        ) == pytest.approx(jensenshannon(p, q, base=2), abs=1e-9)
    assert jensen_shannon(torch.tensor([0.3, 0.7]), torch.tensor([0.3, 0.7])) == 0.0


def test_ks_statistic_and_asymptotic_p_value_equal_scipys() -> None:
    g = torch.Generator().manual_seed(4)
    cases = [
        (torch.randn(200, generator=g), torch.randn(150, generator=g) + 0.3),
        (torch.randn(80, generator=g), torch.randn(300, generator=g)),
        (torch.randint(0, 10, (120,), generator=g).float(), torch.randint(0, 12, (90,), generator=g).float()),
    ]
    for a, b in cases:
        d, p = ks_test(a, b)
        expected = scipy_stats.ks_2samp(a.numpy(), b.numpy(), method="asymp")
        assert d == pytest.approx(expected.statistic, abs=1e-12)
        n, m = len(a), len(b)
        assert p == pytest.approx(
            scipy_stats.kstwobign.sf(math.sqrt(n * m / (n + m)) * d), rel=1e-6, abs=1e-12
        )
    assert ks_test(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == (0.0, 1.0)
