"""Serving under load: latency percentiles, energy per output token and goodput against the request rate
(grid.request_rate), one line per series (backend with its variant and the other varying parameters, and
model/dataset where they vary)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from llm_energy.plots import data as d
from llm_energy.plots.style import (
    GRID_ALPHA,
    NO_SUCCESS_TEXT,
    add_notes,
    color_map,
    message_figure,
    new_figure,
    tidy_log_axes,
)

RATE = "request_rate_per_s"
NO_RATES_TEXT = "no request rates in this campaign\n(static batches: set grid.request_rate)"
STEADY = "steady_state_gpu_energy_per_output_token_j"


def loaded_rows(ok: pd.DataFrame) -> pd.DataFrame:
    """The successful experiments that ran under a finite request rate."""
    rates = d.column(ok, RATE)
    return ok.loc[rates.notna() & np.isfinite(rates.astype(float))]


def _lines(
    ax, shown: pd.DataFrame, series: pd.Series, colour: dict, column: str, style: str = "-", marker: str = "o"
) -> bool:
    drawn = False
    for label in sorted(dict.fromkeys(series)):
        group = shown.loc[series == label].sort_values(RATE)
        values = d.column(group, column)
        if values.notna().any():
            ax.plot(d.column(group, RATE), values, linestyle=style, marker=marker, markersize=4, color=colour[label])
            drawn = True
    return drawn


def draw_serving(inputs, title: str) -> Figure:
    ok, notes = d.split_successful(inputs.summary)
    if ok.empty:
        return message_figure(NO_SUCCESS_TEXT, notes, title)
    shown = loaded_rows(ok)
    if shown.empty:  # every figure still says which energy and GPU the campaign has
        return message_figure(NO_RATES_TEXT, d.context_notes(ok, d.choose_boundary(ok)) + notes, title)
    columns = d.varying(shown, d.FACET_COLUMNS) + d.varying(shown, d.SERIES_COLUMNS)
    series = d.labels_of(shown, columns)
    colour = color_map(list(series))
    figure = new_figure(11.0, 7.2)
    axes = figure.subplots(2, 2)
    latency_style = [("p50", "-", "o"), ("p90", "--", "s")]
    for ax, name, what in ((axes[0][0], "ttft", "TTFT (s)"), (axes[0][1], "tpot", "TPOT (s)")):
        for percentile, style, marker in latency_style:
            _lines(ax, shown, series, colour, f"{name}_{percentile}_s", style, marker)
        ax.set_ylabel(what)
        ax.set_title(f"{name.upper()} p50 (solid) and p90 (dashed) per request")
    boundary = d.choose_boundary(shown)
    energy_ax = axes[1][0]
    if d.column(shown, STEADY).notna().any():
        _lines(energy_ax, shown, series, colour, STEADY)
        energy_ax.set_ylabel("GPU energy per output token (J)\n[steady state, measured, nvml_energy_counter]")
        energy_ax.set_title("Energy per output token, steady state")
    elif boundary is not None:
        _lines(energy_ax, shown, series, colour, boundary.column)
        energy_ax.set_ylabel(boundary.label)
        energy_ax.set_title("Energy per output token, whole window (no steady-state GPU energy)")
    else:
        energy_ax.text(0.5, 0.5, "no energy per output token", ha="center", va="center", transform=energy_ax.transAxes)
        energy_ax.set_title("Energy per output token")
    goodput_ax = axes[1][1]
    _lines(goodput_ax, shown, series, colour, "request_throughput_per_s", ":", "o")
    has_goodput = _lines(goodput_ax, shown, series, colour, "goodput_requests_per_s", "-", "D")
    goodput_ax.set_ylabel("Requests per second")
    goodput_ax.set_title("Goodput (solid) and request throughput (dotted)")
    rates = d.column(shown, RATE).to_numpy(dtype=float)
    for ax in (axes[0][0], axes[0][1], axes[1][0], axes[1][1]):
        ax.set_xlabel("Request rate (requests/s, open loop)")
        if d.wants_log(rates, d.LOG_RATIO_VALUES):
            ax.set_xscale("log")
        ax.grid(True, which="major", alpha=GRID_ALPHA)
        tidy_log_axes(ax)
    handles = [Line2D([], [], color=c, marker="o", label=label or "all") for label, c in colour.items()]
    figure.legend(handles=handles, loc="outside right upper", fontsize=7)
    lay_title = d.constant_title(shown, columns)
    figure.suptitle(title + (f"\n{lay_title}" if lay_title else ""))
    slo = [
        f"{name} <= {value:g} s"
        for name, value in (("TTFT", _first(shown, "slo_ttft_s")), ("TPOT", _first(shown, "slo_tpot_s")))
        if value
    ]
    notes.append(
        "Goodput: requests per second of the window meeting every latency objective"
        + (f" ({', '.join(slo)})" if slo else "")
        + (" (none set: goodput not shown)" if not has_goodput else "")
        + ". Latency percentiles pooled over every request of every successful cycle."
    )
    notes += d.missing_note(ok, shown, "a request rate (static batches)")
    add_notes(figure, d.context_notes(shown, boundary) + notes)
    return figure


def _first(frame: pd.DataFrame, name: str) -> float | None:
    values = d.column(frame, name).dropna()
    return float(values.iloc[0]) if len(values) else None
