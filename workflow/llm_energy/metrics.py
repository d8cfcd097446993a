"""Metric definitions: one place for every number the pipeline reports per run.

- input_tokens: prompt tokens without padding; output_tokens: tokens generated, without padding and
  without anything after end-of-sequence (the EOS token itself counts: it was computed).
- The measurement window runs from the first request submitted to the last token received.
- Derived metrics use output tokens as denominator unless the name says otherwise; the energy boundary
  (gpu, cpu, dram, or node = every available domain) is the first word of the name; units come last.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from llm_energy.backends.base import RequestRecord

DOMAINS = ("gpu", "cpu", "dram")
PERCENTILES = (50, 90, 99)


def distribution(values: Iterable[float]) -> dict[str, float | None]:
    """mean and p50/p90/p99 of the values (None for each when there are none)."""
    array = np.asarray([v for v in values if v is not None], dtype=float)
    if array.size == 0:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    return {"mean": float(array.mean()), **{f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES}}


def inter_token_latencies_s(record: RequestRecord) -> list[float]:
    """Gaps between consecutive output tokens, measured from streamed arrival times."""
    times = record.token_times_s or []
    return [b - a for a, b in zip(times, times[1:])]


def time_per_output_token_s(record: RequestRecord) -> float | None:
    """TPOT: (last token - first token) / (output tokens - 1); needs an observed first token."""
    if record.first_token_s is None or record.output_tokens < 2:
        return None
    return (record.finished_s - record.first_token_s) / (record.output_tokens - 1)


def latency_metrics(records: Sequence[RequestRecord]) -> dict[str, float | None]:
    """e2e, ttft, itl (streamed only) and tpot distributions as flat `<name>_<stat>_s` metrics."""
    series = {
        "e2e": [r.e2e_s for r in records],
        "ttft": [r.ttft_s for r in records],
        "itl": [gap for r in records for gap in inter_token_latencies_s(r)],
        "tpot": [time_per_output_token_s(r) for r in records],
    }
    flat: dict[str, float | None] = {}
    for name, values in series.items():
        for stat, value in distribution(values).items():
            flat[f"{name}_{stat}_s"] = value
    return flat


def window_bounds(records: Sequence[RequestRecord]) -> tuple[float, float]:
    """First request submitted to last token received."""
    return min(r.submitted_s for r in records), max(r.finished_s for r in records)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator


def energy_metrics(window: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, float | None], dict[str, str]]:
    """Per-domain gross/net energy and the node total of one energy window record.

    Returns (numbers, info): info names each domain's source and method, or why it is unavailable, and
    which domains the node total contains ("node" sums every available domain, so it is comparable only
    between runs with the same node_energy_domains).
    """
    numbers: dict[str, float | None] = {}
    info: dict[str, str] = {}
    node_gross: list[float] = []
    node_net: list[float | None] = []
    node_domains: list[str] = []
    methods: set[str] = set()
    domains = window.get("domains", {})
    for domain in DOMAINS:
        record = domains.get(domain, {"available": False, "reason": "not measured"})
        if record.get("available"):
            gross = float(record["gross_j"])
            net = record.get("net_j")
            numbers[f"{prefix}{domain}_energy_j"] = gross
            numbers[f"{prefix}{domain}_net_energy_j"] = net
            if not prefix:
                info[f"{domain}_energy_source"] = record.get("source", "unknown")
                info[f"{domain}_energy_method"] = record.get("method", "unknown")
            node_gross.append(gross)
            node_net.append(net)
            node_domains.append(domain)
            methods.add(record.get("method", "unknown"))
        else:
            numbers[f"{prefix}{domain}_energy_j"] = None
            numbers[f"{prefix}{domain}_net_energy_j"] = None
            if not prefix:
                info[f"{domain}_unavailable_reason"] = record.get("reason", "unknown")
    numbers[f"{prefix}node_energy_j"] = sum(node_gross) if node_gross else None
    numbers[f"{prefix}node_net_energy_j"] = (
        sum(node_net) if node_net and all(v is not None for v in node_net) else None
    )
    if not prefix:
        info["node_energy_domains"] = "+".join(node_domains) if node_domains else "none"
        info["node_energy_method"] = (
            "none" if not methods else methods.pop() if len(methods) == 1 else "mixed"
        )
    return numbers, info


def run_metrics(
    records: Sequence[RequestRecord],
    window: Mapping[str, Any],
    setup_windows: Sequence[Mapping[str, Any]] = (),
    phases: Mapping[str, Any] | None = None,
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Every per-run metric: tokens, throughput, energy per domain and per token, latency."""
    duration = float(window["duration_s"])
    input_tokens = sum(r.input_tokens for r in records)
    output_tokens = sum(r.output_tokens for r in records)
    metrics: dict[str, float | None] = {
        "window_duration_s": duration,
        "setup_duration_s": sum(float(w["duration_s"]) for w in setup_windows),
        "requests": float(len(records)),
        "input_tokens": float(input_tokens),
        "output_tokens": float(output_tokens),
        "output_tokens_per_s": _ratio(output_tokens, duration),
        "input_tokens_per_s": _ratio(input_tokens, duration),
        "requests_per_s": _ratio(len(records), duration),
    }
    energy, info = energy_metrics(window)
    metrics.update(energy)
    for boundary in ("gpu", "cpu", "dram", "node"):
        metrics[f"{boundary}_energy_per_output_token_j"] = _ratio(energy[f"{boundary}_energy_j"], output_tokens)
        metrics[f"{boundary}_net_energy_per_output_token_j"] = _ratio(energy[f"{boundary}_net_energy_j"], output_tokens)
        metrics[f"{boundary}_output_tokens_per_j"] = _ratio(output_tokens, energy[f"{boundary}_energy_j"])
        metrics[f"{boundary}_mean_power_w"] = _ratio(energy[f"{boundary}_energy_j"], duration)
    gpu = window.get("domains", {}).get("gpu", {})
    metrics["timeline_vs_counter_rel_diff"] = gpu.get("timeline_vs_counter_rel_diff") if gpu.get("available") else None
    for setup in setup_windows:
        setup_energy, _ = energy_metrics(setup, prefix=f"setup_{setup['name']}_")
        metrics.update({k: v for k, v in setup_energy.items() if "net" not in k})
        metrics[f"setup_{setup['name']}_duration_s"] = float(setup["duration_s"])
    for boundary in ("gpu", "node"):
        values = [metrics.get(f"setup_{w['name']}_{boundary}_energy_j") for w in setup_windows]
        metrics[f"setup_{boundary}_energy_j"] = sum(values) if values and all(v is not None for v in values) else None
    emissions = window.get("emissions", {})
    metrics["emissions_kg_co2eq"] = emissions.get("kg_co2eq") if emissions.get("available") else None
    if phases and phases.get("available", True) and "prefill_j" in phases:
        metrics["prefill_gpu_energy_j"] = phases["prefill_j"]
        metrics["decode_gpu_energy_j"] = phases["decode_j"]
        if phases.get("method") == "differential":
            # Measured per token by the prefill-only window; decode per decode token (after the first).
            metrics["gpu_prefill_energy_per_input_token_j"] = phases["prefill_energy_per_input_token_j"]
            metrics["gpu_decode_energy_per_output_token_j"] = phases["decode_energy_per_decode_token_j"]
        else:
            metrics["gpu_prefill_energy_per_input_token_j"] = _ratio(phases["prefill_j"], input_tokens)
            metrics["gpu_decode_energy_per_output_token_j"] = _ratio(phases["decode_j"], output_tokens)
        info["phase_split_method"] = str(phases.get("method", "unknown"))
    else:
        for key in ("prefill_gpu_energy_j", "decode_gpu_energy_j", "gpu_prefill_energy_per_input_token_j",
                    "gpu_decode_energy_per_output_token_j"):
            metrics[key] = None
        if phases:
            info["phase_split_unavailable_reason"] = str(phases.get("reason", "unknown"))
    metrics.update(latency_metrics(records))
    info["latency_source"] = ",".join(sorted({r.latency_source for r in records}))
    return metrics, info
