"""The workflow on a real SLURM cluster: `snakemake --workflow-profile workflow/profiles/slurm`.

A one-node cluster runs on this machine (tests/slurm_cluster.py; .ci/run installs it up front). The
test copies the repository's Snakefile, workflow/ and config/ into a temp folder and runs the real
snakemake with the shipped SLURM profile, layered under a test-only profile that changes only what
the GPU-less CI node cannot give (see ci_profile). Skipped only when SLURM cannot be installed or
started here; on CI it always runs.

Every SLURM job costs several seconds of submission and polling overhead, so the campaigns are tiny:
4 SLURM jobs for the smoke campaign, 3 for the failure campaign; the rerun is checked with a dry run.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from llm_energy.artifacts import read_json_artifact
from llm_energy.config import load_campaign_file

from tests import slurm_cluster
from tests.workflow.helpers import MEASURED_TIMES_S, REPO_ROOT, SNAKEMAKE, copy_workflow, describe
from tests.workflow.helpers import test_environment as offline_environment  # (not collected as a test)

SHIPPED_PROFILE = REPO_ROOT / "workflow" / "profiles" / "slurm" / "config.yaml"
DEFAULT_PROFILE = REPO_ROOT / "workflow" / "profiles" / "default" / "config.yaml"
SMOKE_CAMPAIGN = "config/campaigns/slurm-smoke.yaml"
# Rules that must run as SLURM jobs; all others are localrules (Snakefile) and run on the submit host.
REMOTE_RULES = {"run_inference", "estimate_flops"}
SNAKEMAKE_TIMEOUT_S = 240

pytestmark = pytest.mark.slurm

# "Job 3 has been submitted with SLURM jobid 17 (log: /…/.snakemake/slurm_logs/rule_run_inference/…/17.log)."
SUBMITTED_RE = re.compile(r"submitted with SLURM jobid (\d+) \(log: (\S+)\)")


# ------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def cluster():
    """The one-node cluster: reused when up (CI), else started here and stopped afterwards."""
    try:
        running = slurm_cluster.ensure_cluster(timeout_s=60)
    except slurm_cluster.SlurmUnavailable as error:
        pytest.skip(f"no SLURM cluster on this machine and none could be started: {error}")
    yield running
    slurm_cluster.stop_cluster(running)


def ci_profile(shipped: dict, node_cpus: int, node_memory_mb: int) -> dict:
    """The shipped SLURM profile, changed only where the one-node, GPU-less CI cluster cannot comply.

    - run_inference: gpu=0. The plugin treats a falsy `gpu` as a CPU job (no --gpus, --ntasks=1 instead
      of --ntasks-per-gpu); gpu_model/gres are dropped because gpu_model alone would still send
      --gpus=<model>:0. Partitions, --exclusive, runtimes and the rest stay as shipped.
    - mem_mb / cpus_per_task: clamped to half the node (sbatch rejects a job no node can hold).
    - Status checks start after 2 s instead of the production interval (CI jobs take seconds).
    """
    profile = copy.deepcopy(shipped)
    inference = profile["set-resources"]["run_inference"]
    inference["gpu"] = 0
    for key in ("gpu_model", "gres"):
        inference.pop(key, None)
    for resources in [profile["default-resources"], *profile["set-resources"].values()]:
        if "mem_mb" in resources:
            resources["mem_mb"] = min(int(resources["mem_mb"]), node_memory_mb // 2)
        if "cpus_per_task" in resources:
            # Half the node at most, so that two small CPU jobs (estimate_flops) can share it.
            resources["cpus_per_task"] = min(int(resources["cpus_per_task"]), max(1, node_cpus // 2))
    profile["slurm-init-seconds-before-status-checks"] = 2
    profile["latency-wait"] = 5
    return profile


def make_workdir(root: Path, name: str, cluster: slurm_cluster.SlurmCluster) -> Path:
    """A copy of the workflow (Snakefile, workflow/, config/, envs/) in root/name; the CI profile goes
    to root/profiles/slurm-ci, shared by every workdir under root."""
    workdir = copy_workflow(root / name)
    profile_file = root / "profiles" / "slurm-ci" / "config.yaml"
    if not profile_file.is_file():
        profile_file.parent.mkdir(parents=True)
        shipped = yaml.safe_load(SHIPPED_PROFILE.read_text())
        profile = ci_profile(shipped, cluster.cpus, cluster.real_memory_mb)
        profile_file.write_text(yaml.safe_dump(profile, sort_keys=False))
    return workdir


def run_snakemake(workdir: Path, configfile: str, *extra: str, label: str | None = None) -> subprocess.CompletedProcess:
    """The real snakemake with the CI layer of the SLURM profile, offline, outside any SLURM job."""
    env = offline_environment(
        {
            "HF_HOME": str(workdir.parent / "hf"),
            # Jobs inherit this environment (sbatch --export=ALL): the venv first.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        }
    )
    # When pytest itself runs inside a SLURM job, its SLURM_* variables must not leak into the
    # submit-host steps (they would look like SLURM jobs).
    for key in [k for k in env if k.startswith("SLURM_")]:
        del env[key]
    argv = [
        SNAKEMAKE,
        "--workflow-profile",
        str(workdir.parent / "profiles" / "slurm-ci"),
        "--configfile",
        configfile,
        *extra,
    ]
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=SNAKEMAKE_TIMEOUT_S)
    if label:
        MEASURED_TIMES_S[label] = time.monotonic() - started
    return proc


def submissions(output: str) -> list[tuple[str, str, Path]]:
    """(rule, SLURM job id, SLURM log) for every sbatch submission snakemake reported. The plugin
    puts the log at .snakemake/slurm_logs/rule_<rule>/<wildcard values joined by _>/<jobid>.log."""
    found = []
    for job_id, log_path in SUBMITTED_RE.findall(output):
        rule = next((part.removeprefix("rule_") for part in Path(log_path).parts if part.startswith("rule_")), None)
        found.append((rule, job_id, Path(log_path)))
    return found


def dry_run_jobs(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, wildcards) of every job a dry run lists."""
    jobs: list[tuple[str, dict[str, str]]] = []
    for block in re.split(r"\n\s*\n", output):
        match = re.search(r"^(?:local)?rule (\w+):", block, flags=re.MULTILINE)
        if not match:
            continue
        wildcards = re.search(r"^\s+wildcards: (.+)$", block, flags=re.MULTILINE)
        values = dict(item.split("=", 1) for item in wildcards.group(1).split(", ")) if wildcards else {}
        jobs.append((match.group(1), values))
    return jobs


