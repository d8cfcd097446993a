"""Where the energy and the time went, as shares (so small and large runs are both visible).

- energy_breakdown: per experiment, GPU energy of one load with its setup and one measured window, by
  phase (model load, compile, warm-up, idle baseline, prefill, decode); beside it the window's energy
  by domain (GPU, CPU, DRAM; estimates hatched).
- time_accounting: the campaign's GPU wall time (the jobs' time) in model load, compile, warm-up,
  baselines, measured windows and gaps; one bar for the campaign and one per experiment.

With more than MAX_BARS experiments, bars are per facet and series (energies and times summed), so
1,000 experiments stay one readable figure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from llm_energy.plots import data as d
from llm_energy.plots.style import (
    DOMAIN_COLORS,
    ESTIMATED_HATCH,
    GRID_ALPHA,
    NO_SUCCESS_TEXT,
    PHASE_COLORS,
    PHASE_LABELS,
    add_notes,
    message_figure,
    new_figure,
)

MAX_BARS = 40
SMALL_SHARE = 0.03  # components below this share are named beside the bar's total
BOUNDARY_NAMES = {"gpu": "GPU", "node": "Node"}
ENERGY_DOMAINS = ("gpu", "cpu", "dram")
SETUP_PHASES = ("model_load", "compile", "warmup")
TIME_PHASES = ("startup", "model_load", "compile", "warmup", "baseline", "windows", "gaps")


@dataclass(frozen=True)
class Bars:
    labels: list[str]
    rows: list[pd.DataFrame]
    per_experiment: bool


def bar_groups(ok: pd.DataFrame) -> Bars:
    """One bar per experiment where there are few; else one per facet and series."""
    lay = d.layout(ok)
    if len(ok) <= MAX_BARS:
        labels = []
        for index in ok.index:
            parts = [p for p in (lay.facets[index], lay.series[index]) if p]
            batch = ok.at[index, "batch_size"] if "batch_size" in ok.columns else None
            if not d.isnan(batch):
                parts.append(f"bs{int(batch)}")
            labels.append(" / ".join(parts) or str(ok.at[index, "experiment_id"]))
        return Bars(labels, [ok.loc[[i]] for i in ok.index], True)
    keys = pd.Series(list(zip(lay.facets, lay.series)), index=ok.index)
    labels, rows = [], []
    for facet, series in dict.fromkeys(keys):
        group = ok.loc[keys == (facet, series)]
        labels.append(" / ".join(p for p in (facet, series) if p) + f" ({len(group)} exp.)")
        rows.append(group)
    return Bars(labels, rows, False)


def _sum(rows: pd.DataFrame, name: str) -> float:
    values = d.column(rows, name)
    return float(values.sum()) if values.notna().any() else np.nan


def phase_energies(rows: pd.DataFrame, boundary: str) -> dict[str, float]:
    """Energy (J) of one load with its setup and one measured window per experiment, by phase, summed
    over `rows`. The window's idle baseline is active-idle power x window (gross - net); the rest of
    the window (net) is split into prefill and decode in the ratio of the run's prefill/decode split."""
    out = {phase: _sum(rows, f"setup_{phase}_{boundary}_energy_j") for phase in SETUP_PHASES}
    gross = d.column(rows, f"{boundary}_energy_j")
    net = d.column(rows, f"{boundary}_net_energy_j")
    prefill = d.column(rows, f"prefill_{boundary}_energy_j")
    decode = d.column(rows, f"decode_{boundary}_energy_j")
    split = prefill / (prefill + decode)
    above = net.where(net.notna(), gross)
    baseline = (gross - net).clip(lower=0)
    out["baseline"] = float(baseline.sum()) if baseline.notna().any() else np.nan
    has_split = split.notna() & above.notna()
    out["prefill"] = float((above * split.clip(0, 1))[has_split].sum()) if has_split.any() else np.nan
    out["decode"] = float((above * (1 - split.clip(0, 1)))[has_split].sum()) if has_split.any() else np.nan
    rest = above[~has_split]
    out["window"] = float(rest.sum()) if rest.notna().any() else np.nan
    return out


def domain_energies(rows: pd.DataFrame) -> tuple[dict[str, float], dict[str, bool]]:
    """Window energy (J) per domain summed over rows: measured, else CodeCarbon's estimate."""
    values, estimated = {}, {}
    for domain in ENERGY_DOMAINS:
        measured = d.column(rows, f"{domain}_energy_j")
        estimate = d.column(rows, f"{domain}_estimated_energy_j") if domain != "gpu" else measured * np.nan
        method = (
            rows[f"{domain}_energy_method"].astype(str)
            if f"{domain}_energy_method" in rows.columns
            else pd.Series("", index=rows.index)
        )
        is_estimate = measured.isna() | method.str.contains("estimated")
        value = measured.where(measured.notna(), estimate)
        values[domain] = float(value.sum()) if value.notna().any() else np.nan
        estimated[domain] = bool((is_estimate & value.notna()).any())
    return values, estimated


