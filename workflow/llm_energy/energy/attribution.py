"""Energy of a part of a window: the steady state of a run under load, and each request's share.

The GPU counter is read at the window's edges only, so the energy of a span inside the window is the
counter's gross energy times the span's share of the power timeline's integral over the window (the
counter sets the total, the timeline how it is spread): llm_energy.energy.phases.CounterSpread, the
rule of the timeline prefill/decode split too. Per request, energy is *attributed*, never measured, two ways:
- by tokens: the window's energy times the request's share of the window's output tokens;
- by time overlap: each moment's energy is shared equally by the requests in flight at that moment
  (in flight: from its submission to its own last token), summed over the request's lifetime.
Energy in moments when no request is in flight (gaps of an open-loop run) belongs to no request: it is
reported as `unattributed_j` beside the per-request figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from llm_energy.backends.base import RequestRecord
from llm_energy.energy.phases import CounterSpread
from llm_energy.load import SteadyState, in_flight_steps, steady_state, tokens_between
from llm_energy.metrics import goodput

METHOD = "nvml counter over the window, spread over time by the power timeline"
ATTRIBUTION_METHODS = {
    "attributed_gpu_energy_by_tokens_j": "window GPU energy x the request's share of output tokens",
    "attributed_gpu_energy_by_time_j": "GPU energy of each moment shared equally by the requests in flight",
}


def steady_state_energy(
    timeline: pd.DataFrame,
    window_record: Mapping[str, Any],
    steady: SteadyState | None,
    records: Sequence[RequestRecord],
    spread: CounterSpread | None = None,
) -> dict[str, Any]:
    """GPU energy, output tokens and J per output token of the steady state, with its bounds and flags
    (`spread`: the window's CounterSpread where the caller has it already)."""
    if steady is None:
        return {"available": False, "reason": "no requests in the window"}
    spreader = spread or CounterSpread(timeline, window_record)
    if not spreader.available:
        return {"available": False, "reason": spreader.reason, **steady.describe()}
    energy = spreader.energy_j(steady.start_s, steady.end_s)
    tokens = tokens_between(records, steady.start_s, steady.end_s)
    return {
        "available": True,
        "method": METHOD,
        **steady.describe(),
        "gpu_energy_j": energy,
        "output_tokens": tokens,
        "gpu_energy_per_output_token_j": energy / tokens if tokens else None,
    }


def attribute_energy(
    records: Sequence[RequestRecord],
    timeline: pd.DataFrame,
    window_record: Mapping[str, Any],
    spread: CounterSpread | None = None,
) -> dict[str, Any]:
    """Per request (in `records` order) its attributed GPU energy, by tokens and by time overlap."""
    spreader = spread or CounterSpread(timeline, window_record)
    if not spreader.available or not records:
        return {"available": False, "reason": spreader.reason or "no requests in the window"}
    output_tokens = np.array([r.output_tokens for r in records], dtype=float)
    by_tokens = (
        (float(spreader.gross_j) * output_tokens / output_tokens.sum()).tolist()
        if output_tokens.sum()
        else [None] * len(records)
    )
    times, _ = in_flight_steps(records)
    edges = np.unique(
        np.clip(np.concatenate(([spreader.start_s], times, [spreader.end_s])), spreader.start_s, spreader.end_s)
    )
    starts = np.array([r.submitted_s for r in records])
    ends = np.array([r.last_token_s for r in records])
    by_time = np.zeros(len(records))
    unattributed = 0.0
    for a, b in zip(edges[:-1], edges[1:]):
        energy = spreader.energy_j(a, b)
        middle = (a + b) / 2
        active = (starts <= middle) & (ends > middle)
        if active.any():
            by_time[active] += energy / active.sum()
        else:
            unattributed += energy
    return {
        "available": True,
        "method": METHOD,
        "methods": ATTRIBUTION_METHODS,
        "attributed_gpu_energy_by_tokens_j": by_tokens,
        "attributed_gpu_energy_by_time_j": by_time.tolist(),
        "unattributed_j": unattributed,
    }


def load_window_results(
    records: Sequence[RequestRecord],
    timeline: pd.DataFrame,
    window_record: Mapping[str, Any],
    max_concurrency: int | None,
    slo: Mapping[str, float | None],
) -> dict[str, Any]:
    """Everything a window under load adds to its cycle: the steady state with its energy, goodput, and
    each request's attributed energy. `metrics` are run metrics (numbers), `info` metrics_info strings,
    `per_request` columns for the requests table (in `records` order), `flags` for the cycle."""
    spread = CounterSpread(timeline, window_record)  # once: the steady state and the attribution share it
    steady = steady_state(records, max_concurrency)
    steady_energy = steady_state_energy(timeline, window_record, steady, records, spread)
    rates = goodput(records, window_record.get("duration_s"), slo.get("ttft_s"), slo.get("tpot_s"))
    attributed = attribute_energy(records, timeline, window_record, spread)
    queued = [r.queue_s for r in records if r.queue_s is not None]
    objectives = any(v is not None for v in slo.values())
    metrics = {
        "request_throughput_per_s": rates["request_throughput_per_s"],
        "goodput_requests_per_s": rates["goodput_requests_per_s"] if objectives else None,
        "slo_met_share": rates["slo_met_share"] if objectives else None,
        "queue_mean_s": sum(queued) / len(queued) if queued else None,
        "steady_state_duration_s": steady.duration_s if steady else None,
        "steady_state_gpu_energy_j": steady_energy.get("gpu_energy_j"),
        "steady_state_gpu_energy_per_output_token_j": steady_energy.get("gpu_energy_per_output_token_j"),
    }
    per_request: dict[str, list] = {name: [None] * len(records) for name in ATTRIBUTION_METHODS}
    if attributed["available"]:
        for name in ATTRIBUTION_METHODS:
            per_request[name] = attributed[name]
            values = [v for v in attributed[name] if v is not None]
            metrics[f"{name.removesuffix('_j')}_per_request_mean_j"] = sum(values) / len(values) if values else None
    methods = ATTRIBUTION_METHODS if attributed["available"] else {}
    info = {
        "attributed_energy_method": "attributed, not measured: " + "; ".join(f"{k}: {v}" for k, v in methods.items()),
        **{f"slo_{name}": f"{value:g}" for name, value in slo.items() if value is not None},
    }
    return {
        "metrics": metrics,
        "info": info,
        "flags": list(steady.flags) if steady else [],
        "per_request": per_request,
        "record": {
            "steady_state": steady_energy,
            "goodput": rates,
            "slo": dict(slo),
            "attribution": {k: v for k, v in attributed.items() if k not in ATTRIBUTION_METHODS},
        },
    }
