"""Unit tests of llm_energy.metrics on hand-made records and energy windows (exact values)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from llm_energy.backends.base import RequestRecord
from llm_energy.metrics import (
    LATENCY_METRIC_NAMES,
    LATENCY_REASON_KEYS,
    NO_SAMPLE_REASONS,
    PERCENTILE_MIN_SAMPLES,
    distribution,
    energy_metrics,
    inter_token_latencies_s,
    latency_distributions,
    latency_metrics,
    repeat_pace,
    run_metrics,
    time_per_output_token_s,
    window_bounds,
    work_duration_s,
)


def records() -> list[RequestRecord]:
    """Three requests: two streamed (per-token times), one whose first token was not observed."""
    return [
        RequestRecord(
            index=0,
            input_tokens=10,
            output_tokens=5,
            submitted_s=0.0,
            finished_s=2.5,
            first_token_s=0.5,
            token_times_s=[0.5, 1.0, 1.5, 2.0, 2.5],
            latency_source="host_clock",
        ),
        RequestRecord(
            index=1,
            input_tokens=6,
            output_tokens=3,
            submitted_s=1.0,
            finished_s=2.2,
            first_token_s=1.2,
            token_times_s=[1.2, 1.4, 2.2],
            latency_source="host_clock",
        ),
        RequestRecord(
            index=2, input_tokens=4, output_tokens=1, submitted_s=0.5, finished_s=3.5, latency_source="engine"
        ),
    ]


def domain(
    gross_j: float, method: str = "measured", source: str = "nvml", net_j: float | None = None, **extra: Any
) -> dict[str, Any]:
    return {"available": True, "source": source, "method": method, "gross_j": gross_j, "net_j": net_j, **extra}


def unavailable(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason}


def measure_window() -> dict[str, Any]:
    """GPU measured, CPU estimated (no net: no baseline), DRAM unavailable; 10 s."""
    return {
        "name": "measure",
        "start_s": 0.0,
        "end_s": 10.0,
        "duration_s": 10.0,
        "domains": {
            "gpu": domain(100.0, net_j=60.0, baseline_w=4.0, timeline_vs_counter_rel_diff=0.02),
            "cpu": domain(50.0, method="estimated", source="codecarbon"),
            "dram": unavailable("no RAPL: /sys/class/powercap is absent"),
        },
        "emissions": {"available": True, "kg_co2eq": 1.5e-5},
    }


# ---------------------------------------------------------------------------------------------
# Distributions and latency


@pytest.mark.parametrize(
    "values",
    [[1.0], [3.0, 1.0, 2.0], [0.1, 0.5, 0.2, 10.0, 0.3, 0.25, 7.5, 1.0, 2.0, 0.05, 0.9], list(range(101))],
)
def test_distribution_matches_numpy(values: list[float]) -> None:
    result = distribution(values)
    assert set(result) == {"n", "mean", "p50", "p90", "p99"}
    assert result["n"] == len(values)
    assert result["mean"] == pytest.approx(float(np.mean(values)), rel=1e-12)
    for p, needed in PERCENTILE_MIN_SAMPLES.items():
        if len(values) >= needed:
            assert result[f"p{p}"] == pytest.approx(float(np.percentile(values, p)), rel=1e-12)
            assert isinstance(result[f"p{p}"], float)
        else:
            assert result[f"p{p}"] is None


def test_distribution_exact_linear_interpolation() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, None, float("nan")]  # skipped, not zero
    assert distribution(values) == {"n": 10, "mean": 5.5, "p50": 5.5, "p90": pytest.approx(9.1), "p99": None}


def test_distribution_empty() -> None:
    empty = {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None}
    assert distribution([]) == empty
    assert distribution([None, None]) == empty


def test_p99_needs_100_samples_and_p90_10() -> None:
    """The sample-count rule at its edges: 99 samples give no p99, 100 do; 9 give no p90, 10 do."""
    flat, reasons = latency_distributions({"e2e": [float(v) for v in range(99)]}, "the test requests")
    assert flat["e2e_n"] == 99 and flat["e2e_p99_s"] is None and flat["e2e_p90_s"] == pytest.approx(88.2)
    assert reasons["e2e_p99_unavailable_reason"] == (
        "99 e2e samples pooled over the test requests; a p99 needs at least 100"
    )
    flat, reasons = latency_distributions({"e2e": [float(v) for v in range(100)]})
    assert flat["e2e_n"] == 100 and flat["e2e_p99_s"] == pytest.approx(98.01)
    assert "e2e_p99_unavailable_reason" not in reasons
    flat, reasons = latency_distributions({"ttft": [1.0] * 9})
    assert flat["ttft_p90_s"] is None and "ttft_p90_unavailable_reason" in reasons
    assert flat["ttft_p50_s"] == 1.0  # a median needs one sample
    flat, reasons = latency_distributions({"ttft": [1.0] * 10})
    assert flat["ttft_p90_s"] == 1.0 and "ttft_p90_unavailable_reason" not in reasons
    # No sample at all: every statistic None, one reason for the metric, n = 0 (a count, not missing).
    assert flat["itl_n"] == 0 and flat["itl_mean_s"] is None and flat["itl_p50_s"] is None
    assert reasons["itl_unavailable_reason"] == NO_SAMPLE_REASONS["itl"]
    assert set(flat) == set(LATENCY_METRIC_NAMES)
    assert set(reasons) <= set(LATENCY_REASON_KEYS)


def test_inter_token_latencies() -> None:
    first, second, third = records()
    assert inter_token_latencies_s(first) == pytest.approx([0.5, 0.5, 0.5, 0.5])
    assert inter_token_latencies_s(second) == pytest.approx([0.2, 0.8])
    assert inter_token_latencies_s(third) == []


def test_merged_chunks_give_one_gap_each_never_zero() -> None:
    """A streamed request of 6 tokens in 3 chunks (1, 3, 2 tokens): 2 ITLs, the chunk gaps; TPOT still
    divides by the 5 token gaps; the ITLs add up to e2e - TTFT."""
    record = RequestRecord(
        index=0,
        input_tokens=4,
        output_tokens=6,
        submitted_s=10.0,
        finished_s=10.9,
        first_token_s=10.2,
        chunk_times_s=[10.2, 10.5, 10.9],
        chunk_tokens=[1, 3, 2],
    )
    assert inter_token_latencies_s(record) == pytest.approx([0.3, 0.4])
    assert time_per_output_token_s(record) == pytest.approx(0.7 / 5)
    assert record.e2e_s == pytest.approx(0.9) and record.ttft_s == pytest.approx(0.2)
    assert sum(inter_token_latencies_s(record)) == pytest.approx(record.e2e_s - record.ttft_s)
    flat, _ = latency_metrics([record])
    assert flat["itl_n"] == 2 and flat["itl_mean_s"] == pytest.approx(0.35)


def test_chunk_tokens_must_match_chunk_times() -> None:
    with pytest.raises(ValueError, match="chunk_tokens"):
        RequestRecord(
            index=0,
            input_tokens=1,
            output_tokens=2,
            submitted_s=0.0,
            finished_s=1.0,
            chunk_times_s=[0.5, 1.0],
            chunk_tokens=[2],
        )
    with pytest.raises(ValueError, match="chunk_tokens"):
        RequestRecord(
            index=0,
            input_tokens=1,
            output_tokens=2,
            submitted_s=0.0,
            finished_s=1.0,
            chunk_times_s=[0.5, 1.0],
            chunk_tokens=[2, 0],
        )


def test_eos_stopped_request_in_a_batch_uses_its_own_last_token() -> None:
    """Batch of two, 128 steps of 10 ms each from t=1.0: request 0 runs all 128 steps, request 1 stops at
    EOS after 10. Each has one time per step up to its own output count and finished_s = its own last
    token (as the pytorch backend records them): request 1's TPOT is one step, not 12.7 steps."""
    steps = [1.0 + 0.01 * (i + 1) for i in range(128)]
    full = RequestRecord(
        index=0,
        input_tokens=8,
        output_tokens=128,
        submitted_s=1.0,
        finished_s=steps[-1],
        first_token_s=steps[0],
        token_times_s=steps,
        batch_index=0,
    )
    stopped = RequestRecord(
        index=1,
        input_tokens=8,
        output_tokens=10,
        submitted_s=1.0,
        finished_s=steps[9],
        first_token_s=steps[0],
        token_times_s=steps[:10],
        batch_index=0,
    )
    assert time_per_output_token_s(full) == pytest.approx(0.01)
    assert time_per_output_token_s(stopped) == pytest.approx(0.01)
    assert stopped.e2e_s == pytest.approx(0.10) and full.e2e_s == pytest.approx(1.28)
    assert inter_token_latencies_s(stopped) == pytest.approx([0.01] * 9)
    # Even a record whose finished_s is the batch end gets its own last token from its arrivals.
    batch_end = RequestRecord(
        index=1,
        input_tokens=8,
        output_tokens=10,
        submitted_s=1.0,
        finished_s=2.5,
        first_token_s=steps[0],
        token_times_s=steps[:10],
        batch_index=0,
    )
    assert batch_end.last_token_s == steps[9] and time_per_output_token_s(batch_end) == pytest.approx(0.01)
    flat, _ = latency_metrics([full, stopped])
    assert flat["itl_n"] == 127 + 9 and flat["tpot_n"] == 2 and flat["e2e_n"] == 2
    assert flat["e2e_mean_s"] == pytest.approx((1.28 + 0.10) / 2)