def _percent(share: float) -> str:
    return "<0.01 %" if share < 1e-4 else f"{100 * share:.2g} %"


def _hbars(
    ax,
    labels: list[str],
    parts: list[dict[str, float]],
    order: list[str],
    colors: dict,
    names: dict,
    hatched: list[dict[str, bool]] | None = None,
    unit: str = "J",
) -> list[str]:
    """Horizontal 100 % bars, one per label; returns the components drawn anywhere. Each bar ends in
    its total (the unit given)."""
    y = np.arange(len(labels))
    left = np.zeros(len(labels))
    totals = np.array([np.nansum([p.get(k, np.nan) for k in order]) for p in parts])
    drawn = []
    for key in order:
        values = np.array([p.get(key, np.nan) for p in parts], dtype=float)
        available = np.isfinite(values) & (totals > 0)
        if not available.any():
            continue
        shares = np.where(available, values / np.where(totals > 0, totals, 1), 0.0)
        hatch = [ESTIMATED_HATCH if hatched and hatched[i].get(key) else None for i in range(len(labels))]
        for i in np.flatnonzero(available):
            ax.barh(
                y[i],
                shares[i],
                left=left[i],
                color=colors[key],
                edgecolor="white" if not hatch[i] else "#333333",
                hatch=hatch[i],
                linewidth=0.5,
                height=0.7,
            )
            if shares[i] >= 0.08:
                ax.text(
                    left[i] + shares[i] / 2,
                    y[i],
                    f"{shares[i]:.0%}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="black",
                )
        left += shares
        drawn.append(key)
    for i, total in enumerate(totals):
        text = f"{total:,.0f} {unit}" if total >= 10 else f"{total:.3g} {unit}" if total > 0 else "n/a"
        # Components too thin to see are named with their share.
        small = [
            f"{names[k]} {_percent(parts[i][k] / total)}"
            for k in order
            if total > 0 and np.isfinite(parts[i].get(k, np.nan)) and 0 < parts[i][k] / total < SMALL_SHARE
        ]
        if small:
            text += " (" + ", ".join(small) + ")"
        ax.text(1.01, y[i], text, va="center", ha="left", fontsize=6, transform=ax.get_yaxis_transform())
    ax.set_yticks(y, labels, fontsize=7 if len(labels) <= 20 else 6)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(lambda v, _pos: f"{v:.0%}")
    ax.grid(True, axis="x", alpha=GRID_ALPHA)
    return drawn


def _height(n: int) -> float:
    return min(30.0, 2.4 + 0.28 * n)


