"""Combine the measurement cycles of one experiment into an `experiment_result`.

Input: the `run_result` artifacts of every cycle (ok or failed) and, optionally, the `flops_model`
of the experiment's model at its dtype (a cost model, applied here to each ok cycle's own requests).
Output (the `data` of an `experiment_result` artifact):

- identity: experiment_id, experiment (model, backend, variant, dataset, parameters), gpu_name, gpu_count;
- load: the load report of the first ok cycle (device, dtype, details: quantization, weight bytes), the
  same weights for every cycle; null when no cycle succeeded;
- cycles: cycles_ok (count), cycles_ok_list, cycles_failed [{cycle, error}], cycles_invalid
  [{cycle, flags}] (cycles that ran but whose validity check failed: kept in the statistics, listed);
- metrics: every numeric metric of the ok cycles, each summarised by `statistics.describe`, plus
  derived metrics computed per cycle first and then described (so their spread is real):
  `{cpu,dram,...}_energy_per_output_token_j` where a cycle lacks them, `gpu_flops_per_j`,
  `node_flops_per_j`, `achieved_flops_per_s`, `mfu` and `mbu`;
- metrics_info: the strings of the cycles (sources, methods); where cycles disagree the value reads
  "mixed: a, b"; a derived metric that cannot be computed has `<metric>_unavailable_reason`;
- flags: the validity flags of all cycles with how many cycles raised each;
- flops: method and confidence of the cost model (the lowest over the cycles), total_flops and
  decode_bytes_min of one pass over the request set (mean over the ok cycles), and per cycle the
  FLOPs and decode bytes of its whole window (null + reason when there is no cost model);
- latency: TTFT, ITL, TPOT and e2e distributions pooled over every request (every row of the
  requests.parquet beside each ok cycle's result.json, repeats included), not averaged per-cycle
  percentiles: `<name>_mean_s`, `<name>_p50_s`, `<name>_p90_s`, `<name>_p99_s`, `<name>_n` (definitions
  and the sample-count rule in llm_energy.metrics); reasons of null ones and `latency_pooled_over` in
  metrics_info. The per-cycle latency distributions are therefore not in `metrics`.

An experiment whose cycles all failed still gets a result, with status "failed", so the summary
shows the failure instead of silently dropping the row.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_energy import metrics as metric_definitions
from llm_energy.artifacts import read_json_artifact, read_table_artifact
from llm_energy.errors import ArtifactError
from llm_energy.flops import cycle_flops, mbu, mfu
from llm_energy.statistics import describe

log = logging.getLogger(__name__)

# Energy domains whose per-output-token energy is derived (per cycle) when a run lacks it.
ENERGY_DOMAINS: tuple[str, ...] = ("gpu", "cpu", "dram", "node")
FLOPS_DERIVED_METRICS: tuple[str, ...] = (
    "gpu_flops_per_j",
    "node_flops_per_j",
    "achieved_flops_per_s",
    "mfu",
    "mbu",
)
REQUESTS_TABLE = "requests.parquet"  # written beside each cycle's result.json
ABSENT = "(absent)"  # marks cycles that lack a metrics_info key when the others have it

MFU_METHOD = (
    "achieved_flops_per_s / (gpu_count x peak dense flops_per_s of the GPU at the run dtype); "
    "achieved_flops_per_s = the FLOPs of every request of the cycle's window (the model's cost model "
    "over its requests table) / work_duration_s (first submission to last token; window_duration_s "
    "for runs that predate it)"
)
MBU_METHOD = (
    "lower bound: decode_bytes_min / work_duration_s / (gpu_count x peak memory_bytes_per_s); "
    "weights at the bytes the run stored them in (load details matmul_weight_bytes: quantized weights "
    "count as stored), else parameters x dtype size; "
    "decode_bytes_min is the minimum traffic (weights + KV cache read once per decode step) and the "
    "window also contains prefill, so the true bandwidth utilisation is at least this"
)

PeakFiguresFunction = Callable[[str, str], Mapping[str, Any] | None]


def _default_peak_figures() -> PeakFiguresFunction | None:
    """`llm_energy.flops.peak_figures`, or None where that module is not available."""
    try:
        from llm_energy.flops import peak_figures
    except ImportError as exc:  # llm_energy.flops is optional for the analysis end
        log.warning("llm_energy.flops.peak_figures unavailable (%s): MFU and MBU will be null", exc)
        return None
    return peak_figures


# Tests replace this to control the GPU peak figures without the real table.
peak_figures_provider: Callable[[], PeakFiguresFunction | None] = _default_peak_figures


@dataclass
class _Cycle:
    """The parts of one run_result that aggregation uses."""

    path: Path
    cycle: int
    status: str
    error: str | None
    experiment_id: str
    experiment: dict[str, Any]
    metrics: dict[str, float | None]
    metrics_info: dict[str, str]
    flags: list[str]
    valid: bool
    gpu_names: list[str] = field(default_factory=list)
    # Bytes of the matmul weights as the backend stored them (quantized ones included), where the
    # load report has them (pytorch backend): what one decode step reads at least.
    matmul_weight_bytes: float | None = None
    # Passes over the measured request set in the window (campaign.min_window_s); experiment_result's
    # flops.total_flops is for one pass.
    repeats: int = 1
    load: dict[str, Any] | None = None  # the run_result's load report


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> float | None:
    if not _is_number(value):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _measured_gpu_names(data: Mapping[str, Any]) -> list[str]:
    """Names of the GPUs whose energy the run measured (after binding to the job's GPUs).

    Provenance lists every GPU the process could see, seven idle neighbours included on an 8-GPU
    box without CUDA_VISIBLE_DEVICES; MFU/MBU must use the peaks of the GPUs the job used.
    """
    sources = data.get("energy_sources") or {}
    if not isinstance(sources, Mapping):
        return []
    nvml = next(
        (
            s
            for s in sources.get("sources") or []
            if isinstance(s, Mapping) and s.get("name") == "nvml" and s.get("available")
        ),
        None,
    )
    devices = (nvml or {}).get("devices") or []
    return [str(d["name"]) for d in devices if isinstance(d, Mapping) and d.get("name")]


def _provenance_gpu_names(document: Mapping[str, Any]) -> list[str]:
    gpus = (document.get("provenance") or {}).get("gpus") or []
    return [str(g["name"]) for g in gpus if isinstance(g, Mapping) and g.get("name")]


def _read_cycle(path: Path) -> _Cycle:
    document = read_json_artifact(path, "run_result")
    data = document["data"]
    try:
        experiment_id = data["experiment_id"]
        cycle = int(data["cycle"])
        status = data["status"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(
            f"{path}: run_result lacks a usable experiment_id/cycle/status ({exc!r}); re-run the cycle to re-create it"
        ) from None
    metrics: dict[str, float | None] = {}
    for name, value in (data.get("metrics") or {}).items():
        if value is None:
            metrics[name] = None
        elif _is_number(value):
            metrics[name] = float(value)
        else:  # a metric that is not a number cannot be averaged; say so once, keep going
            log.debug("%s: metric %s is not numeric (%r), not aggregated", path, name, value)
    info = {str(k): str(v) for k, v in (data.get("metrics_info") or {}).items() if v is not None}
    validity = data.get("validity") or {}
    gpu_names = _measured_gpu_names(data) or _provenance_gpu_names(document)
    return _Cycle(
        path=path,
        cycle=cycle,
        status=str(status),
        error=data.get("error"),
        experiment_id=str(experiment_id),
        experiment=dict(data.get("experiment") or {}),
        metrics=metrics,
        metrics_info=info,
        flags=[str(f) for f in validity.get("flags") or []],
        valid=bool(validity.get("valid", True)),
        gpu_names=gpu_names,
        matmul_weight_bytes=_finite(((data.get("load") or {}).get("details") or {}).get("matmul_weight_bytes")),
        repeats=int((data.get("tokens") or {}).get("repeats") or 1),
        load=data.get("load"),
    )


def _merge_info(cycles: Sequence[_Cycle]) -> dict[str, str]:
    """One string per metrics_info key: the common value, or "mixed: a, b" where cycles disagree."""
    keys: list[str] = []
    for cycle in cycles:
        keys.extend(k for k in cycle.metrics_info if k not in keys)
    merged: dict[str, str] = {}
    for key in keys:
        values: list[str] = []
        for cycle in cycles:
            value = cycle.metrics_info.get(key, ABSENT)
            if value not in values:
                values.append(value)
        merged[key] = values[0] if len(values) == 1 else "mixed: " + ", ".join(values)
    return merged


def _read_flops_model(flops_path: Path | None) -> tuple[dict[str, Any] | None, str | None]:
    """(flops_model data, None) or (None, reason it is unavailable)."""
    if flops_path is None:
        return None, "no FLOPs cost model was given for this experiment"
    flops_path = Path(flops_path)
    if not flops_path.is_file():
        return None, f"FLOPs cost model {flops_path} does not exist"
    return read_json_artifact(flops_path, "flops_model")["data"], None


def _cycle_flops(
    model_flops: Mapping[str, Any], cycle: _Cycle, batch_size: int
) -> tuple[dict[str, Any] | None, str | None]:
    """The FLOPs of one cycle's window: the cost model over every row of its requests table (each
    pass of a repeated window, with its own output lengths). (record, None) or (None, reason)."""
    path = cycle.path.parent / REQUESTS_TABLE
    try:
        frame, _ = read_table_artifact(path, "requests_table")
        record = cycle_flops(dict(model_flops), frame, batch_size)
    except ArtifactError as exc:
        return None, str(exc)
    if not record["total_flops"] > 0:
        return None, f"{path} has no FLOPs ({record['tokens']['requests']} requests)"
    return record, None


_CONFIDENCE_ORDER = ("low", "medium", "high")


def _flops_section(
    model_flops: Mapping[str, Any], per_cycle: Sequence[tuple[_Cycle, dict[str, Any] | None]]
) -> dict[str, Any] | None:
    """experiment_result.flops: the cost model's method, the lowest confidence of the cycles, one pass
    over the request set (mean over the cycles that have FLOPs) and every cycle's window."""
    counted = [(c, r) for c, r in per_cycle if r is not None]
    if not counted:
        return None
    passes = [r["total_flops"] / c.repeats for c, r in counted]
    bytes_per_pass = [r["decode_bytes_min"] / c.repeats for c, r in counted]
    return {
        "method": model_flops.get("method"),
        "confidence": min((r["confidence"] for _, r in counted), key=_CONFIDENCE_ORDER.index),
        "total_flops": sum(passes) / len(passes),
        "decode_bytes_min": sum(bytes_per_pass) / len(bytes_per_pass),
        "cycles": [
            {
                "cycle": c.cycle,
                "window_flops": r["total_flops"],
                "decode_bytes_min": r["decode_bytes_min"],
                "requests": r["tokens"]["requests"],
                "confidence": r["confidence"],
            }
            for c, r in counted
        ],
    }


