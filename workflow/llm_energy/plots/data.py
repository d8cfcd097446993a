"""What the figures read from the summary table: series, facets, the energy boundary, the context line.

The energy *boundary* of a figure is "gpu" when any plotted experiment has GPU energy, else "node"
(the measured domains: gpu+cpu+dram or cpu+dram), else "host_estimated" (CodeCarbon's CPU+DRAM
model estimate, on a machine that measures nothing, e.g. CPU-only without RAPL). Axis labels name
the boundary and whether the energy was measured or estimated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.ticker import NullFormatter, ScalarFormatter

from llm_energy.plots.style import MAX_LISTED
from llm_energy.summary import PARAMETER_COLUMNS, Tables, read_tables

# Columns that, when they vary, distinguish the series of a figure (batch size is an axis; model and
# dataset are facets).
FACET_COLUMNS: tuple[str, ...] = ("model", "dataset")
SERIES_COLUMNS: tuple[str, ...] = (
    "backend",
    *(name for name in PARAMETER_COLUMNS if name != "batch_size"),
    "gpu_name",
)
# Ratio max/min above which an axis is drawn logarithmically.
LOG_RATIO_BATCH = 8.0
LOG_RATIO_VALUES = 10.0


@dataclass(frozen=True)
class EnergyBoundary:
    """Which energy the figure shows, and how its axis is labelled."""

    name: str  # "gpu", "node" or "host_estimated"
    column: str  # summary column with the mean energy per output token
    label: str  # axis label: boundary, unit, measured/estimated and source
    short: str  # one line for the context footer


def load(summary: Tables | pd.DataFrame | Path | str) -> pd.DataFrame:
    """What the figures read: the summary with every metric of the metrics table joined
    (summary.Tables.for_figures; from a summary.parquet path, the metrics.parquet beside it), or an
    already joined DataFrame; backends labelled with their variant and engine path."""
    if isinstance(summary, (str, Path)):
        summary = read_tables(summary)
    if isinstance(summary, Tables):
        summary = summary.for_figures()
    return backend_with_variant(summary)


def backend_with_variant(summary: pd.DataFrame) -> pd.DataFrame:
    """Where a row has a backend variant, its backend reads `backend-variant` (pytorch-int8, as in the
    experiment id), so every figure tells a backend's variants apart where it labels backends; where
    the engine path is known and not already the variant's name, it follows in parentheses
    (`pytorch (eager)`, `pytorch-int8 (fast)`), so eager and fast pytorch are never one series."""
    labelled = summary.copy()
    if "backend" not in labelled.columns:
        return labelled
    labelled["backend"] = labelled["backend"].astype(object)
    if "backend_variant" in labelled.columns:
        has = labelled["backend_variant"].notna()
        labelled.loc[has, "backend"] = (
            labelled.loc[has, "backend"].astype(str) + "-" + labelled.loc[has, "backend_variant"].astype(str)
        )
    if "engine_path" in labelled.columns:
        variant = labelled["backend_variant"] if "backend_variant" in labelled.columns else None
        shown = labelled["engine_path"].notna()
        if variant is not None:
            shown &= labelled["engine_path"].astype(str) != variant.astype(str)
        labelled.loc[shown, "backend"] = (
            labelled.loc[shown, "backend"].astype(str) + " (" + labelled.loc[shown, "engine_path"].astype(str) + ")"
        )
    return labelled


def column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A numeric column, or all-NaN where the summary lacks it (a metric nobody measured)."""
    if name in frame.columns:
        return pd.to_numeric(frame[name], errors="coerce").astype("float64")
    return pd.Series(np.nan, index=frame.index, dtype="float64")


def isnan(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def strings(frame: pd.DataFrame, name: str) -> list[str]:
    """Distinct non-null strings of a column, in order of appearance."""
    if name not in frame.columns:
        return []
    return list(dict.fromkeys(str(v) for v in frame[name] if not isnan(v)))


def list_ids(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:MAX_LISTED])
    return shown + (f" and {len(ids) - MAX_LISTED} more" if len(ids) > MAX_LISTED else "")


