"""Figures of the summary table (PNG at 200 dpi + SVG), written atomically.

Each plot function takes the summary (a DataFrame from `llm_energy.summary.build_summary`, or the
path of the summary Parquet artifact) and two output paths. Every function copes with a single
experiment, missing metrics, failed experiments (skipped, with a note on the figure) and an empty
summary (a figure that says "no successful experiments"), so a partial campaign never breaks the
report.

The energy *boundary* of a figure is "gpu" when any plotted experiment has GPU energy, else "node"
(the measured domains: gpu+cpu+dram or cpu+dram), else "host_estimated" (CodeCarbon's CPU+DRAM
model estimate, on a machine that measures nothing, e.g. CPU-only without RAPL). The y label names
the boundary and whether the energy was measured or estimated.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas directly (no pyplot state), so
plotting is thread-safe and independent of the user's MPLBACKEND.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import NullFormatter, ScalarFormatter

from llm_energy.artifacts import atomic_write_bytes
from llm_energy.summary import PARAMETER_COLUMNS

log = logging.getLogger(__name__)

PNG_DPI = 200
NO_SUCCESS_TEXT = "no successful experiments"
# Columns that, when they vary, distinguish the lines of a figure (batch size is the x axis).
SERIES_COLUMNS: tuple[str, ...] = (
    "model", "backend", "dataset",
    *(name for name in PARAMETER_COLUMNS if name != "batch_size"),
    "gpu_name",
)
ENERGY_DOMAINS: tuple[str, ...] = ("gpu", "cpu", "dram")
DOMAIN_COLORS = {"gpu": "#4C72B0", "cpu": "#DD8452", "dram": "#55A868"}
# Ratio max/min above which an axis is drawn logarithmically.
LOG_RATIO_BATCH = 8.0
LOG_RATIO_VALUES = 10.0
MAX_LISTED = 4  # experiment ids listed in a note before "and N more"
RC_PARAMS = {
    "svg.hashsalt": "llm-energy",  # stable SVG ids: same data, same file
    "font.size": 9,
}


# ---------------------------------------------------------------------------------------------
# Shared helpers


@dataclass(frozen=True)
class EnergyBoundary:
    """Which energy the figure shows, and how its y axis is labelled."""

    name: str  # "gpu", "node" or "host_estimated"
    column: str  # summary column with the mean energy per output token
    label: str  # axis label: boundary, unit, measured/estimated and source


def _load(summary: pd.DataFrame | Path | str) -> pd.DataFrame:
    if isinstance(summary, pd.DataFrame):
        return _backend_with_variant(summary)
    from llm_energy.summary import read_summary

    return _backend_with_variant(read_summary(summary))


def _backend_with_variant(summary: pd.DataFrame) -> pd.DataFrame:
    """Where a row has a backend variant, its backend reads `backend-variant` (pytorch-int8, as in the
    experiment id), so every figure tells a backend's variants apart where it labels backends; where
    the engine path is known and not already the variant's name, it follows in parentheses
    (`pytorch (eager)`, `pytorch-int8 (fast)`), so eager and fast pytorch are never one series."""
    labelled = summary.copy()
    if "backend_variant" in labelled.columns:
        has = labelled["backend_variant"].notna()
        labelled.loc[has, "backend"] = (labelled.loc[has, "backend"].astype(str) + "-"
                                        + labelled.loc[has, "backend_variant"].astype(str))
    if "engine_path" in labelled.columns:
        variant = labelled["backend_variant"] if "backend_variant" in labelled.columns else None
        shown = labelled["engine_path"].notna()
        if variant is not None:
            shown &= labelled["engine_path"].astype(str) != variant.astype(str)
        labelled.loc[shown, "backend"] = (labelled.loc[shown, "backend"].astype(str) + " ("
                                          + labelled.loc[shown, "engine_path"].astype(str) + ")")
    return labelled


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A numeric column, or all-NaN where the summary lacks it (a metric nobody measured)."""
    if name in frame.columns:
        return pd.to_numeric(frame[name], errors="coerce").astype("float64")
    return pd.Series(np.nan, index=frame.index, dtype="float64")


