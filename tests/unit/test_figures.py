"""The figure names are defined once (llm_energy.figures) and every one has a plot function."""

import re
from pathlib import Path

import pytest

from llm_energy import plots
from llm_energy.figures import FIGURE_NAMES, plot_function_name

RULES = Path(__file__).resolve().parents[2] / "workflow" / "rules"


@pytest.mark.parametrize("figure", FIGURE_NAMES)
def test_every_figure_has_a_plot_function(figure):
    assert callable(getattr(plots, plot_function_name(figure)))


def test_an_unknown_figure_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown figure 'nope'.*energy_vs_batch_size"):
        plot_function_name("nope")


def test_the_rules_take_the_names_from_the_package():
    # A second list in the rules would drift from this one: they must import it.
    common = (RULES / "common.smk").read_text()
    assert "from llm_energy.figures import FIGURE_NAMES" in common
    for figure in FIGURE_NAMES:
        assert not re.search(rf"[\"']{figure}[\"']", common), f"{figure} is spelled out in common.smk"
