"""The HTML pages of the Snakemake report beside the figures: the summary table with units, the
validity flags with their meanings, and the provenance (software, GPUs, commit) of the measurements.

Each page is one self-contained HTML file (inline CSS, no script, nothing fetched from a network), so
the report opens offline.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llm_energy.artifacts import atomic_write_bytes
from llm_energy.energy.validity import FLAG_DESCRIPTIONS, flag_effect
from llm_energy.units import unit_of

log = logging.getLogger(__name__)

PAGE_NAMES: tuple[str, ...] = ("summary", "flags", "provenance")
PAGE_TITLES = {
    "summary": "Summary table (units)",
    "flags": "Validity flags and their meanings",
    "provenance": "Provenance: software, GPUs, commit",
}
PAGE_CAPTIONS = {
    "summary": "**The summary table** (``summary.csv`` / ``summary.parquet``): the main columns for every "
    "experiment, with units, then every column of the table with its unit. Units are also in the "
    "column names (``_j`` joules, ``_s`` seconds, ``_w`` watts, ...). Every metric with its n, std, "
    "95 % CI and CV is in ``metrics.csv`` / ``metrics.parquet`` (one row per experiment and metric).",
    "flags": "**Validity flags**: what each flag means, whether it makes a run's energy unreliable or only "
    "describes how the GPU ran, and which experiments carry it.",
    "provenance": "**Provenance** of the measurements (the first successful cycle of each experiment): "
    "package version and git commit, software versions, hosts and GPUs (driver, power limit), "
    "and the software that rendered this report.",
}
# Flags the harness sets (llm_energy.measure) beside the energy session's own.
HARNESS_FLAG_DESCRIPTIONS = {
    "warmup_not_converged": "warm-up batch times did not agree within campaign.warmup.tolerance before "
    "campaign.warmup.max_s: the window may include a host or GPU still warming up",
    "pace_varied_in_window": "the repeats of the request set inside the window (the same work each time) took "
    "times whose CV exceeds campaign.warmup.tolerance: the engine or its host changed pace during the window "
    "(repeat_time_cv_in_window), which shows as spread between cycles",
    "host_cpu_throttled": "the cgroup's CPU quota stopped the measured process during the window "
    "(host_cpu.throttled_s in the window record): the host, not the engine, set part of its pace",
    "recompiled_in_window": "the backend compiled (torch.compile / CUDA graphs) inside the measured window",
    "prefill_exceeds_window": "the differential prefill energy exceeded the whole window's: decode energy "
    "is negative, the split is not meaningful",
    "failed": "the cycle failed (the error is in the summary's errors column)",
}
FLAG_MEANINGS = {**FLAG_DESCRIPTIONS, **HARNESS_FLAG_DESCRIPTIONS}
KEY_COLUMNS: tuple[str, ...] = (
    "experiment_id",
    "model",
    "backend",
    "backend_variant",
    "engine_path",
    "dataset",
    "batch_size",
    "dtype",
    "status",
    "cycles_ok",
    "flags",
    "gpu_name",
    "output_tokens_per_s",
    "gpu_energy_per_output_token_j",
    "gpu_energy_per_output_token_j_ci95_low",
    "gpu_energy_per_output_token_j_ci95_high",
    "node_energy_per_output_token_j",
    "host_estimated_energy_per_output_token_j",
    "gpu_mean_power_w",
    "ttft_p50_s",
    "tpot_p50_s",
    "e2e_p50_s",
    "mfu",
    "mbu",
    "job_share_in_windows",
)
STYLE = """
body { font-family: sans-serif; font-size: 13px; margin: 12px; color: #222; }
h1 { font-size: 18px; } h2 { font-size: 15px; margin-top: 20px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.unit { font-weight: normal; color: #555; font-size: 11px; }
.wrap { overflow-x: auto; }
"""


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def _cell(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and not np.isfinite(value)):
        return "<td></td>"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f'<td class="num">{int(value):,}</td>'
    if isinstance(value, (float, np.floating)):
        return f'<td class="num">{float(value):.4g}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def table_html(frame: pd.DataFrame, units: bool = True, table_id: str = "") -> str:
    head = "".join(
        f"<th>{html.escape(c)}"
        + (f'<br><span class="unit">[{html.escape(unit_of(c))}]</span>' if units else "")
        + "</th>"
        for c in frame.columns
    )
    rows = "\n".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in frame.itertuples(index=False))
    ident = f' id="{table_id}"' if table_id else ""
    return f'<div class="wrap"><table{ident}><thead><tr>{head}</tr></thead><tbody>\n{rows}\n</tbody></table></div>'


def summary_page(summary: pd.DataFrame) -> str:
    key = [c for c in KEY_COLUMNS if c in summary.columns and summary[c].notna().any()]
    columns = pd.DataFrame({"column": list(summary.columns), "unit": [unit_of(c) for c in summary.columns]})
    body = (
        f"<p>{len(summary)} experiments, {len(summary.columns)} columns in summary.csv (the headline "
        "metrics; every metric with its n, std, CI and CV is in metrics.csv, one row per experiment and "
        "metric, and the settings shared by every experiment are in each experiment's JSON). Means over the "
        "successful cycles; <code>_ci95_low</code>/<code>_ci95_high</code>: 95 % confidence interval of the "
        "mean (Student t); latency percentiles pooled over every request.</p>"
        "<h2>Main columns</h2>"
        + table_html(summary[key], table_id="summary-table")
        + "<h2>Every column and its unit</h2>"
        + table_html(columns, units=False, table_id="summary-units")
    )
    return _page(PAGE_TITLES["summary"], body)


def flags_page(summary: pd.DataFrame) -> str:
    carried: dict[str, list[str]] = {}
    if "flags" in summary.columns:
        for eid, flags in zip(summary["experiment_id"].astype(str), summary["flags"]):
            for flag in flags.split(";") if isinstance(flags, str) and flags else []:
                carried.setdefault(flag, []).append(eid)
    rows = []
    for flag in sorted(set(FLAG_MEANINGS) | set(carried)):
        ids = carried.get(flag, [])
        rows.append(
            {
                "flag": flag,
                "meaning": FLAG_MEANINGS.get(flag, "(no description recorded)"),
                "effect": flag_effect(flag),
                "experiments": len(ids),
                "which": ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else ""),
            }
        )
    frame = pd.DataFrame(rows, columns=["flag", "meaning", "effect", "experiments", "which"])
    carrying = sum(1 for flags in summary.get("flags", []) if isinstance(flags, str) and flags)
    body = (
        f"<p>{carrying} of {len(summary)} experiments carry at least one flag (summary column "
        "<code>flags</code>). A flag does not discard a measurement; it says why a number may not be "
        "comparable with others.</p>" + table_html(frame, units=False, table_id="flags-table")
    )
    return _page(PAGE_TITLES["flags"], body)


def _measuring_provenance(runs_dir: Path | None, experiment_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Provenance of each experiment's first successful cycle (the process that measured it)."""
    found: dict[str, dict[str, Any]] = {}
    if runs_dir is None:
        return found
    for eid in experiment_ids:
        for result in sorted(
            Path(runs_dir, eid).glob("cycle-*/result.json"), key=lambda p: int(p.parent.name.removeprefix("cycle-"))
        ):
            document = json.loads(result.read_text())
            if document.get("data", {}).get("status") == "ok":
                found[eid] = document.get("provenance") or {}
                break
    return found


def _distinct_rows(values: Sequence[Mapping[str, Any]], drop_none: bool = False) -> pd.DataFrame:
    """The distinct records (keys in their order), each with how many experiments share it (without
    the keys whose value is None, with drop_none: software that is not installed)."""
    counts: dict[str, list] = {}
    for value in values:
        key = json.dumps(value, sort_keys=True, default=str)
        counts.setdefault(key, [value, 0])[1] += 1
    rows = sorted(counts.values(), key=lambda pair: -pair[1])
    return pd.DataFrame(
        [{**{k: v for k, v in value.items() if v is not None or not drop_none}, "experiments": n} for value, n in rows]
    )


def provenance_page(
    summary: pd.DataFrame,
    experiment_provenance: Mapping[str, Mapping[str, Any]],
    runs_dir: Path | None,
    rendered_by: Mapping[str, Any],
) -> str:
    ids = summary["experiment_id"].astype(str).tolist() if "experiment_id" in summary.columns else []
    measured = _measuring_provenance(runs_dir, ids)
    parts = [
        f"<p>Measured provenance found for {len(measured)} of {len(ids)} experiments (from "
        "<code>runs/*/cycle-*/result.json</code>; an archive without raw runs keeps only the aggregation's "
        "provenance, below).</p>"
    ]
    if measured:
        code = [
            {**(p.get("code") or {}), "git_commit": (p.get("code") or {}).get("git_commit") or "not recorded"}
            for p in measured.values()
        ]
        parts.append("<h2>Code that measured</h2>" + table_html(_distinct_rows(code), units=False, table_id="code"))
        software = [p.get("software") or {} for p in measured.values()]
        parts.append(
            "<h2>Software (versions of the measuring process)</h2>"
            + table_html(_distinct_rows(software, drop_none=True), units=False, table_id="software")
        )
        gpus = []
        for p in measured.values():
            for gpu in p.get("gpus") or [{"name": "no GPU (CPU only)"}]:
                gpus.append(
                    {
                        k: gpu.get(k)
                        for k in (
                            "name",
                            "uuid",
                            "driver",
                            "cuda_driver_version",
                            "power_limit_w",
                            "applications_clock_sm_mhz",
                            "mig_mode",
                            "memory_total_bytes",
                        )
                        if k in gpu
                    }
                )
        parts.append("<h2>GPUs</h2>" + table_html(_distinct_rows(gpus), units=False, table_id="gpus"))
        hosts = [
            {
                k: (p.get("host") or {}).get(k)
                for k in ("hostname", "platform", "cpu_model", "cpu_count", "memory_total_bytes")
            }
            for p in measured.values()
        ]
        parts.append("<h2>Hosts</h2>" + table_html(_distinct_rows(hosts), units=False, table_id="hosts"))
    aggregated = [
        {"config_sha256": p.get("config_sha256"), **(p.get("code") or {})} for p in experiment_provenance.values()
    ]
    if aggregated:
        parts.append("<h2>Aggregation (experiments/*.json)</h2>" + table_html(_distinct_rows(aggregated), units=False))
    rendered = {
        "package_version": (rendered_by.get("code") or {}).get("package_version"),
        "git_commit": (rendered_by.get("code") or {}).get("git_commit"),
        "created_utc": rendered_by.get("created_utc"),
        **{
            k: v
            for k, v in (rendered_by.get("software") or {}).items()
            if k in ("python", "snakemake", "matplotlib", "pandas", "numpy") and v
        },
    }
    parts.append("<h2>Rendered by</h2>" + table_html(pd.DataFrame([rendered]), units=False, table_id="rendered"))
    return _page(PAGE_TITLES["provenance"], "\n".join(parts))


def write_pages(
    summary: pd.DataFrame,
    experiment_provenance: Mapping[str, Mapping[str, Any]],
    runs_dir: Path | None,
    rendered_by: Mapping[str, Any],
    outputs: Mapping[str, Path],
) -> None:
    """Write every page of PAGE_NAMES to outputs[name]."""
    pages = {
        "summary": lambda: summary_page(summary),
        "flags": lambda: flags_page(summary),
        "provenance": lambda: provenance_page(summary, experiment_provenance, runs_dir, rendered_by),
    }
    for name in PAGE_NAMES:
        atomic_write_bytes(outputs[name], pages[name]().encode("utf-8"))
        log.info("wrote %s", outputs[name])
