"""aggregate_experiment over fake cycles (ok and failed), with and without a FLOPs estimate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from llm_energy import aggregate, artifacts
from llm_energy.aggregate import MBU_METHOD, aggregate_experiment
from llm_energy.errors import ArtifactError
from llm_energy.statistics import describe

EXPERIMENT_ID = "tiny-llama.pytorch.builtin.bs8-fp32-out64.3f9a1c2e"
GPU = "NVIDIA H100 80GB HBM3"
PEAK_FLOPS_PER_S = 989e12
PEAK_BYTES_PER_S = 3.35e12
PARAMETERS = {
    "batch_size": 8,
    "dtype": "bf16",
    "max_input_tokens": 128,
    "max_output_tokens": 64,
    "decoding_mode": "greedy",
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "output_length": "fixed",
    "batching": "fixed",
    "token_budget": None,
}


@pytest.fixture(autouse=True)
def fake_peaks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []

    def peak_figures(gpu_name: str, dtype: str) -> dict[str, float] | None:
        calls.append((gpu_name, dtype))
        if gpu_name != GPU:
            return None
        return {"flops_per_s": PEAK_FLOPS_PER_S, "memory_bytes_per_s": PEAK_BYTES_PER_S}

    monkeypatch.setattr(aggregate, "peak_figures_provider", lambda: peak_figures)
    return calls


def run_result_data(
    cycle: int,
    metrics: dict[str, float | None] | None,
    info: dict[str, str] | None = None,
    status: str = "ok",
    error: str | None = None,
    flags: tuple[str, ...] = (),
    experiment_id: str = EXPERIMENT_ID,
) -> dict[str, Any]:
    """A run_result `data` shaped like llm_energy.measure writes it."""
    return {
        "experiment_id": experiment_id,
        "cycle": cycle,
        "status": status,
        "error": error,
        "experiment": {
            "model": "tiny-llama",
            "backend": "pytorch",
            "dataset": "builtin",
            "parameters": dict(PARAMETERS),
        },
        "load": None,
        "setup": {"duration_s": 1.0, "windows": []},
        "window": None,
        "tokens": None,
        "metrics": metrics or {},
        "metrics_info": info or {},
        "phases": None,
        "energy_sources": {},
        "validity": {"flags": list(flags), "valid": not flags},
    }


def write_run(directory: Path, data: dict[str, Any], gpus: list[str]) -> Path:
    path = directory / "runs" / data["experiment_id"] / f"cycle-{data['cycle']}" / "result.json"
    provenance = {
        "experiment": data["experiment_id"],
        "gpus": [{"name": name, "uuid": f"GPU-{i}"} for i, name in enumerate(gpus)],
    }
    artifacts.write_json_artifact(path, "run_result", data, provenance)
    return path


def gpu_metrics(window_s: float, gpu_j: float, output_tokens: float = 512.0) -> dict[str, float | None]:
    node_j = gpu_j + 30.0
    return {
        "window_duration_s": window_s,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / window_s,
        "gpu_energy_j": gpu_j,
        "gpu_energy_per_output_token_j": gpu_j / output_tokens,
        "node_energy_j": node_j,
        "cpu_energy_j": None,
        "ttft_p50_s": 0.05,
    }


GPU_INFO = {
    "gpu_energy_source": "nvml_energy_counter",
    "gpu_energy_method": "measured",
    "cpu_unavailable_reason": "no RAPL",
}


# The FLOPs cost model of write_flops and the requests it writes beside each cycle: 8 requests of 100
# prompt and 26 output tokens cost 8 x (100 + 25) x 4e9 = 4e12 FLOPs (no logits or attention term),
# and read the 4e9 weights (2 bytes each) at 25 decode steps at least: 2e11 bytes.
FLOPS_INPUT_TOKENS, FLOPS_OUTPUT_TOKENS = 100, 26
COST_MODEL = {
    "linear_flops_per_token": 4_000_000_000,
    "logits_flops_per_position": 0,
    "attention_flops_per_query_key": 0,
    "decode_weight_params": 4_000_000_000,
    "kv_elements_per_token": None,
}


def write_flops(directory: Path, runs: list[Path], confidence: str = "high") -> Path:
    """A flops_model artifact, and a requests table beside every run result of `runs` lacking one."""
    from llm_energy.backends.base import RequestRecord

    for run in runs:
        if not (run.parent / "requests.parquet").exists():
            write_requests(
                run,
                [
                    RequestRecord(
                        index=i,
                        input_tokens=FLOPS_INPUT_TOKENS,
                        output_tokens=FLOPS_OUTPUT_TOKENS,
                        submitted_s=0.0,
                        finished_s=1.0,
                        first_token_s=0.1,
                    )
                    for i in range(8)
                ],
            )
    path = directory / "models" / "tiny-llama" / "flops-bf16.json"
    data = {
        "model": "tiny-llama",
        "method": "analytic",
        "confidence": confidence,
        "dtype": "bf16",
        "bytes_per_param": 2.0,
        "parameter_count": 4_000_000_000,
        "cost_model": dict(COST_MODEL),
        "cross_checks": [],
        "architecture": None,
        "notes": [],
    }
    artifacts.write_json_artifact(path, "flops_model", data, {"experiment": None})
    return path


@pytest.fixture()
def three_cycles(tmp_path: Path) -> list[Path]:
    """Two ok cycles (one flagged) and one failed cycle on one H100."""
    info_2 = {**GPU_INFO, "latency_source": "cuda_events"}
    return [
        write_run(
            tmp_path, run_result_data(1, gpu_metrics(2.0, 200.0), {**GPU_INFO, "latency_source": "host_clock"}), [GPU]
        ),
        write_run(tmp_path, run_result_data(2, gpu_metrics(2.5, 240.0), info_2, flags=("short_window",)), [GPU]),
        write_run(
            tmp_path, run_result_data(3, None, status="failed", error="CUDA out of memory", flags=("failed",)), [GPU]
        ),
    ]


def test_three_cycles_with_flops(tmp_path: Path, three_cycles: list[Path], fake_peaks: list) -> None:
    flops_path = write_flops(tmp_path, three_cycles[:2])
    result = aggregate_experiment(three_cycles, flops_path)

    assert result["experiment_id"] == EXPERIMENT_ID
    assert result["status"] == "ok"
    assert result["experiment"]["parameters"]["batch_size"] == 8
    assert result["cycles_ok"] == 2 and result["cycles_ok_list"] == [1, 2]
    assert result["cycles_failed"] == [{"cycle": 3, "error": "CUDA out of memory"}]
    assert result["cycles_invalid"] == [{"cycle": 2, "flags": ["short_window"]}]
    assert result["flags"] == {"failed": 1, "short_window": 1}
    assert result["gpu_name"] == GPU and result["gpu_count"] == 1

    # every numeric metric of the ok cycles, described over those cycles only
    assert result["metrics"]["output_tokens_per_s"] == describe([256.0, 204.8])
    assert result["metrics"]["gpu_energy_j"]["mean"] == 220.0
    assert result["metrics"]["cpu_energy_j"]["n"] == 0 and result["metrics"]["cpu_energy_j"]["n_missing"] == 2

    # metrics_info: agreeing strings kept, disagreeing ones marked mixed
    info = result["metrics_info"]
    assert info["gpu_energy_source"] == "nvml_energy_counter"
    assert info["latency_source"] == "mixed: host_clock, cuda_events"
    assert info["flops_method"] == "analytic" and info["flops_confidence"] == "high"
    assert info["mbu_method"] == MBU_METHOD and "lower bound" in info["mbu_method"]

    # derived metrics: computed per cycle, then described (mean of ratios, with a real spread)
    metrics = result["metrics"]
    assert metrics["gpu_flops_per_j"] == describe([4.0e12 / 200.0, 4.0e12 / 240.0])
    assert metrics["node_flops_per_j"]["mean"] == pytest.approx((4.0e12 / 230.0 + 4.0e12 / 270.0) / 2)
    assert metrics["achieved_flops_per_s"]["mean"] == pytest.approx((2.0e12 + 1.6e12) / 2)
    assert metrics["mfu"]["mean"] == pytest.approx((2.0e12 + 1.6e12) / 2 / PEAK_FLOPS_PER_S)
    assert metrics["mbu"]["mean"] == pytest.approx((1.0e11 + 0.8e11) / 2 / PEAK_BYTES_PER_S)
    assert metrics["mfu"]["ci95_low"] < metrics["mfu"]["mean"] < metrics["mfu"]["ci95_high"]
    assert fake_peaks == [(GPU, "bf16"), (GPU, "bf16")]
    assert info["gpu_peak_figures"] == f"1 x {GPU} at bf16: 9.89e+14 FLOP/s, 3.35e+12 B/s"
    assert not any(key.endswith("_unavailable_reason") and key.startswith(("mfu", "mbu", "gpu_flops")) for key in info)
    assert result["flops"] == {
        "method": "analytic",
        "confidence": "high",
        "total_flops": 4.0e12,
        "decode_bytes_min": 2.0e11,
        "cycles": [
            {"cycle": c, "window_flops": 4.0e12, "decode_bytes_min": 2.0e11, "requests": 8, "confidence": "high"}
            for c in (1, 2)
        ],
    }

    # the result is a valid experiment_result artifact and reads back unchanged
    out = tmp_path / "experiments" / f"{EXPERIMENT_ID}.json"
    artifacts.write_json_artifact(out, "experiment_result", result, {"experiment": EXPERIMENT_ID})
    assert artifacts.read_json_artifact(out, "experiment_result")["data"] == json.loads(json.dumps(result))


def test_without_flops_estimate(tmp_path: Path, three_cycles: list[Path]) -> None:
    result = aggregate_experiment(three_cycles, tmp_path / "flops" / "missing.json")
    assert result["flops"] is None
    info = result["metrics_info"]
    assert "does not exist" in info["flops_unavailable_reason"]
    for name in ("gpu_flops_per_j", "node_flops_per_j", "achieved_flops_per_s", "mfu", "mbu"):
        assert result["metrics"][name]["mean"] is None
        assert result["metrics"][name]["n_missing"] == 2
        assert "does not exist" in info[f"{name}_unavailable_reason"]
    # everything else is still aggregated
    assert result["metrics"]["gpu_energy_per_output_token_j"]["n"] == 2

    no_path = aggregate_experiment(three_cycles, None)
    assert "no FLOPs cost model" in no_path["metrics_info"]["flops_unavailable_reason"]


def test_cpu_only_run_has_node_flops_but_no_gpu_figures(tmp_path: Path) -> None:
    """A CPU machine: GPU energy null, CPU+DRAM estimated, no GPU in the provenance."""
    metrics = {
        "window_duration_s": 4.0,
        "output_tokens": 100.0,
        "gpu_energy_j": None,
        "cpu_energy_j": 40.0,
        "dram_energy_j": 20.0,
        "node_energy_j": 60.0,
    }
    info = {
        "cpu_energy_source": "codecarbon_estimate",
        "cpu_energy_method": "estimated",
        "gpu_unavailable_reason": "no NVIDIA GPU",
    }
    paths = [write_run(tmp_path, run_result_data(c, metrics, info), gpus=[]) for c in (1, 2)]
    result = aggregate_experiment(paths, write_flops(tmp_path, paths))
    m, i = result["metrics"], result["metrics_info"]
    assert result["gpu_name"] is None and result["gpu_count"] == 0
    assert m["node_flops_per_j"]["mean"] == pytest.approx(4.0e12 / 60.0)
    assert m["gpu_flops_per_j"]["mean"] is None
    assert i["gpu_flops_per_j_unavailable_reason"] == "gpu_energy_j unavailable (all cycles)"
    assert i["mfu_unavailable_reason"] == "no GPU in the run provenance (all cycles)"
    assert i["mbu_unavailable_reason"] == "no GPU in the run provenance (all cycles)"
    assert "gpu_peak_figures" not in i
    # per-output-token energy of domains the run did not report is derived per cycle
    assert m["cpu_energy_per_output_token_j"]["mean"] == pytest.approx(0.4)
    assert m["dram_energy_per_output_token_j"]["mean"] == pytest.approx(0.2)
    assert "output_tokens" in i["cpu_energy_per_output_token_j_method"]
    assert m["gpu_energy_per_output_token_j"]["mean"] is None


def test_unknown_gpu_and_missing_peak_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [
        write_run(tmp_path, run_result_data(c, gpu_metrics(2.0, 200.0), GPU_INFO), ["Mystery GPU"]) for c in (1, 2)
    ]
    flops = write_flops(tmp_path, paths)
    result = aggregate_experiment(paths, flops)
    assert result["metrics"]["mfu"]["mean"] is None
    assert "no peak figures for Mystery GPU at bf16" in result["metrics_info"]["mfu_unavailable_reason"]
    assert result["metrics"]["gpu_flops_per_j"]["n"] == 2  # needs no peak figures

    monkeypatch.setattr(aggregate, "peak_figures_provider", lambda: None)
    result = aggregate_experiment(paths, flops)
    assert "peak_figures missing" in result["metrics_info"]["mbu_unavailable_reason"]


def test_two_gpus_double_the_peak(tmp_path: Path) -> None:
    paths = [write_run(tmp_path, run_result_data(c, gpu_metrics(2.0, 200.0), GPU_INFO), [GPU, GPU]) for c in (1, 2)]
    result = aggregate_experiment(paths, write_flops(tmp_path, paths))
    assert result["gpu_count"] == 2
    assert result["metrics"]["mfu"]["mean"] == pytest.approx(2.0e12 / (2 * PEAK_FLOPS_PER_S))


def test_all_cycles_failed_still_gives_a_result(tmp_path: Path) -> None:
    paths = [
        write_run(tmp_path, run_result_data(c, None, status="failed", error=f"OOM {c}", flags=("failed",)), [GPU])
        for c in (1, 2, 3)
    ]
    result = aggregate_experiment(paths, None)
    assert result["status"] == "failed"
    assert result["cycles_ok"] == 0
    assert [f["error"] for f in result["cycles_failed"]] == ["OOM 1", "OOM 2", "OOM 3"]
    assert result["metrics"] == {}
    assert result["flags"] == {"failed": 3}
    artifacts.write_json_artifact(tmp_path / "failed.json", "experiment_result", result, {})


def test_mixing_experiments_or_repeating_a_cycle_is_refused(tmp_path: Path) -> None:
    one = write_run(tmp_path, run_result_data(1, gpu_metrics(2.0, 200.0)), [GPU])
    other = write_run(tmp_path, run_result_data(2, gpu_metrics(2.0, 200.0), experiment_id="other.x"), [GPU])
    with pytest.raises(ArtifactError, match="several experiments"):
        aggregate_experiment([one, other], None)
    with pytest.raises(ArtifactError, match="more than once"):
        aggregate_experiment([one, one], None)
    with pytest.raises(ArtifactError, match="no run_result"):
        aggregate_experiment([], None)


def test_a_corrupt_run_result_is_an_artifact_error(tmp_path: Path) -> None:
    bad = tmp_path / "result.json"
    bad.write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        aggregate_experiment([bad], None)


def test_real_peak_figures_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default provider is llm_energy.flops.peak_figures (H100 SXM, dense bf16)."""
    monkeypatch.setattr(aggregate, "peak_figures_provider", aggregate._default_peak_figures)
    from llm_energy.flops import peak_figures

    peaks = peak_figures(GPU, "bf16")
    paths = [write_run(tmp_path, run_result_data(c, gpu_metrics(2.0, 200.0), GPU_INFO), [GPU]) for c in (1, 2)]
    result = aggregate_experiment(paths, write_flops(tmp_path, paths))
    assert result["metrics"]["mfu"]["mean"] == pytest.approx(2.0e12 / peaks["flops_per_s"])
    assert result["metrics"]["mbu"]["mean"] == pytest.approx(1.0e11 / peaks["memory_bytes_per_s"])
    assert "H100 SXM" in result["metrics_info"]["gpu_peak_figures"]