def scontrol_job(job_id: str) -> dict[str, str]:
    """Fields of a (finished, still remembered: MinJobAge) job as `scontrol show job` prints them."""
    out = subprocess.run(
        ["scontrol", "show", "job", job_id, "--oneliner"], capture_output=True, text=True, timeout=15, check=True
    ).stdout
    return dict(token.split("=", 1) for token in out.split() if "=" in token)


def break_model_weights(source_weights: Path, target: Path) -> Path:
    """A copy of a model folder whose safetensors file is cut short: its header (what download_model
    reads to count parameters) is intact, but loading the tensors fails - inside the SLURM job."""
    shutil.copytree(source_weights, target)
    weights = target / "model.safetensors"
    header_len = int.from_bytes(weights.read_bytes()[:8], "little")
    with open(weights, "r+b") as handle:
        handle.truncate(8 + header_len + 64)
    return target


# --------------------------------------------------------------------------------------------- tests


def test_shipped_profile_requests_gpus_and_matches_default_profile():
    """The shipped profile (not the CI layer) asks SLURM for a GPU and a whole node per measurement,
    and repeats the default profile's shared settings (a --workflow-profile replaces the default)."""
    shipped = yaml.safe_load(SHIPPED_PROFILE.read_text())
    default = yaml.safe_load(DEFAULT_PROFILE.read_text())
    inference = shipped["set-resources"]["run_inference"]
    assert shipped["executor"] == "slurm"
    assert shipped["slurm-status-command"] == "squeue"
    assert int(inference["gpu"]) >= 1
    assert "--exclusive" in inference["slurm_extra"]
    assert "gpu" not in shipped["set-resources"]["estimate_flops"]
    assert shipped["keep-going"] is True
    assert shipped["retries"] == 0
    for key in ("rerun-triggers", "rerun-incomplete", "show-failed-logs"):
        assert shipped[key] == default[key], key
    assert "code" not in shipped["rerun-triggers"]
    # The CI layer relaxes only the GPU request and sizes, never the exclusivity or partitions.
    layered = ci_profile(shipped, node_cpus=2, node_memory_mb=8000)
    assert layered["set-resources"]["run_inference"]["gpu"] == 0
    assert layered["set-resources"]["run_inference"]["slurm_extra"] == inference["slurm_extra"]
    assert layered["set-resources"]["run_inference"]["slurm_partition"] == inference["slurm_partition"]
    assert layered["rerun-triggers"] == shipped["rerun-triggers"]


