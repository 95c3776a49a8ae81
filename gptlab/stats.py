"""Statistics any study needs: means with Student-t intervals over seeds, paired differences, Holm.

`t_interval` is the mean with a two-sided Student-t confidence interval; `paired_difference`
the same for per-seed differences between two arms that share their seeds (the seed fixes the
data order and the initialisation of what is new, so pairing removes that part of the noise);
`paired_p_value` its two-sided paired t-test; `holm` corrects a family of p-values for
multiplicity (Holm 1979: step-down Bonferroni, family-wise error at most `alpha`).
"""
import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import stats


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean over `n` values with its two-sided `confidence` interval [low, high]."""
    mean: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes(self, value: float = 0.0) -> bool:
        """Whether the interval lies entirely on one side of `value` (a difference that holds)."""
        return self.low > value or self.high < value


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean and Student-t interval of independent values; one value gives an infinite interval."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"t_interval needs a non-empty list of numbers, got {values!r}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"t_interval got a non-finite value: {values!r}")
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, -math.inf, math.inf, 1, confidence)
    half = float(stats.t.ppf(0.5 + confidence / 2, df=x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return Interval(mean, mean - half, mean + half, int(x.size), confidence)


def paired_difference(a: dict, b: dict, confidence: float = 0.95) -> Interval:
    """Interval of a - b over the seeds both arms have; `a` and `b` map seed -> value."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"no common seeds to pair: {sorted(a)} vs {sorted(b)}")
    return t_interval([a[s] - b[s] for s in seeds], confidence)


def paired_p_value(a: dict, b: dict) -> float:
    """Two-sided paired t-test p-value of a - b over common seeds; nan with fewer than 2 pairs.

    Differences that are all equal give 0 when they are not zero (the interval is a point off zero)
    and 1 when they are."""
    seeds = sorted(set(a) & set(b))
    d = np.asarray([a[s] - b[s] for s in seeds], dtype=np.float64)
    if d.size < 2:
        return math.nan
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        return 1.0 if float(d.mean()) == 0.0 else 0.0
    t = float(d.mean()) / (sd / math.sqrt(d.size))
    return float(2 * stats.t.sf(abs(t), df=d.size - 1))


def holm(p_values: Sequence[float], alpha: float = 0.05) -> tuple:
    """(adjusted p-values, reject flags) in the given order, by Holm's step-down procedure.

    Sorted ascending, the i-th smallest (from 0) is multiplied by m - i, made non-decreasing,
    capped at 1; a hypothesis is rejected where its adjusted p-value is <= alpha. A nan p-value
    (a comparison that could not be tested) counts toward m and is never rejected."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"holm needs a list of p-values, got {p_values!r}")
    m = p.size
    order = np.argsort(np.where(np.isnan(p), np.inf, p), kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        value = p[i] * (m - rank) if math.isfinite(p[i]) else math.nan
        running = running if math.isnan(value) else max(running, min(1.0, value))
        adjusted[i] = math.nan if math.isnan(value) else running
    reject = [bool(math.isfinite(v) and v <= alpha) for v in adjusted]
    return [float(v) for v in adjusted], reject
