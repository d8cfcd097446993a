"""Comparisons that scale: energy per output token vs batch size, throughput vs energy with the Pareto
front. Small multiples by model and dataset (where they vary), one series per backend, engine path and
other varying parameter, the same colour for a series in every panel."""

from __future__ import annotations

from collections.abc import Callable

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
    facet_grid,
    facet_size,
    label_batches,
    message_figure,
    new_figure,
    tidy_log_axes,
)


def faceted(
    shown: pd.DataFrame,
    lay: d.Layout,
    title: str,
    draw_panel: Callable[[object, pd.DataFrame, dict], list[Line2D]],
    sharey: bool = False,
) -> tuple[Figure, dict]:
    """A figure with one panel per facet; draw_panel(ax, rows, colours) returns extra legend handles.
    One legend for the figure (series colours), right of the panels."""
    facets = list(dict.fromkeys(lay.facets.loc[shown.index]))
    colour = color_map(list(lay.series.loc[shown.index]))
    width, height = facet_size(len(facets))
    figure = new_figure(width + (2.2 if any(colour) else 0), height)
    axes = facet_grid(figure, len(facets), sharey=sharey)
    extra: dict[str, Line2D] = {}
    for ax, facet in zip(axes, facets):
        rows = shown.loc[lay.facets.loc[shown.index] == facet]
        for handle in draw_panel(ax, rows, colour):
            extra.setdefault(handle.get_label(), handle)
        if facet:
            ax.set_title(facet)
        ax.grid(True, which="major", alpha=GRID_ALPHA)
        tidy_log_axes(ax)
    if len(axes) > 1:
        # One (two-line) energy label for the figure, not one per panel; the short x label stays.
        figure.supylabel(axes[0].get_ylabel(), fontsize=9)
        for ax in axes:
            ax.set_ylabel("")
    handles = [Line2D([], [], color=c, marker="o", label=label) for label, c in colour.items() if label]
    handles += list(extra.values())
    if handles:
        figure.legend(handles=handles, loc="outside right upper", fontsize=7)
    figure.suptitle(title + (f"\n{lay.title}" if lay.title else ""))
    return figure, colour


def energy_rows(inputs, title: str, x_column: str, x_what: str):
    """(successful rows, notes, boundary, rows with energy per token and x_column), or the message
    figure that replaces the plot when there is nothing to draw."""
    ok, notes = d.split_successful(inputs.summary)
    if ok.empty:
        return message_figure(NO_SUCCESS_TEXT, notes, title)
    boundary = d.choose_boundary(ok)
    if boundary is None:
        return message_figure("no energy per output token measured", notes + d.context_notes(ok, None), title)
    shown = ok.loc[d.column(ok, boundary.column).notna() & d.column(ok, x_column).notna()]
    notes += d.missing_note(ok, shown, f"{x_what} or {boundary.name} energy per output token")
    if shown.empty:
        return message_figure(f"no experiment has both {x_what} and energy", notes, title)
    return ok, notes, boundary, shown


def draw_energy_vs_batch_size(inputs, title: str) -> Figure:
    prepared = energy_rows(inputs, title, "batch_size", "batch size")
    if isinstance(prepared, Figure):
        return prepared
    ok, notes, boundary, shown = prepared
    lay = d.layout(ok)
    y_log = d.wants_log(d.column(shown, boundary.column).to_numpy(), d.LOG_RATIO_VALUES)

    def panel(ax, rows: pd.DataFrame, colour: dict) -> list[Line2D]:
        for label in sorted(dict.fromkeys(lay.series.loc[rows.index])):
            group = rows.loc[lay.series.loc[rows.index] == label].sort_values("batch_size")
            ax.errorbar(
                d.column(group, "batch_size"),
                d.column(group, boundary.column),
                yerr=d.error(group, boundary.column, floor_positive=y_log),
                marker="o",
                capsize=3,
                color=colour[label],
                markersize=4,
            )
        d.set_batch_axis(ax, d.column(rows, "batch_size").to_numpy())
        if y_log:
            ax.set_yscale("log")
        ax.set_ylabel(boundary.label)
        return []

    figure, _ = faceted(shown, lay, title, panel)
    notes.append(
        "Error bars: 95 % CI of the mean over cycles (Student t), clipped at zero; none where fewer than 2 cycles."
    )
    add_notes(figure, d.context_notes(ok, boundary) + notes)
    return figure


def draw_throughput_vs_energy(inputs, title: str) -> Figure:
    x_column = "output_tokens_per_s"
    prepared = energy_rows(inputs, title, x_column, "throughput")
    if isinstance(prepared, Figure):
        return prepared
    ok, notes, boundary, shown = prepared
    lay = d.layout(ok)
    x_log = d.wants_log(d.column(shown, x_column).to_numpy(), d.LOG_RATIO_VALUES)
    y_log = d.wants_log(d.column(shown, boundary.column).to_numpy(), d.LOG_RATIO_VALUES)
    batches = d.column(shown, "batch_size")
    largest = float(np.nanmax(batches)) if batches.notna().any() else 1.0

    def panel(ax, rows: pd.DataFrame, colour: dict) -> list[Line2D]:
        labels: list[tuple[float, float, float]] = []
        for label in sorted(dict.fromkeys(lay.series.loc[rows.index])):
            group = rows.loc[lay.series.loc[rows.index] == label].sort_values("batch_size")
            x, y = d.column(group, x_column), d.column(group, boundary.column)
            ax.errorbar(
                x,
                y,
                xerr=d.error(group, x_column, floor_positive=x_log),
                yerr=d.error(group, boundary.column, floor_positive=y_log),
                linestyle=":",
                linewidth=0.8,
                capsize=2,
                color=colour[label],
                fmt="none",
            )
            sizes = 12 + 60 * np.log2(1 + d.column(group, "batch_size").fillna(1)) / np.log2(1 + largest)
            ax.scatter(x, y, s=sizes, color=colour[label], zorder=3, edgecolors="white", linewidths=0.5)
            ax.plot(x, y, linestyle=":", linewidth=0.8, color=colour[label])
            labels += zip(x, y, d.column(group, "batch_size"))
        x_all, y_all = d.column(rows, x_column).to_numpy(), d.column(rows, boundary.column).to_numpy()
        front = d.pareto_front(x_all, y_all)
        ax.plot(
            x_all[front],
            y_all[front],
            color="black",
            linestyle="--",
            linewidth=1.2,
            marker="s",
            markersize=9,
            markerfacecolor="none",
            zorder=2,
        )
        if x_log:
            ax.set_xscale("log")
        if y_log:
            ax.set_yscale("log")
        label_batches(ax, labels)
        ax.set_xlabel("Output tokens per second")
        ax.set_ylabel(boundary.label)
        return [Line2D([], [], color="black", linestyle="--", marker="s", markerfacecolor="none", label="Pareto front")]

    figure, _ = faceted(shown, lay, title, panel)
    notes.append(
        "Error bars: 95 % CI over cycles (Student t), clipped at zero. Marker size grows with the "
        "batch size. Pareto front (per panel): no other point is both faster and needs less energy "
        "per token (better: down and right)."
    )
    add_notes(figure, d.context_notes(ok, boundary) + notes)
    return figure
