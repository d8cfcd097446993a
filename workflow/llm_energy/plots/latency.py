"""Latency distributions from the pooled per-request data (every request of every successful cycle):
TTFT, TPOT and end-to-end latency as box plots against batch size, one box per series, one row of
panels per facet (model / dataset). Boxes show the quartiles and median of the requests themselves,
whiskers their 5th and 95th percentiles: a distribution of positive times never reaches below zero
(unlike a mean +- t x std interval from three cycles)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.collections import LineCollection, PolyCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from llm_energy.plots import data as d
from llm_energy.plots.runs import pooled_requests
from llm_energy.plots.style import (
    GRID_ALPHA,
    NO_SUCCESS_TEXT,
    add_notes,
    color_map,
    message_figure,
    new_figure,
    tidy_log_axes,
)

METRICS: tuple[tuple[str, str], ...] = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "End-to-end latency"))
WHISKER_PERCENTILES = (5, 95)
MAX_FACET_ROWS = 24


def box_stats(values: np.ndarray) -> dict | None:
    """matplotlib bxp statistics of positive samples (None without any)."""
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    low, high = np.percentile(values, WHISKER_PERCENTILES)
    return {"med": med, "q1": q1, "q3": q3, "whislo": low, "whishi": high, "fliers": [], "n": len(values)}


def draw_boxes(ax, positions: list[float], stats: list[dict], width: float, color) -> None:
    """Box plots as three collections (boxes, whiskers, medians) rather than matplotlib's six artists
    per box: a campaign of 1,000 experiments draws thousands of boxes."""
    half = width / 2
    boxes = [
        [(x - half, s["q1"]), (x + half, s["q1"]), (x + half, s["q3"]), (x - half, s["q3"])]
        for x, s in zip(positions, stats)
    ]
    whiskers = [
        seg
        for x, s in zip(positions, stats)
        for seg in (((x, s["whislo"]), (x, s["q1"])), ((x, s["q3"]), (x, s["whishi"])))
    ]
    whiskers += [
        ((x - half / 2, s[k]), (x + half / 2, s[k])) for x, s in zip(positions, stats) for k in ("whislo", "whishi")
    ]  # caps
    medians = [((x - half, s["med"]), (x + half, s["med"])) for x, s in zip(positions, stats)]
    ax.add_collection(LineCollection(whiskers, colors="black", linewidths=0.6), autolim=True)
    ax.add_collection(
        PolyCollection(boxes, facecolors=[color], edgecolors="black", linewidths=0.6, alpha=0.85), autolim=True
    )
    ax.add_collection(LineCollection(medians, colors="black", linewidths=1.0), autolim=True)
    ax.autoscale_view()


def draw_latency(inputs, title: str) -> Figure:
    ok, notes = d.split_successful(inputs.summary)
    if ok.empty:
        return message_figure(NO_SUCCESS_TEXT, notes, title)
    requests, missing = pooled_requests(inputs.runs_dir, ok["experiment_id"].astype(str))
    if missing:
        notes.append(f"No per-request data (runs/ not archived or no successful cycle): {d.list_ids(missing)}")
    context = d.context_notes(ok, None, energy=False)
    if requests.empty:
        return message_figure("no per-request latency data", notes + context, title)
    lay = d.layout(ok)
    by_id = pd.Series(ok.index, index=ok["experiment_id"].astype(str))
    requests["row"] = by_id.reindex(requests["experiment_id"]).to_numpy()
    facets = list(dict.fromkeys(lay.facets.loc[requests["row"].unique()]))
    if len(facets) > MAX_FACET_ROWS:
        notes.append(f"{len(facets)} facets: the first {MAX_FACET_ROWS} shown.")
        facets = facets[:MAX_FACET_ROWS]
    series = sorted(dict.fromkeys(lay.series.loc[requests["row"].unique()]))
    colour = color_map(series)
    figure = new_figure(12.0 + (2.0 if any(series) else 0), min(40.0, 1.4 + 2.7 * len(facets)))
    axes = figure.subplots(len(facets), len(METRICS), squeeze=False)
    grouped = {key: frame for key, frame in requests.groupby("row")}
    width = 0.8 / max(len(series), 1)
    for r, facet in enumerate(facets):
        rows = ok.loc[[i for i in grouped if lay.facets[i] == facet]]
        batches = sorted(set(d.column(rows, "batch_size").dropna().astype(int)))
        position = {b: i for i, b in enumerate(batches)}
        for c, (metric, label) in enumerate(METRICS):
            ax = axes[r][c]
            drawn = 0
            for s, name in enumerate(series):
                stats, places = [], []
                for index in rows.index[lay.series.loc[rows.index] == name]:
                    batch = rows.at[index, "batch_size"]
                    stat = box_stats(pd.to_numeric(grouped[index][metric], errors="coerce").to_numpy(float))
                    if stat is None or d.isnan(batch):
                        continue
                    stats.append(stat)
                    places.append(position[int(batch)] - 0.4 + width * (s + 0.5))
                if stats:
                    draw_boxes(ax, places, stats, width * 0.85, colour[name])
                    drawn += len(stats)
            if not drawn:
                ax.text(0.5, 0.5, f"{label} not available", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks(range(len(batches)), [str(b) for b in batches], rotation=45 if len(batches) > 8 else 0)
            ax.set_xlim(-0.6, len(batches) - 0.4)
            ax.set_xlabel("Batch size")
            values = requests.loc[requests["row"].isin(rows.index), metric].to_numpy(float)
            if d.wants_log(values[values > 0], d.LOG_RATIO_VALUES):
                ax.set_yscale("log")
                tidy_log_axes(ax)
            ax.set_ylabel(f"{label} (s)")
            ax.grid(True, axis="y", alpha=GRID_ALPHA)
            ax.set_title(f"{label}" + (f" | {facet}" if facet else ""))
    handles = [Patch(facecolor=colour[name], label=name) for name in series if name]
    if handles:
        figure.legend(handles=handles, loc="outside right upper", fontsize=7)
    figure.suptitle(title + (f"\n{lay.title}" if lay.title else ""))
    notes.insert(
        0,
        f"Per request, pooled over every successful cycle ({len(requests):,} requests): box = quartiles "
        f"and median, whiskers = {WHISKER_PERCENTILES[0]}th and {WHISKER_PERCENTILES[1]}th percentiles. "
        "TPOT needs 2+ output tokens. No request rates in this campaign (offline batches).",
    )
    add_notes(figure, context + notes)
    return figure