def _strings(frame: pd.DataFrame, name: str) -> list[str]:
    """Distinct non-null strings of a column, in order of appearance."""
    if name not in frame.columns:
        return []
    return list(dict.fromkeys(str(v) for v in frame[name] if v is not None and not _isnan(v)))


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _list_ids(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:MAX_LISTED])
    return shown + (f" and {len(ids) - MAX_LISTED} more" if len(ids) > MAX_LISTED else "")


def _split_successful(summary: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """(rows of successful experiments, notes about skipped failed ones)."""
    if "status" not in summary.columns or summary.empty:
        return summary.copy(), []
    ok_mask = summary["status"].astype(str) == "ok"
    failed = summary.loc[~ok_mask, "experiment_id"].astype(str).tolist()
    notes = [f"Skipped {len(failed)} failed experiment(s): {_list_ids(failed)}"] if failed else []
    ok = summary.loc[ok_mask].reset_index(drop=True)
    if "flags" in ok.columns:
        # Validity flags travel with every figure, so a reader of the report sees them too.
        flagged = [f"{eid} [{flags}]" for eid, flags in zip(ok["experiment_id"].astype(str), ok["flags"])
                   if isinstance(flags, str) and flags]
        if flagged:
            notes.append(f"Validity flags (summary.csv, column flags): {_list_ids(flagged)}")
    return ok, notes


def _method_word(methods: list[str]) -> str:
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
        column = f"{name}_energy_per_output_token_j"
        values = _column(ok, column)
        if not values.notna().any():
            continue
        rows = ok.loc[values.notna()]
        method = _method_word(_strings(rows, f"{name}_energy_method"))
        sources = _strings(rows, f"{name}_energy_source")
        if name == "gpu":
            detail = f"{method}" + (f", {', '.join(sources)}" if sources else "")
            label = f"GPU energy per output token (J)\n[{detail}]"
        elif name == "host_estimated":
            domains = _strings(rows, "host_estimated_energy_domains")
            label = ("Host energy per output token (J)\n[" + (", ".join(domains) + "; " if domains
                     else "") + "estimated (CodeCarbon model)]")
        else:
            domains = _strings(rows, "node_energy_domains")
            detail = (", ".join(domains) + "; " if domains else "") + method
            label = f"Node energy per output token (J)\n[{detail}]"
        return EnergyBoundary(name=name, column=column, label=label)
    return None


def _varying(ok: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    return [c for c in columns if c in ok.columns and ok[c].astype(str).nunique(dropna=False) > 1]


def _constant_title(ok: pd.DataFrame, varying: Sequence[str]) -> str:
    parts = []
    for name in ("model", "backend", "dataset", "gpu_name"):
        if name in ok.columns and name not in varying and len(ok):
            value = ok[name].iloc[0]
            if value is not None and not _isnan(value):
                parts.append(str(value))
    return " | ".join(parts)


def _value_text(name: str, value: Any) -> str:
    """How one identity value reads in a legend or tick label."""
    missing = value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA
    if name == "gpu_name":
        return "no GPU" if missing or str(value) == "None" else str(value)
    if name in ("model", "backend", "dataset"):
        return "?" if missing else str(value)
    return f"{name}={'-' if missing else value}"


def _series(ok: pd.DataFrame) -> tuple[list[tuple[str | None, pd.DataFrame]], str]:
    """Groups of rows drawn as one line each, their labels, and the text common to all of them."""
    varying = _varying(ok, SERIES_COLUMNS)
    title = _constant_title(ok, varying)
    if not varying:
        return [(None, ok)], title
    keys = ok[varying].astype(str).agg("\x00".join, axis=1)
    groups = []
    for key in dict.fromkeys(keys):
        group = ok.loc[keys == key]
        first = group.iloc[0]
        groups.append((" / ".join(_value_text(name, first[name]) for name in varying), group))
    return groups, title


def _error(frame: pd.DataFrame, column: str, floor_positive: bool) -> np.ndarray:
    """2 x n asymmetric error bars from the 95 % CI columns (0 where there is no interval)."""
    mean = _column(frame, column).to_numpy()
    low = mean - _column(frame, f"{column}_ci95_low").to_numpy()
    high = _column(frame, f"{column}_ci95_high").to_numpy() - mean
    low = np.nan_to_num(low, nan=0.0)
    high = np.nan_to_num(high, nan=0.0)
    if floor_positive:  # a log axis cannot show an interval reaching 0 or below
        low = np.minimum(low, mean * 0.999)
    return np.vstack([np.clip(low, 0, None), np.clip(high, 0, None)])


def _wants_log(values: np.ndarray, ratio: float) -> bool:
    values = values[np.isfinite(values)]
    return bool(len(values) > 1 and (values > 0).all() and values.max() / values.min() >= ratio)


def _set_batch_axis(ax, batch_sizes: np.ndarray) -> None:
    ticks = sorted({float(b) for b in batch_sizes if np.isfinite(b)})
    if _wants_log(np.asarray(ticks), LOG_RATIO_BATCH):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(ticks)
    formatter = ScalarFormatter()
    formatter.set_scientific(False)
    ax.xaxis.set_major_formatter(formatter)
    ax.set_xlabel("Batch size")


def _new_figure(width_in: float = 7.0, height_in: float = 4.8) -> Figure:
    figure = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _add_notes(figure: Figure, notes: Sequence[str]) -> None:
    """Notes (skipped experiments, missing metrics) at the bottom, outside the axes."""
    if not notes:
        return
    import textwrap

    # Wrapped here, not by matplotlib, so that the reserved margin counts the lines really drawn
    # (about 19 characters of 7 pt text per inch of figure width).
    width_chars = int(figure.get_figwidth() * 19)
    text = "\n".join(textwrap.fill(note, width_chars, break_long_words=True) for note in notes)
    lines = text.count("\n") + 1
    height_in = figure.get_figheight()
    bottom = min(0.45, (0.06 + 0.12 * lines) / height_in)
    figure.get_layout_engine().set(rect=(0, bottom, 1, 1 - bottom))
    figure.text(0.01, 0.01, text, ha="left", va="bottom", fontsize=7, color="#444444")


def _message_figure(message: str, notes: Sequence[str], title: str) -> Figure:
    figure = _new_figure()
    ax = figure.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=14, transform=ax.transAxes)
    _add_notes(figure, notes)
    return figure


def _save(figure: Figure, png: Path | str, svg: Path | str) -> None:
    """Render to memory, then write each file atomically (temp name + os.replace)."""
    with matplotlib.rc_context(RC_PARAMS):
        png_buffer = io.BytesIO()
        figure.savefig(png_buffer, format="png", dpi=PNG_DPI)
        svg_buffer = io.BytesIO()
        # No date in the SVG: the same summary gives the same file.
        figure.savefig(svg_buffer, format="svg", metadata={"Date": None})
    atomic_write_bytes(png, png_buffer.getvalue())
    atomic_write_bytes(svg, svg_buffer.getvalue())
    log.info("wrote %s and %s", png, svg)


def _missing_note(ok: pd.DataFrame, shown: pd.DataFrame, what: str) -> list[str]:
    missing = [i for i in ok["experiment_id"].astype(str) if i not in set(shown["experiment_id"].astype(str))]
    return [f"Not shown ({what} unavailable): {_list_ids(missing)}"] if missing else []


def _colors(n: int) -> list:
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(max(n, 1))]


