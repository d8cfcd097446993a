"""describe(): exact values, checked against scipy's own t interval."""

from __future__ import annotations

import math

import numpy as np
import pytest
from llm_energy.statistics import DESCRIBE_KEYS, describe
from scipy import stats


def test_describe_matches_scipy_t_interval() -> None:
    values = [0.91, 1.02, 0.97, 1.10, 0.95]
    result = describe(values)
    mean = float(np.mean(values))
    std = float(np.std(values, ddof=1))
    low, high = stats.t.interval(0.95, df=len(values) - 1, loc=mean, scale=std / math.sqrt(len(values)))
    assert result["n"] == 5
    assert result["n_missing"] == 0
    assert result["mean"] == pytest.approx(mean, rel=1e-14)
    assert result["std"] == pytest.approx(std, rel=1e-12)
    assert result["ci95_low"] == pytest.approx(low, rel=1e-12)
    assert result["ci95_high"] == pytest.approx(high, rel=1e-12)
    assert result["cv"] == pytest.approx(std / mean, rel=1e-12)
    assert result["min"] == 0.91 and result["max"] == 1.10
    assert tuple(result) == DESCRIBE_KEYS


def test_describe_hand_computed_values() -> None:
    # mean 2, std 1, t(0.975, 2) = 4.30265272975 (tables) -> half width 4.30265 / sqrt(3)
    result = describe([1, 2, 3])
    half_width = 4.30265272975 / math.sqrt(3)
    assert result["mean"] == 2.0
    assert result["std"] == 1.0
    assert result["ci95_low"] == pytest.approx(2.0 - half_width, abs=1e-10)
    assert result["ci95_high"] == pytest.approx(2.0 + half_width, abs=1e-10)
    assert result["cv"] == 0.5


def test_missing_values_are_dropped_and_counted() -> None:
    result = describe([1.0, None, float("nan"), 3.0, float("inf")])
    assert result["n"] == 2
    assert result["n_missing"] == 3
    assert result["mean"] == 2.0
    assert result["std"] == pytest.approx(math.sqrt(2.0))


def test_single_value_has_no_spread() -> None:
    result = describe([4.5])
    assert result == {
        "n": 1,
        "n_missing": 0,
        "mean": 4.5,
        "std": None,
        "ci95_low": None,
        "ci95_high": None,
        "cv": None,
        "min": 4.5,
        "max": 4.5,
    }


def test_no_values() -> None:
    result = describe([None, float("nan")])
    assert result["n"] == 0 and result["n_missing"] == 2
    assert all(result[key] is None for key in DESCRIBE_KEYS if key not in ("n", "n_missing"))
    assert describe([])["n"] == 0


def test_cv_undefined_for_zero_mean_and_positive_for_negative_mean() -> None:
    assert describe([-1.0, 1.0])["cv"] is None
    negative = describe([-2.0, -4.0])
    assert negative["cv"] == pytest.approx(math.sqrt(2.0) / 3.0)


def test_constant_values_give_a_zero_width_interval() -> None:
    result = describe([7.0, 7.0, 7.0])
    assert result["std"] == 0.0
    assert result["ci95_low"] == result["ci95_high"] == 7.0
    assert result["cv"] == 0.0


def test_numpy_scalars_and_bools() -> None:
    # numpy floats are numbers; booleans are not metric values and count as missing
    result = describe([np.float32(1.5), np.int64(2), True])
    assert result["n"] == 2 and result["n_missing"] == 1
    assert result["mean"] == pytest.approx(1.75)
