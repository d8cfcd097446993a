"""The measurement harness: one run of one experiment (one cycle).

It owns the sequence  setup (model load) -> warm-up -> open window -> generate -> close window ->
write artifacts, the clock and the energy session. Backends and energy sources are looked up by name;
the harness knows neither's internals. Setup is measured (time and energy) but never inside the window.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from llm_energy import artifacts, clock, hardware, metrics
from llm_energy.backends import create_backend
from llm_energy.backends.base import DecodingSettings, Request, RequestRecord
from llm_energy.config import Experiment
from llm_energy.energy import EnergySession, EnergySettings
from llm_energy.energy.validity import invalidating_flags
from llm_energy.errors import BackendError, ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPaths:
    result: Path
    requests: Path
    timeline: Path


def decoding_settings(experiment: Experiment, cycle: int) -> DecodingSettings:
    p = experiment.parameters
    return DecodingSettings(
        mode=p["decoding_mode"], temperature=p["temperature"], top_p=p["top_p"], top_k=p["top_k"],
        output_length=p["output_length"], max_output_tokens=p["max_output_tokens"],
        # Each cycle samples with its own seed, so sampled cycles are independent yet reproducible.
        seed=experiment.seed + cycle,
    )


def backend_settings(experiment: Experiment) -> dict[str, Any]:
    settings = dict(experiment.backend_settings)
    settings["trust_remote_code"] = experiment.model_spec.get("trust_remote_code", False)
    settings["batching"] = experiment.parameters["batching"]
    settings["token_budget"] = experiment.parameters["token_budget"]
    return settings


def max_model_len(experiment: Experiment) -> int:
    configured = experiment.model_spec.get("max_model_len")
    needed = experiment.parameters["max_input_tokens"] + experiment.parameters["max_output_tokens"]
    return configured or needed


def select_requests(requests: list[Request], experiment: Experiment) -> tuple[list[Request], list[Request]]:
    """(warm-up requests, measured requests). Warm-up reuses the first prompts: it only has to run
    the same kernels at the same shapes; the measured set is every prompt (or requests_per_cycle)."""
    wanted = experiment.request_count(experiment.requests_per_cycle)
    if wanted is not None and wanted > len(requests):
        raise ConfigError(
            "campaign.requests_per_cycle",
            f"asks for {wanted} requests but dataset '{experiment.dataset}' has {len(requests)} prompts",
            f"Lower it, or give datasets.{experiment.dataset} more prompts (sample_size / count).",
        )
    measured = list(requests[:wanted]) if wanted else list(requests)
    warmup = list(requests[: experiment.request_count(experiment.warmup_requests)])
    return warmup, measured


def requests_frame(records: list[RequestRecord]) -> pd.DataFrame:
    """One row per request; latencies as llm_energy.metrics defines them. `itl_s` holds the request's
    every ITL sample (one per chunk gap), so that aggregation can pool the samples over cycles."""
    rows = []
    for r in records:
        itl = metrics.inter_token_latencies_s(r)
        tpot = metrics.time_per_output_token_s(r)
        chunk_times, chunk_tokens = r.arrivals()
        rows.append({
            "request_index": r.index,
            "batch_index": -1 if r.batch_index is None else r.batch_index,
            "input_tokens": r.input_tokens,
            "output_tokens": r.output_tokens,
            "submitted_s": r.submitted_s,
            "first_token_s": float("nan") if r.first_token_s is None else r.first_token_s,
            "finished_s": r.finished_s,
            "e2e_s": r.e2e_s,
            "ttft_s": float("nan") if r.ttft_s is None else r.ttft_s,
            "tpot_s": float("nan") if tpot is None else tpot,
            "itl_mean_s": sum(itl) / len(itl) if itl else float("nan"),
            "token_times_s": list(r.token_times_s or []),
            "chunk_times_s": chunk_times,
            "chunk_tokens": chunk_tokens,
            "itl_s": itl,
            "latency_source": r.latency_source,
        })
    columns = ["request_index", "batch_index", "input_tokens", "output_tokens", "submitted_s", "first_token_s",
               "finished_s", "e2e_s", "ttft_s", "tpot_s", "itl_mean_s", "token_times_s", "chunk_times_s",
               "chunk_tokens", "itl_s", "latency_source"]
    return pd.DataFrame(rows, columns=columns)


def _prefill_spans(records: list[RequestRecord]) -> list[tuple[float, float]]:
    """Submission to first token of each request: the time its prompt was being processed."""
    return [(r.submitted_s, r.first_token_s) for r in records if r.first_token_s is not None]


def _failed_result(experiment: Experiment, cycle: int, error: str, setup: list[dict], energy_sources: dict,
                   gpu_state: dict) -> dict:
    return {
        "experiment_id": experiment.id, "cycle": cycle, "status": "failed", "error": error,
        "experiment": {"model": experiment.model, "backend": experiment.backend, "variant": experiment.variant,
                       "dataset": experiment.dataset,
                       "parameters": experiment.parameters},
        "load": None, "setup": {"duration_s": sum(w["duration_s"] for w in setup), "windows": setup},
        "window": None, "tokens": None, "metrics": {}, "metrics_info": {}, "phases": None,
        "energy_sources": energy_sources, "gpu_state": gpu_state,
        "validity": {"flags": ["failed"], "valid": False},
    }


def run_cycle(
    experiment: Experiment,
    cycle: int,
    model_dir: Path,
    prompts: list[str],
    energy_config: dict[str, Any],
    paths: RunPaths,
    provenance: dict[str, Any],
    baseline_path: Path | None = None,
) -> dict:
    """Measure one cycle of `experiment` and write its three artifacts. Returns the run result data.

    Engine errors (BackendError: out of memory, unsupported model, engine missing) are recorded as a
    failed run with the reason, so the campaign goes on; anything else is a bug and propagates.
    """
    devices = hardware.visible_gpus()
    session = EnergySession(EnergySettings.from_config(energy_config), devices=devices, baseline_path=baseline_path)
    decoding = decoding_settings(experiment, cycle)
    setup_windows: list[dict] = []
    backend = None
    log.info("experiment %s cycle %d: %d prompts, GPUs used: %s", experiment.id, cycle, len(prompts),
             [d.uuid for d in devices] or "none")
    gpu_state = {"start": hardware.describe_gpus(devices), "end": []}  # temperatures, clocks, limits
    session.start()
    try:
        baseline = session.ensure_baseline()
        log.info("idle baseline: %s", baseline)
        try:
            handle = session.open_window("model_load")
            backend = create_backend(experiment.backend, backend_settings(experiment))
            load_report = backend.load(model_dir, experiment.parameters["dtype"], max_model_len(experiment),
                                       experiment.parameters["batch_size"])
            backend.synchronize()
            setup_windows.append(session.close_window(handle))
            requests = backend.tokenize(prompts, experiment.parameters["max_input_tokens"])
            warmup, measured = select_requests(requests, experiment)
            if warmup:
                handle = session.open_window("warmup")
                backend.generate(warmup, experiment.parameters["batch_size"], decoding)
                backend.synchronize()
                setup_windows.append(session.close_window(handle))
            log.info("measuring %d requests", len(measured))
            handle = session.open_window("inference")
            records = backend.generate(measured, experiment.parameters["batch_size"], decoding)
            backend.synchronize()
            window = session.close_window(handle)
            gpu_state["end"] = hardware.describe_gpus(devices)
        except BackendError as exc:
            log.error("experiment %s cycle %d failed: %s", experiment.id, cycle, exc)
            session.stop()
            gpu_state["end"] = hardware.describe_gpus(devices)
            result = _failed_result(experiment, cycle, str(exc), setup_windows, session.describe(), gpu_state)
            artifacts.write_table_artifact(paths.requests, "requests_table", requests_frame([]), provenance)
            artifacts.write_table_artifact(paths.timeline, "timeline_table", session.timeline_frame(), provenance)
            artifacts.write_json_artifact(paths.result, "run_result", result, provenance)
            return result
    finally:
        session.stop()
        if backend is not None:
            backend.close()

    timeline = session.timeline_frame()
    from llm_energy.energy.phases import split_prefill_decode

    phases = split_prefill_decode(timeline, window, _prefill_spans(records))
    run_metrics, info = metrics.run_metrics(records, window, setup_windows, phases)
    first_submitted, last_finished = metrics.window_bounds(records)
    flags = sorted(set(window.get("flags", [])))
    result = {
        "experiment_id": experiment.id,
        "cycle": cycle,
        "status": "ok",
        "error": None,
        "experiment": {"model": experiment.model, "backend": experiment.backend, "variant": experiment.variant,
                       "dataset": experiment.dataset,
                       "parameters": experiment.parameters},
        "load": {"device": load_report.device, "dtype": load_report.dtype, "details": load_report.details},
        "setup": {"duration_s": sum(w["duration_s"] for w in setup_windows), "windows": setup_windows,
                  "baseline": baseline},
        "window": {**window, "start_unix_s": window["start_s"] + clock.wall_offset_s(),
                   "first_request_submitted_s": first_submitted, "last_token_received_s": last_finished},
        "tokens": {"requests": len(records), "input_tokens": int(run_metrics["input_tokens"]),
                   "output_tokens": int(run_metrics["output_tokens"]),
                   "warmup_requests": len(warmup)},
        "metrics": run_metrics,
        "metrics_info": info,
        "phases": phases,
        "energy_sources": session.describe(),
        "gpu_state": gpu_state,
        "validity": {"flags": flags, "valid": not invalidating_flags(flags)},
    }
    artifacts.write_table_artifact(paths.requests, "requests_table", requests_frame(records), provenance)
    artifacts.write_table_artifact(paths.timeline, "timeline_table", timeline, provenance)
    # The result is written last: its presence marks a complete run (Snakemake checks all three).
    artifacts.write_json_artifact(paths.result, "run_result", result, provenance)
    log.info("done: %.1f output tokens/s, window %.2f s, flags %s",
             run_metrics["output_tokens_per_s"] or 0, window["duration_s"], flags or "none")
    return result


def job_provenance() -> dict[str, Any]:
    """Scheduler facts (SLURM job id etc.) for the run artifacts."""
    keys = ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_JOB_NODELIST", "SLURM_JOB_PARTITION", "SLURM_CLUSTER_NAME")
    return {k.lower(): os.environ[k] for k in keys if k in os.environ}