def _render(draw, summary: pd.DataFrame | Path | str, png: Path | str, svg: Path | str, title: str) -> None:
    """Draw one figure from a summary (DataFrame or Parquet path) in the house style and save it."""
    with matplotlib.rc_context(RC_PARAMS):
        figure = draw(_load(summary), title)
    _save(figure, png, svg)


# ---------------------------------------------------------------------------------------------
# Figures


def plot_energy_vs_batch_size(summary: pd.DataFrame | Path | str, png: Path | str, svg: Path | str) -> None:
    """Energy per output token vs batch size, one line per configuration, 95 % CI error bars."""
    _render(_draw_energy_vs_batch_size, summary, png, svg, "Energy per output token vs batch size")


def _draw_energy_vs_batch_size(summary: pd.DataFrame, title: str) -> Figure:
    ok, notes = _split_successful(summary)
    if ok.empty:
        return _message_figure(NO_SUCCESS_TEXT, notes, title)
    boundary = choose_boundary(ok)
    if boundary is None:
        return _message_figure("no energy per output token measured", notes, title)
    shown = ok.loc[_column(ok, boundary.column).notna() & _column(ok, "batch_size").notna()]
    notes += _missing_note(ok, shown, f"{boundary.name} energy per output token or batch size")
    groups, common = _series(shown)
    y_log = _wants_log(_column(shown, boundary.column).to_numpy(), LOG_RATIO_VALUES)
    figure = _new_figure()
    ax = figure.add_subplot()
    for (label, group), color in zip(groups, _colors(len(groups))):
        group = group.sort_values("batch_size")
        ax.errorbar(
            _column(group, "batch_size"), _column(group, boundary.column),
            yerr=_error(group, boundary.column, floor_positive=y_log),
            marker="o", capsize=3, color=color, label=label,
        )
    _set_batch_axis(ax, _column(shown, "batch_size").to_numpy())
    if y_log:
        ax.set_yscale("log")
    ax.set_ylabel(boundary.label)
    ax.set_title(title + (f"\n{common}" if common else ""))
    ax.grid(True, which="major", alpha=0.3)
    if any(label for label, _ in groups):
        ax.legend(fontsize=7)
    notes.append("Error bars: 95 % CI of the mean over cycles (Student t); none where fewer than 2 cycles.")
    _add_notes(figure, notes)
    return figure


