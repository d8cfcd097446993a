"""Metric definitions: one place for every number the pipeline reports per run.

- input_tokens: prompt tokens without padding; output_tokens: tokens generated, without padding and
  without anything after end-of-sequence (the EOS token itself counts: it was computed).
- The measurement window runs from the first request submitted to the last token received.
- Derived metrics use output tokens as denominator unless the name says otherwise; the energy boundary
  (gpu, cpu, dram, or node) is the first word of the name; units come last.
- Measured totals stay measured: `<domain>_energy_j` (and its net, per-token, per-joule and power
  metrics) holds a *measured* value only (NVML counter, RAPL); `node_energy_j` / `node_net_energy_j`
  sum the measured domains only, named in `node_energy_domains`.
- Estimates have their own columns: `cpu_estimated_energy_j` and `dram_estimated_energy_j` hold
  CodeCarbon's model estimate where a domain was not measured, `host_estimated_energy_j` their sum
  (cpu+dram, both estimated, named in `host_estimated_energy_domains`), each with
  `..._per_output_token_j`. They are never added to a measured total.

Latency, per request, as vLLM's serving benchmark defines it (`vllm bench serve`:
vllm/benchmarks/lib/endpoint_request_func.py and serve.py), from the timestamps of its RequestRecord:
- TTFT = its first token reaching the caller - its submission;
- e2e = its OWN last token - its submission (never the end of the batch it ran in);
- TPOT = (own last token - own first token) / (output tokens - 1); none for a request of one token;
- ITL = one value per chunk after the first: the gap between consecutive chunk arrivals. A chunk that
  carries several tokens (a streaming engine merges them when the caller lags) gives ONE gap, never
  zero gaps; a backend that sees every token on its own gives one gap per token. A request's ITLs sum
  to e2e - TTFT; a backend without arrival times (vLLM offline) has no ITLs.
Each latency is a distribution over its samples, pooled: every request of a run here (repeats of the
request set included), every request of every cycle in the experiment result (llm_energy.aggregate).
Metrics: `<name>_mean_s`, `<name>_p50_s`, `<name>_p90_s`, `<name>_p99_s` and `<name>_n` (samples). A
percentile needs enough samples to be one: p50 needs 1, p90 10, p99 100 (below that a "p99" is an
interpolation between the largest few values); it is None below, with
`<name>_p<p>_unavailable_reason` in metrics_info (`<name>_unavailable_reason` when there is no sample).
Percentiles are numpy's linear interpolation, as in vLLM's benchmark.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from llm_energy.backends.base import RequestRecord
from llm_energy.statistics import describe

DOMAINS = ("gpu", "cpu", "dram")
# Percentile -> the fewest samples it is reported from.
PERCENTILE_MIN_SAMPLES: dict[int, int] = {50: 1, 90: 10, 99: 100}
PERCENTILES = tuple(PERCENTILE_MIN_SAMPLES)
LATENCY_NAMES = ("e2e", "ttft", "itl", "tpot")
# Every metric key and metrics_info reason key the latency distributions produce.
LATENCY_METRIC_NAMES: tuple[str, ...] = tuple(
    key for name in LATENCY_NAMES for key in (f"{name}_mean_s", *(f"{name}_p{p}_s" for p in PERCENTILES), f"{name}_n")
)
LATENCY_REASON_KEYS: tuple[str, ...] = tuple(
    key
    for name in LATENCY_NAMES
    for key in (f"{name}_unavailable_reason", *(f"{name}_p{p}_unavailable_reason" for p in PERCENTILES))
)
# Why a latency has no sample at all (the records say where their timestamps came from).
NO_SAMPLE_REASONS: dict[str, str] = {
    "e2e": "no request was measured",
    "ttft": "the backend did not observe any request's first token",
    "itl": (
        "no request has two or more chunk arrival times (the backend reports only first and last token, "
        "or every request was one chunk)"
    ),
    "tpot": "no request has an observed first token and two or more output tokens",
}


def distribution(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """n, mean and p50/p90/p99 of the values (None and NaN skipped); a percentile is None below
    PERCENTILE_MIN_SAMPLES, every statistic is None without samples."""
    array = np.asarray([v for v in values if v is not None], dtype=float)
    array = array[np.isfinite(array)]
    result: dict[str, float | int | None] = {"n": int(array.size), "mean": float(array.mean()) if array.size else None}
    for p, needed in PERCENTILE_MIN_SAMPLES.items():
        result[f"p{p}"] = float(np.percentile(array, p)) if array.size >= needed else None
    return result


def inter_token_latencies_s(record: RequestRecord) -> list[float]:
    """ITL: one gap per chunk after the first, between consecutive arrivals at the caller."""
    times, _ = record.arrivals()
    return [b - a for a, b in zip(times, times[1:])]


def time_per_output_token_s(record: RequestRecord) -> float | None:
    """TPOT: (own last token - own first token) / (output tokens - 1); None without an observed first
    token or with fewer than 2 output tokens."""
    if record.first_token_s is None or record.output_tokens < 2:
        return None
    return (record.last_token_s - record.first_token_s) / (record.output_tokens - 1)


def latency_samples(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """Every sample of each latency: one e2e, TTFT and TPOT per request (where defined), one ITL per gap."""
    return {
        "e2e": [r.e2e_s for r in records],
        "ttft": [r.ttft_s for r in records if r.ttft_s is not None],
        "itl": [gap for r in records for gap in inter_token_latencies_s(r)],
        "tpot": [t for t in (time_per_output_token_s(r) for r in records) if t is not None],
    }


def latency_distributions(
    samples: Mapping[str, Sequence[float]],
    where: str = "",
) -> tuple[dict[str, float | None], dict[str, str]]:
    """The latency metrics (LATENCY_METRIC_NAMES) of pooled samples, and the reasons of those that are None.
    `where` says what was pooled (for the reasons)."""
    flat: dict[str, float | None] = {}
    reasons: dict[str, str] = {}
    pooled = f" pooled over {where}" if where else ""
    for name in LATENCY_NAMES:
        stats = distribution(samples.get(name, ()))
        n = int(stats["n"] or 0)
        flat[f"{name}_n"] = float(n)
        flat[f"{name}_mean_s"] = stats["mean"]
        for p, needed in PERCENTILE_MIN_SAMPLES.items():
            flat[f"{name}_p{p}_s"] = stats[f"p{p}"]
            if 0 < n < needed:
                reasons[f"{name}_p{p}_unavailable_reason"] = (
                    f"{n} {name} samples{pooled}; a p{p} needs at least {needed}"
                )
        if n == 0:
            reasons[f"{name}_unavailable_reason"] = NO_SAMPLE_REASONS[name]
    return flat, reasons


def latency_metrics(records: Sequence[RequestRecord]) -> tuple[dict[str, float | None], dict[str, str]]:
    """e2e, TTFT, ITL and TPOT distributions of one run (see the module docstring), and metrics_info:
    latency_source (where the timestamps were taken) and the reasons of unavailable statistics."""
    flat, info = latency_distributions(latency_samples(records), f"the {len(records)} requests of the run")
    info["latency_source"] = ",".join(sorted({r.latency_source for r in records}))
    return flat, info


def goodput(
    records: Sequence[RequestRecord], window_s: float | None, ttft_s: float | None, tpot_s: float | None
) -> dict[str, float | int | None]:
    """Request throughput and goodput under latency objectives, as vLLM's serving benchmark defines
    them: goodput = requests meeting every objective that is set (TTFT <= ttft_s and TPOT <= tpot_s)
    per second of the window. A request without a TPOT (one output token) meets the TPOT objective;
    one whose first token was not observed cannot meet a TTFT objective."""
    met = 0
    for r in records:
        ttft = r.ttft_s
        tpot = time_per_output_token_s(r)
        ok_ttft = ttft_s is None or (ttft is not None and ttft <= ttft_s)
        ok_tpot = tpot_s is None or tpot is None or tpot <= tpot_s
        met += ok_ttft and ok_tpot
    rate = window_s if window_s and window_s > 0 else None
    return {
        "request_throughput_per_s": len(records) / rate if rate else None,
        "goodput_requests_per_s": met / rate if rate else None,
        "slo_met_requests": met,
        "slo_met_share": met / len(records) if records else None,
    }


def window_bounds(records: Sequence[RequestRecord]) -> tuple[float, float]:
    """First request submitted to last token received."""
    return min(r.submitted_s for r in records), max(r.finished_s for r in records)


def work_duration_s(records: Sequence[RequestRecord], window_duration_s: float) -> float:
    """First request submitted to last token received; the window's own duration without requests."""
    if not records:
        return window_duration_s
    first, last = window_bounds(records)
    return last - first


