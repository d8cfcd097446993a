"""A job killed with SIGKILL between cycles resumes at the first missing cycle (the real snakemake).

One experiment, three cycles measured back to back in one process (campaign.cycle_isolation:
experiment). The whole snakemake process group is killed as soon as cycle 1's result.json exists;
the rerun must leave cycle 1's artifacts untouched and measure cycles 2 and 3 only.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import yaml
from llm_energy import artifacts
from llm_energy.config import load_campaign

from tests.workflow.helpers import SNAKEMAKE, copy_workflow, describe, run_snakemake
from tests.workflow.helpers import test_environment as job_environment

CAMPAIGN = {
    "campaign": {
        "name": "resume",
        "cycles": 3,
        "min_window_s": 1.0,
        "warmup": {"min_batches": 2, "stable_batches": 2, "tolerance": 0.5, "max_s": 10},
        "seed": 1,
    },
    "models": {"tiny-llama": {"source": "builtin", "architecture": "llama", "seed": 0}},
    "datasets": {"bundled": {"source": "bundled", "sample_size": 4, "seed": 0}},
    "backends": ["pytorch"],
    "grid": {
        "batch_size": [2],
        "dtype": ["float32"],
        "max_input_tokens": [64],
        "max_output_tokens": [8],
        "decoding": [{"mode": "greedy"}],
        "output_length": ["fixed"],
    },
    "energy": {"baseline": {"duration_s": 0.5}},
}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_job_killed_after_cycle_1_resumes_at_cycle_2(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "resume")
    campaign_file = workdir / "campaign.yaml"
    campaign_file.write_text(yaml.safe_dump(CAMPAIGN))
    (experiment_id,) = load_campaign(CAMPAIGN).experiments
    runs = workdir / "results" / "runs" / experiment_id
    first = runs / "cycle-1" / "result.json"

    process = subprocess.Popen(
        [SNAKEMAKE, "--cores", "2", "--configfile", str(campaign_file)],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=job_environment(),
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while not first.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # snakemake and the job's python, mid-experiment
    process.wait()
    assert first.is_file(), f"cycle 1 never completed: {process.stderr.read()[-3000:]}"
    assert not (runs / "cycle-3" / "result.json").is_file(), "the job finished before it could be killed"
    assert not (runs / "cycles.json").is_file()
    kept = {name: digest(runs / "cycle-1" / name) for name in ("result.json", "requests.parquet", "timeline.parquet")}

    unlocked = run_snakemake(workdir, "--unlock", "--configfile", str(campaign_file))
    assert unlocked.returncode == 0, describe(unlocked)
    rerun = run_snakemake(workdir, "--cores", "2", "--configfile", str(campaign_file), label="resume after kill -9")
    assert rerun.returncode == 0, describe(rerun)

    assert {name: digest(runs / "cycle-1" / name) for name in kept} == kept  # untouched
    run_set = artifacts.read_json_artifact(runs / "cycles.json", "run_set")["data"]
    assert [c["cycle"] for c in run_set["cycles"]] == [1, 2, 3]
    measured_now = [c["cycle"] for c in run_set["measured_now"]]
    assert measured_now and 1 not in measured_now and 3 in measured_now
    for cycle in (2, 3):
        data = artifacts.read_json_artifact(runs / f"cycle-{cycle}" / "result.json", "run_result")["data"]
        assert data["status"] == "ok" and data["window"]["duration_s"] >= 1.0
    experiment = artifacts.read_json_artifact(
        workdir / "results" / "experiments" / f"{experiment_id}.json", "experiment_result"
    )["data"]
    assert experiment["cycles_ok"] == 3