def test_time_per_output_token() -> None:
    first, second, third = records()
    assert time_per_output_token_s(first) == pytest.approx(2.0 / 4)
    assert time_per_output_token_s(second) == pytest.approx(1.0 / 2)
    assert time_per_output_token_s(third) is None  # first token not observed
    one_token = RequestRecord(
        index=0, input_tokens=1, output_tokens=1, submitted_s=0.0, finished_s=1.0, first_token_s=0.4
    )
    assert time_per_output_token_s(one_token) is None  # no gap to divide by


def test_record_properties() -> None:
    first, _, third = records()
    assert first.e2e_s == 2.5 and first.ttft_s == 0.5
    assert third.e2e_s == 3.0 and third.ttft_s is None
    assert third.arrivals() == ([], []) and third.last_token_s == 3.5  # finished_s where no arrivals


def test_latency_metrics() -> None:
    flat, info = latency_metrics(records())
    assert set(flat) == set(LATENCY_METRIC_NAMES)
    samples = {"e2e": [2.5, 1.2, 3.0], "ttft": [0.5, 0.2], "itl": [0.5, 0.5, 0.5, 0.5, 0.2, 0.8], "tpot": [0.5, 0.5]}
    for name, values in samples.items():
        assert flat[f"{name}_n"] == len(values)
        assert flat[f"{name}_mean_s"] == pytest.approx(np.mean(values))
        assert flat[f"{name}_p50_s"] == pytest.approx(np.percentile(values, 50))
        # Fewer than 10 (100) samples: no p90 (p99), with the reason.
        assert flat[f"{name}_p90_s"] is None and flat[f"{name}_p99_s"] is None
        assert info[f"{name}_p99_unavailable_reason"] == (
            f"{len(values)} {name} samples pooled over the 3 requests of the run; a p99 needs at least 100"
        )
    assert info["latency_source"] == "engine,host_clock"


