"""The campaign's tables, built from the experiment results (experiments/*.json):

- `summary.csv` / `summary.parquet`, narrow, one row per experiment, for people to read:
  - identity: experiment_id, model, backend, engine_path, dataset, batch_size, dtype, status, cycles_ok,
    cycles_failed, flags (";"-joined), gpu_name, gpu_count (always);
  - the other settings (backend_variant, the other experiment parameters, request_rate_per_s,
    max_concurrency, quantization, weight_bytes, total_flops, decode_bytes_min) and `errors`, only where
    they differ between the campaign's experiments: a setting that is the same in every row is in each
    experiment's JSON, not repeated on every line;
  - where the job's wall time went: job_wall_s, job_windows_s, job_share_in_windows,
    job_{startup,baseline,model_load,compile,warmup}_s (startup: the job process's interpreter start and
    imports before measuring; empty in trees measured before it was recorded);
  - the headline metrics (HEADLINE_METRICS): `<metric>` = mean over ok cycles, `<metric>_ci95_low`,
    `<metric>_ci95_high`; the pooled latency percentiles (HEADLINE_LATENCY: one value per experiment,
    over every request of every ok cycle, so no interval);
  - how each energy column was obtained (ENERGY_PROVENANCE: `gpu_energy_source` nvml_energy_counter,
    `gpu_energy_method` measured, ...): part of reading an energy number, like its unit.
  Every other metrics_info string (methods, peak figures, why a value is missing) is in the experiment
  JSON only.
- `metrics.parquet` / `metrics.csv`, long and tidy, one row per experiment and metric: experiment_id,
  metric, unit, n, mean, std, ci95_low, ci95_high, cv. Every metric of every experiment (not only the
  headline ones), and the pooled latency statistics (`ttft_p50_s`: n = the requests pooled, mean = the
  value, no spread: it is one number over every request).

Units are in the names (llm_energy.units reads them). Summary rows are sorted by model, backend,
backend_variant, dataset, batch_size, then experiment_id; metric rows by that experiment order, then
metric name. The figures read both tables (`Tables.for_figures`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llm_energy.artifacts import atomic_write_bytes, read_json_artifact, read_table_artifact, write_table_artifact
from llm_energy.errors import ArtifactError
from llm_energy.metrics import LATENCY_METRIC_NAMES
from llm_energy.units import unit_of

log = logging.getLogger(__name__)

# The experiment parameters (experiment.parameters) and their kinds.
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
# The summary's settings columns, in order. ALWAYS_COLUMNS are in every summary: what tells a row apart
# and whether to trust it (dtype even when constant: the roofline picks the GPU's peak by it); the others
# only where they differ between the campaign's experiments (backend_variant is null without variants).
SETTING_COLUMNS: dict[str, str] = {
    "experiment_id": "str",
    "model": "str",
    "backend": "str",
    "backend_variant": "str",
    "engine_path": "str",
    "dataset": "str",
    **PARAMETER_COLUMNS,
    "request_rate_per_s": "float",  # grid.request_rate: inf = all at once; NaN = static batches (no load)
    "max_concurrency": "int",
    "status": "str",
    "cycles_ok": "int",
    "cycles_failed": "int",
    "flags": "str",
    "gpu_name": "str",
    "gpu_count": "int",
    "quantization": "str",
    "weight_bytes": "int",
    "total_flops": "float",
    "decode_bytes_min": "float",
    "errors": "str",
}
ALWAYS_COLUMNS: tuple[str, ...] = (
    "experiment_id",
    "model",
    "backend",
    "engine_path",
    "dataset",
    "batch_size",
    "dtype",
    "status",
    "cycles_ok",
    "cycles_failed",
    "flags",
    "gpu_name",
    "gpu_count",
)
# Where the experiment's job spent its wall time (the run set's timing): total, inside measured
# windows, their share, then each setup phase as job_<phase>_s.
TIME_PHASES = ("startup", "baseline", "model_load", "compile", "warmup")
TIME_COLUMNS: dict[str, str] = {
    "job_wall_s": "float",
    "job_windows_s": "float",
    "job_share_in_windows": "float",
    **{f"job_{phase}_s": "float" for phase in TIME_PHASES},
}
# The summary's metrics (mean and 95 % CI each), always present (null where not measured) so the table
# has the same columns in every campaign. Energy first, then speed, efficiency, then the window.
HEADLINE_METRICS: tuple[str, ...] = (
    "gpu_energy_per_output_token_j",
    "gpu_net_energy_per_output_token_j",
    "node_energy_per_output_token_j",
    "host_estimated_energy_per_output_token_j",
    "gpu_prefill_energy_per_input_token_j",
    "gpu_decode_energy_per_output_token_j",
    "steady_state_gpu_energy_per_output_token_j",
    "gpu_output_tokens_per_j",
    "gpu_energy_j",
    "node_energy_j",
    "gpu_mean_power_w",
    "node_mean_power_w",
    "emissions_kg_co2eq",
    "output_tokens_per_s",
    "input_tokens_per_s",
    "requests_per_s",
    "request_throughput_per_s",
    "goodput_requests_per_s",
    "achieved_flops_per_s",
    "gpu_flops_per_j",
    "mfu",
    "mbu",
    "window_duration_s",
    "output_tokens",
    "setup_duration_s",
    "setup_gpu_energy_j",
    "timeline_vs_counter_rel_diff",
    "repeat_time_cv_in_window",
)
HEADLINE_LATENCY: tuple[str, ...] = (
    "ttft_p50_s",
    "ttft_p90_s",
    "ttft_p99_s",
    "tpot_p50_s",
    "tpot_p90_s",
    "itl_p50_s",
    "e2e_p50_s",
    "e2e_p90_s",
)
# The metrics_info strings that say how the energy columns were obtained (the figures name them too).
ENERGY_PROVENANCE: tuple[str, ...] = (
    "gpu_energy_source",
    "gpu_energy_method",
    "cpu_energy_source",
    "cpu_energy_method",
    "dram_energy_source",
    "dram_energy_method",
    "node_energy_domains",
    "node_energy_method",
    "host_estimated_energy_domains",
    "host_estimated_energy_method",
)
INTERVAL_SUFFIXES: tuple[str, ...] = ("_ci95_low", "_ci95_high")
METRICS_COLUMNS: dict[str, str] = {
    "experiment_id": "str",
    "metric": "str",
    "unit": "str",
    "n": "int",
    "mean": "float",
    "std": "float",
    "ci95_low": "float",
    "ci95_high": "float",
    "cv": "float",
}
SORT_COLUMNS = ["model", "backend", "backend_variant", "dataset", "batch_size", "experiment_id"]


@dataclass(frozen=True)
class Tables:
    """The narrow summary (one row per experiment) and the long metrics table (one row per
    experiment and metric)."""

    summary: pd.DataFrame
    metrics: pd.DataFrame

    def for_figures(self) -> pd.DataFrame:
        """The summary with every metric of the metrics table joined as `<metric>`, `<metric>_ci95_low`,
        `<metric>_ci95_high` (the figures draw metrics beyond the headline ones: setup energies, the
        prefill/decode split, CPU and DRAM)."""
        summary = self.summary
        extra = self.metrics.loc[~self.metrics["metric"].isin(summary.columns)]
        if extra.empty:
            return summary.copy()
        wide = extra.pivot(index="experiment_id", columns="metric", values=["mean", "ci95_low", "ci95_high"])
        columns = {}
        for stat, suffix in (("mean", ""), ("ci95_low", "_ci95_low"), ("ci95_high", "_ci95_high")):
            for metric in wide[stat].columns:
                columns[metric + suffix] = wide[stat][metric].astype("float64")
        joined = pd.DataFrame(columns).reindex(summary["experiment_id"]).reset_index(drop=True)
        return pd.concat([summary.reset_index(drop=True), joined], axis=1)


@dataclass(frozen=True)
class TablePaths:
    summary_csv: Path
    summary_parquet: Path
    metrics_csv: Path
    metrics_parquet: Path

    @classmethod
    def in_dir(cls, directory: Path | str) -> TablePaths:
        directory = Path(directory)
        return cls(
            directory / "summary.csv",
            directory / "summary.parquet",
            directory / "metrics.csv",
            directory / "metrics.parquet",
        )


def _typed(values: list[Any], kind: str) -> pd.Series:
    """A column of the given kind: int64 (Int64 where some are null), float64 or object strings."""
    if kind == "int":
        if any(v is None for v in values):
            return pd.Series(values, dtype="Int64")
        return pd.Series(values, dtype="int64")
    if kind == "float":
        return pd.Series([np.nan if v is None else float(v) for v in values], dtype="float64")
    return pd.Series([None if v is None else str(v) for v in values], dtype="object")


def _settings(data: Mapping[str, Any]) -> dict[str, Any]:
    """Identity, settings and time columns of one experiment_result."""
    experiment = data.get("experiment") or {}
    parameters = experiment.get("parameters") or {}
    failures = data.get("cycles_failed") or []
    flops = data.get("flops") or {}
    load_details = (data.get("load") or {}).get("details") or {}
    timing = data.get("time_accounting") or {}
    phases = timing.get("phases_s") or {}
    return {
        "experiment_id": data["experiment_id"],
        "model": experiment.get("model"),
        "backend": experiment.get("backend"),
        "backend_variant": experiment.get("variant"),
        "engine_path": experiment.get("engine_path"),
        "dataset": experiment.get("dataset"),
        **{name: parameters.get(name) for name in PARAMETER_COLUMNS},
        "status": data.get("status"),
        "cycles_ok": int(data.get("cycles_ok") or 0),
        "cycles_failed": len(failures),
        "flags": ";".join(sorted(data.get("flags") or {})),
        "gpu_name": data.get("gpu_name"),
        "gpu_count": int(data.get("gpu_count") or 0),
        "request_rate_per_s": None if "request_rate" not in parameters else float(parameters["request_rate"]),
        "max_concurrency": parameters.get("max_concurrency"),
        "quantization": load_details.get("quantization"),
        "weight_bytes": load_details.get("weight_bytes"),
        "total_flops": flops.get("total_flops"),
        "decode_bytes_min": flops.get("decode_bytes_min"),
        "errors": "; ".join(f"cycle {f.get('cycle')}: {f.get('error')}" for f in failures) or None,
        "job_wall_s": timing.get("total_s"),
        "job_windows_s": timing.get("windows_s"),
        "job_share_in_windows": timing.get("share_in_windows"),
        **{f"job_{phase}_s": phases.get(phase) for phase in TIME_PHASES},
    }


def _metric_rows(experiment_id: str, data: Mapping[str, Any]) -> list[tuple]:
    """(experiment_id, metric, n, mean, std, ci95_low, ci95_high, cv) for every metric of one
    experiment_result, then its pooled latency statistics (one value over n requests)."""
    rows = [
        (
            experiment_id,
            name,
            stats.get("n"),
            stats.get("mean"),
            stats.get("std"),
            stats.get("ci95_low"),
            stats.get("ci95_high"),
            stats.get("cv"),
        )
        for name, stats in sorted((data.get("metrics") or {}).items())
    ]
    latency = data.get("latency") or {}
    for name in LATENCY_METRIC_NAMES:
        if name.endswith("_n") or name not in latency:
            continue
        count = latency.get(name.split("_", 1)[0] + "_n")
        rows.append((experiment_id, name, int(count or 0), latency[name], None, None, None, None))
    return rows


def _metrics_frame(rows: list[tuple]) -> pd.DataFrame:
    names = [name for name in METRICS_COLUMNS if name != "unit"]
    raw = list(zip(*rows)) if rows else [[] for _ in names]
    columns = dict(zip(names, raw))
    units = {metric: unit_of(metric) for metric in set(columns["metric"])}
    columns["unit"] = [units[metric] for metric in columns["metric"]]
    columns["n"] = [int(v or 0) for v in columns["n"]]
    return pd.DataFrame({name: _typed(list(columns[name]), kind) for name, kind in METRICS_COLUMNS.items()})


def build_tables(experiment_result_paths: Iterable[Path | str]) -> Tables:
    """Read experiment_result artifacts and return the summary and the metrics table."""
    settings: list[dict[str, Any]] = []
    metrics: list[dict[str, dict]] = []
    latencies: list[dict[str, Any]] = []
    infos: list[dict[str, Any]] = []
    metric_rows: list[tuple] = []
    for path in experiment_result_paths:
        data = read_json_artifact(path, "experiment_result")["data"]
        settings.append(_settings(data))
        metrics.append(dict(data.get("metrics") or {}))
        latencies.append(dict(data.get("latency") or {}))
        infos.append(dict(data.get("metrics_info") or {}))
        metric_rows += _metric_rows(data["experiment_id"], data)

    columns: dict[str, pd.Series] = {}
    for name, kind in {**SETTING_COLUMNS, **TIME_COLUMNS}.items():
        values = [row[name] for row in settings]
        if name in SETTING_COLUMNS and _left_out(name, values):
            continue
        columns[name] = _typed(values, kind)
    for name in HEADLINE_METRICS:
        columns[name] = _typed([(m.get(name) or {}).get("mean") for m in metrics], "float")
        for suffix in INTERVAL_SUFFIXES:
            columns[name + suffix] = _typed([(m.get(name) or {}).get(suffix[1:]) for m in metrics], "float")
    for name in HEADLINE_LATENCY:
        columns[name] = _typed([latency.get(name) for latency in latencies], "float")
    for key in ENERGY_PROVENANCE:
        columns[key] = _typed([info.get(key) for info in infos], "str")

    summary = pd.DataFrame(columns)
    if len(summary):
        summary = summary.sort_values(
            [c for c in SORT_COLUMNS if c in summary.columns], kind="stable", na_position="last"
        ).reset_index(drop=True)
    table = _metrics_frame(metric_rows)
    if len(table):
        order = pd.Series(range(len(summary)), index=summary["experiment_id"])
        table = (
            table.assign(_order=order.reindex(table["experiment_id"]).to_numpy())
            .sort_values(["_order", "metric"], kind="stable")
            .drop(columns="_order")
            .reset_index(drop=True)
        )
    log.info("summary: %d experiments, %d columns; metrics: %d rows", len(summary), len(summary.columns), len(table))
    return Tables(summary, table)


def _left_out(name: str, values: list[Any]) -> bool:
    """A settings column the summary leaves out: one with the same value in every experiment (null
    counting as one value), except ALWAYS_COLUMNS and `errors`, kept wherever any experiment failed (an
    error all of them share is still the reason each failed)."""
    if name in ALWAYS_COLUMNS:
        return False
    if name == "errors":
        return all(v is None for v in values)
    return len({"<null>" if v is None or (isinstance(v, float) and np.isnan(v)) else repr(v) for v in values}) <= 1


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    # Floats are written repr-exact: pandas.read_csv(..., float_precision="round_trip") gives back the
    # numbers of the Parquet file bit for bit (the default parser may differ in the last digit).
    atomic_write_bytes(path, frame.to_csv(index=False, lineterminator="\n", float_format=None).encode("utf-8"))


def write_tables(tables: Tables, paths: TablePaths, provenance: Mapping[str, Any]) -> None:
    """Write the summary (`summary_table`) and the metrics table (`metrics_table`) as Parquet artifacts
    and as CSV with the same columns."""
    for frame, name, parquet, csv in (
        (tables.summary, "summary_table", paths.summary_parquet, paths.summary_csv),
        (tables.metrics, "metrics_table", paths.metrics_parquet, paths.metrics_csv),
    ):
        write_table_artifact(
            parquet, name, frame, provenance, extra={"rows": len(frame), "columns": len(frame.columns)}
        )
        _write_csv(frame, Path(csv))


def read_summary(parquet_path: Path | str) -> pd.DataFrame:
    """The summary table of a `summary_table` Parquet artifact (validated)."""
    frame, _meta = read_table_artifact(parquet_path, "summary_table")
    return frame


def read_tables(summary_parquet: Path | str, metrics_parquet: Path | str | None = None) -> Tables:
    """Both tables (validated); the metrics table beside the summary unless given."""
    summary_parquet = Path(summary_parquet)
    metrics_parquet = (
        Path(metrics_parquet) if metrics_parquet else TablePaths.in_dir(summary_parquet.parent).metrics_parquet
    )
    if not metrics_parquet.is_file():
        raise ArtifactError(
            f"{metrics_parquet}: not found beside {summary_parquet.name}; a summary written before "
            "the metrics table existed: run the rule summarize again (figures-only mode: "
            "snakemake --config figures_only=true results_dir=<tree> --forcerun summarize)"
        )
    metrics, _meta = read_table_artifact(metrics_parquet, "metrics_table")
    return Tables(read_summary(summary_parquet), metrics)
