"""Power timeline: exact integral, missing samples, the sampler thread, the table artifact."""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest
from llm_energy import hardware
from llm_energy.artifacts import read_table_artifact, write_table_artifact
from llm_energy.energy.nvml import NvmlEnergySource
from llm_energy.energy.timeline import (
    TIMELINE_COLUMNS,
    TimelineSampler,
    TimelineStore,
    frame_from_rows,
    integrate_power,
    power_update_period_s,
)

from tests.fake_nvml import FakeGpu, FakeNvml


def test_integral_is_exact_for_a_known_power_sequence():
    # 100 W rising 50 W/s, sampled every 0.1 s: the exact energy over [0.25, 1.75] is
    # the integral of 100 + 50 t = 100 * 1.5 + 25 * (1.75^2 - 0.25^2) = 225 J
    times = np.arange(0.0, 2.01, 0.1)
    power = 100.0 + 50.0 * times
    result = integrate_power(times, power, 0.25, 1.75, max_edge_gap_s=0.25)
    assert result.energy_j == pytest.approx(225.0, rel=1e-12)
    assert result.samples == 15
    assert result.max_gap_s == pytest.approx(0.1)


def test_recorded_step_sequence_and_missing_samples():
    # A recorded 1 kHz-free sequence: 70 W idle, then 400 W, with two failed reads (NaN)
    times = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    power = np.array([70, 70, 400, 400, np.nan, np.nan, 400, 400, 400], dtype=float)
    full = integrate_power(times, power, 0.0, 0.8, max_edge_gap_s=0.25)
    # trapezoids: 0.1*70 + 0.1*(70+400)/2 + 0.1*400 + 0.3*400 (over the gap) + 0.2*400
    assert full.energy_j == pytest.approx(7 + 23.5 + 40 + 120 + 80)
    assert full.max_gap_s == pytest.approx(0.3)
    assert full.samples == 7


def test_edges_hold_the_nearest_sample_only_within_the_allowed_gap():
    times, power = np.array([0.1, 0.2, 0.3]), np.array([10.0, 10.0, 10.0])
    held = integrate_power(times, power, 0.0, 0.4, max_edge_gap_s=0.15)
    assert held.energy_j == pytest.approx(4.0)
    uncovered = integrate_power(times, power, 0.0, 1.0, max_edge_gap_s=0.15)
    assert uncovered.energy_j is None
    assert integrate_power(np.array([]), np.array([]), 0.0, 1.0, 0.1).energy_j is None


def test_empty_frame_keeps_columns_and_dtypes_and_round_trips(tmp_path):
    empty = frame_from_rows([])
    assert list(empty.columns) == list(TIMELINE_COLUMNS)
    assert {c: str(t) for c, t in empty.dtypes.items()} == TIMELINE_COLUMNS
    write_table_artifact(tmp_path / "empty.parquet", "timeline_table", empty, {"experiment": "x"})
    frame, meta = read_table_artifact(tmp_path / "empty.parquet", "timeline_table")
    assert len(frame) == 0 and meta["schema"] == "llm_energy/timeline_table"


def test_sampler_reads_power_every_period_and_the_counter_about_once_a_second(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = FakeNvml([FakeGpu("GPU-aaaa", power_w=lambda t: 100.0 + 10.0 * t)])
    hardware.set_nvml_module(fake)
    try:
        source = NvmlEnergySource(fake, hardware.visible_gpus())
        source.start(measure_period=False)
        store = TimelineStore()
        slow_calls: list[float] = []
        sampler = TimelineSampler(
            source.sample,
            store,
            period_s=0.02,
            slow_tasks=[lambda: slow_calls.append(time.perf_counter())],
            slow_period_s=0.25,
        )
        sampler.start()
        time.sleep(0.6)
        sampler.stop()
    finally:
        hardware.set_nvml_module(None)
    frame = store.frame()
    assert 20 <= len(frame) <= 32  # 0.6 s / 20 ms, with scheduling slack
    counter_rows = frame["energy_counter_j"].notna().sum()
    assert 2 <= counter_rows <= 4 and len(slow_calls) == counter_rows
    assert frame["time_s"].is_monotonic_increasing
    assert (frame["power_w"] >= 100.0).all() and frame["clocks_event_reasons"].eq(1).all()
    assert not sampler.running and sampler.errors == 0
    write_table_artifact(tmp_path / "t.parquet", "timeline_table", frame, {"experiment": "x"})
    back, _ = read_table_artifact(tmp_path / "t.parquet", "timeline_table")
    # pandas 3 reads the uuid column back as its `str` dtype; every other dtype must survive
    pd.testing.assert_frame_equal(back, frame, check_dtype=False)
    numeric = [c for c in TIMELINE_COLUMNS if c != "device_uuid"]
    assert back[numeric].dtypes.to_dict() == frame[numeric].dtypes.to_dict()


def test_sampler_survives_failing_reads():
    store = TimelineStore()
    calls = {"n": 0}

    def flaky(include_counter: bool) -> list[tuple]:
        calls["n"] += 1
        if calls["n"] % 2:
            raise RuntimeError("NVML hiccup")
        return [(time.perf_counter(), 0, "GPU-x", 1.0, math.nan, 1.0, 1.0, 1.0, 0.0, 0.0, 1, 700.0)]

    sampler = TimelineSampler(flaky, store, period_s=0.01)
    sampler.start()
    time.sleep(0.15)
    sampler.stop()
    assert sampler.errors >= 3 and len(store) >= 3


def _power_rows(uuid: str, times: np.ndarray, power: np.ndarray) -> list[tuple]:
    nan = float("nan")
    return [(t, 0, uuid, w, nan, nan, nan, nan, nan, nan, None, nan) for t, w in zip(times, power)]


def test_power_update_period_is_how_often_the_reading_changes_not_the_sampling_period():
    # Sampled every 20 ms, a reading that changes every 100 ms (as the H200's instant field does):
    times = np.arange(0.0, 3.0, 0.02)
    held = 200.0 + 10.0 * np.floor(times / 0.1 + 1e-9) % 7  # a new value every 5th sample
    held[7] = np.nan  # a failed read is no change
    # A second GPU whose reading changes at every 20 ms sample: the slower one sets the figure.
    fast = 100.0 + np.arange(len(times))
    frame = frame_from_rows(_power_rows("GPU-a", times, held) + _power_rows("GPU-b", times, fast))
    assert power_update_period_s(frame) == pytest.approx(0.1, abs=1e-6)
    assert power_update_period_s(frame[frame.device_uuid == "GPU-b"]) == pytest.approx(0.02, abs=1e-6)
    # Too few changes (a flat reading) say nothing about the sensor.
    flat = frame_from_rows(_power_rows("GPU-c", times, np.full(len(times), 150.0)))
    assert power_update_period_s(flat) is None
    assert power_update_period_s(frame_from_rows([])) is None
