"""Statistics any study needs: means with Student-t intervals over seeds, and paired differences.

`t_interval` is the mean with a two-sided Student-t confidence interval; `paired_difference`
the same for per-seed differences between two arms that share their seeds (the seed fixes the
data order and the initialisation of what is new, so pairing removes that part of the noise).
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
