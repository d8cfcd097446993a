"""Figures of a campaign (PNG at 200 dpi + SVG), written atomically, each with its caption.

`FIGURES` names every campaign figure once: its title, the function that draws it and its caption
(the Snakemake report shows the caption; the rules and the report template take the names from
here). The per-experiment power timelines are `plot_run_timelines` (one file per experiment in
`TIMELINES_DIR`).

Every figure copes with a single experiment, missing metrics, failed experiments (skipped, with a note
on the figure), missing raw runs (an archive of experiments/ only) and an empty summary (a figure that
says "no successful experiments"), so a partial campaign never breaks the report. Every figure names
its energy source and method (or says it shows no energy), the GPU, and the validity flags.

Modules: `style` (the house style: sizes, colours, notes, saving), `data` (series, facets, the energy
boundary), `runs` (raw run artifacts), and one module per figure family: `comparisons`, `breakdown`,
`hardware`, `latency`, `timeline`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from llm_energy.summary import Tables

TIMELINES_DIR = "timelines"  # results/figures/timelines/{experiment}.png and .svg


@dataclass(frozen=True)
class FigureInputs:
    """What a figure reads: the summary with every metric joined (summary.Tables.for_figures), and
    where the raw runs are (None: not archived)."""

    summary: pd.DataFrame
    runs_dir: Path | None = None


@dataclass(frozen=True)
class FigureSpec:
    title: str
    draw_at: str  # "module.function" in this package: imported when drawn, so that the Snakefile, which
    # reads the names and captions here, does not import matplotlib (a second per `snakemake -n`)
    caption: str  # reStructuredText, shown in the Snakemake report
    needs_runs: bool = False  # reads runs/ (requests or timelines) beside the summary

    @property
    def draw(self) -> Callable[[FigureInputs, str], Figure]:
        module, function = self.draw_at.rsplit(".", 1)
        return getattr(importlib.import_module(f"{__name__}.{module}"), function)


ENERGY_BOUNDARY_CAPTION = (
    "*Energy boundary:* GPU energy (NVML total-energy counter, gross, measurement window only) when any "
    "experiment measured a GPU; otherwise the node energy, the sum of every domain the machine measured "
    "(RAPL), or, where nothing is measured, CodeCarbon's CPU+DRAM model estimate. The axis label names the "
    "boundary and says *measured* or *estimated*."
)
CONTEXT_CAPTION = (
    "Under the plot: the energy source and method, the GPU(s), the validity flags with the experiments that "
    "carry them (their meanings are in the report's *Flags* page), and the experiments not shown and why."
)
FACET_CAPTION = (
    "One panel per model and dataset where they vary (small multiples), one colour per series (backend with "
    "its variant and engine path, and any other parameter that varies), the same colour in every panel."
)

FIGURES: dict[str, FigureSpec] = {
    "energy_vs_batch_size": FigureSpec(
        "Energy per output token vs batch size",
        "comparisons.draw_energy_vs_batch_size",
        "**Energy per output token against batch size.** Each point is the mean over the successful cycles of "
        "one experiment; error bars are two-sided 95 % confidence intervals of the mean (Student t over the "
        "cycles), clipped at zero; a single cycle has none. " + FACET_CAPTION + " Axes become logarithmic when "
        "the values span a wide range.\n\n" + ENERGY_BOUNDARY_CAPTION + "\n\n" + CONTEXT_CAPTION,
    ),
    "throughput_vs_energy": FigureSpec(
        "Throughput vs energy per output token",
        "comparisons.draw_throughput_vs_energy",
        "**Throughput against energy per output token.** Each point is one experiment: output tokens per second "
        "(x) against energy per output token (y), means over the successful cycles with 95 % confidence "
        "intervals in both directions (clipped at zero). Marker size grows with the batch size (points are "
        "labelled with it where a panel has few). The dashed black line with open squares is each panel's "
        "Pareto front: the experiments no other experiment of the panel beats on both throughput and energy per "
        "token (better is down and to the right). "
        + FACET_CAPTION
        + "\n\n"
        + ENERGY_BOUNDARY_CAPTION
        + "\n\n"
        + CONTEXT_CAPTION,
    ),
    "energy_breakdown": FigureSpec(
        "Where the energy went",
        "breakdown.draw_energy_breakdown",
        "**Where the energy went, as shares.** Left: the GPU energy (node energy without a GPU) of one model "
        "load with its setup (model load, compile, warm-up; measured once per load, outside every window) and "
        "one measured window per experiment, by phase; each bar is 100 % and its total in joules is printed at "
        "its end, so small and large runs are both readable. The window splits into the idle baseline "
        "(the run's baseline power x window duration, i.e. gross - net energy; active idle, with the model resident, "
        "where the run measured it, else the static idle of older runs) and the energy above it, divided into "
        "prefill and decode in the ratio of the run's prefill/decode split (differential: a prefill-only window; "
        "see ``phase_split_method`` in the experiment's JSON). Right: the window's energy by domain; hatched segments are "
        "CodeCarbon estimates, not measurements, and a domain that could not be measured is marked n/a, never "
        "drawn as zero. With more than 40 experiments, one bar per model/dataset and series (energies summed). "
        "\n\n" + CONTEXT_CAPTION,
    ),
    "time_accounting": FigureSpec(
        "Where the GPU time went",
        "breakdown.draw_time_accounting",
        "**Where the campaign's GPU time went.** Wall time of the measuring jobs (``job_*_s`` in the summary; "
        "the job holds its GPU throughout) split into process start (interpreter and imports, where recorded), "
        "model load, compilation, warm-up (including the one batch before each window), idle baselines, measured "
        "windows (inference and prefill-only) and gaps (the rest: writing artifacts, closing the engine). "
        "Top bar: the whole campaign, its share inside measured windows in the title; below, one bar per "
        "experiment (or per model/dataset and series beyond 40). Totals in seconds at the end of each bar. "
        "No energy is shown.\n\n" + CONTEXT_CAPTION,
    ),
    "roofline": FigureSpec(
        "Against the hardware: roofline, MFU and MBU",
        "hardware.draw_roofline",
        "**How close each run came to the GPU's limits.** Roofline panels (one per GPU model and precision): "
        "achieved FLOP/s per GPU (analytic FLOPs of the measured requests / window) against arithmetic "
        "intensity, under the GPU's peak dense FLOP/s and peak memory bandwidth (black line). The intensity uses "
        "the minimum decode traffic (weights at their stored size plus the KV cache, read once per decode step), "
        "so it is an upper bound and the point lies at most that far right. Last panel: MFU against MBU (1 = "
        "the peak). The peak figures and their source (``llm_energy.flops.PEAK_FIGURES``, vendor datasheets, "
        "dense) are named under the plot. CPU-only runs have no peak figures and are listed as not shown.\n\n"
        + CONTEXT_CAPTION,
    ),
    "latency": FigureSpec(
        "Latency distributions per request",
        "latency.draw_latency",
        needs_runs=True,
        caption=(
            "**Latency distributions.** TTFT (submission to the first token reaching the caller), TPOT ((own last "
            "token - own first token) / (output tokens - 1)) and end-to-end latency of every request of every "
            "successful cycle (``requests.parquet``), pooled per experiment: boxes show the quartiles and the "
            "median, whiskers the 5th and 95th percentiles, one box per series at each batch size, one row of "
            "panels per model/dataset. Distributions of positive times never reach below zero. Experiments whose "
            "raw runs are not archived are listed under the plot.\n\n" + CONTEXT_CAPTION
        ),
    ),
    "serving": FigureSpec(
        "Serving under load: latency, energy and goodput vs request rate",
        "serving.draw_serving",
        caption=(
            "**Serving under load.** Experiments measured at a request rate (``grid.request_rate``: requests "
            "arriving open loop at their seeded arrival times), one line per series against the rate. Top: TTFT "
            "and TPOT, p50 (solid) and p90 (dashed), pooled over every request of every successful cycle. Bottom "
            "left: GPU energy per output token in the steady state (the span holding the plateau number of "
            "requests in flight, without ramp-up and drain), or the whole window's energy per output token "
            "where no steady-state GPU energy was measured (the axis says which). Bottom right: goodput, the "
            "requests per second meeting every latency objective (``slo``), and the request throughput. A "
            "campaign without request rates shows a note instead.\n\n" + CONTEXT_CAPTION
        ),
    ),
    "timeline_overview": FigureSpec(
        "Campaign overview: GPU power of every experiment",
        "timeline.draw_timeline_overview",
        needs_runs=True,
        caption=(
            "**Campaign overview.** One row per experiment: the GPU power (W, colour) of its first cycle's job "
            "over time since the job's first sample, in 0.5 s bins: model load, compile, warm-up, baselines and "
            "windows in sequence. White ticks mark the measured window's edges. Each experiment's own timeline "
            "figure (category *Power timelines*) shades and names every phase.\n\n" + CONTEXT_CAPTION
        ),
    ),
}
FIGURE_NAMES: tuple[str, ...] = tuple(FIGURES)
RUN_TIMELINE_CAPTION = (
    "**Power timeline of one experiment** (its first successful cycle; the job loads the model once and "
    "measures its cycles back to back). Top: GPU power from the sampler (``timeline.parquet``); below: SM clock "
    "and temperature where sampled. Shaded: model load, compile, warm-up, idle baseline(s), the measured "
    "window and the prefill-only window; red ticks at the bottom of the power panel: the requests' prefill "
    "spans (submission to first token). Each window's GPU energy from the NVML counter is written inside it "
    "where there is room, and all of them are listed under the plot with their durations; baselines are idle "
    "power x duration. A span whose timestamps the measuring harness did not record is named under the plot."
)


def plot(
    name: str,
    summary: Tables | pd.DataFrame | Path | str,
    png: Path | str,
    svg: Path | str,
    runs_dir: Path | str | None = None,
) -> None:
    """Draw campaign figure `name` from the campaign's tables (summary.Tables, a summary.parquet path with
    metrics.parquet beside it, or an already joined DataFrame) and save PNG + SVG."""
    import matplotlib

    from llm_energy.plots.data import load
    from llm_energy.plots.style import RC_PARAMS, save

    spec = FIGURES[name]
    inputs = FigureInputs(load(summary), Path(runs_dir) if runs_dir is not None else None)
    with matplotlib.rc_context(RC_PARAMS):
        figure = spec.draw(inputs, spec.title)
    save(figure, png, svg)


# Names re-exported from the modules that import matplotlib, loaded on first use (see FigureSpec.draw_at).
_LAZY: dict[str, str] = {
    "EnergyBoundary": "data",
    "choose_boundary": "data",
    "load": "data",
    "pareto_front": "data",
    "NO_SUCCESS_TEXT": "style",
    "plot_run_timelines": "timeline",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FIGURES",
    "FIGURE_NAMES",
    "TIMELINES_DIR",
    "RUN_TIMELINE_CAPTION",
    "EnergyBoundary",
    "FigureInputs",
    "NO_SUCCESS_TEXT",
    "choose_boundary",
    "pareto_front",
    "plot",
    "plot_run_timelines",
]