# The fewest repeats of the request set in one window that a pace spread is computed from.
PACE_MIN_REPEATS = 3
PACE_METRICS = ("repeats_in_window", "repeat_time_cv_in_window", "repeat_time_spread_in_window")


def repeat_pace(
    records: Sequence[RequestRecord], repeats: Sequence[int]
) -> tuple[dict[str, float | None], dict[str, str]]:
    """How steady the work's pace was inside one window. Every repeat of the request set
    (campaign.min_window_s) is the same work, so its duration (first submission to last token of that
    repeat) changes only when the engine or its host changes pace: a spread here is in the machine, and
    it is what makes cycles disagree when the window holds few repeats.

    `repeat_time_cv_in_window` is std/mean of the repeats' durations, `repeat_time_spread_in_window`
    max/min - 1; both None below PACE_MIN_REPEATS repeats (the reason in metrics_info)."""
    by_repeat: dict[int, list[RequestRecord]] = {}
    for record, repeat in zip(records, repeats):
        by_repeat.setdefault(int(repeat), []).append(record)
    return pace_of_durations([last - first for first, last in map(window_bounds, by_repeat.values())])


def pace_of_durations(repeat_durations_s: Sequence[float]) -> tuple[dict[str, float | None], dict[str, str]]:
    """repeat_pace's figures from the repeats' durations themselves (also for a loop timed without
    records, such as the harness-overhead benchmark's bare engine)."""
    durations = describe(repeat_durations_s)
    pace: dict[str, float | None] = {**dict.fromkeys(PACE_METRICS), "repeats_in_window": float(durations["n"])}
    if durations["n"] < PACE_MIN_REPEATS or durations["min"] <= 0:
        reason = f"{durations['n']} repeat(s) of the request set in the window; the spread needs {PACE_MIN_REPEATS}"
        return pace, {"repeat_time_unavailable_reason": reason}
    pace["repeat_time_cv_in_window"] = durations["cv"]
    pace["repeat_time_spread_in_window"] = durations["max"] / durations["min"] - 1.0
    return pace, {}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator


