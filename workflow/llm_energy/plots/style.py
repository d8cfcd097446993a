"""The house style of every figure: one place for sizes, colours, notes, the context footer and saving.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas directly (no pyplot state), so
plotting is thread-safe and independent of the user's MPLBACKEND. PNG and SVG are rendered to memory
and written atomically; the SVG carries no date, so the same data gives the same file.
"""

from __future__ import annotations

import io
import logging
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from llm_energy.artifacts import atomic_write_bytes

log = logging.getLogger(__name__)

PNG_DPI = 200
MAX_PNG_PIXELS = 12e6
# Per-experiment timelines: one per experiment, so a 1,000-experiment campaign must stay cheap.
TIMELINE_PNG_DPI = 110
NO_SUCCESS_TEXT = "no successful experiments"
RC_PARAMS = {
    "svg.hashsalt": "llm-energy",  # stable SVG ids: same data, same file
    "svg.fonttype": "none",  # text stays text in the SVG: searchable, a third of the size, faster
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 7,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
}
NOTE_FONT_SIZE = 7
NOTE_COLOR = "#444444"
GRID_ALPHA = 0.3
MAX_LISTED = 4  # experiment ids listed in a note before "and N more"
MAX_FACET_COLUMNS = 4

# Energy domains and the phases of a run, each with one colour used by every figure.
DOMAIN_COLORS = {"gpu": "#4C72B0", "cpu": "#DD8452", "dram": "#55A868"}
PHASE_COLORS = {
    "startup": "#B0B0B0",
    "model_load": "#8172B3",
    "compile": "#DA8BC3",
    "warmup": "#CCB974",
    "baseline": "#8C8C8C",
    "windows": "#4C72B0",
    "inference": "#4C72B0",
    "prefill_only": "#64B5CD",
    "prefill": "#C44E52",
    "decode": "#55A868",
    "gaps": "#E5E5E5",
}
PHASE_LABELS = {
    "startup": "process start",
    "model_load": "model load",
    "compile": "compile",
    "warmup": "warm-up",
    "baseline": "idle baseline",
    "windows": "measured windows",
    "inference": "measured window",
    "prefill_only": "prefill-only window",
    "prefill": "prefill",
    "decode": "decode",
    "gaps": "gaps (other)",
}
ESTIMATED_HATCH = "///"
# Above this many points in one panel, points are not labelled with their batch size (marker size or
# position says it instead).
MAX_LABELLED_POINTS = 16
BATCH_LABEL_FONT_SIZE = 7
# Where a batch label may sit, in points from its marker: upper right first, then the other corners.
BATCH_LABEL_OFFSETS = ((4, 3), (4, -10), (-22, 3), (-22, -10))


def colors(n: int) -> list:
    """n distinct colours (tab10, tab20 beyond ten)."""
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(max(n, 1))]


def color_map(labels: Sequence[str]) -> dict[str, tuple]:
    """One colour per label, the same in every panel of a figure (labels sorted, so the same
    campaign gives the same colours in every figure)."""
    ordered = sorted(dict.fromkeys(labels))
    return dict(zip(ordered, colors(len(ordered))))


def new_figure(width_in: float = 7.0, height_in: float = 4.8, constrained: bool = True) -> Figure:
    figure = Figure(figsize=(width_in, height_in), layout="constrained" if constrained else None)
    FigureCanvasAgg(figure)
    return figure


def wrap_notes(notes: Sequence[str], width_in: float) -> str:
    # About 19 characters of 7 pt text per inch of figure width.
    width_chars = max(40, int(width_in * 19))
    return "\n".join(textwrap.fill(note, width_chars, break_long_words=True) for note in notes if note)


def add_notes(figure: Figure, notes: Sequence[str]) -> None:
    """Notes (context, skipped experiments, missing metrics) at the bottom, outside the axes.

    Wrapped here, not by matplotlib, so that the reserved margin counts the lines really drawn.
    """
    notes = [n for n in notes if n]
    if not notes:
        return
    text = wrap_notes(notes, figure.get_figwidth())
    lines = text.count("\n") + 1
    height_in = figure.get_figheight()
    margin_in = 0.05  # the text's distance from the bottom edge, in inches (not a fraction: figures grow)
    bottom = min(0.5, (margin_in + 0.08 + 0.118 * lines) / height_in)
    engine = figure.get_layout_engine()
    if engine is not None:
        engine.set(rect=(0, bottom, 1, 1 - bottom))
    else:
        figure.subplots_adjust(bottom=bottom + 0.07)
    figure.text(
        0.1 / figure.get_figwidth(),
        margin_in / height_in,
        text,
        ha="left",
        va="bottom",
        fontsize=NOTE_FONT_SIZE,
        color=NOTE_COLOR,
    )


def message_figure(message: str, notes: Sequence[str], title: str) -> Figure:
    figure = new_figure()
    ax = figure.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=14, transform=ax.transAxes)
    add_notes(figure, notes)
    return figure


