"""A synthetic results tree (experiments/, runs/) of any size, for the plotting benchmark and tests.

Every file is a valid artifact (the same schemas as a measured tree), with plausible GPU numbers: energy
per token falls and throughput rises with the batch size, setup phases, baselines, windows and a power
timeline per cycle. Nothing here is a measurement; the trees are labelled synthetic in their config
hash and provenance.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llm_energy import artifacts
from llm_energy.statistics import describe

GPU_NAME = "NVIDIA H100 80GB HBM3"
GPU_UUID = "GPU-00000000-0000-0000-0000-000000000000"
PROVENANCE = {
    "config_sha256": "synthetic",
    "code": {"package_version": "synthetic", "git_commit": None},
    "software": {"python": "synthetic"},
    "gpus": [{"name": GPU_NAME, "uuid": GPU_UUID, "driver": "synthetic", "power_limit_w": 700.0}],
    "host": {"hostname": "synthetic"},
}
INFO = {
    "gpu_energy_source": "nvml_energy_counter",
    "gpu_energy_method": "measured",
    "cpu_energy_source": "codecarbon_estimate",
    "cpu_energy_method": "estimated",
    "dram_energy_source": "codecarbon_estimate",
    "dram_energy_method": "estimated",
    "node_energy_domains": "gpu",
    "node_energy_method": "measured",
    "host_estimated_energy_domains": "cpu+dram",
    "host_estimated_energy_method": "estimated (CodeCarbon model)",
    "phase_split_method": "differential",
    "latency_source": "synthetic",
    "gpu_peak_figures": "1 x H100 SXM at bf16: 9.894e+14 FLOP/s, 3.35e+12 B/s (vendor datasheet, dense)",
}
PARAMETERS = {
    "dtype": "bfloat16",
    "max_input_tokens": 128,
    "max_output_tokens": 128,
    "decoding_mode": "greedy",
    "temperature": 0.0,
    "top_p": 1.0,
    "top_k": 0,
    "output_length": "fixed",
    "batching": "fixed",
    "token_budget": None,
}
REQUESTS_PER_CYCLE = 48
TIMELINE_HZ = 10.0


@dataclass(frozen=True)
class Point:
    model: str
    backend: str
    variant: str | None
    engine_path: str
    dataset: str
    batch_size: int

    @property
    def experiment_id(self) -> str:
        backend = f"{self.backend}-{self.variant}" if self.variant else self.backend
        return f"{self.model}.{backend}.{self.dataset}.bs{self.batch_size}-bfloat16-in128-out128-greedy.synth"


def grid(experiments: int) -> list[Point]:
    """About `experiments` points: models x backends x datasets x batch sizes, cut to the count."""
    models = [f"model-{i}b" for i in (1, 3, 8, 14, 32, 70)]
    backends = [
        ("pytorch", "eager", "eager"),
        ("pytorch", "fast", "fast"),
        ("vllm", None, "vllm"),
        ("pytorch", "int8", "fast"),
        ("vllm", "fp8", "vllm"),
    ]
    datasets = ["chat", "code", "long"]
    batches = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    points = [
        Point(m, b, v, e, d, bs) for m, (b, v, e), d, bs in itertools.product(models, backends, datasets, batches)
    ]
    rng = np.random.default_rng(0)
    keep = sorted(rng.choice(len(points), size=min(experiments, len(points)), replace=False))
    return [points[i] for i in keep]


def _scale(point: Point) -> tuple[float, float]:
    """(J per token, tokens/s) of a point."""
    size = float(point.model.split("-")[1].rstrip("b"))
    engine = {"eager": 1.0, "fast": 0.55, "vllm": 0.4}[point.engine_path] * (
        0.8 if point.variant in ("int8", "fp8") else 1
    )
    j_per_token = 0.25 * size**0.8 * engine * point.batch_size**-0.7
    tokens_per_s = 900.0 / size**0.7 / engine * point.batch_size**0.8
    return j_per_token, tokens_per_s


def _window(name: str, start: float, duration: float, gpu_j: float) -> dict[str, Any]:
    return {
        "name": name,
        "start_s": start,
        "end_s": start + duration,
        "duration_s": duration,
        "domains": {
            "gpu": {"available": True, "source": "nvml_energy_counter", "method": "measured", "gross_j": gpu_j},
            "cpu": {"available": False, "reason": "synthetic"},
            "dram": {"available": False, "reason": "synthetic"},
        },
        "flags": [],
    }


def _cycle(point: Point, cycle: int, rng: np.random.Generator) -> tuple[dict, pd.DataFrame, pd.DataFrame, dict]:
    """One cycle's run result, timeline, requests and its metrics."""
    j_per_token, tokens_per_s = _scale(point)
    jitter = 1 + 0.05 * rng.standard_normal()
    output_tokens = REQUESTS_PER_CYCLE * 128
    window_s = output_tokens / (tokens_per_s * jitter)
    gpu_j = j_per_token * output_tokens * jitter
    t = 100.0
    phases = [
        ("model_load", 8.0 + rng.random() * 4, 80.0),
        ("compile", 6.0 if point.engine_path != "eager" else 0.2, 200.0),
        ("warmup", 3.0 + rng.random(), 300.0),
    ]
    setup = []
    for name, duration, power in phases:
        setup.append(_window(name, t, duration, power * duration))
        t += duration + 0.2
    baseline = {
        "kind": "active_idle",
        "start_s": t,
        "end_s": t + 3.0,
        "duration_s": 3.0,
        "domains": {
            "gpu": {
                "available": True,
                "power_w": 125.0,
                "source": "nvml_energy_counter",
                "method": "measured",
                "reason": None,
            }
        },
    }
    t += 3.5
    window = {**_window("inference", t, window_s, gpu_j), "start_unix_s": 1.8e9 + t, "repeats": 1}
    window["domains"]["gpu"].update(baseline_w=125.0, net_j=max(gpu_j - 125.0 * window_s, 0.0))
    prefill_s = max(window_s * 0.08, 0.2)
    prefill = {
        "start_s": t + window_s + 0.3,
        "end_s": t + window_s + 0.3 + prefill_s,
        "duration_s": prefill_s,
        "gross_j": gpu_j * 0.08,
        "repeats": 1,
        "input_tokens": REQUESTS_PER_CYCLE * 128,
        "flags": [],
    }
    end = prefill["end_s"] + 0.5
    times = np.arange(100.0 - 0.5, end, 1.0 / TIMELINE_HZ)
    power = np.full_like(times, 75.0)
    for w in setup:
        power[(times >= w["start_s"]) & (times < w["end_s"])] = w["domains"]["gpu"]["gross_j"] / w["duration_s"]
    power[(times >= baseline["start_s"]) & (times < baseline["end_s"])] = 125.0
    power[(times >= window["start_s"]) & (times < window["end_s"])] = gpu_j / window_s
    power[(times >= prefill["start_s"]) & (times < prefill["end_s"])] = prefill["gross_j"] / prefill_s
    power = np.clip(power * (1 + 0.04 * rng.standard_normal(len(times))), 50, 700)
    timeline = pd.DataFrame(
        {
            "time_s": times,
            "device_index": np.zeros(len(times), dtype="int64"),
            "device_uuid": GPU_UUID,
            "power_w": power,
            "energy_counter_j": np.cumsum(power) / TIMELINE_HZ,
            "sm_clock_mhz": np.where(power > 100, 1980.0, 345.0),
            "mem_clock_mhz": 2619.0,
            "temperature_c": 35 + np.cumsum(power - 120) / 4000,
            "gpu_utilization_pct": np.clip(power / 7, 0, 100),
            "mem_utilization_pct": np.clip(power / 10, 0, 100),
            "clocks_event_reasons": pd.array(np.ones(len(times), dtype="int64"), dtype="Int64"),
            "power_limit_w": 700.0,
        }
    )
    ttft = 0.01 * point.batch_size**0.4 * rng.lognormal(0, 0.3, REQUESTS_PER_CYCLE)
    tpot = window_s / 128 * rng.lognormal(0, 0.1, REQUESTS_PER_CYCLE) / max(1, REQUESTS_PER_CYCLE / point.batch_size)
    submitted = t + np.sort(rng.random(REQUESTS_PER_CYCLE)) * window_s * 0.9
    requests = pd.DataFrame(
        {
            "request_index": np.arange(REQUESTS_PER_CYCLE),
            "repeat": 0,
            "batch_index": np.arange(REQUESTS_PER_CYCLE) // point.batch_size,
            "input_tokens": 128,
            "output_tokens": 128,
            "submitted_s": submitted,
            "first_token_s": submitted + ttft,
            "finished_s": submitted + ttft + 127 * tpot,
            "e2e_s": ttft + 127 * tpot,
            "ttft_s": ttft,
            "tpot_s": tpot,
            "itl_mean_s": tpot,
            "token_times_s": [[] for _ in range(REQUESTS_PER_CYCLE)],
            "chunk_times_s": [[] for _ in range(REQUESTS_PER_CYCLE)],
            "chunk_tokens": [[] for _ in range(REQUESTS_PER_CYCLE)],
            "itl_s": [[] for _ in range(REQUESTS_PER_CYCLE)],
            "latency_source": "synthetic",
        }
    )
    size = float(point.model.split("-")[1].rstrip("b"))
    flops = 2 * size * 1e9 * (output_tokens + REQUESTS_PER_CYCLE * 128)
    metrics = {
        "gpu_energy_j": gpu_j,
        "gpu_net_energy_j": window["domains"]["gpu"]["net_j"],
        "gpu_energy_per_output_token_j": gpu_j / output_tokens,
        "output_tokens_per_s": output_tokens / window_s,
        "gpu_mean_power_w": gpu_j / window_s,
        "window_duration_s": window_s,
        "output_tokens": float(output_tokens),
        "prefill_gpu_energy_j": gpu_j * 0.08 * 0.5,
        "decode_gpu_energy_j": gpu_j * (1 - 0.04),
        "cpu_estimated_energy_j": 6.4 * window_s,
        "dram_estimated_energy_j": 37.8 * window_s,
        "host_estimated_energy_per_output_token_j": 44.2 * window_s / output_tokens,
        "achieved_flops_per_s": flops / window_s,
        "mfu": flops / window_s / 9.894e14,
        "mbu": min(size * 2e9 * 128 * REQUESTS_PER_CYCLE / point.batch_size / window_s / 3.35e12, 0.95),
        **{f"setup_{w['name']}_gpu_energy_j": w["domains"]["gpu"]["gross_j"] for w in setup},
        **{f"setup_{w['name']}_duration_s": w["duration_s"] for w in setup},
    }
    result = {
        "experiment_id": point.experiment_id,
        "cycle": cycle,
        "status": "ok",
        "error": None,
        "experiment": {
            "model": point.model,
            "backend": point.backend,
            "variant": point.variant,
            "dataset": point.dataset,
            "engine_path": point.engine_path,
            "parameters": {"batch_size": point.batch_size, **PARAMETERS},
        },
        "load": {"device": "cuda", "dtype": "bfloat16", "details": {}},
        "setup": {
            "duration_s": sum(w["duration_s"] for w in setup),
            "windows": setup,
            "baseline": {"active_idle": baseline, "static_idle": None},
        },
        "window": window,
        "tokens": {
            "requests": REQUESTS_PER_CYCLE,
            "input_tokens": REQUESTS_PER_CYCLE * 128,
            "output_tokens": output_tokens,
        },
        "metrics": {},
        "metrics_info": {},
        "phases": {"available": True, "method": "differential", "prefill_window": prefill},
        "energy_sources": {},
        "validity": {"flags": [], "valid": True},
    }
    timing = {
        "total_s": end - 99.5,
        "phases_s": {w["name"]: w["duration_s"] for w in setup} | {"baseline": 3.0},
        "windows_s": window_s + prefill_s,
    }
    return result, timeline, requests, {"metrics": metrics, "timing": timing}