@dataclass
class _DerivedSeries:
    """Per-cycle values of one derived metric and why some cycles have none."""

    values: list[float | None] = field(default_factory=list)
    reasons: dict[str, list[int]] = field(default_factory=dict)

    def add(self, cycle: int, value: float | None, reason: str | None = None) -> None:
        self.values.append(value)
        if value is None:
            self.reasons.setdefault(reason or "inputs missing", []).append(cycle)

    def reason_text(self, n_cycles: int) -> str | None:
        if not self.reasons:
            return None
        parts = []
        for reason, cycles in self.reasons.items():
            where = "all cycles" if len(cycles) == n_cycles else "cycles " + ", ".join(map(str, cycles))
            parts.append(f"{reason} ({where})")
        return "; ".join(parts)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _derive_per_token_energy(ok: Sequence[_Cycle]) -> dict[str, _DerivedSeries]:
    """`<domain>_energy_per_output_token_j` = energy / output tokens, for domains the runs lack."""
    derived: dict[str, _DerivedSeries] = {}
    for domain in ENERGY_DOMAINS:
        name = f"{domain}_energy_per_output_token_j"
        energy_name = f"{domain}_energy_j"
        if any(name in c.metrics for c in ok) or not any(energy_name in c.metrics for c in ok):
            continue  # measured by the run already, or the domain does not exist at all
        series = _DerivedSeries()
        for c in ok:
            energy = _finite(c.metrics.get(energy_name))
            tokens = _finite(c.metrics.get("output_tokens"))
            if energy is None:
                series.add(c.cycle, None, f"{energy_name} unavailable")
            elif not tokens:
                series.add(c.cycle, None, "no output tokens")
            else:
                series.add(c.cycle, energy / tokens)
        derived[name] = series
    return derived