def test_window_bounds() -> None:
    assert window_bounds(records()) == (0.0, 3.5)


# ---------------------------------------------------------------------------------------------
# Energy


def test_energy_metrics_mixed_domains() -> None:
    numbers, info = energy_metrics(measure_window())
    assert numbers == {
        "gpu_energy_j": 100.0,
        "gpu_net_energy_j": 60.0,
        # an estimate never fills a measured column, nor the node total
        "cpu_energy_j": None,
        "cpu_net_energy_j": None,
        "cpu_estimated_energy_j": 50.0,
        "dram_energy_j": None,
        "dram_net_energy_j": None,  # unavailable is None, never 0
        "dram_estimated_energy_j": None,
        "node_energy_j": 100.0,
        "node_net_energy_j": 60.0,
        "host_estimated_energy_j": 50.0,
    }
    assert info == {
        "gpu_energy_source": "nvml",
        "gpu_energy_method": "measured",
        "cpu_energy_source": "codecarbon",
        "cpu_energy_method": "estimated",
        "cpu_unavailable_reason": "not measured; CodeCarbon's estimate is in cpu_estimated_energy_j",
        "dram_unavailable_reason": "no RAPL: /sys/class/powercap is absent",
        "node_energy_domains": "gpu",
        "node_energy_method": "measured",
        "host_estimated_energy_domains": "cpu",
        "host_estimated_energy_method": "estimated (CodeCarbon model)",
    }