def test_mbu_counts_the_stored_quantized_weight_bytes(tmp_path: Path, fake_peaks: list) -> None:
    """A run that recorded its matmul weights as stored (int8: 1 byte each) moves those bytes per decode
    step; a run without them keeps the FLOPs estimate's parameters x dtype size."""
    quantized = run_result_data(1, gpu_metrics(2.0, 200.0), GPU_INFO)
    quantized["load"] = {
        "device": "cuda",
        "dtype": "bfloat16",
        "details": {"quantization": "torchao_int8_weight_only", "matmul_weight_bytes": 1000.0},
    }
    plain = run_result_data(2, gpu_metrics(2.0, 200.0), GPU_INFO)
    runs = [write_run(tmp_path, quantized, [GPU]), write_run(tmp_path, plain, [GPU])]
    result = aggregate_experiment(runs, write_flops(tmp_path, runs))
    mbu_values = [1000.0 * 25 / 2.0 / PEAK_BYTES_PER_S, 2.0e11 / 2.0 / PEAK_BYTES_PER_S]
    assert result["metrics"]["mbu"] == describe(mbu_values)
    assert "matmul_weight_bytes" in result["metrics_info"]["mbu_method"]


# -- latency pooled over the requests of all cycles ---------------------------------------------


def write_requests(result_path: Path, records: list) -> None:
    """The cycle's requests.parquet beside its result.json, as the harness writes it."""
    from llm_energy.measure import requests_frame

    artifacts.write_table_artifact(
        result_path.parent / "requests.parquet",
        "requests_table",
        requests_frame(records),
        {"experiment": EXPERIMENT_ID},
    )


