"""msd.eval.stats against scipy.stats on fixed inputs."""

from __future__ import annotations

import numpy as np
import pytest

scipy_stats = pytest.importorskip("scipy.stats")

from msd.eval import stats  # noqa: E402


@pytest.mark.parametrize("b,c", [(0, 0), (0, 5), (3, 3), (1, 9), (12, 4), (40, 20), (7, 0), (150, 170)])
def test_mcnemar_exact_equals_scipy_binomtest(b, c):
    expected = 1.0 if b + c == 0 else scipy_stats.binomtest(b, b + c, 0.5).pvalue
    assert stats.mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_discordant_counts_pairs():
    assert stats.discordant([1, 1, 0, 0, 1], [1, 0, 1, 0, 0]) == (2, 1)


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30])
@pytest.mark.parametrize("q", [0.025, 0.3, 0.5, 0.9, 0.975, 0.999])
def test_t_quantile_and_tail_equal_scipy(df, q):
    assert stats.t_ppf(q, df) == pytest.approx(scipy_stats.t.ppf(q, df), abs=1e-8)
    for t in (-3.2, -0.4, 0.0, 1.1, 2.5, 8.0):
        assert stats.t_sf(t, df) == pytest.approx(scipy_stats.t.sf(t, df), abs=1e-12)


def test_t_interval_equals_scipy():
    values = [0.18, 0.23, 0.15, 0.31, 0.02, 0.19, 0.27, 0.12, 0.2, 0.08]
    out = stats.t_interval(values)
    lo, hi = scipy_stats.t.interval(0.95, len(values) - 1, loc=np.mean(values),
                                    scale=scipy_stats.sem(values))
    assert out["mean"] == pytest.approx(np.mean(values))
    assert out["ci95"] == pytest.approx([lo, hi], abs=1e-10)
    assert stats.t_interval([0.3])["ci95"] is None


def test_rerun_interval_equals_scipy_and_covers_new_seeds():
    values = [0.18, 0.23, 0.15, 0.31, 0.02, 0.19, 0.27, 0.12, 0.2, 0.08]
    n, m = len(values), 5
    scale = np.std(values, ddof=1) * np.sqrt(1 / n + 1 / m)
    lo, hi = scipy_stats.t.interval(0.95, n - 1, loc=np.mean(values), scale=scale)
    assert stats.rerun_interval(values, m) == pytest.approx([lo, hi], abs=1e-10)
    assert stats.rerun_interval([0.3], 5) is None
    # What it promises: the mean of m new seeds falls inside 95% of the time (normal seeds).
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(2000):
        old, new = rng.normal(0.2, 0.1, size=7), rng.normal(0.2, 0.1, size=3)
        lo, hi = stats.rerun_interval(list(old), 3)
        hits += lo <= new.mean() <= hi
    assert 0.93 < hits / 2000 < 0.97
    # ... and the interval of the mean alone (t_interval) would not: it ignores the new seeds' noise.
    assert stats.t_interval(values)["ci95"][1] < stats.rerun_interval(values, 3)[1]


def test_paired_t_test_equals_scipy():
    x = [0.18, 0.23, 0.15, 0.31, 0.02, 0.19]
    y = [0.52, 0.40, 0.02, 0.54, 0.33, 0.21]
    out = stats.paired_t_test(x, y)
    ref = scipy_stats.ttest_rel(y, x)
    assert out["t"] == pytest.approx(ref.statistic, rel=1e-10)
    assert out["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert stats.paired_t_test([0.1, 0.2], [0.1, 0.2])["p"] == 1.0


def test_bootstrap_mean_interval_matches_scipy_percentile_bootstrap():
    values = [0.18, 0.23, 0.15, 0.31, 0.02, 0.19, 0.27, 0.12, 0.2, 0.08]
    out = stats.bootstrap_mean_interval(values, B=20_000)
    ref = scipy_stats.bootstrap((values,), np.mean, n_resamples=20_000, method="percentile",
                                confidence_level=0.95, random_state=1).confidence_interval
    assert out["B"] == 20_000 and out["mean"] == pytest.approx(np.mean(values))
    # Different random resamples: the endpoints agree to Monte-Carlo error.
    assert out["ci95"] == pytest.approx([ref.low, ref.high], abs=0.006)
    assert stats.bootstrap_mean_interval(values, B=2000) == stats.bootstrap_mean_interval(values, B=2000)


def test_paired_bootstrap_matches_scipy_paired_bootstrap():
    rng = np.random.default_rng(3)
    x = (rng.random(144) < 0.5).astype(int).tolist()
    y = [v if rng.random() < 0.8 else 1 - v for v in x]
    out = stats.paired_bootstrap_diff(x, y, B=20_000)
    ref = scipy_stats.bootstrap((x, y), lambda a, b: np.mean(b) - np.mean(a), paired=True,
                                vectorized=False, n_resamples=20_000, method="percentile",
                                random_state=1).confidence_interval
    assert out["diff"] == pytest.approx(np.mean(y) - np.mean(x))
    assert out["ci95"] == pytest.approx([ref.low, ref.high], abs=0.01)
    assert out["B"] == 20_000 and out["n"] == 144
    with pytest.raises(ValueError):
        stats.paired_bootstrap_diff([1], [1, 0])


def test_holm_by_hand():
    # sorted: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06), 0.5 (x1 = 0.5)
    out = stats.holm([0.03, 0.5, 0.01, 0.02])
    assert [o["p_holm"] for o in out] == pytest.approx([0.06, 0.5, 0.04, 0.06])
    assert [o["significant"] for o in out] == [False, False, True, False]
    # monotone: a larger raw p never gets a smaller adjusted p
    out = stats.holm([0.001, 0.04, 0.012])
    assert [o["p_holm"] for o in out] == pytest.approx([0.003, 0.04, 0.024])
    assert stats.holm([0.9, 0.8])[0]["p_holm"] == 1.0