def test_energy_metrics_node_net_when_all_nets_known() -> None:
    window = measure_window()
    window["domains"]["cpu"] = domain(50.0, method="measured", source="rapl", net_j=20.0)
    window["domains"]["dram"] = domain(5.0, method="measured", source="rapl", net_j=1.0)
    numbers, info = energy_metrics(window)
    assert numbers["node_energy_j"] == 155.0
    assert numbers["node_net_energy_j"] == 81.0
    assert info["node_energy_domains"] == "gpu+cpu+dram"
    assert info["node_energy_method"] == "measured"
    assert numbers["host_estimated_energy_j"] is None
    assert "dram_unavailable_reason" not in info


def test_energy_metrics_single_method_and_missing_domains() -> None:
    window = {"duration_s": 1.0, "domains": {"cpu": domain(8.0, method="estimated", source="codecarbon")}}
    numbers, info = energy_metrics(window)
    # a CPU-only machine without RAPL: nothing measured, the estimate in its own columns
    assert numbers["node_energy_j"] is None and numbers["gpu_energy_j"] is None
    assert numbers["cpu_estimated_energy_j"] == numbers["host_estimated_energy_j"] == 8.0
    assert info["node_energy_method"] == "none" and info["node_energy_domains"] == "none"
    assert info["host_estimated_energy_domains"] == "cpu"
    assert info["gpu_unavailable_reason"] == "not measured"
    assert info["dram_unavailable_reason"] == "not measured"


def test_energy_metrics_nothing_available() -> None:
    numbers, info = energy_metrics({"duration_s": 1.0, "domains": {"gpu": unavailable("no GPU")}})
    assert all(v is None for v in numbers.values())
    assert numbers["node_energy_j"] is None and numbers["node_net_energy_j"] is None
    assert info["node_energy_domains"] == "none" and info["node_energy_method"] == "none"
    assert info["gpu_unavailable_reason"] == "no GPU"


def test_energy_metrics_prefix_has_no_info() -> None:
    numbers, info = energy_metrics(measure_window(), prefix="setup_load_")
    assert numbers["setup_load_gpu_energy_j"] == 100.0
    assert numbers["setup_load_node_energy_j"] == 100.0
    assert numbers["setup_load_host_estimated_energy_j"] == 50.0
    assert all(k.startswith("setup_load_") for k in numbers)
    assert info == {}


# ---------------------------------------------------------------------------------------------
# Run metrics


def test_work_duration_without_requests_is_the_window() -> None:
    assert work_duration_s([], 4.0) == 4.0
    assert work_duration_s(records(), 10.0) == pytest.approx(3.5)


def setup_windows() -> list[dict[str, Any]]:
    return [
        {
            "name": "load",
            "duration_s": 3.0,
            "domains": {
                "gpu": domain(30.0, net_j=18.0),
                "cpu": domain(6.0, method="estimated", source="codecarbon"),
                "dram": unavailable("no RAPL"),
            },
        },
        {
            "name": "warmup",
            "duration_s": 1.0,
            "domains": {
                "gpu": domain(10.0, net_j=6.0),
                "cpu": unavailable("tracker failed"),
                "dram": unavailable("no RAPL"),
            },
        },
    ]