def pareto_front(throughput: Sequence[float], energy: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both higher throughput and lower energy,
    sorted by throughput."""
    points = [
        (float(x), float(y), i) for i, (x, y) in enumerate(zip(throughput, energy))
        if np.isfinite(x) and np.isfinite(y)
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


def plot_throughput_vs_energy(summary: pd.DataFrame | Path | str, png: Path | str, svg: Path | str) -> None:
    """Output tokens/s (x) vs energy per output token (y), labelled by batch size, Pareto front."""
    _render(_draw_throughput_vs_energy, summary, png, svg, "Throughput vs energy per output token")


def _draw_throughput_vs_energy(summary: pd.DataFrame, title: str) -> Figure:
    ok, notes = _split_successful(summary)
    if ok.empty:
        return _message_figure(NO_SUCCESS_TEXT, notes, title)
    boundary = choose_boundary(ok)
    if boundary is None:
        return _message_figure("no energy per output token measured", notes, title)
    x_column = "output_tokens_per_s"
    shown = ok.loc[_column(ok, boundary.column).notna() & _column(ok, x_column).notna()].reset_index(drop=True)
    notes += _missing_note(ok, shown, f"throughput or {boundary.name} energy per output token")
    if shown.empty:
        return _message_figure("no experiment has both throughput and energy", notes, title)
    x_all = _column(shown, x_column).to_numpy()
    y_all = _column(shown, boundary.column).to_numpy()
    x_log = _wants_log(x_all, LOG_RATIO_VALUES)
    y_log = _wants_log(y_all, LOG_RATIO_VALUES)
    groups, common = _series(shown)
    figure = _new_figure()
    ax = figure.add_subplot()
    for (label, group), color in zip(groups, _colors(len(groups))):
        group = group.sort_values("batch_size")
        x = _column(group, x_column)
        y = _column(group, boundary.column)
        ax.errorbar(
            x, y,
            xerr=_error(group, x_column, floor_positive=x_log),
            yerr=_error(group, boundary.column, floor_positive=y_log),
            marker="o", linestyle=":", linewidth=0.8, capsize=2, color=color, label=label,
        )
        for xi, yi, batch in zip(x, y, _column(group, "batch_size")):
            if np.isfinite(batch):
                ax.annotate(f"bs{int(batch)}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front(x_all, y_all)
    if len(front) >= 1:
        ax.plot(
            x_all[front], y_all[front], color="black", linestyle="--", linewidth=1.2,
            marker="s", markersize=9, markerfacecolor="none", label="Pareto front", zorder=0,
        )
    if x_log:
        ax.set_xscale("log")
    if y_log:
        ax.set_yscale("log")
    ax.set_xlabel("Output tokens per second")
    ax.set_ylabel(boundary.label)
    ax.set_title(title + (f"\n{common}" if common else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    notes.append(
        "Error bars: 95 % CI over cycles (Student t). Pareto front: no other point is both faster "
        "and needs less energy per token."
    )
    _add_notes(figure, notes)
    return figure


def _domain_values(ok: pd.DataFrame, domain: str) -> np.ndarray:
    """Energy per output token of one domain: measured, else CodeCarbon's estimate (the
    `_estimated_` columns); ratio of means where the summary lacks the per-token column."""
    tokens = _column(ok, "output_tokens").where(lambda s: s > 0)
    values = _column(ok, f"{domain}_energy_per_output_token_j").fillna(
        _column(ok, f"{domain}_energy_j") / tokens)
    if domain != "gpu":
        values = values.fillna(_column(ok, f"{domain}_estimated_energy_per_output_token_j").fillna(
            _column(ok, f"{domain}_estimated_energy_j") / tokens))
    return values.to_numpy()


def _estimated(ok: pd.DataFrame, domain: str) -> list[bool]:
    """True where the domain's bar is an estimate (no measured value, or labelled estimated)."""
    measured = _column(ok, f"{domain}_energy_per_output_token_j").fillna(_column(ok, f"{domain}_energy_j"))
    column = f"{domain}_energy_method"
    methods = ok[column] if column in ok.columns else [None] * len(ok)
    return [bool(np.isnan(m)) or (isinstance(v, str) and "estimated" in v)
            for m, v in zip(measured.to_numpy(), methods)]