def _peaks_for(
    cycle: _Cycle, dtype: str, lookup: PeakFiguresFunction | None
) -> tuple[Mapping[str, Any] | None, int, str | None]:
    """(peak figures of ONE GPU, gpu count, None) or (None, 0, reason)."""
    if not cycle.gpu_names:
        return None, 0, "no GPU in the run provenance"
    if lookup is None:
        return None, 0, "GPU peak figures unavailable (llm_energy.flops.peak_figures missing)"
    if len(set(cycle.gpu_names)) > 1:
        return None, 0, f"mixed GPU models {sorted(set(cycle.gpu_names))}"
    try:
        peaks = lookup(cycle.gpu_names[0], dtype)
    except (ValueError, LookupError) as exc:  # a table that raises for unknown names
        return None, 0, f"no peak figures for {cycle.gpu_names[0]} at {dtype} ({exc})"
    if not peaks:
        return None, 0, f"no peak figures for {cycle.gpu_names[0]} at {dtype}"
    return peaks, len(cycle.gpu_names), None


def _describe_peaks(peaks: Mapping[str, Any], gpu_name: str, gpu_count: int, dtype: str) -> str:
    """One line naming the peak figures MFU/MBU were computed against (for the metrics_info)."""
    model = peaks.get("gpu_model") or gpu_name
    precision = peaks.get("dtype") or dtype
    flops = _finite(peaks.get("flops_per_s"))
    bandwidth = _finite(peaks.get("memory_bytes_per_s"))
    text = (
        f"{gpu_count} x {model} at {precision}: "
        f"{f'{flops:.4g}' if flops else 'n/a'} FLOP/s, {f'{bandwidth:.4g}' if bandwidth else 'n/a'} B/s"
    )
    return text + (f" ({peaks['source']})" if peaks.get("source") else "")


