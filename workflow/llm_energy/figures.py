"""The figures the pipeline draws, named once.

Each name is the file stem under `results/figures/` (`<name>.png`, `<name>.svg`) and the plot
function `llm_energy.plots.plot_<name>`. The rules (rule all, the `figure` wildcard) and
`jobs.plot_job` read this list, so adding a figure is one name here and one plot function there.
It lives apart from `plots` so that the rules can import it without matplotlib.
"""

from __future__ import annotations

FIGURE_NAMES: tuple[str, ...] = ("energy_vs_batch_size", "throughput_vs_energy", "energy_breakdown", "latency")


def plot_function_name(figure: str) -> str:
    """The name of the function in `llm_energy.plots` that draws `figure`."""
    if figure not in FIGURE_NAMES:
        raise ValueError(f"unknown figure {figure!r}; the figures are {list(FIGURE_NAMES)}")
    return f"plot_{figure}"