def plot_energy_breakdown(summary: pd.DataFrame | Path | str, png: Path | str, svg: Path | str) -> None:
    """Stacked bars per experiment: GPU, CPU and DRAM energy per output token; estimated domains
    hatched, unavailable domains marked "n/a" (never drawn as zero)."""
    _render(_draw_energy_breakdown, summary, png, svg, "Energy per output token by domain")


def _bar_labels(ok: pd.DataFrame) -> list[str]:
    varying = _varying(ok, SERIES_COLUMNS)
    labels = []
    for _, row in ok.iterrows():
        parts = [_value_text(c, row[c]) for c in varying]
        batch = row.get("batch_size")
        if batch is not None and not pd.isna(batch):
            parts.append(f"bs{int(batch)}")
        labels.append("\n".join(parts) or str(row["experiment_id"]))
    return labels


def _draw_energy_breakdown(summary: pd.DataFrame, title: str) -> Figure:
    ok, notes = _split_successful(summary)
    if ok.empty:
        return _message_figure(NO_SUCCESS_TEXT, notes, title)
    ok = ok.sort_values([c for c in ("model", "backend", "dataset", "batch_size") if c in ok.columns],
                        kind="stable").reset_index(drop=True)
    values = {d: _domain_values(ok, d) for d in ENERGY_DOMAINS}
    estimated = {d: _estimated(ok, d) for d in ENERGY_DOMAINS}
    if not any(np.isfinite(v).any() for v in values.values()):
        return _message_figure("no energy measured in any domain", notes, title)
    n = len(ok)
    figure = _new_figure(width_in=min(30.0, max(6.0, 1.0 + 0.9 * n)), height_in=5.2)
    ax = figure.add_subplot()
    x = np.arange(n)
    bottom = np.zeros(n)
    legend_handles: list[Patch] = []
    any_estimated = False
    for domain in ENERGY_DOMAINS:
        heights = values[domain]
        available = np.isfinite(heights)
        if not available.any():
            legend_handles.append(Patch(facecolor="none", edgecolor="#999999", label=f"{domain}: n/a"))
            continue
        for i in np.flatnonzero(available):
            hatch = "///" if estimated[domain][i] else None
            any_estimated |= bool(hatch)
            ax.bar(
                x[i], heights[i], bottom=bottom[i], width=0.6, color=DOMAIN_COLORS[domain],
                edgecolor="white" if hatch is None else "#333333", hatch=hatch, linewidth=0.6,
            )
        bottom = bottom + np.where(available, heights, 0.0)
        label = domain if available.all() else f"{domain} (n/a where marked)"
        legend_handles.append(Patch(facecolor=DOMAIN_COLORS[domain], label=label))
    if any_estimated:
        legend_handles.append(Patch(facecolor="white", edgecolor="#333333", hatch="///",
                                     label="estimated (CodeCarbon model)"))
    top = float(bottom.max()) if n else 1.0
    # Domains missing everywhere are "n/a" in the legend; those missing only for some experiments
    # are marked on those bars, so a short bar is never mistaken for a small measurement.
    partly = [d for d in ENERGY_DOMAINS if np.isfinite(values[d]).any()]
    for i in range(n):
        unavailable = [d for d in partly if not np.isfinite(values[d][i])]
        if unavailable:
            ax.annotate(
                "n/a: " + ", ".join(unavailable), (x[i], bottom[i]), textcoords="offset points",
                xytext=(0, 3), ha="center", va="bottom", fontsize=7, rotation=90 if n > 8 else 0,
            )
    ax.set_ylim(0, top * 1.25 if top > 0 else 1.0)
    ax.set_xticks(x, _bar_labels(ok), fontsize=7, rotation=30 if n > 4 else 0,
                  ha="right" if n > 4 else "center")
    ax.set_ylabel("Energy per output token (J)")
    _, common = _series(ok)
    ax.set_title(title + (f"\n{common}" if common else ""))
    ax.grid(True, axis="y", alpha=0.3)
    # Outside the axes: inside it would cover the tallest bar and its "n/a" note.
    ax.legend(handles=legend_handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    notes.append("Bars: mean over cycles, stacked by domain; no error bars. Hatched: estimated, not measured.")
    _add_notes(figure, notes)
    return figure


LATENCY_PANELS: tuple[tuple[str, str], ...] = (("ttft", "Time to first token"), ("e2e", "End-to-end latency"))
PERCENTILE_STYLES: tuple[tuple[str, str], ...] = (("p50", "-"), ("p90", "--"))


def plot_latency(summary: pd.DataFrame | Path | str, png: Path | str, svg: Path | str) -> None:
    """TTFT and end-to-end latency (p50 solid, p90 dashed) vs batch size, where available."""
    _render(_draw_latency, summary, png, svg, "Latency vs batch size")


def _draw_latency(summary: pd.DataFrame, title: str) -> Figure:
    ok, notes = _split_successful(summary)
    if ok.empty:
        return _message_figure(NO_SUCCESS_TEXT, notes, title)
    ok = ok.loc[_column(ok, "batch_size").notna()].reset_index(drop=True)
    if ok.empty:
        return _message_figure("no experiment has a batch size", notes, title)
    groups, common = _series(ok)
    colors = _colors(len(groups))
    figure = _new_figure(width_in=10.0, height_in=4.8)
    axes = figure.subplots(1, len(LATENCY_PANELS), squeeze=False)[0]
    for ax, (prefix, panel_title) in zip(axes, LATENCY_PANELS):
        columns = [f"{prefix}_{p}_s" for p, _ in PERCENTILE_STYLES]
        panel_values = np.concatenate([_column(ok, c).to_numpy() for c in columns])
        ax.set_title(panel_title)
        if not np.isfinite(panel_values).any():
            ax.text(0.5, 0.5, f"{prefix.upper()} not available", ha="center", va="center",
                    transform=ax.transAxes, fontsize=11)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        y_log = _wants_log(panel_values, LOG_RATIO_VALUES)
        handles: list[Line2D] = []
        percentiles_drawn: set[str] = set()
        for (label, group), color in zip(groups, colors):
            group = group.sort_values("batch_size")
            drawn = False
            for (percentile, style), column in zip(PERCENTILE_STYLES, columns):
                y = _column(group, column)
                if not y.notna().any():
                    continue
                ax.errorbar(
                    _column(group, "batch_size"), y, yerr=_error(group, column, floor_positive=y_log),
                    marker="o", linestyle=style, capsize=3, color=color,
                )
                drawn = True
                percentiles_drawn.add(percentile)
            if drawn and label:
                handles.append(Line2D([], [], color=color, marker="o", label=label))
        # One legend entry per configuration (colour) and one per percentile (line style).
        handles += [Line2D([], [], color="black", linestyle=style, label=percentile)
                    for percentile, style in PERCENTILE_STYLES if percentile in percentiles_drawn]
        _set_batch_axis(ax, _column(ok, "batch_size").to_numpy())
        if y_log:
            ax.set_yscale("log")
        ax.set_ylabel(f"{prefix.upper()} (s)")
        ax.grid(True, alpha=0.3)
        ax.legend(handles=handles, fontsize=7)
        shown = ok.loc[pd.concat([_column(ok, c) for c in columns], axis=1).notna().any(axis=1)]
        notes += _missing_note(ok, shown, prefix.upper())
    if common:
        figure.suptitle(f"{title}\n{common}")
    else:
        figure.suptitle(title)
    notes.append("p50 solid, p90 dashed. Error bars: 95 % CI over cycles (Student t) of each percentile.")
    _add_notes(figure, notes)
    return figure