def _decode_bytes_min(record: Mapping[str, Any], cycle: _Cycle) -> float | None:
    """Minimum bytes moved while decoding in the cycle's window: the run's stored matmul weight bytes
    (quantization counted) x decode steps + KV cache, where the run recorded them; else the cost
    model's figure (weight parameters x bytes of the dtype)."""
    breakdown = record.get("decode_bytes_breakdown") or {}
    steps = _finite(breakdown.get("decode_steps_min"))
    if cycle.matmul_weight_bytes is not None and steps is not None:
        return cycle.matmul_weight_bytes * steps + (_finite(breakdown.get("kv_cache_bytes")) or 0.0)
    return _finite(record.get("decode_bytes_min"))


def _derive_flops_metrics(
    per_cycle: Sequence[tuple[_Cycle, dict[str, Any] | None, str | None]],
    dtype: str,
    peak_descriptions: list[str],
) -> dict[str, _DerivedSeries]:
    """gpu_flops_per_j, node_flops_per_j, achieved_flops_per_s, MFU and MBU of every ok cycle, each
    from that cycle's own FLOPs (None with the reason where a cycle has none)."""
    series = {name: _DerivedSeries() for name in FLOPS_DERIVED_METRICS}
    lookup = peak_figures_provider() if per_cycle else None
    for c, record, reason in per_cycle:
        if record is None:
            for s in series.values():
                s.add(c.cycle, None, reason)
            continue
        total_flops = _finite(record["total_flops"])
        decode_bytes = _decode_bytes_min(record, c)
        # The work's own span: the energy window's closing edge waits for the counter's next update.
        window = _finite(c.metrics.get("work_duration_s", c.metrics.get("window_duration_s")))
        gpu_energy = _finite(c.metrics.get("gpu_energy_j"))
        node_energy = _finite(c.metrics.get("node_energy_j"))
        series["gpu_flops_per_j"].add(
            c.cycle,
            _ratio(total_flops, gpu_energy),
            "gpu_energy_j unavailable" if gpu_energy is None else "gpu_energy_j not positive",
        )
        series["node_flops_per_j"].add(
            c.cycle,
            _ratio(total_flops, node_energy),
            "node_energy_j unavailable" if node_energy is None else "node_energy_j not positive",
        )
        achieved = _ratio(total_flops, window)
        series["achieved_flops_per_s"].add(c.cycle, achieved, "work_duration_s unavailable")
        peaks, gpu_count, peak_reason = _peaks_for(c, dtype, lookup)
        peak_flops = _finite(peaks.get("flops_per_s")) if peaks else None
        peak_bytes = _finite(peaks.get("memory_bytes_per_s")) if peaks else None
        if peaks:
            description = _describe_peaks(peaks, c.gpu_names[0], gpu_count, dtype)
            if description not in peak_descriptions:
                peak_descriptions.append(description)
        if achieved is None:
            series["mfu"].add(c.cycle, None, "work_duration_s unavailable")
        elif peak_reason:
            series["mfu"].add(c.cycle, None, peak_reason)
        else:
            series["mfu"].add(
                c.cycle,
                mfu(total_flops, window, peak_flops * gpu_count if peak_flops else None),
                f"no peak flops_per_s for {c.gpu_names[0]} at {dtype}",
            )
        if decode_bytes is None:
            series["mbu"].add(c.cycle, None, "no decode_bytes_min for the cycle")
        elif window is None:
            series["mbu"].add(c.cycle, None, "work_duration_s unavailable")
        elif peak_reason:
            series["mbu"].add(c.cycle, None, peak_reason)
        else:
            series["mbu"].add(
                c.cycle,
                mbu(decode_bytes, window, peak_bytes * gpu_count if peak_bytes else None),
                f"no peak memory_bytes_per_s for {c.gpu_names[0]} at {dtype}",
            )
    return series


