"""Descriptive statistics of one metric over the measurement cycles of an experiment.

Every aggregated metric is summarised the same way (`describe`), so the summary table, the figures and
the paper all quote the same numbers: the sample mean, the sample standard deviation (ddof=1) and a
two-sided 95 % confidence interval of the mean from Student's t distribution, which is the right
interval for the handful of cycles (typically 3-10) an energy campaign can afford.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from scipy import stats as _scipy_stats

# The keys of every `describe` result, in order. Schemas and the summary table rely on this list.
DESCRIBE_KEYS: tuple[str, ...] = (
    "n",
    "n_missing",
    "mean",
    "std",
    "ci95_low",
    "ci95_high",
    "cv",
    "min",
    "max",
)
CONFIDENCE_LEVEL = 0.95


def _as_finite_float(value: Any) -> float | None:
    """A finite float, or None for missing values (None, NaN, +-inf, non-numbers)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def describe(values: Iterable[Any]) -> dict[str, float | int | None]:
    """Summarise the values of one metric over cycles.

    Returns {n, n_missing, mean, std, ci95_low, ci95_high, cv, min, max}. Missing values (None, NaN,
    infinities) are dropped and counted in `n_missing`. `std` is the sample standard deviation
    (ddof=1); the 95 % interval is mean -+ t(0.975, n-1) * std / sqrt(n). Both are None for n < 2,
    because one cycle says nothing about the spread. `cv` = std / |mean| (the absolute value keeps
    it a non-negative spread measure for net energies that can dip below zero); None when the mean
    is 0 or n < 2.
    """
    raw = list(values)
    kept = [number for number in (_as_finite_float(v) for v in raw) if number is not None]
    n = len(kept)
    result: dict[str, float | int | None] = dict.fromkeys(DESCRIBE_KEYS)
    result["n"] = n
    result["n_missing"] = len(raw) - n
    if n == 0:
        return result
    mean = math.fsum(kept) / n
    result["mean"] = mean
    result["min"] = min(kept)
    result["max"] = max(kept)
    if n < 2:
        return result
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in kept) / (n - 1))
    half_width = float(_scipy_stats.t.ppf(0.5 + CONFIDENCE_LEVEL / 2, n - 1)) * std / math.sqrt(n)
    result["std"] = std
    result["ci95_low"] = mean - half_width
    result["ci95_high"] = mean + half_width
    result["cv"] = std / abs(mean) if mean != 0 else None
    return result
