"""A run's power timeline (its first successful cycle), and the campaign overview.

Per experiment: GPU power, SM clock and temperature over the job's time, with the setup windows (model
load, compile, warm-up), the idle baselines, the measured window, the prefill-only window and the
requests' prefill spans (submission to first token) shaded, and each window's counter energy named.
All timestamps share one monotonic clock (llm_energy.clock), so samples and windows line up.

The overview: GPU power of every experiment's first cycle as one row of a heat map (time since the
first sample), the measured window marked, so 1,000 experiments are one image.
"""

from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from llm_energy.plots import data as d
from llm_energy.plots.runs import CycleRun, first_cycle
from llm_energy.plots.style import (
    GRID_ALPHA,
    NO_SUCCESS_TEXT,
    PHASE_COLORS,
    PHASE_LABELS,
    RC_PARAMS,
    TIMELINE_PNG_DPI,
    add_notes,
    message_figure,
    new_figure,
    save,
)

log = logging.getLogger(__name__)

SPAN_ALPHA = 0.22
OVERVIEW_BIN_S = 0.5
MAX_LABELLED_ROWS = 40
MAX_MARKED_ROWS = 120


@dataclass(frozen=True)
class Span:
    kind: str  # a PHASE_COLORS key
    start_s: float
    end_s: float
    gpu_j: float | None  # the counter's GPU energy of the window, where measured
    method: str | None
    label: str = ""  # how the notes name it (default: the phase's label)

    @property
    def name(self) -> str:
        return self.label or PHASE_LABELS[self.kind]


def _gpu_energy(record: dict[str, Any]) -> tuple[float | None, str | None]:
    gpu = (record.get("domains") or {}).get("gpu") or {}
    if gpu.get("available"):
        return float(gpu["gross_j"]), f"{gpu.get('source')}, {gpu.get('method')}"
    return None, None


def spans_of(result: dict[str, Any]) -> tuple[list[Span], list[str]]:
    """The shaded spans of one cycle's result (monotonic seconds), and notes on spans whose
    timestamps this run did not record."""
    spans, notes = [], []
    setup = result.get("setup") or {}
    for window in setup.get("windows") or []:
        energy, method = _gpu_energy(window)
        spans.append(
            Span(
                window["name"] if window["name"] in PHASE_COLORS else "warmup",
                float(window["start_s"]),
                float(window["end_s"]),
                energy,
                method,
            )
        )
    measured = result.get("window") or {}
    offset = None
    if measured.get("start_unix_s") is not None:
        offset = float(measured["start_unix_s"]) - float(measured["start_s"])  # unix - monotonic
    baselines = setup.get("baseline") or {}
    for kind in ("active_idle", "static_idle"):
        record = baselines.get(kind) if "active_idle" in baselines or "static_idle" in baselines else None
        if kind == "static_idle" and record is None and baselines.get("domains"):
            record = baselines  # results before the active-idle baseline: the static one only
        if not record:
            continue
        gpu = (record.get("domains") or {}).get("gpu") or {}
        power = gpu.get("power_w")
        if record.get("start_s") is not None:
            start, end = float(record["start_s"]), float(record["end_s"])
        elif offset is not None and record.get("measured_unix_s") is not None:
            end = float(record["measured_unix_s"]) - offset  # measured_unix_s: the end of the measurement
            start = end - float(record.get("duration_s") or 0.0)
        else:
            notes.append(f"{kind} baseline: no timestamps recorded")
            continue
        energy = power * (end - start) if power is not None else None
        method = kind.replace("_", " ") + (f", {gpu['method']}" if gpu.get("method") else "")
        spans.append(Span("baseline", start, end, energy, method, label=f"{kind.replace('_', '-')} baseline"))
    if measured.get("start_s") is not None:
        energy, method = _gpu_energy(measured)
        spans.append(Span("inference", float(measured["start_s"]), float(measured["end_s"]), energy, method))
    prefill = (result.get("phases") or {}).get("prefill_window")
    if prefill:
        if prefill.get("start_s") is not None:
            spans.append(
                Span(
                    "prefill_only",
                    float(prefill["start_s"]),
                    float(prefill["end_s"]),
                    prefill.get("gross_j"),
                    "nvml_energy_counter, measured",
                )
            )
        else:
            notes.append("prefill-only window: timestamps not recorded by the harness that measured this run")
    return spans, notes