def draw_energy_breakdown(inputs, title: str) -> Figure:
    ok, notes = d.split_successful(inputs.summary)
    if ok.empty:
        return message_figure(NO_SUCCESS_TEXT, notes, title)
    ok = ok.sort_values(
        [c for c in ("model", "dataset", "backend", "batch_size") if c in ok.columns], kind="stable"
    ).reset_index(drop=True)
    bars = bar_groups(ok)
    boundary = "gpu" if d.column(ok, "gpu_energy_j").notna().any() else "node"
    phases = [phase_energies(rows, boundary) for rows in bars.rows]
    domains = [domain_energies(rows) for rows in bars.rows]
    figure = new_figure(12.0, _height(len(bars.labels)) + 1.4)
    left, right = figure.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    order = [*SETUP_PHASES, "baseline", "prefill", "decode", "window"]
    colors = {**PHASE_COLORS, "window": PHASE_COLORS["inference"]}
    names = {**PHASE_LABELS, "window": "window above idle (no prefill/decode split)"}
    drawn = _hbars(left, bars.labels, phases, order, colors, names)
    if drawn:
        left.legend(
            handles=[Patch(color=colors[k], label=names[k]) for k in drawn],
            fontsize=7,
            loc="lower center",
            bbox_to_anchor=(0.5, 1.0),
            ncol=4,
            frameon=False,
            title=f"{BOUNDARY_NAMES[boundary]} energy by phase: one load with its setup + one measured window",
            title_fontsize=9,
        )
    else:
        left.set_title(f"{BOUNDARY_NAMES[boundary]} energy by phase")
        left.text(
            0.5,
            0.5,
            f"not available: no measured {boundary} energy\nof setup and window phases",
            transform=left.transAxes,
            ha="center",
            va="center",
            fontsize=10,
        )
    drawn_domains = _hbars(
        right,
        bars.labels,
        [v for v, _ in domains],
        list(ENERGY_DOMAINS),
        DOMAIN_COLORS,
        {k: k for k in ENERGY_DOMAINS},
        hatched=[e for _, e in domains],
    )
    handles = [Patch(color=DOMAIN_COLORS[k], label=k) for k in drawn_domains]
    handles += [
        Patch(facecolor="none", edgecolor="#999999", label=f"{k}: n/a")
        for k in ENERGY_DOMAINS
        if k not in drawn_domains
    ]
    if any(any(e.values()) for _, e in domains):
        handles.append(
            Patch(facecolor="white", edgecolor="#333333", hatch=ESTIMATED_HATCH, label="estimated (CodeCarbon model)")
        )
    right.legend(
        handles=handles,
        fontsize=7,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=4,
        frameon=False,
        title="Window energy by domain",
        title_fontsize=9,
    )
    lay = d.layout(ok)
    figure.suptitle(title + (f"\n{lay.title}" if lay.title else ""))
    boundary_info = d.choose_boundary(ok)
    notes.append(
        "Shares of each bar's total (printed at its end). Idle baseline: the run's baseline power x "
        "window (gross - net; active idle where the run measured it, else the static idle); the rest of "
        "the window is split into prefill and decode in the ratio of the run's prefill/decode split "
        "(its method is phase_split_method in the experiment's JSON). Setup is measured once per load."
    )
    if not bars.per_experiment:
        notes.append(f"{len(ok)} experiments: one bar per model/dataset and series, energies summed.")
    add_notes(figure, d.context_notes(ok, boundary_info) + notes)
    return figure


def time_parts(rows: pd.DataFrame) -> dict[str, float]:
    """The jobs' wall time (s) by phase, summed over rows; gaps = wall - everything accounted."""
    out = {phase: _sum(rows, f"job_{phase}_s") for phase in TIME_PHASES if phase not in ("windows", "gaps")}
    out["windows"] = _sum(rows, "job_windows_s")
    wall = _sum(rows, "job_wall_s")
    out["gaps"] = max(wall - np.nansum(list(out.values())), 0.0) if np.isfinite(wall) else np.nan
    return out


def draw_time_accounting(inputs, title: str) -> Figure:
    summary = inputs.summary
    ok, notes = d.split_successful(summary)
    if ok.empty:
        return message_figure(NO_SUCCESS_TEXT, notes, title)
    timed = ok.loc[d.column(ok, "job_wall_s").notna()].reset_index(drop=True)
    if timed.empty:
        return message_figure(
            "no job time recorded\n(results from a harness without time accounting)",
            notes + d.context_notes(ok, None, energy=False),
            title,
        )
    notes += d.missing_note(ok, timed, "job time accounting")
    bars = bar_groups(timed)
    labels = ["campaign (all jobs)", *bars.labels]
    parts = [time_parts(timed), *(time_parts(rows) for rows in bars.rows)]
    figure = new_figure(9.0, _height(len(labels)) + 1.2)
    ax = figure.add_subplot()
    drawn = _hbars(ax, labels, parts, list(TIME_PHASES), PHASE_COLORS, PHASE_LABELS, unit="s")
    ax.axhline(0.5, color="black", linewidth=0.8)
    ax.legend(
        handles=[Patch(color=PHASE_COLORS[k], label=PHASE_LABELS[k]) for k in drawn],
        fontsize=7,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=6,
        frameon=False,
    )
    ax.set_xlabel("Share of the jobs' wall time")
    share = parts[0]["windows"] / sum(v for v in parts[0].values() if np.isfinite(v))
    if not d.column(ok, "gpu_count").gt(0).any():
        title = title.replace("GPU time", "jobs' time (no GPU)")
    lay = d.layout(ok)
    figure.suptitle(f"{title}: {share:.0%} inside measured windows" + (f"\n{lay.title}" if lay.title else ""))
    notes.append(
        "Wall time of the run_inference jobs (summary job_*_s; the GPU is held for all of it). Gaps: "
        "the rest (writing artifacts, closing the engine; the batch before each window counts as warm-up). "
        "Process start where the job recorded it (job_startup_s); older jobs began their wall time after it."
    )
    add_notes(figure, d.context_notes(ok, None, energy=False) + notes)
    return figure
