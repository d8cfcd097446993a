"""Load: when each request is submitted, and the steady state it produces.

Open-loop arrivals as vLLM's serving benchmark draws them (`vllm bench serve --request-rate
--burstiness`): the gaps between consecutive submissions are independent draws of a gamma
distribution with shape `burstiness` and mean 1 / request_rate, from the campaign seed, so two runs
of one experiment submit at the same offsets. `burstiness` 1 is a Poisson process, below 1 burstier,
above 1 more regular; `constant` spaces the submissions exactly 1 / request_rate apart; a rate of
`inf` submits everything at once (the offline behaviour). A request is submitted at its offset
whether or not earlier ones have finished (open loop); `max_concurrency`, where set, holds a
request back until fewer than that many are in flight, as the benchmark's semaphore does.

Steady state, in the sense of ML.ENERGY's benchmark: the span of a run in which the server holds its
plateau number of requests in flight, without the ramp-up at the start and the drain at the end.
- in flight at t: requests submitted at or before t whose own last token came after t;
- the drain starts at the last submission: after it the number in flight can only fall;
- the plateau is the time-weighted median of the number in flight over the second half of the
  submission span (by then the ramp-up is over unless the run is far too short, which the flag says);
  with `max_concurrency` it is at most that cap;
- the steady state starts when the number in flight first reaches the plateau, and ends at the drain.
It is flagged `steady_state_short` when it lasts less than a quarter of the window or holds fewer
than 10 completed requests: then its J per token is not to be trusted.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from llm_energy import clock
from llm_energy.backends.base import RequestRecord

T = TypeVar("T")
Item = TypeVar("Item")

ARRIVALS = ("poisson", "gamma", "constant")
FLAG_STEADY_SHORT = "steady_state_short"
STEADY_MIN_WINDOW_FRACTION = 0.25
STEADY_MIN_REQUESTS = 10


@dataclass(frozen=True)
class LoadSpec:
    """How requests arrive. request_rate is in requests per second (math.inf: all at once)."""

    request_rate: float = math.inf
    arrival: str = "poisson"
    burstiness: float = 1.0
    max_concurrency: int | None = None

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 requests/s (or inf), got {self.request_rate}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {', '.join(ARRIVALS)}, got {self.arrival!r}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if self.arrival != "gamma" and self.burstiness != 1.0:
            raise ValueError(f"burstiness applies to arrival: gamma only (arrival is {self.arrival!r})")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")

    @property
    def open_loop(self) -> bool:
        """True when requests arrive over time rather than all at once."""
        return math.isfinite(self.request_rate)

    def describe(self) -> dict[str, Any]:
        return {
            "request_rate_per_s": None if not self.open_loop else self.request_rate,
            "request_rate": "inf" if not self.open_loop else self.request_rate,
            "arrival": self.arrival,
            "burstiness": self.burstiness,
            "max_concurrency": self.max_concurrency,
        }


def arrival_offsets_s(count: int, spec: LoadSpec, seed: int) -> list[float]:
    """Submission offset of each of `count` requests from the first one (which is at 0 s)."""
    if count <= 0:
        return []
    if not spec.open_loop:
        return [0.0] * count
    if spec.arrival == "constant":
        gaps = np.full(count - 1, 1.0 / spec.request_rate)
    else:
        shape = 1.0 if spec.arrival == "poisson" else spec.burstiness
        rng = np.random.default_rng(seed)
        gaps = rng.gamma(shape, 1.0 / (spec.request_rate * shape), size=count - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


@dataclass(frozen=True)
class Schedule:
    """When each request of a call is due (offsets from the call's start) and how many may be in flight."""

    offsets_s: tuple[float, ...]
    max_concurrency: int | None = None

    @classmethod
    def closed_batches(cls, count: int, batch_size: int | None = None) -> Schedule:
        """The offline load: everything due at once, at most batch_size in flight (None: the engine's
        own scheduler decides how many run together)."""
        return cls((0.0,) * count, batch_size)

    @classmethod
    def open_loop(cls, count: int, spec: LoadSpec, seed: int) -> Schedule:
        return cls(tuple(arrival_offsets_s(count, spec, seed)), spec.max_concurrency)


async def run_on_schedule(
    items: Sequence[Item], schedule: Schedule, submit: Callable[[Item, float], Awaitable[T]]
) -> list[T]:
    """Call `submit(item, due_s)` for each item at its due time (clock.now() scale), never waiting for
    earlier items to finish (open loop), at most schedule.max_concurrency at a time: an item due while
    that many are in flight waits for a free slot, and its queueing is submitted_s - due_s."""
    if len(items) != len(schedule.offsets_s):
        raise ValueError(f"{len(items)} items but {len(schedule.offsets_s)} offsets")
    start = clock.now()
    slots = asyncio.Semaphore(schedule.max_concurrency) if schedule.max_concurrency else None

    async def one(item: Item, offset: float) -> T:
        due = start + offset
        delay = due - clock.now()
        if delay > 0:
            await asyncio.sleep(delay)
        if slots is None:
            return await submit(item, due)
        async with slots:
            return await submit(item, due)

    return list(await asyncio.gather(*(one(item, offset) for item, offset in zip(items, schedule.offsets_s))))


# ---------------------------------------------------------------------------------------------
# Steady state


def in_flight_steps(records: Sequence[RequestRecord]) -> tuple[np.ndarray, np.ndarray]:
    """The number of requests in flight as a step function: (times, count from each time on)."""
    events = sorted(
        [(r.submitted_s, 1) for r in records] + [(r.last_token_s, -1) for r in records], key=lambda e: (e[0], e[1])
    )  # a request ending at t is out before one starting at t
    times = np.array([t for t, _ in events], dtype=float)
    counts = np.cumsum([d for _, d in events])
    return times, counts


def _time_weighted_median(times: np.ndarray, counts: np.ndarray, start: float, end: float) -> float:
    """Median over [start, end] of the step function counts (value counts[i] on [times[i], times[i+1]))."""
    edges = np.clip(np.append(times, end), start, end)
    durations = np.diff(edges)
    if durations.sum() <= 0:
        return float(counts[np.searchsorted(times, start, side="right") - 1]) if len(counts) else 0.0
    order = np.argsort(counts, kind="stable")
    cumulative = np.cumsum(durations[order])
    return float(counts[order][np.searchsorted(cumulative, cumulative[-1] / 2)])


@dataclass(frozen=True)
class SteadyState:
    start_s: float
    end_s: float
    plateau_in_flight: float
    completed_requests: int
    flags: tuple[str, ...]

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    def describe(self) -> dict[str, Any]:
        return {
            "start_s": self.start_s,
            "end_s": self.end_s,
            "duration_s": self.duration_s,
            "plateau_in_flight": self.plateau_in_flight,
            "completed_requests": self.completed_requests,
            "flags": list(self.flags),
        }


def steady_state(records: Sequence[RequestRecord], max_concurrency: int | None = None) -> SteadyState | None:
    """The steady state of one window's requests (see the module docstring); None without requests."""
    if not records:
        return None
    window_start = min(r.submitted_s for r in records)
    window_end = max(r.last_token_s for r in records)
    drain_s = max(r.submitted_s for r in records)
    times, counts = in_flight_steps(records)
    midpoint = window_start + (drain_s - window_start) / 2
    plateau = _time_weighted_median(times, counts, midpoint, drain_s) if drain_s > window_start else float(counts.max())
    if max_concurrency is not None:
        plateau = min(plateau, max_concurrency)
    reached = np.flatnonzero(counts >= plateau)
    start = float(times[reached[0]]) if len(reached) else drain_s
    start = min(start, drain_s)
    completed = sum(1 for r in records if start <= r.last_token_s <= drain_s)
    flags = []
    if drain_s - start < STEADY_MIN_WINDOW_FRACTION * (window_end - window_start) or completed < STEADY_MIN_REQUESTS:
        flags.append(FLAG_STEADY_SHORT)
    return SteadyState(start, drain_s, plateau, completed, tuple(flags))


def tokens_between(records: Sequence[RequestRecord], start_s: float, end_s: float) -> float:
    """Output tokens that reached the caller in [start_s, end_s]: counted per chunk where arrivals are
    known, else spread evenly over the request's first-token-to-last-token span."""
    total = 0.0
    for r in records:
        times, tokens = r.arrivals()
        if times:
            total += sum(n for t, n in zip(times, tokens) if start_s <= t <= end_s)
            continue
        first = r.first_token_s if r.first_token_s is not None else r.submitted_s
        last = r.last_token_s
        if last <= first:
            total += r.output_tokens if start_s <= last <= end_s else 0
            continue
        overlap = max(0.0, min(end_s, last) - max(start_s, first))
        total += r.output_tokens * overlap / (last - first)
    return total