def prefill_spans(requests: pd.DataFrame) -> list[tuple[float, float]]:
    """Union of the requests' prefill spans (submission to first token), as (start, width)."""
    if requests.empty or "first_token_s" not in requests.columns:
        return []
    pairs = sorted(
        (float(a), float(b))
        for a, b in zip(requests["submitted_s"], requests["first_token_s"])
        if np.isfinite(a) and np.isfinite(b) and b >= a
    )
    merged: list[list[float]] = []
    for start, end in pairs:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end - start) for start, end in merged]


def _energy_text(joules: float | None) -> str:
    if joules is None:
        return "n/a"
    return f"{joules:,.0f} J" if joules >= 100 else f"{joules:.3g} J"


def draw_run_timeline(run: CycleRun, title: str, gpu_text: str, flags: str) -> Figure:
    result = run.result
    spans, notes = spans_of(result)
    timeline = run.timeline
    # A span outside this job (a static baseline reused from an earlier job) is named, not drawn: it
    # would stretch the axis over time this job did not run. The job: its samples, else its own windows.
    own = [s for s in spans if s.kind != "baseline" or s.label.startswith("active")]
    if len(timeline):
        first, last = float(timeline["time_s"].min()) - 1.0, float(timeline["time_s"].max()) + 1.0
    elif own:
        first, last = min(s.start_s for s in own) - 1.0, max(s.end_s for s in own) + 1.0
    else:
        first, last = -np.inf, np.inf
    outside = [s for s in spans if s.end_s < first or s.start_s > last]
    notes += [
        f"{s.name} ({s.method}): measured outside this job's timeline (reused), "
        f"{_energy_text(s.gpu_j)} in {s.end_s - s.start_s:.1f} s"
        for s in outside
    ]
    spans = [s for s in spans if s not in outside]
    t_values = [s.start_s for s in spans] + ([float(timeline["time_s"].min())] if len(timeline) else [])
    t0 = min(t_values) if t_values else 0.0
    channels = [("power_w", "GPU power (W)")]
    for name, label in (("sm_clock_mhz", "SM clock (MHz)"), ("temperature_c", "Temperature (°C)")):
        if name in timeline.columns and timeline[name].notna().any():
            channels.append((name, label))
    # Fixed margins, no layout solver, few ticks: a campaign draws one of these per experiment.
    height_in = 2.4 + 1.45 * len(channels)
    figure = new_figure(10.0, height_in, constrained=False)
    axes = figure.subplots(
        len(channels),
        1,
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": [2.2] + [1] * (len(channels) - 1), "hspace": 0.12},
    )[:, 0]
    figure.subplots_adjust(left=0.08, right=0.98, top=1 - 0.75 / height_in)
    for ax, (name, label) in zip(axes, channels):
        if len(timeline):
            for device, samples in timeline.groupby("device_index"):
                ax.plot(
                    samples["time_s"] - t0,
                    samples[name],
                    linewidth=0.8,
                    color="black",
                    label=f"GPU {device}" if timeline["device_index"].nunique() > 1 else None,
                )
        ax.set_ylabel(label)
        ax.grid(True, alpha=GRID_ALPHA)
        ax.yaxis.set_major_locator(MaxNLocator(4 if ax is not axes[0] else 6))
        for span in spans:
            ax.axvspan(span.start_s - t0, span.end_s - t0, color=PHASE_COLORS[span.kind], alpha=SPAN_ALPHA, linewidth=0)
    power_ax = axes[0]
    if not len(timeline):
        power_ax.text(
            0.5,
            0.5,
            "no GPU power samples (no GPU measured: CPU-only run)",
            ha="center",
            va="center",
            transform=power_ax.transAxes,
            fontsize=10,
        )
        power_ax.set_yticks([])
    prefill = prefill_spans(run.requests)
    if prefill:
        power_ax.broken_barh(
            [(start - t0, width) for start, width in prefill],
            (0.0, 0.06),
            transform=power_ax.get_xaxis_transform(),
            color=PHASE_COLORS["prefill"],
        )
    axes[-1].set_xlabel(
        "Time since the first sample of the job (s)" if len(timeline) else "Time since the job's first window (s)"
    )
    axes[-1].xaxis.set_major_locator(MaxNLocator(10))
    kinds = list(dict.fromkeys(s.kind for s in spans))
    handles = [Patch(color=PHASE_COLORS[k], alpha=0.5, label=PHASE_LABELS[k]) for k in kinds]
    if prefill:
        handles.append(Patch(color=PHASE_COLORS["prefill"], label="prefill spans (requests)"))
    power_ax.legend(handles=handles, fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=7, frameon=False)
    # Each window's energy inside it where it is wide enough, and all of them in the notes.
    left, right = power_ax.get_xlim()
    width_in = power_ax.get_position().width * figure.get_figwidth()
    for span in spans:
        text = _energy_text(span.gpu_j)
        needed = len(text) * 7 * 0.6 / 72 + 0.05
        if span.gpu_j is not None and (span.end_s - span.start_s) / (right - left) * width_in > needed:
            power_ax.text(
                (span.start_s + span.end_s) / 2 - t0,
                0.93,
                text,
                ha="center",
                va="top",
                fontsize=7,
                transform=power_ax.get_xaxis_transform(),
            )
    methods = sorted({s.method for s in spans if s.method and s.kind != "baseline"})
    if any(s.gpu_j is not None for s in spans):
        windows = (
            "Counter energy per window (cycle {cycle}): "
            + "; ".join(f"{s.name} {_energy_text(s.gpu_j)} in {s.end_s - s.start_s:.1f} s" for s in spans)
            + ". Baselines: idle power x duration."
        ).format(cycle=run.cycle)
    else:
        windows = (
            f"No GPU energy counter; durations (cycle {run.cycle}): "
            + "; ".join(f"{s.name} {s.end_s - s.start_s:.1f} s" for s in spans)
            + "."
        )
    figure.suptitle(title)
    add_notes(
        figure,
        [
            f"Energy: GPU, {'; '.join(methods) or 'not measured'}. GPU: {gpu_text}.",
            f"Flags: {flags or 'none'}.",
            windows,
            *notes,
        ],
    )
    return figure


