"""The tidy summary table: one row per experiment, written as Parquet (artifact) and CSV.

Columns, in order:
- identity: experiment_id, model, backend, backend_variant (the backend_settings.<backend>.variants name,
  null without variants), dataset, the experiment parameters (batch_size, dtype,
  max_input_tokens, max_output_tokens, decoding_mode, temperature, top_p, top_k, output_length,
  batching, token_budget), cycles_ok, cycles_failed, status, flags (";"-joined), gpu_name, then
  gpu_count, errors, total_flops, decode_bytes_min, quantization and weight_bytes (of the load report:
  the weights as stored, quantized ones at their real size; null where the backend does not report them);
  engine_path (pytorch: eager, static or fast) after dataset;
- where the job's wall time went: job_wall_s, job_windows_s, job_share_in_windows and
  job_{baseline,model_load,compile,warmup}_s (a campaign's share: sum of job_windows_s / sum of job_wall_s);
- per metric (sorted by name): `<metric>` = mean over ok cycles, `<metric>_std`, `<metric>_ci95_low`,
  `<metric>_ci95_high`, `<metric>_cv`;
- latency, pooled over every request of every ok cycle (llm_energy.aggregate, definitions in
  llm_energy.metrics), for e2e, itl, tpot, ttft: `<name>_mean_s`, `<name>_p50_s`, `<name>_p90_s`,
  `<name>_p99_s` (seconds; null below the samples a percentile needs, the reason in the info columns)
  and `<name>_n` (samples); one value per experiment, so no _std/_ci95 columns;
- the metrics_info strings (sources, methods, unavailable reasons), one column per key.
Rows are sorted by model, backend, backend_variant, dataset, batch_size (then experiment_id, for a
stable order).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llm_energy.artifacts import atomic_write_bytes, read_json_artifact, read_table_artifact, write_table_artifact
from llm_energy.metrics import LATENCY_METRIC_NAMES

log = logging.getLogger(__name__)

# Identity columns and their kind; the order is the column order of the table.
PARAMETER_COLUMNS: dict[str, str] = {
    "batch_size": "int",
    "dtype": "str",
    "max_input_tokens": "int",
    "max_output_tokens": "int",
    "decoding_mode": "str",
    "temperature": "float",
    "top_p": "float",
    "top_k": "int",
    "output_length": "str",
    "batching": "str",
    "token_budget": "int",
}
IDENTITY_COLUMNS: dict[str, str] = {
    "experiment_id": "str",
    "model": "str",
    "backend": "str",
    "backend_variant": "str",
    "dataset": "str",
    "engine_path": "str",
    **PARAMETER_COLUMNS,
    "cycles_ok": "int",
    "cycles_failed": "int",
    "status": "str",
    "flags": "str",
    "gpu_name": "str",
}
EXTRA_COLUMNS: dict[str, str] = {
    "gpu_count": "int",
    "errors": "str",
    "total_flops": "float",
    "decode_bytes_min": "float",
    "quantization": "str",
    "weight_bytes": "int",
    "request_rate_per_s": "float",  # grid.request_rate: inf = all at once; NaN = static batches (no load)
    "max_concurrency": "int",
}
# Where the experiment's job spent its wall time (the run set's timing): total, inside measured
# windows, their share, then each setup phase as job_<phase>_s.
TIME_COLUMNS: dict[str, str] = {"job_wall_s": "float", "job_windows_s": "float", "job_share_in_windows": "float"}
TIME_PHASES = ("baseline", "model_load", "compile", "warmup")
# Statistic of `describe` -> column suffix ("" = the mean is the bare metric name).
STAT_SUFFIXES: dict[str, str] = {
    "mean": "",
    "std": "_std",
    "ci95_low": "_ci95_low",
    "ci95_high": "_ci95_high",
    "cv": "_cv",
}
SORT_COLUMNS = ["model", "backend", "backend_variant", "dataset", "batch_size", "experiment_id"]


def _row(data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict], dict[str, str]]:
    """(identity values, metrics, metrics_info) of one experiment_result (latency: see _latency_columns)."""
    experiment = data.get("experiment") or {}
    parameters = experiment.get("parameters") or {}
    failures = data.get("cycles_failed") or []
    flops = data.get("flops") or {}
    load_details = (data.get("load") or {}).get("details") or {}
    identity: dict[str, Any] = {
        "experiment_id": data["experiment_id"],
        "model": experiment.get("model"),
        "backend": experiment.get("backend"),
        "backend_variant": experiment.get("variant"),
        "dataset": experiment.get("dataset"),
        "engine_path": experiment.get("engine_path"),
        **{name: parameters.get(name) for name in PARAMETER_COLUMNS},
        "cycles_ok": int(data.get("cycles_ok") or 0),
        "cycles_failed": len(failures),
        "status": data.get("status"),
        "flags": ";".join(sorted(data.get("flags") or {})),
        "gpu_name": data.get("gpu_name"),
        "gpu_count": int(data.get("gpu_count") or 0),
        "errors": "; ".join(f"cycle {f.get('cycle')}: {f.get('error')}" for f in failures) or None,
        "total_flops": flops.get("total_flops"),
        "decode_bytes_min": flops.get("decode_bytes_min"),
        "quantization": load_details.get("quantization"),
        "weight_bytes": load_details.get("weight_bytes"),
        "request_rate_per_s": None if "request_rate" not in parameters else float(parameters["request_rate"]),
        "max_concurrency": parameters.get("max_concurrency"),
        **_time_columns(data.get("time_accounting") or {}),
    }
    return identity, dict(data.get("metrics") or {}), dict(data.get("metrics_info") or {})


def _time_columns(timing: Mapping[str, Any]) -> dict[str, Any]:
    phases = timing.get("phases_s") or {}
    return {"job_wall_s": timing.get("total_s"), "job_windows_s": timing.get("windows_s"),
            "job_share_in_windows": timing.get("share_in_windows"),
            **{f"job_{phase}_s": phases.get(phase) for phase in TIME_PHASES}}


def _typed(values: list[Any], kind: str) -> pd.Series:
    """A column of the given kind: int64 (Int64 where some are null), float64 or object strings."""
    if kind == "int":
        if any(v is None for v in values):
            return pd.Series(values, dtype="Int64")
        return pd.Series(values, dtype="int64")
    if kind == "float":
        return pd.Series([np.nan if v is None else float(v) for v in values], dtype="float64")
    return pd.Series([None if v is None else str(v) for v in values], dtype="object")


def _latency_columns(all_latency: list[dict[str, Any]]) -> dict[str, pd.Series]:
    """The pooled latency columns, in LATENCY_METRIC_NAMES order: seconds as float, `<name>_n` as int
    (0 for an experiment without them, e.g. one whose cycles all failed)."""
    columns: dict[str, pd.Series] = {}
    if not any(all_latency):
        return columns  # results written before latency was pooled: no columns rather than empty ones
    for name in LATENCY_METRIC_NAMES:
        values = [latency.get(name) for latency in all_latency]
        if name.endswith("_n"):
            columns[name] = _typed([int(v or 0) for v in values], "int")
        else:
            columns[name] = _typed(values, "float")
    return columns


def build_summary(experiment_result_paths: Iterable[Path | str]) -> pd.DataFrame:
    """Read experiment_result artifacts and return the tidy summary (one row per experiment)."""
    identities: list[dict[str, Any]] = []
    all_metrics: list[dict[str, dict]] = []
    all_info: list[dict[str, str]] = []
    all_latency: list[dict[str, Any]] = []
    for path in experiment_result_paths:
        data = read_json_artifact(path, "experiment_result")["data"]
        identity, metrics, info = _row(data)
        identities.append(identity)
        all_metrics.append(metrics)
        all_info.append(info)
        all_latency.append(dict(data.get("latency") or {}))

    columns: dict[str, pd.Series] = {}
    time_columns = {**TIME_COLUMNS, **{f"job_{phase}_s": "float" for phase in TIME_PHASES}}
    for name, kind in {**IDENTITY_COLUMNS, **EXTRA_COLUMNS, **time_columns}.items():
        columns[name] = _typed([row[name] for row in identities], kind)

    metric_names = sorted({name for metrics in all_metrics for name in metrics})
    for name in metric_names:
        for stat, suffix in STAT_SUFFIXES.items():
            column = name + suffix
            if column in columns:
                raise ValueError(f"metric column '{column}' collides with another column")
            columns[column] = _typed(
                [(metrics.get(name) or {}).get(stat) for metrics in all_metrics], "float"
            )

    for column, series in _latency_columns(all_latency).items():
        if column in columns:
            raise ValueError(f"latency column '{column}' collides with another column")
        columns[column] = series

    info_names = sorted({key for info in all_info for key in info})
    for key in info_names:
        # A metrics_info key that happens to equal a metric column must not overwrite it.
        column = key if key not in columns else f"info_{key}"
        columns[column] = _typed([info.get(key) for info in all_info], "str")

    frame = pd.DataFrame(columns)
    if len(frame):
        frame = frame.sort_values(SORT_COLUMNS, kind="stable", na_position="last").reset_index(drop=True)
    log.info("summary: %d experiments, %d columns", len(frame), len(frame.columns))
    return frame


def write_summary(
    frame: pd.DataFrame, csv_path: Path | str, parquet_path: Path | str, provenance: Mapping[str, Any]
) -> None:
    """Write the summary as a Parquet artifact (`summary_table`) and as CSV with the same columns."""
    write_table_artifact(
        parquet_path, "summary_table", frame, provenance,
        extra={"rows": len(frame), "columns": len(frame.columns)},
    )
    # Floats are written repr-exact: pandas.read_csv(..., float_precision="round_trip") gives back the
    # numbers of the Parquet file bit for bit (the default parser may differ in the last digit).
    csv_text = frame.to_csv(index=False, lineterminator="\n", float_format=None)
    atomic_write_bytes(csv_path, csv_text.encode("utf-8"))


def read_summary(parquet_path: Path | str) -> pd.DataFrame:
    """The summary table of a `summary_table` Parquet artifact (validated)."""
    frame, _meta = read_table_artifact(parquet_path, "summary_table")
    return frame
