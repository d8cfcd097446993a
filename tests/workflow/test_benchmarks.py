"""The benchmark scripts run for real on CPU (their figures matter on a GPU; here: that they work)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.workflow.helpers import REPO_ROOT
from tests.workflow.helpers import test_environment as job_environment


def test_harness_overhead_measures_every_arm_against_bare_generate(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "workflow" / "benchmarks" / "harness_overhead.py"),
            "--configfile",
            str(REPO_ROOT / "config" / "config.yaml"),
            "--resources",
            str(tmp_path / "resources"),
            "--experiments",
            "tiny-llama",
            "--batch-sizes",
            "4",
            "--windows",
            "2",
            "--window-s",
            "0.2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=job_environment(),
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "harness throughput / transformers' own generate" in completed.stdout
    document = json.loads(out.read_text())
    assert {r["arm"] for r in document["rows"]} == {"full", "no_sampler", "no_codecarbon", "bare_streamer"}
    for row in document["rows"]:
        assert row["pytorch_path"] == "eager" and row["batch_size"] == 4 and row["n"] == 2
        assert row["bare_output_tokens_per_s"] > 0 and row["arm_output_tokens_per_s"] > 0
        assert row["ratio"] > 0 and row["ci95_low"] <= row["ratio"] <= row["ci95_high"]
    (timing,) = document["time_accounting"]
    assert 0 < timing["share_in_windows"] < 1