def streamed_requests(count: int, offset_s: float) -> list:
    """`count` requests of 3 tokens in 2 chunks (1 + 2 tokens): TTFT 0.1 s, one ITL of 0.2 s each."""
    from llm_energy.backends.base import RequestRecord

    return [
        RequestRecord(
            index=i,
            input_tokens=4,
            output_tokens=3,
            submitted_s=offset_s + i,
            finished_s=offset_s + i + 0.3 + 0.001 * i,
            first_token_s=offset_s + i + 0.1,
            chunk_times_s=[offset_s + i + 0.1, offset_s + i + 0.3 + 0.001 * i],
            chunk_tokens=[1, 2],
        )
        for i in range(count)
    ]


def test_latency_is_pooled_over_every_request_of_every_cycle(tmp_path: Path) -> None:
    """60 requests per cycle: no cycle alone has a p99 (and its reason is not carried over), the
    120 pooled samples do; the per-cycle percentiles are not averaged into `metrics`."""
    paths = []
    for cycle in (1, 2):
        metrics = {**gpu_metrics(2.0, 200.0), "ttft_p99_s": None, "ttft_n": 60.0}
        info = {**GPU_INFO, "ttft_p99_unavailable_reason": "60 ttft samples ...; a p99 needs at least 100"}
        path = write_run(tmp_path, run_result_data(cycle, metrics, info), [GPU])
        write_requests(path, streamed_requests(60, offset_s=1000.0 * cycle))
        paths.append(path)
    result = aggregate_experiment(paths, None)
    latency = result["latency"]
    assert latency["ttft_n"] == latency["e2e_n"] == latency["itl_n"] == latency["tpot_n"] == 120
    e2e = [0.3 + 0.001 * i for i in range(60)] * 2
    assert latency["e2e_p99_s"] == pytest.approx(float(np.percentile(e2e, 99)))
    assert latency["e2e_mean_s"] == pytest.approx(float(np.mean(e2e)))
    assert latency["ttft_p50_s"] == pytest.approx(0.1)
    assert latency["tpot_mean_s"] == pytest.approx(float(np.mean(e2e)) / 2 - 0.05)
    assert "ttft_p99_unavailable_reason" not in result["metrics_info"]
    assert "ttft_p50_s" not in result["metrics"] and "ttft_n" not in result["metrics"]
    assert result["metrics_info"]["latency_pooled_over"].endswith("cycles 1, 2 (120 requests)")
    artifacts.validate_data("experiment_result", result)


