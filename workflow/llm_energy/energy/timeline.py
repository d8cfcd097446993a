"""The sampled power timeline: the sampling loop, one row per GPU per period, and its integral.

The loop reads cheap NVML values (power ~4 us, clocks, temperature, utilisation, clock-event
reasons, power limit) every `period_s`, and every ~1 s runs the slow tasks: one energy-counter read
per GPU (~4 ms each on an H100), the raw RAPL counters and the GPU process list. It runs in the
sampler process (sampler.py), never as a thread of the measured process outside unit tests. All
timestamps are `llm_energy.clock.now()` values, comparable with request and window timestamps.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from llm_energy import clock

logger = logging.getLogger(__name__)

# name -> pandas dtype; clocks_event_reasons is a nullable integer (bit mask, NA when unsupported)
TIMELINE_COLUMNS: dict[str, str] = {
    "time_s": "float64",
    "device_index": "int64",
    "device_uuid": "object",
    "power_w": "float64",
    "energy_counter_j": "float64",
    "sm_clock_mhz": "float64",
    "mem_clock_mhz": "float64",
    "temperature_c": "float64",
    "gpu_utilization_pct": "float64",
    "mem_utilization_pct": "float64",
    "clocks_event_reasons": "Int64",
    "power_limit_w": "float64",
}
SLOW_PERIOD_S = 1.0


def frame_from_rows(rows: Sequence[tuple]) -> pd.DataFrame:
    """A timeline DataFrame (zero rows keep the same columns and dtypes), sorted by time."""
    frame = pd.DataFrame.from_records(list(rows), columns=list(TIMELINE_COLUMNS))
    frame = frame.astype(TIMELINE_COLUMNS)
    return frame.sort_values(["time_s", "device_index"], kind="stable").reset_index(drop=True)


MIN_POWER_CHANGES = 10


def power_update_period_s(frame: pd.DataFrame) -> float | None:
    """How often the sampled power reading itself changes: the median time between changes of
    `power_w` on the GPU whose reading changes least often; None with fewer than MIN_POWER_CHANGES
    changes. On an H200 (driver 580) the instant-power field changes every 100 ms, so 20 ms samples
    repeat each value about 5 times: a period below this adds rows, not resolution."""
    periods = []
    for _, rows in frame.groupby("device_uuid", sort=False):
        power = rows["power_w"].to_numpy(dtype=float)
        times = rows["time_s"].to_numpy(dtype=float)
        keep = ~np.isnan(power)
        power, times = power[keep], times[keep]
        changed = times[1:][power[1:] != power[:-1]]
        if len(changed) >= MIN_POWER_CHANGES:
            periods.append(float(np.median(np.diff(changed))))
    return max(periods) if periods else None


class TimelineStore:
    """Append-only rows shared by the sampler thread and the window edges."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: list[tuple] = []

    def extend(self, rows: Sequence[tuple]) -> None:
        with self._lock:
            self._rows.extend(rows)

    def rows(self) -> list[tuple]:
        with self._lock:
            return list(self._rows)

    def frame(self) -> pd.DataFrame:
        return frame_from_rows(self.rows())

    def frame_between(self, start_s: float, end_s: float) -> pd.DataFrame:
        """Rows with start_s <= time_s <= end_s: a window's rows without building the whole run's."""
        with self._lock:
            rows = [row for row in self._rows if start_s <= row[0] <= end_s]
        return frame_from_rows(rows)

    def __len__(self) -> int:
        with self._lock:
            return len(self._rows)


class TimelineSampler:
    """One daemon thread: `sample(include_counter)` every period, `slow_tasks` every ~1 s."""

    def __init__(
        self,
        sample: Callable[[bool], list[tuple]],
        store: TimelineStore,
        period_s: float,
        slow_tasks: Sequence[Callable[[], None]] = (),
        slow_period_s: float = SLOW_PERIOD_S,
        on_error: Callable[[str], None] | None = None,
    ):
        self._sample = sample
        self._store = store
        self.period_s = period_s
        self.slow_period_s = slow_period_s
        self._slow_tasks = list(slow_tasks)
        self._on_error = on_error
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ticks = 0
        self.missed_ticks = 0
        self.errors = 0

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="llm-energy-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        next_tick = clock.now()
        next_slow = next_tick  # first tick also reads the counters
        while not self._stop.is_set():
            now = clock.now()
            slow = now >= next_slow
            try:
                self._store.extend(self._sample(slow))
                if slow:
                    for task in self._slow_tasks:
                        task()
            except Exception as exc:  # a failing read must not end the timeline; report the first
                self.errors += 1
                if self.errors == 1:
                    logger.exception("timeline sampler: a read failed (further failures counted)")
                    if self._on_error is not None:
                        self._on_error(f"{type(exc).__name__}: {exc}")
            if slow:
                next_slow = now + self.slow_period_s
            self.ticks += 1
            next_tick += self.period_s
            now = clock.now()
            if next_tick < now:  # fell behind (slow reads, GIL): skip ticks instead of bursting
                skipped = math.ceil((now - next_tick) / self.period_s)
                self.missed_ticks += skipped
                next_tick += skipped * self.period_s
            self._stop.wait(max(0.0, next_tick - now))


@dataclass
class Integral:
    energy_j: float | None  # None when the samples do not cover the window
    samples: int  # valid samples inside the window
    max_gap_s: float  # largest interval without a valid sample inside the window


def integrate_power(
    times_s: np.ndarray, power_w: np.ndarray, start_s: float, end_s: float, max_edge_gap_s: float
) -> Integral:
    """Exact integral of the piecewise-linear interpolation of the samples over [start_s, end_s].

    Power at the edges is interpolated between the neighbouring samples; where the first (last)
    sample lies after the start (before the end) it is held constant, if no further than
    `max_edge_gap_s` away. NaN samples (failed reads) are dropped. The trapezoid rule is exact for
    the linear interpolant, so a linear power ramp integrates exactly.
    """
    times_s = np.asarray(times_s, dtype=float)
    power_w = np.asarray(power_w, dtype=float)
    valid = ~np.isnan(power_w) & ~np.isnan(times_s)
    t, p = times_s[valid], power_w[valid]
    order = np.argsort(t, kind="stable")
    t, p = t[order], p[order]
    inside = (t >= start_s) & (t <= end_s)
    n_inside = int(inside.sum())
    if end_s <= start_s or len(t) == 0:
        return Integral(None, n_inside, math.inf)
    if t[0] > start_s + max_edge_gap_s or t[-1] < end_s - max_edge_gap_s:
        return Integral(None, n_inside, math.inf)
    p_start = float(np.interp(start_s, t, p))  # holds the first/last value beyond the ends
    p_end = float(np.interp(end_s, t, p))
    grid_t = np.concatenate(([start_s], t[inside], [end_s]))
    grid_p = np.concatenate(([p_start], p[inside], [p_end]))
    energy = float(np.sum((grid_p[1:] + grid_p[:-1]) * np.diff(grid_t)) / 2.0)
    max_gap = float(np.max(np.diff(grid_t))) if len(grid_t) > 1 else math.inf
    # An edge "hold" counts as a gap from the window edge to the nearest sample.
    return Integral(energy, n_inside, max_gap)
