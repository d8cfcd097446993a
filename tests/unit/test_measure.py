"""The harness's own logic (llm_energy.measure): warm-up to convergence, windows repeated to
min_window_s, the recompilation flag, and the differential prefill/decode arithmetic.

The backend is a fake (its generate sleeps and returns records): these test our loop, not an engine;
the real engines run through the same functions in the workflow tests.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from llm_energy import clock
from llm_energy.backends.base import Backend, DecodingSettings, LoadReport, Request, RequestRecord
from llm_energy.energy import EnergySession, EnergySettings
from llm_energy.measure import (
    FLAG_RECOMPILED,
    PACE_FLAG_VARIED,
    REWARM_AFTER_IDLE_S,
    MeasuredWindow,
    count_startup,
    differential_phases,
    measure_window,
    needs_rewarm,
    warm_up,
    warmup_converged,
    window_pace,
)

DECODING = DecodingSettings(max_output_tokens=4)
WARMUP = {"min_batches": 3, "stable_batches": 3, "tolerance": 0.2, "max_s": 30}


class SleepingBackend(Backend):
    """generate() sleeps `batch_s` (or the next of `batch_times_s`) per batch of `batch_size`."""

    name = "sleeping"

    def __init__(
        self, batch_times_s: list[float] | None = None, batch_s: float = 0.01, compiles_on_generate: bool = False
    ):
        super().__init__({})
        self.batch_times_s = list(batch_times_s or [])
        self.batch_s = batch_s
        self.calls: list[tuple[int, int]] = []  # (rows, max_output_tokens) per generate call
        self.compilations = 0
        self.compiles_on_generate = compiles_on_generate

    def load(self, model_dir: Path, dtype: str, max_model_len: int, batch_size: int) -> LoadReport:
        return LoadReport(device="cpu", dtype=dtype)

    def tokenize(self, prompts: list[str], max_input_tokens: int) -> list[Request]:
        return [Request(i, tuple(range(len(p)))) for i, p in enumerate(prompts)]

    def generate(self, requests: list[Request], batch_size: int, decoding: DecodingSettings) -> list[RequestRecord]:
        records = []
        for start in range(0, len(requests), batch_size):
            batch = requests[start : start + batch_size]
            self.calls.append((len(batch), decoding.max_output_tokens))
            submitted = clock.now()
            time.sleep(self.batch_times_s.pop(0) if self.batch_times_s else self.batch_s)
            if self.compiles_on_generate:
                self.compilations += 1
            done = clock.now()
            records += [
                RequestRecord(
                    index=r.index,
                    input_tokens=r.input_tokens,
                    output_tokens=decoding.max_output_tokens,
                    submitted_s=submitted,
                    finished_s=done,
                    first_token_s=submitted + (done - submitted) / 4,
                )
                for r in batch
            ]
        return records

    def compilation_count(self) -> int | None:
        return self.compilations


def requests(count: int, length: int = 5) -> list[Request]:
    return [Request(i, tuple(range(length))) for i in range(count)]


@pytest.fixture
def session(tmp_path: Path):
    settings = EnergySettings.from_config(
        {"codecarbon": False, "rapl": False, "gpu": False, "baseline": {"duration_s": 0}}
    )
    with EnergySession(settings, devices=[], powercap_root=tmp_path / "none") as energy:
        yield energy


# -- warm-up -------------------------------------------------------------------------------------


def test_warmup_needs_min_batches_and_stable_times_of_the_common_shape() -> None:
    full, partial = (4, 5), (2, 5)
    assert not warmup_converged([1.0, 1.0], [full, full], 3, 2, 0.05)  # fewer than min_batches
    assert warmup_converged([3.0, 1.0, 1.02], [full, full, full], 3, 2, 0.05)
    assert not warmup_converged([3.0, 1.0, 1.2], [full, full, full], 3, 2, 0.05)
    # The partial batch's shorter time is not compared with the full batches' times.
    assert warmup_converged([1.0, 0.4, 1.01, 0.41], [full, partial, full, partial], 3, 2, 0.05)


def test_warm_up_runs_until_converged_and_covers_every_shape() -> None:
    backend = SleepingBackend(batch_times_s=[0.08, 0.05, 0.02, 0.02, 0.02, 0.02, 0.02])
    batches = [requests(4)[:4], requests(6)[4:6]]  # a full batch and the partial last one
    result = warm_up(backend, batches, 4, DECODING, WARMUP, prefill_decoding=DecodingSettings(max_output_tokens=1))
    assert result.converged
    assert len(result.batch_times_s) >= 3 and len(result.batch_times_s) == len(result.batch_shapes)
    assert {(4, 5), (2, 5)} <= set(result.batch_shapes)
    # The prefill-only pass runs each shape once, with one output token.
    assert result.prefill_batches == 2 and backend.calls[-2:] == [(4, 1), (2, 1)]
    assert result.describe(WARMUP)["batch_times_s"] == result.batch_times_s


def test_warm_up_that_never_settles_stops_at_max_s_unconverged() -> None:
    times = [0.01, 0.03] * 50  # alternating: never within 20 %
    backend = SleepingBackend(batch_times_s=times)
    result = warm_up(backend, [requests(2)], 2, DECODING, {**WARMUP, "max_s": 0.3})
    assert not result.converged and len(result.batch_times_s) < len(times)


# -- windows -------------------------------------------------------------------------------------


def test_a_window_repeats_the_request_set_until_min_window_s(session) -> None:
    backend = SleepingBackend(batch_s=0.03)
    measured = requests(4)
    window = measure_window(session, backend, "inference", measured, 2, DECODING, min_window_s=0.25)
    assert window.record["duration_s"] >= 0.25
    assert window.repeats == window.record["repeats"] >= 4  # 0.06 s per pass
    assert len(window.requests) == 4 * window.repeats
    assert window.repeat_of_request == [r for r in range(window.repeats) for _ in range(4)]
    assert FLAG_RECOMPILED not in window.record["flags"]


def test_a_window_whose_repeats_change_pace_is_flagged_and_a_steady_one_is_not(session) -> None:
    steady = measure_window(session, SleepingBackend(batch_s=0.02), "inference", requests(2), 2, DECODING, 0.2)
    pace, info, flags = window_pace(steady, under_load=False, tolerance=0.2)
    assert pace["repeats_in_window"] == steady.repeats >= 3 and pace["repeat_time_cv_in_window"] < 0.2
    assert flags == set() and info == {}
    # The same work at two paces, as a host that slows down and recovers inside one window.
    varying = SleepingBackend(batch_times_s=[0.02, 0.08] * 20)
    window = measure_window(session, varying, "inference", requests(2), 2, DECODING, 0.3)
    pace, _, flags = window_pace(window, under_load=False, tolerance=0.2)
    assert pace["repeat_time_cv_in_window"] > 0.5 and pace["repeat_time_spread_in_window"] > 2
    assert flags == {PACE_FLAG_VARIED}
    pace, info, flags = window_pace(window, under_load=True, tolerance=0.2)
    assert set(pace.values()) == {None} and "schedule" in info["repeat_time_unavailable_reason"] and not flags


def test_zero_min_window_s_is_one_pass(session) -> None:
    window = measure_window(session, SleepingBackend(), "inference", requests(3), 2, DECODING, min_window_s=0)
    assert window.repeats == 1 and len(window.requests) == 3


def test_a_compilation_inside_the_window_flags_the_run(session) -> None:
    backend = SleepingBackend(compiles_on_generate=True)
    window = measure_window(session, backend, "inference", requests(2), 2, DECODING, min_window_s=0)
    assert FLAG_RECOMPILED in window.record["flags"]
    assert window.compilations[1] > window.compilations[0]


# -- differential prefill / decode -----------------------------------------------------------------


def fake_window(gross_j: float | None, records: list[RequestRecord], repeats: int = 1) -> MeasuredWindow:
    gpu = (
        {"available": True, "gross_j": gross_j}
        if gross_j is not None
        else {"available": False, "reason": "no NVIDIA driver"}
    )
    record = {"domains": {"gpu": gpu}, "start_s": 5.0, "end_s": 6.0, "duration_s": 1.0, "flags": []}
    return MeasuredWindow(record, records, [0] * len(records), repeats, (None, None), {})


def records_of(count: int, input_tokens: int, output_tokens: int) -> list[RequestRecord]:
    return [
        RequestRecord(index=i, input_tokens=input_tokens, output_tokens=output_tokens, submitted_s=0.0, finished_s=1.0)
        for i in range(count)
    ]


def test_prefill_per_input_token_from_the_prefill_window_and_decode_is_the_rest() -> None:
    full = fake_window(100.0, records_of(4, 10, 8))  # 40 input tokens, 4 x 7 decode tokens
    prefill = fake_window(30.0, records_of(12, 10, 1), repeats=3)  # 120 input tokens: 0.25 J each
    phases = differential_phases(full, prefill)
    assert phases["available"] and phases["method"] == "differential"
    assert phases["prefill_energy_per_input_token_j"] == pytest.approx(0.25)
    assert phases["prefill_j"] == pytest.approx(10.0) and phases["decode_j"] == pytest.approx(90.0)
    assert phases["decode_tokens"] == 28
    assert phases["decode_energy_per_decode_token_j"] == pytest.approx(90.0 / 28)
    assert phases["flags"] == []
    # the prefill-only window's span on the run's clock, for the power timeline figure
    assert (phases["prefill_window"]["start_s"], phases["prefill_window"]["end_s"]) == (5.0, 6.0)


def test_a_prefill_costing_more_than_the_window_is_flagged() -> None:
    phases = differential_phases(fake_window(5.0, records_of(2, 10, 4)), fake_window(30.0, records_of(2, 10, 1)))
    assert phases["decode_j"] < 0 and phases["flags"] == ["prefill_exceeds_window"]


def test_without_measured_gpu_energy_the_split_is_unavailable_with_the_reason() -> None:
    phases = differential_phases(fake_window(None, records_of(2, 10, 4)), fake_window(None, records_of(2, 10, 1)))
    assert phases["available"] is False and "no NVIDIA driver" in phases["reason"]


def test_a_cycle_rewarms_after_the_baseline_or_an_idle_gap_but_not_back_to_back() -> None:
    assert needs_rewarm(None, 100.0)  # the experiment's first cycle follows the active-idle baseline
    assert not needs_rewarm(100.0, 100.0 + 0.2)  # the previous window closed moments ago
    assert needs_rewarm(100.0, 100.0 + REWARM_AFTER_IDLE_S + 0.1)


def test_a_window_starts_on_a_collected_frozen_heap_and_records_collections_inside_it(session) -> None:
    import gc

    class Cycle:
        def __init__(self) -> None:
            self.me = self  # cyclic garbage: only the collector frees it

    class AllocatingBackend(SleepingBackend):
        def generate(self, requests, batch_size, decoding):
            for _ in range(5000):  # enough new container objects to trigger generation-0 collections
                Cycle()
            return super().generate(requests, batch_size, decoding)

    gc.unfreeze()
    try:
        alive_before = [Cycle() for _ in range(100)]
        window = measure_window(session, AllocatingBackend(), "inference", requests(4), 2, DECODING, 0.0)
        assert gc.get_freeze_count() >= len(alive_before)  # frozen before the window opened
        generations = window.record["gc_collections"]
        assert len(generations) == 3 and generations[0] > 0  # the window's own allocations were collected
    finally:
        gc.unfreeze()


def test_the_job_processs_startup_counts_in_its_wall_time_and_lowers_the_share() -> None:
    timing = {
        "started_unix_s": 1000.0,
        "total_s": 80.0,
        "phases_s": {"model_load": 10.0, "windows": 60.0},
        "other_s": 10.0,
        "windows_s": 60.0,
        "share_in_windows": 0.75,
    }
    counted = count_startup(timing, 4.0)
    assert counted["phases_s"] == {"startup": 4.0, "model_load": 10.0, "windows": 60.0}
    assert counted["total_s"] == 84.0 and counted["started_unix_s"] == 996.0
    assert counted["share_in_windows"] == pytest.approx(60 / 84)
    assert counted["other_s"] == 10.0 and timing["total_s"] == 80.0  # the input is left as it was
    assert count_startup(timing, -0.5)["phases_s"]["startup"] == 0.0  # clock skew is not negative time


def test_a_window_records_what_the_host_took_from_its_cpu_time(session) -> None:
    window = measure_window(session, SleepingBackend(), "inference", requests(4), 2, DECODING, 0.0)
    taken = window.record["host_cpu"]
    # Read from this machine's kernel at both edges: each counter a change in seconds, or why not.
    for name in ("throttled", "pressure_some", "steal"):
        assert (taken[f"{name}_s"] is not None and taken[f"{name}_s"] >= 0) != (name in taken["unavailable"])
    assert taken["sources"]["steal"] == "/proc/stat"
    assert ("host_cpu_throttled" in window.record.get("flags", [])) == bool(taken["throttled_s"])