def test_latency_below_100_pooled_samples_has_no_p99(tmp_path: Path) -> None:
    paths = []
    for cycle in (1, 2):
        path = write_run(tmp_path, run_result_data(cycle, gpu_metrics(2.0, 200.0), GPU_INFO), [GPU])
        write_requests(path, streamed_requests(49 if cycle == 1 else 50, offset_s=100.0 * cycle))
        paths.append(path)
    result = aggregate_experiment(paths, None)
    assert result["latency"]["e2e_n"] == 99 and result["latency"]["e2e_p99_s"] is None
    assert result["latency"]["e2e_p90_s"] is not None
    assert result["metrics_info"]["e2e_p99_unavailable_reason"] == (
        "99 e2e samples pooled over the requests of cycles 1, 2; a p99 needs at least 100"
    )


def test_latency_without_a_requests_table_is_null_with_the_reason(tmp_path: Path) -> None:
    with_table = write_run(tmp_path, run_result_data(1, gpu_metrics(2.0, 200.0), GPU_INFO), [GPU])
    write_requests(with_table, streamed_requests(5, offset_s=0.0))
    without = write_run(tmp_path, run_result_data(2, gpu_metrics(2.0, 200.0), GPU_INFO), [GPU])
    result = aggregate_experiment([with_table, without], None)
    assert result["latency"]["ttft_n"] == 0 and result["latency"]["ttft_p50_s"] is None
    reason = result["metrics_info"]["ttft_unavailable_reason"]
    assert reason.startswith("not pooled: cycle 2: ") and "artifact not found" in reason