def test_run_metrics_tokens_throughput_and_energy_ratios() -> None:
    metrics, info = run_metrics(records(), measure_window())
    assert metrics["window_duration_s"] == 10.0
    assert metrics["setup_duration_s"] == 0.0
    assert metrics["requests"] == 3.0
    assert metrics["input_tokens"] == 20.0
    assert metrics["output_tokens"] == 9.0
    # Throughput over the work (first submission 0.0 s to last token 3.5 s), not over the energy
    # window, whose edges wait for the counter; mean power stays energy over the window.
    assert metrics["work_duration_s"] == pytest.approx(3.5)
    assert metrics["output_tokens_per_s"] == pytest.approx(9 / 3.5)
    assert metrics["input_tokens_per_s"] == pytest.approx(20 / 3.5)
    assert metrics["requests_per_s"] == pytest.approx(3 / 3.5)
    assert metrics["gpu_energy_per_output_token_j"] == pytest.approx(100.0 / 9)
    assert metrics["gpu_net_energy_per_output_token_j"] == pytest.approx(60.0 / 9)
    assert metrics["gpu_output_tokens_per_j"] == pytest.approx(9 / 100.0)
    assert metrics["gpu_mean_power_w"] == pytest.approx(10.0)
    assert metrics["cpu_energy_per_output_token_j"] is None  # estimated, not measured
    assert metrics["cpu_estimated_energy_per_output_token_j"] == pytest.approx(50.0 / 9)
    assert metrics["host_estimated_energy_per_output_token_j"] == pytest.approx(50.0 / 9)
    assert metrics["cpu_mean_power_w"] is None
    assert metrics["node_energy_j"] == 100.0
    assert metrics["node_energy_per_output_token_j"] == pytest.approx(100.0 / 9)
    assert metrics["node_output_tokens_per_j"] == pytest.approx(9 / 100.0)
    assert metrics["node_mean_power_w"] == pytest.approx(10.0)
    assert metrics["node_net_energy_per_output_token_j"] == pytest.approx(60.0 / 9)
    for key in (
        "dram_energy_j",
        "dram_energy_per_output_token_j",
        "dram_output_tokens_per_j",
        "dram_mean_power_w",
        "dram_net_energy_per_output_token_j",
    ):
        assert metrics[key] is None, key  # unavailable stays None, never 0
    assert metrics["timeline_vs_counter_rel_diff"] == 0.02
    assert metrics["emissions_kg_co2eq"] == 1.5e-5
    assert info["node_energy_domains"] == "gpu"
    assert info["node_energy_method"] == "measured"
    assert info["dram_unavailable_reason"] == "no RAPL: /sys/class/powercap is absent"
    assert info["latency_source"] == "engine,host_clock"
    assert metrics["e2e_mean_s"] == pytest.approx(np.mean([2.5, 1.2, 3.0]))
    # Every value is a number or None (what the run_result schema accepts).
    assert all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in metrics.values())


def test_run_metrics_unavailable_gpu_and_emissions() -> None:
    window = measure_window()
    window["domains"]["gpu"] = unavailable("no NVIDIA GPU")
    window["emissions"] = {"available": False, "reason": "codecarbon not installed"}
    metrics, info = run_metrics(records(), window)
    assert metrics["gpu_energy_j"] is None and metrics["gpu_energy_per_output_token_j"] is None
    assert metrics["timeline_vs_counter_rel_diff"] is None
    assert metrics["emissions_kg_co2eq"] is None
    assert metrics["node_energy_j"] is None and metrics["host_estimated_energy_j"] == 50.0
    assert info["node_energy_domains"] == "none"
    assert info["host_estimated_energy_domains"] == "cpu"
    assert info["gpu_unavailable_reason"] == "no NVIDIA GPU"


def test_run_metrics_zero_duration_and_zero_tokens_give_none() -> None:
    window = measure_window()
    window["duration_s"] = 0.0
    zero_output = [RequestRecord(index=0, input_tokens=3, output_tokens=0, submitted_s=0.0, finished_s=0.0)]
    metrics, _ = run_metrics(zero_output, window)
    assert metrics["output_tokens_per_s"] is None and metrics["gpu_mean_power_w"] is None
    assert metrics["gpu_energy_per_output_token_j"] is None
    assert metrics["gpu_output_tokens_per_j"] == 0.0