def split_successful(summary: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """(rows of successful experiments, notes: skipped failed ones and the validity flags)."""
    if "status" not in summary.columns or summary.empty:
        return summary.copy(), []
    ok_mask = summary["status"].astype(str) == "ok"
    failed = summary.loc[~ok_mask, "experiment_id"].astype(str).tolist()
    notes = [f"Skipped {len(failed)} failed experiment(s): {list_ids(failed)}"] if failed else []
    ok = summary.loc[ok_mask].reset_index(drop=True)
    notes += flag_notes(ok)
    return ok, notes


def flag_notes(ok: pd.DataFrame) -> list[str]:
    """Validity flags travel with every figure: each flag with how many experiments carry it, and the
    first few of them."""
    if "flags" not in ok.columns:
        return []
    by_flag: dict[str, list[str]] = {}
    for eid, flags in zip(ok["experiment_id"].astype(str), ok["flags"]):
        if isinstance(flags, str) and flags:
            for flag in flags.split(";"):
                by_flag.setdefault(flag, []).append(eid)
    if not by_flag:
        return ["Validity flags: none."]
    parts = [f"{flag} ({len(ids)}: {list_ids(ids)})" for flag, ids in sorted(by_flag.items())]
    return ["Validity flags (summary.csv, column flags; meanings in the report): " + "; ".join(parts)]


def method_word(methods: list[str]) -> str:
    words = set()
    for method in methods:
        words |= {w for w in ("measured", "estimated") if w in method}
    if words == {"measured"}:
        return "measured"
    if words == {"estimated"}:
        return "estimated"
    if words:
        return "partly estimated"
    return "method unknown"


def choose_boundary(ok: pd.DataFrame) -> EnergyBoundary | None:
    """GPU energy where any experiment has it, else measured node energy, else CodeCarbon's
    estimate; None where none exists."""
    for name in ("gpu", "node", "host_estimated"):
        per_token = f"{name}_energy_per_output_token_j"
        values = column(ok, per_token)
        if not values.notna().any():
            continue
        rows = ok.loc[values.notna()]
        method = method_word(strings(rows, f"{name}_energy_method"))
        sources = strings(rows, f"{name}_energy_source")
        if name == "gpu":
            detail = f"{method}" + (f", {', '.join(sources)}" if sources else "")
            label = f"GPU energy per output token (J)\n[{detail}]"
            short = f"GPU energy, {detail}"
        elif name == "host_estimated":
            domains = strings(rows, "host_estimated_energy_domains")
            detail = (", ".join(domains) + "; " if domains else "") + "estimated (CodeCarbon model)"
            label = f"Host energy per output token (J)\n[{detail}]"
            short = f"host energy, {detail}"
        else:
            domains = strings(rows, "node_energy_domains")
            detail = (", ".join(domains) + "; " if domains else "") + method
            label = f"Node energy per output token (J)\n[{detail}]"
            short = f"node energy, {detail}"
        return EnergyBoundary(name=name, column=per_token, label=label, short=short)
    return None


def gpu_text(ok: pd.DataFrame) -> str:
    names = []
    for name, count in zip(ok.get("gpu_name", pd.Series(dtype=object)), ok.get("gpu_count", pd.Series(dtype=object))):
        if isnan(name) or str(name) == "None":
            names.append("no GPU (CPU only)")
        else:
            n = 1 if isnan(count) or not int(count) else int(count)
            names.append(f"{n} x {name}")
    return ", ".join(dict.fromkeys(names)) or "unknown"


def context_notes(ok: pd.DataFrame, boundary: EnergyBoundary | None, energy: bool = True) -> list[str]:
    """The line every figure carries: its energy source and method, and the GPU."""
    if not energy:
        what = "Energy: none shown"
    elif boundary is None:
        what = "Energy: none measured or estimated"
    else:
        what = f"Energy: {boundary.short}"
    return [f"{what}. GPU: {gpu_text(ok)}."]


def varying(ok: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    return [c for c in columns if c in ok.columns and ok[c].astype(str).nunique(dropna=False) > 1]


def constant_title(ok: pd.DataFrame, varies: Sequence[str]) -> str:
    parts = []
    for name in ("model", "backend", "dataset", "gpu_name"):
        if name in ok.columns and name not in varies and len(ok):
            value = ok[name].iloc[0]
            if not isnan(value):
                parts.append(str(value))
    return " | ".join(parts)


def value_text(name: str, value: Any) -> str:
    """How one identity value reads in a legend or tick label."""
    if name == "gpu_name":
        return "no GPU" if isnan(value) or str(value) == "None" else str(value)
    if name in ("model", "backend", "dataset"):
        return "?" if isnan(value) else str(value)
    return f"{name}={'-' if isnan(value) else value}"


def labels_of(frame: pd.DataFrame, columns: Sequence[str]) -> pd.Series:
    """One label per row from the given identity columns ("" where none)."""
    if not columns or frame.empty:
        return pd.Series([""] * len(frame), index=frame.index, dtype=object)
    parts = [frame[c].map(lambda v, c=c: value_text(c, v)) for c in columns]
    return pd.concat(parts, axis=1).agg(" / ".join, axis=1)


@dataclass(frozen=True)
class Layout:
    """How a figure splits a campaign: facets (small multiples) and series (lines within one)."""

    facet_columns: list[str]
    series_columns: list[str]
    facets: pd.Series  # facet label per row
    series: pd.Series  # series label per row
    title: str  # what every experiment shares


def layout(ok: pd.DataFrame) -> Layout:
    """Facets by model and dataset (where they vary), series by backend and the other varying
    parameters."""
    facet_columns = varying(ok, FACET_COLUMNS)
    series_columns = varying(ok, SERIES_COLUMNS)
    return Layout(
        facet_columns,
        series_columns,
        labels_of(ok, facet_columns),
        labels_of(ok, series_columns),
        constant_title(ok, facet_columns + series_columns),
    )


def error(frame: pd.DataFrame, name: str, floor_positive: bool) -> np.ndarray:
    """2 x n asymmetric error bars from the 95 % CI columns (0 where there is no interval); never
    below zero: a quantity that cannot be negative gets no interval crossing zero."""
    mean = column(frame, name).to_numpy()
    low = np.nan_to_num(mean - column(frame, f"{name}_ci95_low").to_numpy(), nan=0.0)
    high = np.nan_to_num(column(frame, f"{name}_ci95_high").to_numpy() - mean, nan=0.0)
    low = np.minimum(np.clip(low, 0, None), np.nan_to_num(mean) * (0.999 if floor_positive else 1.0))
    return np.vstack([np.clip(low, 0, None), np.clip(high, 0, None)])


def wants_log(values: np.ndarray, ratio: float) -> bool:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return bool(len(values) > 1 and (values > 0).all() and values.max() / values.min() >= ratio)


def set_batch_axis(ax, batch_sizes: np.ndarray) -> None:
    ticks = sorted({float(b) for b in batch_sizes if np.isfinite(b)})
    if wants_log(np.asarray(ticks), LOG_RATIO_BATCH):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_formatter(NullFormatter())
    if len(ticks) > 12:  # too many to label each: every other one
        ticks = ticks[::2]
    ax.set_xticks(ticks)
    formatter = ScalarFormatter()
    formatter.set_scientific(False)
    ax.xaxis.set_major_formatter(formatter)
    ax.set_xlabel("Batch size")


def missing_note(ok: pd.DataFrame, shown: pd.DataFrame, what: str) -> list[str]:
    present = set(shown["experiment_id"].astype(str))
    missing = [i for i in ok["experiment_id"].astype(str) if i not in present]
    return [f"Not shown ({what} unavailable): {list_ids(missing)}"] if missing else []


def pareto_front(throughput: Sequence[float], energy: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both higher throughput and lower energy,
    sorted by throughput."""
    points = [
        (float(x), float(y), i) for i, (x, y) in enumerate(zip(throughput, energy)) if np.isfinite(x) and np.isfinite(y)
    ]
    # Highest throughput first; a point is on the front if it needs less energy than every faster one.
    points.sort(key=lambda p: (-p[0], p[1]))
    front: list[int] = []
    best_energy = math.inf
    for _x, y, index in points:
        if y < best_energy:
            front.append(index)
            best_energy = y
    return sorted(front, key=lambda i: float(throughput[i]))
