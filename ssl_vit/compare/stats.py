"""The statistics of a comparison: mean, spread and 95% interval over pretraining seeds; Welch's t-test.

With a handful of pretraining seeds (2-3) the normal approximation is far too narrow: the interval is
Student's t (mean ± t(0.975, n-1) · sd / √n; t = 12.71 for n = 2, 4.30 for n = 3), and two methods are
compared by Welch's unequal-variance t-test, two-sided. A bootstrap would be meaningless over 2-3 values.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

from scipy import stats as _scipy_stats

__all__ = ["ALPHA", "CONFIDENCE", "Summary", "WelchResult", "summarize", "t_quantile", "welch"]

CONFIDENCE = 0.95  # the intervals' coverage
ALPHA = 0.05  # a gap is "within noise" when Welch's two-sided p >= ALPHA


@dataclass
class Summary:
    """Values from n runs: mean, sample std (n-1) and the t-interval; std/interval None when n < 2."""

    n: int
    mean: float
    std: Optional[float]
    ci_low: Optional[float]
    ci_high: Optional[float]
    t: Optional[float]  # the quantile used: t(1 - alpha/2, n - 1)


@dataclass
class WelchResult:
    t: float
    df: float
    p: float  # two-sided


def t_quantile(q: float, df: float) -> float:
    """Student's t quantile, e.g. `t_quantile(0.975, 1) = 12.706`."""
    return float(_scipy_stats.t.ppf(q, df))


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    """Mean, sample std and `confidence` t-interval of `values` (one per pretraining seed)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("summarize needs at least one value")
    n, mean = len(values), statistics.fmean(values)
    if n < 2:
        return Summary(n, mean, None, None, None, None)
    std = statistics.stdev(values)
    t = t_quantile(0.5 + confidence / 2, n - 1)
    half = t * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half, t)


def welch(a: Sequence[float], b: Sequence[float]) -> Optional[WelchResult]:
    """Welch's two-sided t-test of mean(a) == mean(b); None when it is undefined: fewer than 2 values on
    a side, or no spread on either (e.g. a tiny eval set where every run scores the same): with no noise
    seen there is nothing to measure a gap against."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0.0:
        return None
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    # Welch-Satterthwaite degrees of freedom, (va + vb)^2 / (va^2 / (na - 1) + vb^2 / (nb - 1)), written with
    # the shares of va + vb so that tiny variances (1e-150) cannot underflow the squares to 0 / 0.
    wa, wb = va / (va + vb), vb / (va + vb)
    df = 1.0 / (wa**2 / (len(a) - 1) + wb**2 / (len(b) - 1))
    p = 2.0 * float(_scipy_stats.t.sf(abs(t), df))
    return WelchResult(t=t, df=df, p=min(1.0, p))
