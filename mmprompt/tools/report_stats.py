"""Confidence intervals for ``mmprompt report``: a t-interval over seeds, a bootstrap over test images for a
single run, paired differences between methods run on the same seeds, and the mark for a difference that
is inside the noise.

Why each one: seeds change the few-shot draw and the initialisation, so the spread over seeds is the noise
a reader re-running the sweep would see (a t-interval, since there are 3-10 seeds, not hundreds). A single
run has no seed spread; its test set still is a sample, so it gets a percentile bootstrap over its test
images (an accuracy is ``correct / n``: resampling the images is drawing ``Binomial(n, correct / n)``).
Two methods run on the same seeds share the few-shot draw, so their difference per seed cancels the
draw's luck: the interval of the per-seed differences is narrower than comparing two intervals.

Standard library and numpy only (no torch), so ``mmprompt report`` starts at once.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

LEVEL = 0.95
NOISE_MARK = "≈"  # a difference whose interval contains 0


@dataclass(frozen=True)
class Interval:
    """A mean and its confidence interval (``low``/``high`` are nan when undefined, e.g. one seed)."""

    mean: float
    low: float
    high: float
    n: int
    kind: str  # "t over seeds", "bootstrap over test images", "paired t over seeds", "Welch t"

    @property
    def defined(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def inside_noise(self) -> bool:
        """True when the interval contains 0 (or is undefined): the sign of the mean is not established."""
        return not self.defined or self.low <= 0 <= self.high

    def text(self, digits: int = 1) -> str:
        """``58.3 [55.1, 61.5]``, or the mean alone when no interval is defined."""
        if not self.defined:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


# -- Student's t quantile (no scipy): the regularised incomplete beta by Lentz's continued fraction ------

def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return result


def incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1 - math.exp(log_front) * _beta_fraction(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the cdf)."""
    if not 0 < p < 1 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    low, high = -1e4, 1e4
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


# -- intervals -----------------------------------------------------------------------------------------

def t_interval(values: Sequence[float], level: float = LEVEL, kind: str = "t over seeds") -> Interval:
    """mean ± t_{(1+level)/2, n-1} · s / √n; undefined (nan bounds) for fewer than 2 values."""
    n = len(values)
    if n == 0:
        raise ValueError("t_interval: no values")
    mean = statistics.fmean(values)
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, kind)
    half = t_quantile((1 + level) / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, kind)


def bootstrap_accuracy(accuracy: float, n_images: int, level: float = LEVEL, resamples: int = 4000,
                       seed: int = 0) -> Interval:
    """Percentile bootstrap over the ``n_images`` test images of one run's accuracy (in percent)."""
    if n_images < 1 or not 0 <= accuracy <= 100:
        raise ValueError(f"bootstrap_accuracy needs n_images >= 1 and an accuracy in [0, 100], got "
                         f"{n_images}, {accuracy}")
    correct = round(accuracy / 100 * n_images)
    draws = np.random.default_rng(seed).binomial(n_images, correct / n_images, resamples) * 100 / n_images
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return Interval(accuracy, float(low), float(high), n_images, "bootstrap over test images")


def bootstrap_hm(base: float, n_base: int, new: float, n_new: int, level: float = LEVEL, resamples: int = 4000,
                 seed: int = 0) -> Interval:
    """Percentile bootstrap of one run's HM: the base and novel test images resampled independently."""
    rng = np.random.default_rng(seed)
    draws = [rng.binomial(n, round(acc / 100 * n) / n, resamples) * 100 / n
             for acc, n in ((base, n_base), (new, n_new))]
    total = draws[0] + draws[1]
    hms = np.divide(2 * draws[0] * draws[1], total, out=np.zeros_like(total), where=total > 0)
    low, high = np.quantile(hms, [(1 - level) / 2, (1 + level) / 2])
    return Interval(2 * base * new / (base + new) if base + new else 0.0, float(low), float(high), n_base + n_new,
                    "bootstrap over test images")


def paired_difference(a: Mapping[int, float] | float, b: Mapping[int, float] | float,
                      level: float = LEVEL) -> Interval:
    """``a − b`` on the seeds both have, as a t-interval of the per-seed differences.

    A side given as a plain number is a constant for every seed: zero-shot CLIP, where nothing depends
    on the seed (its one run is the same on every few-shot draw)."""
    if not isinstance(a, Mapping) and not isinstance(b, Mapping):
        raise ValueError("paired_difference: at least one side needs per-seed values")
    a = a if isinstance(a, Mapping) else {seed: float(a) for seed in b}
    b = b if isinstance(b, Mapping) else {seed: float(b) for seed in a}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"paired_difference: no common seeds ({sorted(a)} vs {sorted(b)})")
    return t_interval([a[s] - b[s] for s in seeds], level, "paired t over seeds")


def welch_difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Interval:
    """``mean(a) − mean(b)`` for unpaired samples (e.g. two datasets), Welch–Satterthwaite degrees of freedom."""
    if len(a) < 2 or len(b) < 2:
        return Interval(statistics.fmean(a) - statistics.fmean(b), math.nan, math.nan, min(len(a), len(b)), "Welch t")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    mean = statistics.fmean(a) - statistics.fmean(b)
    if va + vb == 0:
        return Interval(mean, mean, mean, min(len(a), len(b)), "Welch t")
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t_quantile((1 + level) / 2, df) * math.sqrt(va + vb)
    return Interval(mean, mean - half, mean + half, min(len(a), len(b)), "Welch t")


def verdict(difference: Interval) -> str:
    """For a claim "difference > 0": ``holds`` (interval above 0), ``does not hold`` (below 0) or
    ``inside the noise`` (the interval contains 0, or there is none)."""
    if difference.inside_noise:
        return "inside the noise"
    return "holds" if difference.low > 0 else "does not hold"


def marked(difference: Interval, digits: int = 1) -> str:
    """The difference's text with ``≈`` in front when it is inside the noise."""
    return (f"{NOISE_MARK} " if difference.inside_noise else "") + difference.text(digits)