def test_mfu_uses_one_gpu_peak_when_the_run_measured_one_gpu_of_eight(tmp_path: Path) -> None:
    """An 8-GPU box without CUDA_VISIBLE_DEVICES: provenance lists 8 GPUs, the energy session bound
    the run to GPU 3 (energy_sources); MFU/MBU divide by one GPU's peak, not eight."""
    one, eight = [], []
    for cycle, window_s in ((1, 2.0), (2, 2.5)):
        data = run_result_data(cycle, gpu_metrics(window_s, 200.0), GPU_INFO)
        eight.append(write_run(tmp_path / "all", data, [GPU] * 8))
        bound = {
            **data,
            "energy_sources": {
                "sources": [
                    {"name": "nvml", "available": True, "devices": [{"index": 3, "uuid": "GPU-3", "name": GPU}]}
                ]
            },
        }
        one.append(write_run(tmp_path / "bound", bound, [GPU] * 8))
    flops_path = write_flops(tmp_path, one + eight)
    bound_result = aggregate_experiment(one, flops_path)
    unbound_result = aggregate_experiment(eight, flops_path)
    assert bound_result["gpu_count"] == 1 and unbound_result["gpu_count"] == 8
    for metric in ("mfu", "mbu"):
        assert bound_result["metrics"][metric]["mean"] == pytest.approx(8 * unbound_result["metrics"][metric]["mean"])


