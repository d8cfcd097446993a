"""workflow/benchmarks/plot_scale.py runs for real (a small synthetic campaign; the 1,000-experiment
figure is in the README), through the real snakemake in figures-only mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llm_energy import plots
from tests.workflow.helpers import REPO_ROOT
from tests.workflow.helpers import test_environment as job_environment

pytestmark = pytest.mark.workflow


def test_plot_scale_times_figures_only_mode_on_a_synthetic_campaign(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "workflow" / "benchmarks" / "plot_scale.py"), "--experiments", "15",
         "--cycles", "2", "--keep", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=900, env=job_environment(),
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads(completed.stdout[completed.stdout.index("{"):completed.stdout.rindex("}") + 1])
    assert report["experiments"] == 15 and report["timeline_figures"] == 15
    assert report["campaign_figures"] == sorted(f"{name}.png" for name in plots.FIGURE_NAMES)
    assert 0 < report["figures_target_wall_s"] and 0 < report["timelines_wall_s"]
    assert "figures-only mode, 15 experiments, 2 cores" in completed.stdout
    tree = tmp_path / "work" / "tree"
    assert len(list((tree / "experiments").glob("*.json"))) == 15
    assert (tree / "report" / "summary.html").stat().st_size > 5_000