def facet_grid(figure: Figure, count: int, sharex: bool = False, sharey: bool = False):
    """`count` axes in a grid of at most MAX_FACET_COLUMNS columns (unused cells removed)."""
    columns = min(count, MAX_FACET_COLUMNS)
    rows = -(-count // columns)
    axes = figure.subplots(rows, columns, squeeze=False, sharex=sharex, sharey=sharey).ravel()
    for ax in axes[count:]:
        ax.remove()
    return list(axes[:count])


def facet_size(count: int, width_in: float = 4.2, height_in: float = 3.3) -> tuple[float, float]:
    """Figure size for `count` facets (capped so a huge campaign stays a viewable image)."""
    columns = min(max(count, 1), MAX_FACET_COLUMNS)
    rows = -(-max(count, 1) // columns)
    return min(22.0, max(7.0, width_in * columns + 0.6)), min(40.0, height_in * rows + 1.6)


def tidy_log_axes(ax) -> None:
    """No labels on the minor ticks of a log axis spanning more than a decade and a half (2x10^3,
    3x10^3, ... crowd small panels); a narrower one keeps them, or it would have no label at all."""
    from matplotlib.ticker import NullFormatter

    for axis, scale, limits in ((ax.xaxis, ax.get_xscale(), ax.get_xlim()), (ax.yaxis, ax.get_yscale(), ax.get_ylim())):
        low, high = sorted(limits)
        if scale == "log" and low > 0 and high / low > 30:
            axis.set_minor_formatter(NullFormatter())


def render(figure: Figure, dpi: int = PNG_DPI) -> tuple[bytes, bytes]:
    """(PNG bytes, SVG bytes) of a figure. A very large figure (small multiples of a big campaign) gets
    fewer dots per inch, so that its PNG stays about MAX_PNG_PIXELS."""
    width_in, height_in = figure.get_size_inches()
    dpi = max(72, min(dpi, int((MAX_PNG_PIXELS / (width_in * height_in)) ** 0.5)))
    with matplotlib.rc_context(RC_PARAMS):
        png_buffer = io.BytesIO()
        figure.savefig(png_buffer, format="png", dpi=dpi)
        # The layout is solved now: the SVG reuses it instead of solving it again (half the time of
        # a figure with many panels).
        figure.set_layout_engine("none")
        svg_buffer = io.BytesIO()
        # No date in the SVG: the same summary gives the same file.
        figure.savefig(svg_buffer, format="svg", metadata={"Date": None})
    return png_buffer.getvalue(), svg_buffer.getvalue()


def save(figure: Figure, png: Path | str, svg: Path | str, dpi: int = PNG_DPI) -> None:
    """Render to memory, then write each file atomically (temp name + os.replace)."""
    png_bytes, svg_bytes = render(figure, dpi)
    atomic_write_bytes(png, png_bytes)
    atomic_write_bytes(svg, svg_bytes)
    log.info("wrote %s and %s", png, svg)


def _overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Whether two (left, bottom, right, top) boxes overlap."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def label_batches(ax, points: Sequence[tuple[float, float, float]]) -> None:
    """Label a panel's (x, y, batch size) points "bs<n>" where it has at most MAX_LABELLED_POINTS.
    Points of several series often coincide (two engines at the same speed): a label equal to one
    already drawn within a label's height of it is left out, since that one names both, and any other
    label takes the first corner of BATCH_LABEL_OFFSETS where it covers no label drawn before. Call it
    once the panel's scales and data are set, so that where the points land is known."""
    shown = [(x, y, b) for x, y, b in points if np.isfinite(x) and np.isfinite(y) and np.isfinite(b)]
    if not shown or len(shown) > MAX_LABELLED_POINTS:
        return
    ax.autoscale_view()
    px_per_pt = ax.figure.dpi / 72
    height = BATCH_LABEL_FONT_SIZE * px_per_pt
    drawn: list[tuple[str, float, float, tuple[float, ...]]] = []  # text, marker (px) and its label's box
    for x, y, batch in shown:
        text = f"bs{int(batch)}"
        at_x, at_y = ax.transData.transform((x, y))
        if any(t == text and abs(at_x - mx) < height and abs(at_y - my) < height for t, mx, my, _ in drawn):
            continue
        width = 0.6 * BATCH_LABEL_FONT_SIZE * len(text) * px_per_pt
        boxes = []
        for dx, dy in BATCH_LABEL_OFFSETS:
            left, bottom = at_x + dx * px_per_pt, at_y + dy * px_per_pt
            boxes.append((left, bottom, left + width, bottom + height))
        free = (i for i, box in enumerate(boxes) if not any(_overlaps(box, other) for *_, other in drawn))
        choice = next(free, 0)
        ax.annotate(
            text, (x, y), textcoords="offset points", xytext=BATCH_LABEL_OFFSETS[choice], fontsize=BATCH_LABEL_FONT_SIZE
        )
        drawn.append((text, at_x, at_y, boxes[choice]))