def _cycle_latency_samples(cycle: _Cycle) -> dict[str, list[float]]:
    """Every latency sample of one cycle, from the rows of its requests table (raises ArtifactError)."""
    path = cycle.path.parent / REQUESTS_TABLE
    frame, _ = read_table_artifact(path, "requests_table")
    if "itl_s" not in frame.columns:
        raise ArtifactError(
            f"{path} has no itl_s column (written before per-chunk ITLs were recorded); re-run cycle {cycle.cycle}"
        )

    def column(name: str) -> list[float]:
        return [float(v) for v in frame[name] if v is not None and math.isfinite(float(v))]

    return {
        "e2e": column("e2e_s"),
        "ttft": column("ttft_s"),
        "tpot": column("tpot_s"),
        "itl": [float(gap) for gaps in frame["itl_s"] for gap in (gaps if gaps is not None else ())],
    }


def _pooled_latency(ok: Sequence[_Cycle]) -> tuple[dict[str, float | None], dict[str, str]]:
    """Latency distributions over the requests of every ok cycle, pooled (see the module docstring)."""
    pooled: dict[str, list[float]] = {name: [] for name in metric_definitions.LATENCY_NAMES}
    problems: list[str] = []
    for c in ok:
        try:
            samples = _cycle_latency_samples(c)
        except ArtifactError as exc:
            problems.append(f"cycle {c.cycle}: {exc}")
            continue
        for name, values in samples.items():
            pooled[name].extend(values)
    if problems or not ok:
        # Pooling some cycles only would describe another set of requests than the other metrics.
        reason = "; ".join(problems) if problems else "no ok cycle"
        flat, _ = metric_definitions.latency_distributions({})
        return flat, {
            f"{name}_unavailable_reason": f"not pooled: {reason}" for name in metric_definitions.LATENCY_NAMES
        }
    where = f"the requests of cycles {', '.join(str(c.cycle) for c in ok)}"
    flat, info = metric_definitions.latency_distributions(pooled, where)
    info["latency_pooled_over"] = f"every row of {REQUESTS_TABLE} of {where} ({len(pooled['e2e'])} requests)"
    return flat, info


def _check_one_experiment(cycles: Sequence[_Cycle]) -> str:
    ids = sorted({c.experiment_id for c in cycles})
    if len(ids) != 1:
        raise ArtifactError(
            f"run results of several experiments were given to one aggregation: {ids} "
            f"({[str(c.path) for c in cycles]}); aggregate each experiment separately"
        )
    numbers = [c.cycle for c in cycles]
    duplicates = sorted(n for n, count in Counter(numbers).items() if count > 1)
    if duplicates:
        raise ArtifactError(
            f"experiment {ids[0]}: cycle(s) {duplicates} given more than once "
            f"({[str(c.path) for c in cycles]}); pass each cycle's result.json once"
        )
    return ids[0]