def test_run_metrics_setup_windows() -> None:
    metrics, info = run_metrics(records(), measure_window(), setup_windows=setup_windows())
    assert metrics["setup_duration_s"] == 4.0
    assert metrics["setup_load_duration_s"] == 3.0
    assert metrics["setup_warmup_duration_s"] == 1.0
    assert metrics["setup_load_gpu_energy_j"] == 30.0
    assert metrics["setup_load_cpu_energy_j"] is None  # estimated: not in a measured column
    assert metrics["setup_load_dram_energy_j"] is None
    assert metrics["setup_load_node_energy_j"] == 30.0
    assert metrics["setup_warmup_gpu_energy_j"] == 10.0
    assert metrics["setup_warmup_cpu_energy_j"] is None
    assert metrics["setup_warmup_node_energy_j"] == 10.0
    assert metrics["setup_gpu_energy_j"] == 40.0
    assert metrics["setup_node_energy_j"] == 40.0
    assert not [k for k in metrics if k.startswith("setup_") and "net" in k]  # net is for the window only
    # Setup windows never change the measured window's numbers or info.
    plain, plain_info = run_metrics(records(), measure_window())
    assert metrics["gpu_energy_j"] == plain["gpu_energy_j"] == 100.0
    assert info == plain_info


def test_run_metrics_setup_total_none_when_a_window_lacks_the_domain() -> None:
    windows = setup_windows()
    windows[1]["domains"]["gpu"] = unavailable("no GPU")
    windows[1]["domains"]["cpu"] = unavailable("no tracker")
    metrics, _ = run_metrics(records(), measure_window(), setup_windows=windows)
    assert metrics["setup_warmup_node_energy_j"] is None
    assert metrics["setup_gpu_energy_j"] is None  # a partial sum would understate the setup cost
    assert metrics["setup_node_energy_j"] is None


def test_run_metrics_no_setup_windows_totals_none() -> None:
    metrics, _ = run_metrics(records(), measure_window(), setup_windows=[])
    assert metrics["setup_gpu_energy_j"] is None and metrics["setup_node_energy_j"] is None


def test_run_metrics_phases_present() -> None:
    phases = {"available": True, "prefill_j": 20.0, "decode_j": 80.0, "method": "timeline_split"}
    metrics, info = run_metrics(records(), measure_window(), phases=phases)
    assert metrics["prefill_gpu_energy_j"] == 20.0
    assert metrics["decode_gpu_energy_j"] == 80.0
    assert metrics["gpu_prefill_energy_per_input_token_j"] == pytest.approx(20.0 / 20)
    assert metrics["gpu_decode_energy_per_output_token_j"] == pytest.approx(80.0 / 9)
    assert info["phase_split_method"] == "timeline_split"
    assert "phase_split_unavailable_reason" not in info


@pytest.mark.parametrize(
    ("phases", "reason"),
    [
        (None, None),
        ({"available": False, "reason": "no GPU timeline"}, "no GPU timeline"),
        ({"available": True, "method": "x"}, "unknown"),
    ],
)
def test_run_metrics_phases_absent(phases, reason) -> None:
    metrics, info = run_metrics(records(), measure_window(), phases=phases)
    for key in (
        "prefill_gpu_energy_j",
        "decode_gpu_energy_j",
        "gpu_prefill_energy_per_input_token_j",
        "gpu_decode_energy_per_output_token_j",
    ):
        assert key in metrics and metrics[key] is None
    assert "phase_split_method" not in info
    assert info.get("phase_split_unavailable_reason") == reason


def test_repeat_pace_is_the_spread_of_the_repeats_durations_first_submission_to_last_token() -> None:
    # Three repeats of two requests each: 1.0 s, 2.0 s and 1.5 s from first submission to last token.
    spans = [(0.0, 0.8, 1.0), (1.0, 2.5, 3.0), (3.0, 4.5, 4.0)]
    records = [
        RequestRecord(index=i, input_tokens=4, output_tokens=2, submitted_s=start, finished_s=end)
        for start, end_a, end_b in spans
        for i, end in enumerate((end_a, end_b))
    ]
    repeats = [0, 0, 1, 1, 2, 2]
    pace, info = repeat_pace(records, repeats)
    durations = np.array([1.0, 2.0, 1.5])
    assert pace["repeats_in_window"] == 3 and info == {}
    assert pace["repeat_time_cv_in_window"] == pytest.approx(durations.std(ddof=1) / durations.mean())
    assert pace["repeat_time_spread_in_window"] == pytest.approx(1.0)
    pace, info = repeat_pace(records[:4], repeats[:4])
    assert pace["repeats_in_window"] == 2 and pace["repeat_time_cv_in_window"] is None
    assert "2 repeat(s)" in info["repeat_time_unavailable_reason"]
