"""The figure names are defined once (llm_energy.plots.FIGURES) and the rules read them from there."""

import re
from pathlib import Path

import pytest
from llm_energy import plots

RULES = Path(__file__).resolve().parents[2] / "workflow" / "rules"


@pytest.mark.parametrize("figure", plots.FIGURE_NAMES)
def test_every_figure_has_a_drawing_function_a_title_and_a_caption(figure):
    spec = plots.FIGURES[figure]
    assert callable(spec.draw) and spec.title and spec.caption


def test_the_rules_take_the_names_from_the_package():
    # A second list in the rules would drift from this one: they must import it.
    common = (RULES / "common.smk").read_text()
    assert "plots.FIGURE_NAMES" in common
    for figure in plots.FIGURE_NAMES:
        assert not re.search(rf"[\"']{figure}[\"']", common), f"{figure} is spelled out in common.smk"