def aggregate_experiment(run_result_paths: Iterable[Path | str], flops_path: Path | str | None) -> dict[str, Any]:
    """Aggregate the cycles of one experiment; returns the data of an `experiment_result` artifact."""
    paths = [Path(p) for p in run_result_paths]
    if not paths:
        raise ArtifactError("aggregate_experiment: no run_result files given; the experiment has no cycles")
    cycles = sorted((_read_cycle(p) for p in paths), key=lambda c: c.cycle)
    experiment_id = _check_one_experiment(cycles)
    ok = [c for c in cycles if c.status == "ok"]
    failed = [c for c in cycles if c.status != "ok"]
    for c in failed:
        log.warning("%s cycle %d failed: %s", experiment_id, c.cycle, c.error)
    reference = ok[0] if ok else cycles[0]
    experiment = reference.experiment
    dtype = str((experiment.get("parameters") or {}).get("dtype", ""))

    metric_names: list[str] = []
    for c in ok:
        metric_names.extend(
            name
            for name in c.metrics
            if name not in metric_names and name not in metric_definitions.LATENCY_METRIC_NAMES
        )
    metrics = {name: describe([c.metrics.get(name) for c in ok]) for name in sorted(metric_names)}
    info = _merge_info(ok or cycles)
    # The experiment's latency is pooled over all requests; the cycles' own reasons do not apply to it.
    for key in metric_definitions.LATENCY_REASON_KEYS:
        info.pop(key, None)
    latency, latency_info = _pooled_latency(ok)
    info.update(latency_info)

    model_flops, flops_reason = _read_flops_model(Path(flops_path) if flops_path is not None else None)
    batch_size = int((experiment.get("parameters") or {}).get("batch_size") or 1)
    per_cycle: list[tuple[_Cycle, dict[str, Any] | None, str | None]] = []
    for c in ok:
        record, reason = _cycle_flops(model_flops, c, batch_size) if model_flops else (None, flops_reason)
        per_cycle.append((c, record, reason))
    flops = _flops_section(model_flops, [(c, r) for c, r, _ in per_cycle]) if model_flops else None
    if model_flops is not None and flops is None:
        flops_reason = "; ".join(dict.fromkeys(r for _, _, r in per_cycle if r)) or "no ok cycle"
    if ok:
        derived = _derive_per_token_energy(ok)
        peak_descriptions: list[str] = []
        derived.update(_derive_flops_metrics(per_cycle, dtype, peak_descriptions))
        if peak_descriptions:
            info["gpu_peak_figures"] = "; ".join(peak_descriptions)
        for name, series in derived.items():
            metrics[name] = describe(series.values)
            reason = series.reason_text(len(ok))
            if reason:
                info[f"{name}_unavailable_reason"] = reason
        for domain in ENERGY_DOMAINS:
            name = f"{domain}_energy_per_output_token_j"
            if name in derived and f"{name}_method" not in info:
                info[f"{name}_method"] = f"{domain}_energy_j / output_tokens per cycle"
        info["mfu_method"] = MFU_METHOD
        info["mbu_method"] = MBU_METHOD
    if flops is not None:
        info["flops_method"] = str(flops.get("method"))
        info["flops_confidence"] = str(flops.get("confidence"))
    else:
        info["flops_unavailable_reason"] = str(flops_reason)

    flag_counts = Counter(flag for c in cycles for flag in dict.fromkeys(c.flags))
    gpu_names = reference.gpu_names
    result: dict[str, Any] = {
        "experiment_id": experiment_id,
        "status": "ok" if ok else "failed",
        "experiment": experiment,
        "load": reference.load if ok else None,
        "gpu_name": ", ".join(dict.fromkeys(gpu_names)) if gpu_names else None,
        "gpu_count": len(gpu_names),
        "cycles_ok": len(ok),
        "cycles_ok_list": [c.cycle for c in ok],
        "cycles_failed": [{"cycle": c.cycle, "error": c.error} for c in failed],
        "cycles_invalid": [{"cycle": c.cycle, "flags": c.flags} for c in ok if not c.valid],
        "metrics": metrics,
        "metrics_info": info,
        "flags": dict(sorted(flag_counts.items())),
        "flops": flops,
        "latency": latency,
        "run_results": [str(c.path) for c in cycles],
    }
    log.info("%s: %d ok, %d failed cycle(s), %d metrics", experiment_id, len(ok), len(failed), len(metrics))
    return result
