"""Unit tests of llm_energy.metrics on hand-made records and energy windows (exact values)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from llm_energy.backends.base import RequestRecord
from llm_energy.metrics import (
    distribution,
    energy_metrics,
    inter_token_latencies_s,
    latency_metrics,
    run_metrics,
    time_per_output_token_s,
    window_bounds,
)


def records() -> list[RequestRecord]:
    """Three requests: two streamed (per-token times), one whose first token was not observed."""
    return [
        RequestRecord(index=0, input_tokens=10, output_tokens=5, submitted_s=0.0, finished_s=2.5,
                      first_token_s=0.5, token_times_s=[0.5, 1.0, 1.5, 2.0, 2.5], latency_source="host_clock"),
        RequestRecord(index=1, input_tokens=6, output_tokens=3, submitted_s=1.0, finished_s=2.2,
                      first_token_s=1.2, token_times_s=[1.2, 1.4, 2.2], latency_source="host_clock"),
        RequestRecord(index=2, input_tokens=4, output_tokens=1, submitted_s=0.5, finished_s=3.5,
                      latency_source="engine"),
    ]


def domain(gross_j: float, method: str = "measured", source: str = "nvml", net_j: float | None = None,
           **extra: Any) -> dict[str, Any]:
    return {"available": True, "source": source, "method": method, "gross_j": gross_j, "net_j": net_j, **extra}


def unavailable(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason}


def measure_window() -> dict[str, Any]:
    """GPU measured, CPU estimated (no net: no baseline), DRAM unavailable; 10 s."""
    return {
        "name": "measure", "start_s": 0.0, "end_s": 10.0, "duration_s": 10.0,
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
    assert set(result) == {"mean", "p50", "p90", "p99"}
    assert result["mean"] == pytest.approx(float(np.mean(values)), rel=1e-12)
    for p in (50, 90, 99):
        assert result[f"p{p}"] == pytest.approx(float(np.percentile(values, p)), rel=1e-12)
        assert isinstance(result[f"p{p}"], float)


def test_distribution_exact_linear_interpolation() -> None:
    result = distribution([1.0, 2.0, 3.0, 4.0, None])  # None is skipped, not zero
    assert result == {"mean": 2.5, "p50": 2.5, "p90": pytest.approx(3.7), "p99": pytest.approx(3.97)}


def test_distribution_empty() -> None:
    assert distribution([]) == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert distribution([None, None]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_inter_token_latencies() -> None:
    first, second, third = records()
    assert inter_token_latencies_s(first) == pytest.approx([0.5, 0.5, 0.5, 0.5])
    assert inter_token_latencies_s(second) == pytest.approx([0.2, 0.8])
    assert inter_token_latencies_s(third) == []


def test_time_per_output_token() -> None:
    first, second, third = records()
    assert time_per_output_token_s(first) == pytest.approx(2.0 / 4)
    assert time_per_output_token_s(second) == pytest.approx(1.0 / 2)
    assert time_per_output_token_s(third) is None  # first token not observed
    one_token = RequestRecord(index=0, input_tokens=1, output_tokens=1, submitted_s=0.0, finished_s=1.0,
                              first_token_s=0.4)
    assert time_per_output_token_s(one_token) is None  # no gap to divide by


def test_record_properties() -> None:
    first, _, third = records()
    assert first.e2e_s == 2.5 and first.ttft_s == 0.5
    assert third.e2e_s == 3.0 and third.ttft_s is None


def test_latency_metrics() -> None:
    flat = latency_metrics(records())
    assert set(flat) == {f"{n}_{s}_s" for n in ("e2e", "ttft", "itl", "tpot") for s in ("mean", "p50", "p90", "p99")}
    e2e = [2.5, 1.2, 3.0]
    ttft = [0.5, 0.2]
    itl = [0.5, 0.5, 0.5, 0.5, 0.2, 0.8]
    for name, values in (("e2e", e2e), ("ttft", ttft), ("itl", itl)):
        assert flat[f"{name}_mean_s"] == pytest.approx(np.mean(values))
        for p in (50, 90, 99):
            assert flat[f"{name}_p{p}_s"] == pytest.approx(np.percentile(values, p))
    assert flat["tpot_mean_s"] == pytest.approx(0.5) and flat["tpot_p99_s"] == pytest.approx(0.5)


def test_window_bounds() -> None:
    assert window_bounds(records()) == (0.0, 3.5)


# ---------------------------------------------------------------------------------------------
# Energy


def test_energy_metrics_mixed_domains() -> None:
    numbers, info = energy_metrics(measure_window())
    assert numbers == {
        "gpu_energy_j": 100.0, "gpu_net_energy_j": 60.0,
        # an estimate never fills a measured column, nor the node total
        "cpu_energy_j": None, "cpu_net_energy_j": None, "cpu_estimated_energy_j": 50.0,
        "dram_energy_j": None, "dram_net_energy_j": None,  # unavailable is None, never 0
        "dram_estimated_energy_j": None,
        "node_energy_j": 100.0, "node_net_energy_j": 60.0,
        "host_estimated_energy_j": 50.0,
    }
    assert info == {
        "gpu_energy_source": "nvml", "gpu_energy_method": "measured",
        "cpu_energy_source": "codecarbon", "cpu_energy_method": "estimated",
        "cpu_unavailable_reason": "not measured; CodeCarbon's estimate is in cpu_estimated_energy_j",
        "dram_unavailable_reason": "no RAPL: /sys/class/powercap is absent",
        "node_energy_domains": "gpu", "node_energy_method": "measured",
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


def setup_windows() -> list[dict[str, Any]]:
    return [
        {"name": "load", "duration_s": 3.0,
         "domains": {"gpu": domain(30.0, net_j=18.0), "cpu": domain(6.0, method="estimated", source="codecarbon"),
                     "dram": unavailable("no RAPL")}},
        {"name": "warmup", "duration_s": 1.0,
         "domains": {"gpu": domain(10.0, net_j=6.0), "cpu": unavailable("tracker failed"),
                     "dram": unavailable("no RAPL")}},
    ]


def test_run_metrics_tokens_throughput_and_energy_ratios() -> None:
    metrics, info = run_metrics(records(), measure_window())
    assert metrics["window_duration_s"] == 10.0
    assert metrics["setup_duration_s"] == 0.0
    assert metrics["requests"] == 3.0
    assert metrics["input_tokens"] == 20.0
    assert metrics["output_tokens"] == 9.0
    assert metrics["output_tokens_per_s"] == pytest.approx(0.9)
    assert metrics["input_tokens_per_s"] == pytest.approx(2.0)
    assert metrics["requests_per_s"] == pytest.approx(0.3)
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
    for key in ("dram_energy_j", "dram_energy_per_output_token_j", "dram_output_tokens_per_j",
                "dram_mean_power_w", "dram_net_energy_per_output_token_j"):
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
    [(None, None), ({"available": False, "reason": "no GPU timeline"}, "no GPU timeline"),
     ({"available": True, "method": "x"}, "unknown")],
)
def test_run_metrics_phases_absent(phases, reason) -> None:
    metrics, info = run_metrics(records(), measure_window(), phases=phases)
    for key in ("prefill_gpu_energy_j", "decode_gpu_energy_j", "gpu_prefill_energy_per_input_token_j",
                "gpu_decode_energy_per_output_token_j"):
        assert key in metrics and metrics[key] is None
    assert "phase_split_method" not in info
    assert info.get("phase_split_unavailable_reason") == reason
