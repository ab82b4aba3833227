"""Interval estimates and tests for msd's tables, in one place (pure Python and numpy).

    mcnemar_exact(b, c)              exact McNemar test: two-sided binomial test of b discordant
                                     pairs of one kind out of b + c, p = 1/2
    paired_bootstrap_diff(x, y)      difference of two rates measured on the same items, with a
                                     percentile interval from resampling the items (pairs kept)
    t_interval(values)               mean over seeds with a Student t interval
    bootstrap_mean_interval(values)  mean over seeds with a percentile bootstrap interval
    rerun_interval(values, m)        where the mean of m new seeds should fall (t prediction)
    paired_t_test(x, y)              two-sided paired t test (seeds paired by seed number)
    holm(pvalues)                    Holm's step-down adjustment for a family of tests

Wilson intervals of single rates stay in msd.eval.metrics (`wilson`). The t distribution is
computed here (regularised incomplete beta by continued fraction) so that msd needs no scipy at
run time; tests compare every function with scipy.stats.
"""

from __future__ import annotations

import math

LEVEL = 0.95
BOOTSTRAP_B = 10_000
BOOTSTRAP_SEED = 0


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b pairs (yes, no) and c pairs (no, yes): twice the
    smaller binomial tail of Binomial(b + c, 1/2), capped at 1; 1.0 with no discordant pair."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n  # exact: integers until here
    return min(1.0, 2 * tail)


def discordant(x: list, y: list) -> tuple[int, int]:
    """(b, c) of two paired 0/1 lists: b = x true and y false, c = x false and y true."""
    b = sum(1 for u, v in zip(x, y) if u and not v)
    c = sum(1 for u, v in zip(x, y) if v and not u)
    return b, c


def _quantiles(values, level: float) -> list[float]:
    import numpy as np

    alpha = (1 - level) / 2
    lo, hi = np.quantile(np.asarray(values, dtype=np.float64), [alpha, 1 - alpha])
    return [float(lo), float(hi)]


def paired_bootstrap_diff(x: list, y: list, *, B: int = BOOTSTRAP_B, seed: int = BOOTSTRAP_SEED,
                          level: float = LEVEL) -> dict:
    """mean(y) - mean(x) over paired items, and its percentile bootstrap interval: B resamples
    of the item indices (with replacement), the same indices for x and y."""
    import numpy as np

    if len(x) != len(y) or not x:
        raise ValueError(f"paired samples need the same, non-zero length ({len(x)}, {len(y)})")
    d_N = np.asarray(y, dtype=np.float64) - np.asarray(x, dtype=np.float64)
    idx_BN = np.random.default_rng(seed).integers(0, len(d_N), size=(B, len(d_N)))
    means_B = d_N[idx_BN].mean(axis=1)
    return {"diff": float(d_N.mean()), "ci95": _quantiles(means_B, level), "B": B, "seed": seed,
            "n": len(d_N)}


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1) * (a + m2)),
                    -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1 - math.exp(log_front) * _betacf(b, a, 1 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom."""
    # Near t = 0 the tail is 1/2 minus a small term: computed as such (I_x(1/2, df/2) with
    # x = t^2 / (df + t^2)) it keeps full precision, where 1/2 * I_{1-x}(df/2, 1/2) does not.
    if t * t < df:
        tail = 0.5 - 0.5 * _betainc(0.5, df / 2, t * t / (df + t * t))
    else:
        tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1 - tail


def t_ppf(q: float, df: float) -> float:
    """Quantile of Student's t (bisection on t_sf; |error| < 1e-12)."""
    if not 0 < q < 1:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        if 1 - t_sf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


def _mean_sd(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, sd


def t_interval(values: list[float], level: float = LEVEL) -> dict:
    """Mean of `values` (one per seed) with its Student t interval; no interval under 2 values."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values")
    mean, sd = _mean_sd(values)
    n = len(values)
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n, "sd": None}
    half = t_ppf(1 - (1 - level) / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n, "sd": sd}


def rerun_interval(values: list[float], m: int, level: float = LEVEL) -> list[float] | None:
    """Where the mean of `m` new seeds should fall: the Student t prediction interval
    mean ± t(n-1) · sd · sqrt(1/n + 1/m) from the n seeds run (None under 2 values). The check a
    reader can make of a claim by rerunning it with new seeds."""
    if m < 1:
        raise ValueError("m must be at least 1")
    values = [float(v) for v in values]
    n = len(values)
    if n < 2:
        return None
    mean, sd = _mean_sd(values)
    half = t_ppf(1 - (1 - level) / 2, n - 1) * sd * math.sqrt(1 / n + 1 / m)
    return [mean - half, mean + half]


def bootstrap_mean_interval(values: list[float], *, B: int = BOOTSTRAP_B, seed: int = BOOTSTRAP_SEED,
                            level: float = LEVEL) -> dict:
    """Mean of `values` with a percentile bootstrap interval (B resamples of the values)."""
    import numpy as np

    v_N = np.asarray(values, dtype=np.float64)
    if v_N.size == 0:
        raise ValueError("no values")
    idx_BN = np.random.default_rng(seed).integers(0, v_N.size, size=(B, v_N.size))
    return {"mean": float(v_N.mean()), "ci95": _quantiles(v_N[idx_BN].mean(axis=1), level),
            "B": B, "seed": seed, "n": int(v_N.size)}


def paired_t_test(x: list[float], y: list[float]) -> dict:
    """Two-sided paired t test of mean(y - x) = 0: {diff, t, df, p}. All differences equal:
    p = 1 when they are 0, else 0 (the t statistic is infinite)."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"a paired t test needs two or more pairs ({len(x)}, {len(y)})")
    d = [float(b) - float(a) for a, b in zip(x, y)]
    mean, sd = _mean_sd(d)
    df = len(d) - 1
    if sd == 0:
        return {"diff": mean, "t": None, "df": df, "p": 1.0 if mean == 0 else 0.0}
    t = mean / (sd / math.sqrt(len(d)))
    return {"diff": mean, "t": t, "df": df, "p": min(1.0, 2 * t_sf(abs(t), df))}


def holm(pvalues: list[float], alpha: float = 0.05) -> list[dict]:
    """Holm's step-down correction: per test, the adjusted p-value (monotone, capped at 1) and
    whether it is rejected at family-wise level `alpha`. Order of the input is kept."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return [{"p": pvalues[i], "p_holm": adjusted[i], "significant": adjusted[i] <= alpha}
            for i in range(m)]