def test_the_variant_and_the_load_report_reach_the_experiment_result(tmp_path: Path) -> None:
    runs = []
    for cycle in (1, 2):
        data = run_result_data(cycle, gpu_metrics(2.0, 200.0), GPU_INFO)
        data["experiment"]["variant"] = "int8"
        data["load"] = {
            "device": "cpu",
            "dtype": "float32",
            "details": {"quantization": "torchao_int8_weight_only", "weight_bytes": 7151744},
        }
        runs.append(write_run(tmp_path, data, [GPU]))
    result = aggregate_experiment(runs, None)
    assert result["experiment"]["variant"] == "int8"
    assert result["load"]["details"] == {"quantization": "torchao_int8_weight_only", "weight_bytes": 7151744}
    artifacts.write_json_artifact(tmp_path / "e.json", "experiment_result", result, {})  # schema-valid
    failed = [
        write_run(tmp_path / "f", run_result_data(1, None, status="failed", error="OOM", flags=("failed",)), [GPU])
    ]
    assert aggregate_experiment(failed, None)["load"] is None


# -- FLOPs per cycle, from the model's cost model ---------------------------------------------


def _records(output_tokens: list[int], batch_index: int = -1) -> list:
    from llm_energy.backends.base import RequestRecord

    return [
        RequestRecord(
            index=i,
            input_tokens=FLOPS_INPUT_TOKENS,
            output_tokens=o,
            submitted_s=0.0,
            finished_s=1.0,
            first_token_s=0.1,
            batch_index=batch_index,
        )
        for i, o in enumerate(output_tokens)
    ]