def energy_metrics(window: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, float | None], dict[str, str]]:
    """Per-domain gross/net energy, the measured node total and the estimates of one window record.

    Returns (numbers, info): info names each domain's source and method, or why it is unavailable, and
    which domains the node total contains ("node" sums every *measured* domain, so it is comparable
    only between runs with the same node_energy_domains). Estimated domains go to
    `<domain>_estimated_energy_j` and `host_estimated_energy_j`, never into a measured column.
    """
    numbers: dict[str, float | None] = {}
    info: dict[str, str] = {}
    node_gross: list[float] = []
    node_net: list[float | None] = []
    node_domains: list[str] = []
    estimated: dict[str, float] = {}
    domains = window.get("domains", {})
    for domain in DOMAINS:
        record = domains.get(domain, {"available": False, "reason": "not measured"})
        if domain != "gpu":
            numbers[f"{prefix}{domain}_estimated_energy_j"] = None
        if record.get("available") and record.get("method") == "estimated" and domain != "gpu":
            estimated[domain] = float(record["gross_j"])
            numbers[f"{prefix}{domain}_estimated_energy_j"] = estimated[domain]
            numbers[f"{prefix}{domain}_energy_j"] = None
            numbers[f"{prefix}{domain}_net_energy_j"] = None
            if not prefix:
                info[f"{domain}_energy_source"] = record.get("source", "unknown")
                info[f"{domain}_energy_method"] = "estimated"
                info[f"{domain}_unavailable_reason"] = (
                    f"not measured; CodeCarbon's estimate is in {domain}_estimated_energy_j"
                )
        elif record.get("available"):
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
        else:
            numbers[f"{prefix}{domain}_energy_j"] = None
            numbers[f"{prefix}{domain}_net_energy_j"] = None
            if not prefix:
                info[f"{domain}_unavailable_reason"] = record.get("reason", "unknown")
    numbers[f"{prefix}node_energy_j"] = sum(node_gross) if node_gross else None
    numbers[f"{prefix}node_net_energy_j"] = sum(node_net) if node_net and all(v is not None for v in node_net) else None
    numbers[f"{prefix}host_estimated_energy_j"] = sum(estimated.values()) if estimated else None
    if not prefix:
        info["node_energy_domains"] = "+".join(node_domains) if node_domains else "none"
        info["node_energy_method"] = "measured" if node_domains else "none"
        info["host_estimated_energy_domains"] = "+".join(estimated) if estimated else "none"
        if estimated:
            info["host_estimated_energy_method"] = "estimated (CodeCarbon model)"
    return numbers, info


