"""Uncertainty of a comparison: means with 95% intervals over training seeds x evaluation sets, and
verdicts decided on paired differences.

A method trained at S seeds and scored on M evaluation sets (independent noise sets with independent
reference draws) gives an S x M table of scores X[i, j]. Seeds and sets are crossed: every seed is
scored on every set, and every method, solver and floor of a comparison on the same M sets, so the
difference of two methods is paired by set. The model is two-way random effects,

    X[i, j] = mu + a_i + b_j + e_ij,        Var(mean X) = s_a^2 / S + s_b^2 / M + s_e^2 / (S M),

seed effect a (training randomness), set effect b (which noise and reference were drawn), interaction e.

Estimator (`combine`). For a linear combination L = sum_c w_c mean(X_c) of tables on the same sets,

    Var(L) = Var_j(sum_c w_c colmean_c[j]) / M  +  sum_c w_c^2 s_a,c^2 / S_c,

where the first term (everything that moves with the set, interactions included, with the sets shared
so that a common set effect cancels in a difference) is the sample variance of the combined column
means, and s_a,c^2 = max(0, MS_seed - MS_resid) / M is each table's seed variance from its two-way
mean squares (with M = 1 the seed means' own variance, since no set term is estimated). The interval
is L +- t(0.975, df) sqrt(Var) with Welch-Satterthwaite degrees of freedom (M - 1 for the set term,
S_c - 1 for each seed term).

Why t and not a bootstrap: with the counts a study can afford (3 seeds, 5 to 10 sets) a bootstrap over
seeds has 10 distinct resamples and its variance is biased low by (S - 1) / S, and percentile intervals
under-cover at n <= 10; the t interval is exact for normal scores in the one-factor cases (S = 1 or
M = 1) and the standard approximation for crossed random effects. The scores (sliced W2 or FID over
thousands of samples) are smooth functions of many terms and close to normal from set to set; the
coverage is tested on exact samples scored against exact draws (tests/test_intervals.py). The
derivation and the verdicts built on it: docs/science.md §9.6.

A table of one cell (one seed, one set) has no interval: its bounds are NaN and a verdict falls back
to the point value, which the tables mark (n = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy.special import stdtrit  # the t quantile; scipy.stats takes a second to import in every worker

LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% interval [low, high] from n = S x M scores (NaN bounds when n = 1)."""

    mean: float
    low: float
    high: float
    n: int
    df: float = math.nan

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    @property
    def half(self) -> float:
        return (self.high - self.low) / 2 if self.has_interval else math.nan

    def below(self, bar: float = 0.0) -> bool | None:
        """True when the whole interval lies below `bar`, False when it lies above it, None when it
        straddles it (not resolved at this sample size). Without an interval: the point value decides."""
        if not math.isfinite(self.mean):
            return None
        if not self.has_interval:
            return self.mean <= bar
        if self.high < bar:
            return True
        if self.low > bar:
            return False
        return None

    def text(self, digits: int = 4) -> str:
        if not math.isfinite(self.mean):
            return "-"
        if not self.has_interval:
            return f"{self.mean:.{digits}g}"
        return f"{self.mean:.{digits}g} ± {self.half:.2g}"


def table(values) -> np.ndarray:
    """Scores as a float S x M array (a scalar is 1 x 1, a list of per-set scores is 1 x M)."""
    x = np.asarray(values, dtype=float)
    if x.ndim == 0:
        x = x.reshape(1, 1)
    elif x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"scores must be a seeds x sets table; got shape {list(x.shape)}")
    return x


def _seed_variance(x: np.ndarray) -> float:
    """s_a^2 of a seeds x sets table (0 for one seed); with one set, the seed means' whole variance."""
    s, m = x.shape
    if s < 2:
        return 0.0
    if m < 2:
        return float(np.var(x[:, 0], ddof=1))
    grand = x.mean()
    rows, cols = x.mean(1, keepdims=True), x.mean(0, keepdims=True)
    ms_seed = m * float(((rows - grand) ** 2).sum()) / (s - 1)
    ms_resid = float(((x - rows - cols + grand) ** 2).sum()) / ((s - 1) * (m - 1))
    return max(0.0, ms_seed - ms_resid) / m


def combine(terms: Iterable[tuple[float, Sequence]], level: float = LEVEL) -> Estimate:
    """The estimate of sum_c w_c mean(X_c) for (w_c, X_c) on the same evaluation sets (module docstring)."""
    terms = [(float(w), table(x)) for w, x in terms]
    m = terms[0][1].shape[1]
    if any(x.shape[1] != m for _, x in terms):
        raise ValueError(f"paired scores need the same evaluation sets; got {[x.shape[1] for _, x in terms]} sets")
    mean = sum(w * float(x.mean()) for w, x in terms)
    n = max(x.size for _, x in terms)
    if not math.isfinite(mean):   # an infinite or NaN score has no interval (and no variance to compute)
        return Estimate(mean, math.nan, math.nan, n)
    parts: list[tuple[float, float]] = []   # (variance part, its degrees of freedom)
    if m >= 2:
        columns = sum(w * x.mean(0) for w, x in terms)
        parts.append((float(np.var(columns, ddof=1)) / m, m - 1))
    for w, x in terms:
        if x.shape[0] >= 2:
            parts.append((w * w * _seed_variance(x) / x.shape[0], x.shape[0] - 1))
    if not parts:
        return Estimate(mean, math.nan, math.nan, n)
    var = sum(v for v, _ in parts)
    if var == 0.0:
        return Estimate(mean, mean, mean, n, math.inf)
    df = var * var / sum(v * v / d for v, d in parts if v > 0)
    half = float(stdtrit(df, 0.5 + level / 2)) * math.sqrt(var)
    return Estimate(mean, mean - half, mean + half, n, df)


def estimate(x, level: float = LEVEL) -> Estimate:
    """Mean and interval of one seeds x sets table."""
    return combine([(1.0, x)], level)


def difference(a, b, scale: float = 1.0, level: float = LEVEL) -> Estimate:
    """mean(a) - scale * mean(b), paired by evaluation set."""
    return combine([(1.0, a), (-scale, b)], level)


def rank(tables: dict[str, Sequence]) -> dict[str, str]:
    """At one step count: "best" for the lowest mean, "tie" for each method whose paired difference from
    the best is not resolved (its interval contains 0), "worse" for the others."""
    means = {k: float(table(v).mean()) for k, v in tables.items()}
    finite = {k: v for k, v in means.items() if math.isfinite(v)}
    if not finite:
        return {}
    best = min(finite, key=finite.get)
    out = {}
    for label in finite:
        if label == best:
            out[label] = "best"
        else:
            out[label] = "worse" if difference(tables[label], tables[best]).below(0.0) is False else "tie"
    return out


__all__ = ["Estimate", "LEVEL", "combine", "difference", "estimate", "rank", "table"]