def _timeline_job(args: tuple[str, str, str, str, str, str]) -> str | None:
    experiment_id, runs_dir, png, svg, gpu_text, flags = args
    run, reason = first_cycle(runs_dir, experiment_id)
    if run is None:
        return f"{experiment_id}: {reason}"
    with matplotlib.rc_context(RC_PARAMS):
        figure = draw_run_timeline(run, f"Power timeline: {experiment_id}", gpu_text, flags)
    save(figure, png, svg, dpi=TIMELINE_PNG_DPI)
    return None


def plot_run_timelines(summary: pd.DataFrame, runs_dir: Path | str, out_dir: Path | str, workers: int = 1) -> list[str]:
    """One timeline figure per successful experiment with archived runs (out_dir/{experiment}.png and
    .svg), `workers` processes at a time. Returns the experiments skipped, with why."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ok, _ = d.split_successful(d.load(summary))
    jobs = []
    for _, row in ok.iterrows():
        eid = str(row["experiment_id"])
        jobs.append(
            (
                eid,
                str(runs_dir),
                str(out_dir / f"{eid}.png"),
                str(out_dir / f"{eid}.svg"),
                d.gpu_text(ok.loc[[row.name]]),
                "" if d.isnan(row.get("flags")) else str(row.get("flags")),
            )
        )
    if workers > 1 and len(jobs) > 1:
        import multiprocessing

        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
            skipped = list(pool.map(_timeline_job, jobs, chunksize=max(1, len(jobs) // (workers * 4))))
    else:
        skipped = [_timeline_job(job) for job in jobs]
    skipped = [s for s in skipped if s]
    for line in skipped:
        log.warning("no timeline figure: %s", line)
    if not jobs or len(skipped) == len(jobs):
        # The report needs at least one file: say why there is no timeline.
        with matplotlib.rc_context(RC_PARAMS):
            figure = message_figure("no power timeline archived", skipped[:6] or [NO_SUCCESS_TEXT], "Power timelines")
        save(figure, out_dir / "none.png", out_dir / "none.svg", dpi=TIMELINE_PNG_DPI)
    return skipped


def overview_rows(ok: pd.DataFrame, runs_dir: Path | str | None, bin_s: float = OVERVIEW_BIN_S):
    """(labels, power matrix rows (W per bin), window (start, end) per row, skipped ids) of every
    experiment's first cycle, time since its first sample."""
    labels, rows, windows, skipped = [], [], [], []
    for eid in ok["experiment_id"].astype(str):
        run, reason = first_cycle(runs_dir, eid, with_requests=False)
        if run is None or not len(run.timeline):
            skipped.append(eid)
            continue
        timeline = run.timeline
        power = (
            timeline.groupby("time_s")["power_w"].sum()
            if timeline["device_index"].nunique() > 1
            else timeline.set_index("time_s")["power_w"]
        )
        t0 = float(power.index.min())
        bins = ((power.index.to_numpy() - t0) // bin_s).astype(int)
        sums = np.bincount(bins, weights=power.to_numpy(float))
        counts = np.bincount(bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            row = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        labels.append(eid)
        rows.append(row)
        window = run.result.get("window") or {}
        windows.append(
            (float(window["start_s"]) - t0, float(window["end_s"]) - t0)
            if window.get("start_s") is not None
            else (np.nan, np.nan)
        )
    return labels, rows, windows, skipped


def draw_timeline_overview(inputs, title: str) -> Figure:
    ok, notes = d.split_successful(inputs.summary)
    if ok.empty:
        return message_figure(NO_SUCCESS_TEXT, notes, title)
    labels, rows, windows, skipped = overview_rows(ok, inputs.runs_dir)
    context = d.context_notes(ok, d.choose_boundary(ok))
    if skipped:
        notes.append(f"No GPU power timeline (runs/ not archived, or no GPU measured): {d.list_ids(skipped)}")
    if not rows:
        return message_figure("no GPU power timeline", notes + context, title)
    lay = d.layout(ok)
    by_id = dict(zip(ok["experiment_id"].astype(str), ok.index))
    short = [
        " / ".join(
            p
            for p in (
                lay.facets[by_id[e]],
                lay.series[by_id[e]],
                f"bs{int(ok.at[by_id[e], 'batch_size'])}" if not d.isnan(ok.at[by_id[e], "batch_size"]) else "",
            )
            if p
        )
        or e
        for e in labels
    ]
    width = max(len(r) for r in rows)
    matrix = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        matrix[i, : len(row)] = row
    figure = new_figure(11.0, min(16.0, 2.6 + 0.22 * len(rows)))
    ax = figure.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#D9D9D9")
    image = ax.imshow(
        matrix,
        aspect="auto",
        interpolation="nearest",
        cmap=cmap,
        extent=(0, width * OVERVIEW_BIN_S, len(rows) - 0.5, -0.5),
    )
    y = np.arange(len(rows))
    if len(rows) <= MAX_MARKED_ROWS:
        # The window's edges as white bars across each row (too thin to read beyond this many rows).
        for edge, label in ((0, "measured window (cycle 1)"), (1, None)):
            ax.vlines([w[edge] for w in windows], y - 0.42, y + 0.42, color="white", linewidth=1.5, label=label)
    else:
        notes.append(f"{len(rows)} rows: window edges not marked (each row's own timeline figure shades them).")
    if len(rows) <= MAX_LABELLED_ROWS:
        ax.set_yticks(y, short, fontsize=7)
    else:
        step = int(np.ceil(len(rows) / MAX_LABELLED_ROWS))
        ax.set_yticks(y[::step], short[::step], fontsize=6)
    ax.set_xlabel("Time since the first sample of the job (s)")
    figure.colorbar(image, ax=ax, label="GPU power (W)", pad=0.01, shrink=min(1.0, 6.0 / figure.get_figheight()))
    if len(rows) <= MAX_MARKED_ROWS:
        ax.legend(loc="lower right", fontsize=7, facecolor="#444444", labelcolor="white")
    figure.suptitle(title + (f"\n{lay.title}" if lay.title else ""))
    notes.insert(
        0,
        f"One row per experiment: mean GPU power per {OVERVIEW_BIN_S} s of its first cycle's job "
        "(model load, setup, baselines, windows); white bars: the measured window's edges; grey "
        "cells: no sample (before the sampler started, a gap, or after the job ended).",
    )
    add_notes(figure, context + notes)
    return figure