def test_each_cycle_gets_the_flops_of_its_own_requests(tmp_path: Path, fake_peaks: list) -> None:
    """output_length: eos (or sampling): the cycles generate different lengths, so different FLOPs."""
    paths = [write_run(tmp_path, run_result_data(c, gpu_metrics(2.0, 200.0), GPU_INFO), [GPU]) for c in (1, 2)]
    write_requests(paths[0], _records([26] * 8))  # 8 x 125 tokens
    write_requests(paths[1], _records([6] * 8))  # 8 x 105 tokens
    result = aggregate_experiment(paths, write_flops(tmp_path, paths))
    per_token = COST_MODEL["linear_flops_per_token"]
    windows = [8 * 125 * per_token, 8 * 105 * per_token]
    assert [c["window_flops"] for c in result["flops"]["cycles"]] == windows
    assert result["flops"]["total_flops"] == sum(windows) / 2
    assert result["metrics"]["gpu_flops_per_j"] == describe([w / 200.0 for w in windows])
    assert result["metrics"]["mfu"] == describe([w / 2.0 / PEAK_FLOPS_PER_S for w in windows])


def test_a_failed_first_cycle_keeps_mfu_for_the_others(tmp_path: Path) -> None:
    failed = write_run(tmp_path, run_result_data(1, None, status="failed", error="OOM", flags=("failed",)), [GPU])
    ok = write_run(tmp_path, run_result_data(2, gpu_metrics(2.0, 200.0), GPU_INFO), [GPU])
    result = aggregate_experiment([failed, ok], write_flops(tmp_path, [ok]))
    assert result["metrics"]["mfu"]["n"] == 1
    assert result["metrics"]["mfu"]["mean"] == pytest.approx(2.0e12 / PEAK_FLOPS_PER_S)
    assert [c["cycle"] for c in result["flops"]["cycles"]] == [2]


def test_a_cycle_without_its_requests_table_has_no_flops_but_the_others_do(tmp_path: Path) -> None:
    paths = [write_run(tmp_path, run_result_data(c, gpu_metrics(2.0, 200.0), GPU_INFO), [GPU]) for c in (1, 2)]
    flops_path = write_flops(tmp_path, paths)
    (paths[0].parent / "requests.parquet").unlink()
    result = aggregate_experiment(paths, flops_path)
    assert result["metrics"]["mfu"]["n"] == 1 and result["metrics"]["mfu"]["n_missing"] == 1
    assert "artifact not found" in result["metrics_info"]["mfu_unavailable_reason"]
    assert "(cycles 1)" in result["metrics_info"]["mfu_unavailable_reason"]


def test_a_repeated_window_counts_every_pass(tmp_path: Path) -> None:
    """min_window_s repeats the request set: the window's FLOPs cover every pass, total_flops one."""
    from llm_energy.measure import requests_frame

    data = run_result_data(1, gpu_metrics(2.0, 200.0), GPU_INFO)
    data["tokens"] = {"requests": 16, "input_tokens": 1600, "output_tokens": 416, "repeats": 2}
    path = write_run(tmp_path, data, [GPU])
    records = _records([26] * 8) + _records([26] * 8)
    artifacts.write_table_artifact(
        path.parent / "requests.parquet",
        "requests_table",
        requests_frame(records, repeats=[0] * 8 + [1] * 8),
        {"experiment": EXPERIMENT_ID},
    )
    result = aggregate_experiment([path], write_flops(tmp_path, [path]))
    assert result["flops"]["cycles"][0]["window_flops"] == 2 * 4.0e12
    assert result["flops"]["total_flops"] == 4.0e12
    assert result["metrics"]["achieved_flops_per_s"]["mean"] == pytest.approx(2 * 4.0e12 / 2.0)


def test_an_experiment_result_of_version_1_is_migrated(tmp_path: Path) -> None:
    import json as json_module

    path = tmp_path / "old.json"
    document = {
        "schema": "llm_energy/experiment_result",
        "schema_version": 1,
        "provenance": {},
        "data": {"flops": {"method": "analytic", "confidence": "high", "total_flops": 1.0}},
    }
    path.write_text(json_module.dumps(document))
    migrated = artifacts.migrate("experiment_result", 1, document["data"], str(path))
    assert migrated["flops"]["cycles"] is None
    assert artifacts.migrate("experiment_result", 1, {"flops": None}, str(path)) == {"flops": None}
