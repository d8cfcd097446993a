"""workflow/benchmarks/dag_scale.py runs for real on a small campaign (the 1,000-experiment figures are in
the README): `snakemake -n` on a generated campaign and figures-only mode over synthetic results, through
the real snakemake, so the benchmark cannot rot."""

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


def test_dag_scale_times_the_dry_run_and_figures_only_mode(tmp_path: Path) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "workflow" / "benchmarks" / "dag_scale.py"),
            "--experiments",
            "20",
            "--cycles",
            "2",
            "--keep",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=job_environment(),
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads(completed.stdout[completed.stdout.index("{") : completed.stdout.rindex("}") + 1])
    dry, figures = report["dry_run"], report["figures_only"]
    # 2 models x 1 batch size x 10 output lengths; per experiment run_inference + aggregate, plus the
    # models, their FLOPs, the dataset and the campaign's summary, figures and report pages
    assert dry["experiments"] == 20 and dry["jobs"] > 40 and dry["wall_s"] > 0
    assert figures["experiments"] == 20 and figures["wall_s"] > 0
    assert figures["campaign_figures"] == sorted(f"{name}.png" for name in plots.FIGURE_NAMES)
    assert {"summarize.log", "report_pages.log"} <= set(figures["jobs_s"])
    assert 0 < report["snakemake_start_s"]
    assert "snakemake -n on 20 experiments x 2 cycles" in completed.stdout
    assert "figures-only over 20 experiment results" in completed.stdout
    tree = tmp_path / "work" / "tree"
    assert len(list((tree / "experiments").glob("*.json"))) == 20
    assert (tree / "metrics.csv").stat().st_size > 1_000 and (tree / "report" / "summary.html").stat().st_size > 5_000
    assert not (tree / "figures" / "timelines").exists()  # `figures` leaves out the per-experiment timelines