def test_campaign_runs_on_slurm_and_failures_are_isolated(cluster, tmp_path):
    workdir = make_workdir(tmp_path, "smoke", cluster)

    # ---- 1. the smoke campaign, end to end through SLURM ---------------------------------------
    proc = run_snakemake(workdir, SMOKE_CAMPAIGN, label="SLURM smoke campaign (4 jobs)")
    assert proc.returncode == 0, describe(proc)
    campaign = load_campaign_file(workdir / SMOKE_CAMPAIGN)
    submitted = submissions(proc.stderr)
    assert {rule for rule, _, _ in submitted} == REMOTE_RULES
    assert Counter(rule for rule, _, _ in submitted) == {
        "run_inference": len(campaign.experiments) * campaign.cycles,
        # One FLOPs cost model per model and dtype, whatever the number of experiments.
        "estimate_flops": len({(e.model, e.parameters["dtype"]) for e in campaign.experiments.values()}),
    }

    # Each measurement ran in its own SLURM job, and its result says which.
    results = sorted((workdir / "results" / "runs").glob("*/cycle-*/result.json"))
    assert len(results) == len(campaign.experiments) * campaign.cycles
    job_ids = [read_json_artifact(path, "run_result")["provenance"]["job"]["slurm_job_id"] for path in results]
    assert len(set(job_ids)) == len(job_ids)
    inference_jobs = {job_id for rule, job_id, _ in submitted if rule == "run_inference"}
    assert set(job_ids) == inference_jobs
    # ... with the shipped partition and node exclusivity, as SLURM itself recorded them.
    shipped = yaml.safe_load(SHIPPED_PROFILE.read_text())["set-resources"]
    for job_id in inference_jobs:
        facts = scontrol_job(job_id)
        assert facts["JobState"] == "COMPLETED", facts
        assert facts["Partition"] == shipped["run_inference"]["slurm_partition"].strip("'")
        assert facts["OverSubscribe"] == "NO"  # --exclusive
        assert "gres/gpu" not in facts.get("TRES", "")  # the CI layer's gpu=0: no --gpus sent
    for rule, job_id, _ in submitted:
        if rule == "estimate_flops":
            assert scontrol_job(job_id)["Partition"] == shipped["estimate_flops"]["slurm_partition"].strip("'")

    # Models and datasets were prepared on the submit host, not in a SLURM job.
    for manifest, artifact in [
        (workdir / "resources/models/tiny-llama/manifest.json", "model_manifest"),
        (workdir / "resources/datasets/bundled/manifest.json", "dataset_manifest"),
    ]:
        provenance = read_json_artifact(manifest, artifact)["provenance"]
        assert "SLURM_JOB_ID" not in json.dumps(provenance), manifest
        assert "job" not in provenance or "slurm_job_id" not in provenance["job"]

    summary = pd.read_csv(workdir / "results" / "summary.csv")
    assert set(summary["experiment_id"]) == set(campaign.experiments)

    # ---- 2. a broken experiment fails in its SLURM job; the others finish -----------------------
    # A fresh copy of the workflow: a campaign change in the same folder first meets a Snakemake
    # 9.27 quirk (a rerun of an ancient() input's producer ends the run early; see the report).
    broken_weights = break_model_weights(workdir / "resources/models/tiny-llama/weights", tmp_path / "broken")
    workdir = make_workdir(tmp_path, "failure", cluster)
    failure_campaign = yaml.safe_load((workdir / SMOKE_CAMPAIGN).read_text())
    failure_campaign["campaign"]["name"] = "slurm-failure"
    failure_campaign["grid"]["batch_size"] = [1]
    failure_campaign["models"]["broken-llama"] = {"source": "local", "path": str(broken_weights)}
    failure_file = workdir / "config" / "campaigns" / "slurm-failure.yaml"
    failure_file.write_text(yaml.safe_dump(failure_campaign, sort_keys=False))
    failure = load_campaign_file(failure_file)
    broken = {eid for eid, exp in failure.experiments.items() if exp.model == "broken-llama"}
    healthy = set(failure.experiments) - broken
    assert len(broken) == 1 and len(healthy) == 1
    (broken_id,) = broken

    proc = run_snakemake(workdir, str(failure_file.relative_to(workdir)), label="SLURM failure campaign (3 jobs)")
    assert proc.returncode != 0, describe(proc)
    failed_log = workdir / "results" / "logs" / "run_inference" / f"{broken_id}.log"  # one job per experiment
    assert failed_log.is_file()
    # The failing job and its log are named in the console, with the log's content (show-failed-logs).
    assert "Error in rule run_inference" in proc.stderr
    assert str(failed_log.relative_to(workdir)) in proc.stderr
    # The truncated weights file is what the job's log blames (safetensors refuses to load it).
    assert "safetensorerror" in failed_log.read_text().lower()
    failed_submissions = [
        (rule, job_id, log) for rule, job_id, log in submissions(proc.stderr) if broken_id in str(log)
    ]
    assert [rule for rule, _, _ in failed_submissions] == ["run_inference"]
    (_, failed_job_id, failed_slurm_log) = failed_submissions[0]
    assert f"SLURM-job '{failed_job_id}' failed" in proc.stderr
    assert scontrol_job(failed_job_id)["JobState"] == "FAILED"
    assert failed_slurm_log.is_file(), "the SLURM log of a failed job is kept"
    # --keep-going: the healthy experiment was measured and aggregated despite the failure.
    for experiment in healthy:
        assert (workdir / "results" / "experiments" / f"{experiment}.json").is_file()
    assert not (workdir / "results" / "runs" / broken_id / "cycle-1" / "result.json").exists()

    # ---- 3. a rerun submits only what is missing ------------------------------------------------
    dry = run_snakemake(workdir, str(failure_file.relative_to(workdir)), "--dry-run")
    assert dry.returncode == 0, describe(dry)
    planned = dry_run_jobs(dry.stdout + "\n" + dry.stderr)
    per_experiment = [(rule, wc["experiment"]) for rule, wc in planned if "experiment" in wc]
    # The broken model's FLOPs cost model needs no measurement: it was made in the failed run already.
    assert sorted(per_experiment) == sorted([("run_inference", broken_id), ("aggregate", broken_id)]), planned
    assert not any(rule == "estimate_flops" for rule, _ in planned), planned
    assert not any(rule in {"download_model", "prepare_dataset"} for rule, _ in planned), planned
