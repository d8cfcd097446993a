"""The embedded default campaign, end to end, with the real snakemake (no GPU, no network)."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import yaml

from llm_energy import artifacts
from llm_energy.config import load_campaign_file
from tests.workflow.helpers import REPO_ROOT, copy_workflow, describe, run_snakemake

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    workdir = copy_workflow(tmp_path_factory.mktemp("default-campaign"))
    completed = run_snakemake(workdir, "--cores", "2", label="default campaign (snakemake --cores 2)")
    assert completed.returncode == 0, describe(completed)
    return workdir, completed


def test_every_experiment_and_cycle_has_artifacts(default_run):
    workdir, _ = default_run
    campaign = load_campaign_file(REPO_ROOT / "config" / "config.yaml")
    assert len(campaign.experiments) == 4
    for eid, experiment in campaign.experiments.items():
        for cycle in range(1, campaign.cycles + 1):
            run_dir = workdir / "results" / "runs" / eid / f"cycle-{cycle}"
            document = artifacts.read_json_artifact(run_dir / "result.json", "run_result")
            data = document["data"]
            assert data["status"] == "ok", data["error"]
            assert document["provenance"]["experiment"] == eid
            assert document["provenance"]["config_sha256"] == campaign.sha256
            assert document["provenance"]["software"]["torch"]
            requests, _ = artifacts.read_table_artifact(run_dir / "requests.parquet", "requests_table")
            # The dataset's 8 prompts, repeated until the window lasted campaign.min_window_s (0.5 s).
            repeats = data["tokens"]["repeats"]
            assert len(requests) == 8 * repeats and sorted(set(requests["repeat"])) == list(range(repeats))
            assert data["window"]["duration_s"] >= 0.5 and data["window"]["repeats"] == repeats
            assert (requests["output_tokens"] == 16).all()  # fixed output length
            assert data["tokens"]["output_tokens"] == 8 * 16 * repeats
            # Warm-up until two consecutive batch times agree within 25 %, every time recorded.
            warmup = data["setup"]["warmup"]
            assert len(warmup["batch_times_s"]) >= 2 and all(t > 0 for t in warmup["batch_times_s"])
            assert data["setup"]["shared_by_cycles"] is True  # loaded and warmed once per experiment
            assert data["memory"]["peak_rss_bytes"] > 0 and data["metrics"]["memory_peak_rss_bytes"] > 0
            assert data["experiment"]["engine_path"] == "eager"  # the CPU default
            # No GPU: the differential prefill/decode split says why it is unavailable.
            assert data["phases"]["available"] is False and "GPU" in data["phases"]["reason"]
            timeline, _ = artifacts.read_table_artifact(run_dir / "timeline.parquet", "timeline_table")
            assert timeline is not None
            # No GPU and no RAPL on this machine: said so, never a zero.
            window = data["window"]
            assert window["domains"]["gpu"]["available"] is False
            assert window["domains"]["gpu"]["reason"]
            assert data["metrics"]["gpu_energy_j"] is None
            assert data["metrics"]["output_tokens_per_s"] > 0
            assert [w["name"] for w in data["setup"]["windows"]] == ["model_load", "compile", "warmup"]
            assert data["gpu_state"] == {"start": [], "end": []}  # no GPU used
            assert document["provenance"]["code"]["package_version"]
        experiment = campaign.experiments[eid]
        model_flops = artifacts.read_json_artifact(
            workdir / "resources" / "models" / experiment.model / f"flops-{experiment.parameters['dtype']}.json",
            "flops_model")
        assert model_flops["data"]["method"] == "analytic" and model_flops["data"]["confidence"] == "high"
        aggregated = artifacts.read_json_artifact(workdir / "results" / "experiments" / f"{eid}.json", "experiment_result")
        assert aggregated["data"]["cycles_ok"] == campaign.cycles
        # Every cycle's FLOPs come from its own requests (all its passes over the request set).
        flops_cycles = aggregated["data"]["flops"]["cycles"]
        assert [c["cycle"] for c in flops_cycles] == list(range(1, campaign.cycles + 1))
        assert all(c["window_flops"] > 0 for c in flops_cycles)
        assert aggregated["data"]["metrics"]["achieved_flops_per_s"]["n"] == campaign.cycles
        run_set = artifacts.read_json_artifact(workdir / "results" / "runs" / eid / "cycles.json", "run_set")["data"]
        assert [c["cycle"] for c in run_set["cycles"]] == list(range(1, campaign.cycles + 1))
        timing = run_set["timing"]
        assert {"model_load", "compile", "warmup", "windows"} <= set(timing["phases_s"])
        assert 0 < timing["share_in_windows"] < 1


def test_summary_table_has_one_row_per_experiment_with_units(default_run):
    workdir, _ = default_run
    csv = pd.read_csv(workdir / "results" / "summary.csv")
    parquet, meta = artifacts.read_table_artifact(workdir / "results" / "summary.parquet", "summary_table")
    assert len(csv) == len(parquet) == 4
    assert set(csv["batch_size"]) == {1, 4}
    assert set(csv["model"]) == {"tiny-llama", "tiny-gpt2"}
    assert (csv["output_tokens_per_s"] > 0).all()
    assert "output_tokens_per_s_ci95_low" in csv.columns
    # No measured domain on this machine: node totals stay empty; CodeCarbon's CPU/RAM model is in
    # its own, labelled estimate columns.
    assert csv["node_energy_per_output_token_j"].isna().all()
    assert (csv["host_estimated_energy_per_output_token_j"] > 0).all()
    assert (csv["job_share_in_windows"] > 0).all() and (csv["job_wall_s"] > csv["job_windows_s"]).all()
    assert set(csv["engine_path"]) == {"eager"}
    assert meta["schema"] == "llm_energy/summary_table"


def test_figures_exist_in_png_and_svg(default_run):
    workdir, _ = default_run
    for figure in ("energy_vs_batch_size", "throughput_vs_energy", "energy_breakdown", "latency"):
        png = workdir / "results" / "figures" / f"{figure}.png"
        svg = workdir / "results" / "figures" / f"{figure}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in svg.read_bytes()[:2000]


def test_rerun_has_nothing_to_do(default_run):
    workdir, _ = default_run
    completed = run_snakemake(workdir, "--cores", "2", "-n")
    assert completed.returncode == 0, describe(completed)
    assert "Nothing to be done" in completed.stdout + completed.stderr


def test_adding_a_batch_size_runs_only_the_new_experiments(default_run, tmp_path):
    workdir, _ = default_run
    config = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    config["grid"]["batch_size"] = [1, 4, 2]
    extended = tmp_path / "extended.yaml"
    extended.write_text(yaml.safe_dump(config))
    completed = run_snakemake(workdir, "--cores", "2", "-n", "--configfile", str(extended))
    assert completed.returncode == 0, describe(completed)
    output = completed.stdout + completed.stderr
    # 2 models x 1 new batch size: one job per experiment measures all its cycles
    assert any(line.split()[:2] == ["run_inference", "2"] for line in output.splitlines()), output


def test_html_report(default_run):
    workdir, _ = default_run
    completed = run_snakemake(workdir, "--report", "report.html", timeout_s=300)
    assert completed.returncode == 0, describe(completed)
    html = (workdir / "report.html").read_text(errors="replace")
    assert "energy_vs_batch_size" in html


def test_figures_only_mode_regenerates_from_a_copied_results_tree(default_run, tmp_path):
    workdir, _ = default_run
    reader = copy_workflow(tmp_path / "reader")
    # A reader has the archived results only: no models, no datasets, no resources/ at all.
    shutil.copytree(workdir / "results" / "experiments", reader / "archive" / "experiments")
    completed = run_snakemake(
        reader, "--cores", "1", "--config", "figures_only=true", "results_dir=archive", label="figures-only mode"
    )
    assert completed.returncode == 0, describe(completed)
    output = completed.stdout + completed.stderr
    assert "run_inference" not in output and "download_model" not in output
    assert not (reader / "resources").exists()
    regenerated = pd.read_csv(reader / "archive" / "summary.csv")
    original = pd.read_csv(workdir / "results" / "summary.csv")
    assert list(regenerated["experiment_id"]) == list(original["experiment_id"])
    pd.testing.assert_series_equal(regenerated["output_tokens_per_s"], original["output_tokens_per_s"])
    for figure in ("energy_vs_batch_size", "throughput_vs_energy", "energy_breakdown", "latency"):
        assert (reader / "archive" / "figures" / f"{figure}.png").stat().st_size > 0