def write_tree(root: Path | str, experiments: int, cycles: int = 3, seed: int = 0) -> list[str]:
    """Write experiments/*.json and runs/ for about `experiments` experiments; returns their ids."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    ids = []
    for point in grid(experiments):
        per_cycle, pooled = [], {"ttft_s": [], "tpot_s": [], "e2e_s": []}
        run_dir = root / "runs" / point.experiment_id
        entries = []
        for cycle in range(1, cycles + 1):
            result, timeline, requests, numbers = _cycle(point, cycle, rng)
            directory = run_dir / f"cycle-{cycle}"
            artifacts.write_table_artifact(directory / "requests.parquet", "requests_table", requests, PROVENANCE)
            artifacts.write_table_artifact(directory / "timeline.parquet", "timeline_table", timeline, PROVENANCE)
            artifacts.write_json_artifact(directory / "result.json", "run_result", result, PROVENANCE)
            entries.append({"cycle": cycle, "result": f"cycle-{cycle}/result.json", "status": "ok"})
            per_cycle.append(numbers)
            for key in pooled:
                pooled[key] += list(requests[key])
        timing = per_cycle[0]["timing"]
        job = {
            "total_s": timing["total_s"] + sum(n["timing"]["windows_s"] + 1.0 for n in per_cycle[1:]),
            "phases_s": {**timing["phases_s"], "windows": sum(n["timing"]["windows_s"] for n in per_cycle)},
            "windows_s": sum(n["timing"]["windows_s"] for n in per_cycle),
        }
        job["other_s"] = job["total_s"] - sum(job["phases_s"].values())
        job["share_in_windows"] = job["windows_s"] / job["total_s"]
        artifacts.write_json_artifact(
            run_dir / "cycles.json",
            "run_set",
            {
                "experiment_id": point.experiment_id,
                "cycle_isolation": "experiment",
                "cycles": entries,
                "measured_now": entries,
                "timing": job,
            },
            PROVENANCE,
        )
        names = per_cycle[0]["metrics"].keys()
        latency = {}
        for key, values in pooled.items():
            name = key.removesuffix("_s")
            array = np.asarray(values)
            latency.update(
                {
                    f"{name}_mean_s": float(array.mean()),
                    f"{name}_p50_s": float(np.percentile(array, 50)),
                    f"{name}_p90_s": float(np.percentile(array, 90)),
                    f"{name}_p99_s": float(np.percentile(array, 99)),
                    f"{name}_n": len(array),
                }
            )
        flags = {"power_throttled": 1} if point.batch_size >= 512 else {}
        data = {
            "experiment_id": point.experiment_id,
            "status": "ok",
            "experiment": {
                "model": point.model,
                "backend": point.backend,
                "variant": point.variant,
                "dataset": point.dataset,
                "engine_path": point.engine_path,
                "parameters": {"batch_size": point.batch_size, **PARAMETERS},
            },
            "gpu_name": GPU_NAME,
            "gpu_count": 1,
            "cycles_ok": cycles,
            "cycles_ok_list": list(range(1, cycles + 1)),
            "cycles_failed": [],
            "cycles_invalid": [],
            "flags": flags,
            "metrics": {name: describe([n["metrics"][name] for n in per_cycle]) for name in names},
            "metrics_info": dict(INFO),
            "flops": None,
            "latency": latency,
            "time_accounting": job,
        }
        artifacts.write_json_artifact(
            root / "experiments" / f"{point.experiment_id}.json",
            "experiment_result",
            data,
            {**PROVENANCE, "experiment": point.experiment_id},
        )
        ids.append(point.experiment_id)
    return ids