def run_metrics(
    records: Sequence[RequestRecord],
    window: Mapping[str, Any],
    setup_windows: Sequence[Mapping[str, Any]] = (),
    phases: Mapping[str, Any] | None = None,
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Every per-run metric: tokens, throughput, energy per domain and per token, latency.

    Two durations: `window_duration_s` is the energy window, edge to edge, which the NVML counter's
    alignment stretches past the work (the closing edge waits for the counter's next update, 0-1
    period, ~56 ms on average on an H200 against 3 s windows); `work_duration_s` runs from the first
    request's submission to the last token received. Energy and mean power use the former (the
    counter's span), throughput and utilisation the latter: the work's own pace, as a bare loop
    timing the same calls would see it."""
    duration = float(window["duration_s"])
    work = work_duration_s(records, duration)
    input_tokens = sum(r.input_tokens for r in records)
    output_tokens = sum(r.output_tokens for r in records)
    metrics: dict[str, float | None] = {
        "window_duration_s": duration,
        "work_duration_s": work,
        "setup_duration_s": sum(float(w["duration_s"]) for w in setup_windows),
        "requests": float(len(records)),
        "input_tokens": float(input_tokens),
        "output_tokens": float(output_tokens),
        "output_tokens_per_s": _ratio(output_tokens, work),
        "input_tokens_per_s": _ratio(input_tokens, work),
        "requests_per_s": _ratio(len(records), work),
    }
    energy, info = energy_metrics(window)
    metrics.update(energy)
    for boundary in ("gpu", "cpu", "dram", "node"):
        metrics[f"{boundary}_energy_per_output_token_j"] = _ratio(energy[f"{boundary}_energy_j"], output_tokens)
        metrics[f"{boundary}_net_energy_per_output_token_j"] = _ratio(energy[f"{boundary}_net_energy_j"], output_tokens)
        metrics[f"{boundary}_output_tokens_per_j"] = _ratio(output_tokens, energy[f"{boundary}_energy_j"])
        metrics[f"{boundary}_mean_power_w"] = _ratio(energy[f"{boundary}_energy_j"], duration)
    for estimate in ("cpu_estimated", "dram_estimated", "host_estimated"):
        metrics[f"{estimate}_energy_per_output_token_j"] = _ratio(energy[f"{estimate}_energy_j"], output_tokens)
    gpu = window.get("domains", {}).get("gpu", {})
    metrics["timeline_vs_counter_rel_diff"] = gpu.get("timeline_vs_counter_rel_diff") if gpu.get("available") else None
    for setup in setup_windows:
        setup_energy, _ = energy_metrics(setup, prefix=f"setup_{setup['name']}_")
        metrics.update({k: v for k, v in setup_energy.items() if "net" not in k and "estimated" not in k})
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
        for key in (
            "prefill_gpu_energy_j",
            "decode_gpu_energy_j",
            "gpu_prefill_energy_per_input_token_j",
            "gpu_decode_energy_per_output_token_j",
        ):
            metrics[key] = None
        if phases:
            info["phase_split_unavailable_reason"] = str(phases.get("reason", "unknown"))
    latency, latency_info = latency_metrics(records)
    metrics.update(latency)
    info.update(latency_info)
    return metrics, info
