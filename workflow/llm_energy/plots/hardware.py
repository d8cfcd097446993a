"""Against the hardware: a roofline per GPU and precision (achieved FLOP/s against arithmetic intensity,
under the GPU's peak FLOP/s and memory bandwidth), and MFU against MBU per experiment.

The peaks are llm_energy.flops.peak_figures (the table MFU and MBU were computed against), named with
their source on the figure. Arithmetic intensity is achieved FLOP/s over the bytes/s the MBU implies
(MBU x peak bandwidth): the minimum decode traffic (weights + KV cache once per decode step), so the
true intensity is at most this.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from llm_energy.flops import peak_figures
from llm_energy.plots import data as d
from llm_energy.plots.style import (
    GRID_ALPHA,
    NO_SUCCESS_TEXT,
    add_notes,
    color_map,
    facet_grid,
    facet_size,
    label_batches,
    message_figure,
    new_figure,
    tidy_log_axes,
)


def _peaks(rows: pd.DataFrame) -> pd.DataFrame:
    """Per row: the peak FLOP/s and bytes/s of one GPU at the run's dtype, and their description."""
    records = []
    for name, dtype in zip(rows.get("gpu_name", [None] * len(rows)), rows.get("dtype", [None] * len(rows))):
        peaks = peak_figures(None if d.isnan(name) else str(name), str(dtype)) if not d.isnan(name) else None
        if peaks:
            records.append(
                {
                    "peak_flops_per_s": peaks["flops_per_s"],
                    "peak_bytes_per_s": peaks["memory_bytes_per_s"],
                    "peak_key": f"{peaks['gpu_model']} at {peaks['dtype']}",
                    "peak_text": (
                        f"{peaks['gpu_model']} at {peaks['dtype']}: {peaks['flops_per_s']:.4g} FLOP/s, "
                        f"{peaks['memory_bytes_per_s']:.3g} B/s ({peaks['source']})"
                    ),
                }
            )
        else:
            records.append(
                {"peak_flops_per_s": np.nan, "peak_bytes_per_s": np.nan, "peak_key": None, "peak_text": None}
            )
    return pd.DataFrame(records, index=rows.index)


def _points(rows: pd.DataFrame, x: str, y: str) -> list[tuple[float, float, float]]:
    return list(zip(d.column(rows, x), d.column(rows, y), d.column(rows, "batch_size")))


def draw_roofline(inputs, title: str) -> Figure:
    ok, notes = d.split_successful(inputs.summary)
    if ok.empty:
        return message_figure(NO_SUCCESS_TEXT, notes, title)
    ok = ok.join(_peaks(ok))
    gpus = d.column(ok, "gpu_count").where(lambda s: s > 0, 1.0)
    ok["flops_per_gpu_s"] = d.column(ok, "achieved_flops_per_s") / gpus
    ok["bytes_per_gpu_s"] = d.column(ok, "mbu") * d.column(ok, "peak_bytes_per_s")
    ok["intensity_flop_per_byte"] = ok["flops_per_gpu_s"] / ok["bytes_per_gpu_s"]
    shown = ok.loc[ok["intensity_flop_per_byte"].gt(0) & ok["flops_per_gpu_s"].gt(0) & ok["peak_key"].notna()]
    notes += d.missing_note(ok, shown, "MFU, MBU or the GPU's peak figures")
    context = d.context_notes(ok, None, energy=False)
    if shown.empty:
        return message_figure("no MFU/MBU: needs a GPU with known peak figures", notes + context, title)
    lay = d.layout(ok)
    colour = color_map(list(lay.series.loc[shown.index]))
    peak_keys = list(dict.fromkeys(shown["peak_key"]))
    width, height = facet_size(len(peak_keys) + 1)
    figure = new_figure(width + 2.2, height)
    axes = facet_grid(figure, len(peak_keys) + 1)
    for ax, key in zip(axes, peak_keys):
        rows = shown.loc[shown["peak_key"] == key]
        peak_flops = float(rows["peak_flops_per_s"].iloc[0])
        peak_bytes = float(rows["peak_bytes_per_s"].iloc[0])
        ridge = peak_flops / peak_bytes
        x_low = min(float(rows["intensity_flop_per_byte"].min()) / 3, ridge / 100)
        x_high = max(float(rows["intensity_flop_per_byte"].max()) * 3, ridge * 10)
        x = np.geomspace(x_low, x_high, 200)
        ax.plot(x, np.minimum(peak_flops, peak_bytes * x), color="black", linewidth=1.2)
        ax.annotate(
            f"peak {peak_flops / 1e12:.0f} TFLOP/s",
            (x_high, peak_flops),
            ha="right",
            va="bottom",
            fontsize=7,
            textcoords="offset points",
            xytext=(0, 2),
        )
        ax.annotate(
            f"peak {peak_bytes / 1e12:.2f} TB/s",
            (ridge / 8, peak_bytes * ridge / 8),
            ha="right",
            va="bottom",
            fontsize=7,
            textcoords="offset points",
            xytext=(-6, 2),
        )
        for label in sorted(dict.fromkeys(lay.series.loc[rows.index])):
            group = rows.loc[lay.series.loc[rows.index] == label]
            ax.scatter(
                group["intensity_flop_per_byte"],
                group["flops_per_gpu_s"],
                color=colour[label],
                s=22,
                zorder=3,
                edgecolors="white",
                linewidths=0.5,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        label_batches(ax, _points(rows, "intensity_flop_per_byte", "flops_per_gpu_s"))
        ax.set_xlabel("Arithmetic intensity (FLOP/byte, upper bound)")
        ax.set_ylabel("Achieved FLOP/s per GPU")
        ax.set_title(f"Roofline: {key}")
        ax.grid(True, which="major", alpha=GRID_ALPHA)
        tidy_log_axes(ax)
    ax = axes[-1]
    for label in sorted(dict.fromkeys(lay.series.loc[shown.index])):
        group = shown.loc[lay.series.loc[shown.index] == label]
        ax.scatter(
            d.column(group, "mbu"),
            d.column(group, "mfu"),
            color=colour[label],
            s=22,
            zorder=3,
            edgecolors="white",
            linewidths=0.5,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    low = float(np.nanmin([d.column(shown, "mbu").min(), d.column(shown, "mfu").min()]))
    ax.set_xlim(low / 2, 1.5)
    ax.set_ylim(low / 2, 1.5)
    label_batches(ax, _points(shown, "mbu", "mfu"))
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("MBU (lower bound)")
    ax.set_ylabel("MFU")
    ax.set_title("MFU vs MBU (1 = the GPU's peak)")
    ax.grid(True, which="major", alpha=GRID_ALPHA)
    tidy_log_axes(ax)
    handles = [Line2D([], [], color=c, marker="o", linestyle="", label=label) for label, c in colour.items() if label]
    if handles:
        figure.legend(handles=handles, loc="outside right upper", fontsize=7)
    figure.suptitle(title + (f"\n{lay.title}" if lay.title else ""))
    sources = list(dict.fromkeys(shown["peak_text"]))
    notes = [
        f"Peak figures (per GPU): {'; '.join(sources)}.",
        "MFU = achieved FLOP/s / peak; MBU = minimum decode bytes (weights + KV cache per decode step) / "
        "window / peak bandwidth, a lower bound, so the intensity shown is an upper bound.",
    ] + notes
    add_notes(figure, context + notes)
    return figure
