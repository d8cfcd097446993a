"""Open-loop arrivals, the steady state, goodput, and energy attributed to requests (our own logic;
the engines that honour the schedule are tested with the real vLLM CPU engine and server)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from llm_energy.backends.base import RequestRecord
from llm_energy.energy.attribution import attribute_energy, steady_state_energy
from llm_energy.load import (
    FLAG_STEADY_SHORT,
    LoadSpec,
    arrival_offsets_s,
    in_flight_steps,
    steady_state,
    tokens_between,
)
from llm_energy.metrics import goodput

# -- arrivals ------------------------------------------------------------------------------------


def test_infinite_rate_submits_everything_at_once() -> None:
    assert arrival_offsets_s(4, LoadSpec(), seed=1) == [0.0] * 4


def test_constant_arrivals_are_evenly_spaced() -> None:
    assert arrival_offsets_s(4, LoadSpec(request_rate=2.0, arrival="constant"), seed=1) == [0.0, 0.5, 1.0, 1.5]


@pytest.mark.parametrize("arrival,burstiness", [("poisson", 1.0), ("gamma", 0.5), ("gamma", 4.0)])
def test_random_arrivals_have_the_rate_as_mean_and_the_burstiness_as_shape(arrival, burstiness) -> None:
    spec = LoadSpec(request_rate=10.0, arrival=arrival, burstiness=burstiness)
    offsets = arrival_offsets_s(20001, spec, seed=7)
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(0.1, rel=0.03)
    # A gamma distribution's squared CV is 1 / shape: burstier (shape < 1) means more variable gaps.
    assert (gaps.std() / gaps.mean()) ** 2 == pytest.approx(1.0 / burstiness, rel=0.08)


def test_arrivals_come_from_the_seed() -> None:
    spec = LoadSpec(request_rate=5.0)
    assert arrival_offsets_s(50, spec, seed=3) == arrival_offsets_s(50, spec, seed=3)
    assert arrival_offsets_s(50, spec, seed=3) != arrival_offsets_s(50, spec, seed=4)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"request_rate": 0}, "request_rate"),
        ({"arrival": "uniform"}, "arrival"),
        ({"arrival": "poisson", "burstiness": 2.0}, "gamma only"),
        ({"max_concurrency": 0}, "max_concurrency"),
    ],
)
def test_invalid_load_is_refused_with_the_setting_named(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        LoadSpec(**kwargs)


# -- steady state --------------------------------------------------------------------------------


def _record(index: int, submitted: float, finished: float, tokens: int = 10) -> RequestRecord:
    step = (finished - submitted) / tokens
    times = [submitted + step * (i + 1) for i in range(tokens)]
    return RequestRecord(
        index=index,
        input_tokens=4,
        output_tokens=tokens,
        submitted_s=submitted,
        finished_s=finished,
        first_token_s=times[0],
        token_times_s=times,
    )


def _ramp_plateau_drain(n: int = 40, gap: float = 0.25, life: float = 1.0) -> list[RequestRecord]:
    """One request every `gap` s, each lasting `life` s: 4 in flight once ramped up."""
    return [_record(i, i * gap, i * gap + life) for i in range(n)]


def test_in_flight_counts_each_request_from_submission_to_its_own_last_token() -> None:
    times, counts = in_flight_steps([_record(0, 0.0, 1.0), _record(1, 0.5, 2.0)])
    assert times.tolist() == [0.0, 0.5, 1.0, 2.0] and counts.tolist() == [1, 2, 1, 0]


def test_steady_state_runs_from_reaching_the_plateau_to_the_drain() -> None:
    records = _ramp_plateau_drain()
    steady = steady_state(records)
    assert steady.plateau_in_flight == 4
    assert steady.start_s == pytest.approx(0.75)  # the 4th request's submission: 4 in flight
    assert steady.end_s == pytest.approx(39 * 0.25)  # the last submission: the drain starts
    assert steady.flags == ()


def test_a_steady_state_too_short_to_trust_is_flagged() -> None:
    steady = steady_state(_ramp_plateau_drain(n=6))
    assert FLAG_STEADY_SHORT in steady.flags


def test_max_concurrency_caps_the_plateau() -> None:
    assert steady_state(_ramp_plateau_drain(), max_concurrency=2).plateau_in_flight == 2


def test_tokens_between_counts_arrivals_inside_the_span() -> None:
    record = _record(0, 0.0, 1.0, tokens=10)  # a token every 0.1 s from 0.1 to 1.0
    assert tokens_between([record], 0.0, 0.5) == 5
    without_arrivals = RequestRecord(
        index=1, input_tokens=4, output_tokens=10, submitted_s=0.0, finished_s=1.0, first_token_s=0.0
    )
    assert tokens_between([without_arrivals], 0.0, 0.5) == pytest.approx(5.0)  # spread evenly


# -- goodput -------------------------------------------------------------------------------------


def test_goodput_counts_requests_that_meet_every_objective_per_second() -> None:
    fast = _record(0, 0.0, 1.0)  # TTFT 0.1 s, TPOT 0.1 s
    slow_start = RequestRecord(
        index=1,
        input_tokens=4,
        output_tokens=2,
        submitted_s=0.0,
        finished_s=1.0,
        first_token_s=0.9,
        token_times_s=[0.9, 1.0],
    )  # TTFT 0.9 s
    slow_tokens = _record(2, 0.0, 2.0, tokens=4)  # TTFT 0.5 s, TPOT 0.5 s
    out = goodput([fast, slow_start, slow_tokens], window_s=2.0, ttft_s=0.6, tpot_s=0.2)
    assert out["slo_met_requests"] == 1 and out["goodput_requests_per_s"] == 0.5
    assert out["request_throughput_per_s"] == 1.5
    assert goodput([fast, slow_start, slow_tokens], 2.0, None, None)["slo_met_requests"] == 3


# -- energy of the steady state and per request ----------------------------------------------------


def _window(gross_j: float, start: float, end: float) -> dict:
    return {
        "start_s": start,
        "end_s": end,
        "domains": {"gpu": {"available": True, "gross_j": gross_j, "devices": [{"uuid": "GPU-a", "index": 0}]}},
    }


def _flat_timeline(start: float, end: float, power_w: float = 100.0) -> pd.DataFrame:
    times = np.arange(start, end + 0.05, 0.05)
    return pd.DataFrame({"time_s": times, "device_uuid": "GPU-a", "power_w": power_w})


def test_steady_state_energy_is_the_counter_spread_by_the_timeline() -> None:
    records = _ramp_plateau_drain()
    window = _window(gross_j=1075.0, start=0.0, end=10.75)  # 100 W flat over 10.75 s
    out = steady_state_energy(_flat_timeline(0.0, 10.75), window, steady_state(records), records)
    assert out["available"]
    assert out["gpu_energy_j"] == pytest.approx(100.0 * (9.75 - 0.75), rel=1e-6)
    assert out["output_tokens"] == pytest.approx(tokens_between(records, 0.75, 9.75))
    assert out["gpu_energy_per_output_token_j"] == pytest.approx(out["gpu_energy_j"] / out["output_tokens"])


def test_attribution_shares_each_moment_among_the_requests_in_flight() -> None:
    a, b = _record(0, 0.0, 2.0, tokens=10), _record(1, 1.0, 2.0, tokens=30)
    window = _window(gross_j=300.0, start=0.0, end=3.0)  # 100 W; 2..3 s nobody is in flight
    out = attribute_energy([a, b], _flat_timeline(0.0, 3.0), window)
    assert out["attributed_gpu_energy_by_time_j"] == pytest.approx([100.0 + 50.0, 50.0], rel=1e-6)
    assert out["unattributed_j"] == pytest.approx(100.0, rel=1e-6)
    assert out["attributed_gpu_energy_by_tokens_j"] == pytest.approx([75.0, 225.0])


def test_without_gpu_energy_nothing_is_attributed_and_the_reason_is_given() -> None:
    window = {"start_s": 0.0, "end_s": 1.0, "domains": {"gpu": {"available": False, "reason": "no NVML"}}}
    out = attribute_energy([_record(0, 0.0, 1.0)], pd.DataFrame(), window)
    assert not out["available"] and "no NVML" in out["reason"]


# -- submitting on a schedule ----------------------------------------------------------------------


def _run_schedule(schedule, work_s: float):
    import asyncio

    from llm_energy import clock
    from llm_energy.load import run_on_schedule

    async def submit(item, due):
        started = clock.now()
        await asyncio.sleep(work_s)
        return item, due, started, clock.now()

    return asyncio.run(run_on_schedule(list(range(len(schedule.offsets_s))), schedule, submit))


def test_requests_are_submitted_at_their_offsets_without_waiting_for_earlier_ones() -> None:
    from llm_energy.load import Schedule

    results = _run_schedule(Schedule((0.0, 0.05, 0.1)), work_s=0.3)  # each outlives the next arrival
    start = results[0][1]
    for (_item, due, started, _), offset in zip(results, (0.0, 0.05, 0.1)):
        assert due == pytest.approx(start + offset)
        assert 0 <= started - due < 0.03
    assert results[2][2] < results[0][3]  # the third went out before the first had finished: open loop


def test_max_concurrency_holds_a_due_request_until_a_slot_frees() -> None:
    from llm_energy.load import Schedule

    results = _run_schedule(Schedule((0.0, 0.0, 0.0), max_concurrency=1), work_s=0.05)
    queued = [started - due for _, due, started, _ in results]
    assert queued[0] < 0.02 and queued[1] >= 0.04 and queued[2] >= 0.09


def test_closed_batches_are_all_due_at_once_with_the_batch_size_in_flight() -> None:
    from llm_energy.load import Schedule

    assert Schedule.closed_batches(3, 2) == Schedule((0.0, 0.0, 0.0), 2)
    spec = LoadSpec(request_rate=4.0, arrival="constant", max_concurrency=3)
    assert Schedule.open_loop(3, spec, seed=0) == Schedule((0.0, 0.25, 0.5), 3)


def test_a_window_under_load_cycles_the_request_set_until_its_arrivals_span_min_window_s() -> None:
    from llm_energy.backends.base import Request
    from llm_energy.measure import load_requests

    measured = [Request(i, (1, 2, i)) for i in range(3)]
    cycled, passes = load_requests(measured, LoadSpec(request_rate=2.0), min_window_s=3.0)
    assert len(cycled) == 7  # 2/s x 3 s, and one more so the last arrival is at about 3 s
    assert [r.index for r in cycled] == list(range(7))  # unique: one row each in requests.parquet
    assert [r.prompt_token_ids for r in cycled[3:6]] == [r.prompt_token_ids for r in measured]
    assert passes == [0, 0, 0, 1, 1, 1, 2]
