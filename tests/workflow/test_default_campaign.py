"""The embedded default campaign, end to end, with the real snakemake (no GPU, no network)."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import yaml
from llm_energy import artifacts, plots, report_browser
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
            # The pace inside the window: the spread of the repeats' times, or none below 3 with the reason.
            assert data["metrics"]["repeats_in_window"] == repeats
            if repeats >= 3:
                assert data["metrics"]["repeat_time_cv_in_window"] >= 0
            else:
                assert data["metrics"]["repeat_time_cv_in_window"] is None
                assert "repeat(s)" in data["metrics_info"]["repeat_time_unavailable_reason"]
            # Warm-up until two consecutive batch times agree within 25 %, every time recorded.
            warmup = data["setup"]["warmup"]
            assert len(warmup["batch_times_s"]) >= 2 and all(t > 0 for t in warmup["batch_times_s"])
            assert data["setup"]["shared_by_cycles"] is True  # loaded and warmed once per experiment
            assert data["memory"]["peak_rss_bytes"] > 0 and data["metrics"]["memory_peak_rss_bytes"] > 0
            # What the host took from the window, as metrics that aggregate over cycles: this machine's
            # kernel has steal (checked in test_host_cpu), so it is a number, never a silent None.
            window_host = data["window"]["host_cpu"]
            assert data["metrics"]["host_cpu_steal_share"] == window_host["steal_share"] >= 0
            assert data["metrics"]["host_cpu_throttled_s"] == window_host.get("throttled_s")
            for name in window_host["unavailable"]:
                assert data["metrics_info"][f"host_cpu_{name}_unavailable_reason"]
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
            "flops_model",
        )
        assert model_flops["data"]["method"] == "analytic" and model_flops["data"]["confidence"] == "high"
        aggregated = artifacts.read_json_artifact(
            workdir / "results" / "experiments" / f"{eid}.json", "experiment_result"
        )
        assert aggregated["data"]["cycles_ok"] == campaign.cycles
        # Every cycle's FLOPs come from its own requests (all its passes over the request set).
        flops_cycles = aggregated["data"]["flops"]["cycles"]
        assert [c["cycle"] for c in flops_cycles] == list(range(1, campaign.cycles + 1))
        assert all(c["window_flops"] > 0 for c in flops_cycles)
        assert aggregated["data"]["metrics"]["achieved_flops_per_s"]["n"] == campaign.cycles
        assert aggregated["data"]["metrics"]["host_cpu_steal_share"]["n"] == campaign.cycles
        run_set = artifacts.read_json_artifact(workdir / "results" / "runs" / eid / "cycles.json", "run_set")["data"]
        assert [c["cycle"] for c in run_set["cycles"]] == list(range(1, campaign.cycles + 1))
        timing = run_set["timing"]
        assert {"startup", "model_load", "compile", "warmup", "windows"} <= set(timing["phases_s"])
        # the job process's own start (interpreter, imports) is counted, not only what followed it
        assert 0 < timing["phases_s"]["startup"] < timing["total_s"]
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
    assert "repeat_time_cv_in_window" in csv.columns
    assert set(csv["engine_path"]) == {"eager"}
    assert meta["schema"] == "llm_energy/summary_table"


def test_figures_exist_in_png_and_svg(default_run):
    workdir, _ = default_run
    for figure in plots.FIGURE_NAMES:
        png = workdir / "results" / "figures" / f"{figure}.png"
        svg = workdir / "results" / "figures" / f"{figure}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in svg.read_bytes()[:2000]
        # on this CPU-only machine every figure says so, and that its energy is estimated where it shows any
        text = svg.read_text()
        assert "GPU: no GPU (CPU only)" in text, figure
        assert "estimated (CodeCarbon model)" in text or "Energy: none" in text, figure
    # one power timeline per experiment (no GPU here: its setup and windows on a time axis, said so)
    timelines = workdir / "results" / "figures" / plots.TIMELINES_DIR
    ids = sorted(p.stem for p in (workdir / "results" / "experiments").glob("*.json"))
    assert sorted(p.stem for p in timelines.glob("*.png")) == ids
    assert "no GPU power samples" in next(timelines.glob("*.svg")).read_text()


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
    for name in (*plots.FIGURE_NAMES, "summary.html", "flags.html", "provenance.html"):
        assert name in html, name


def test_report_renders_in_a_real_browser(default_run, tmp_path):
    """The report opened in headless Chromium (offline): the figures and the summary table show, no
    script error; the screenshots are kept for a person to look at."""
    if report_browser.find_chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium; .ci/run installs it)")
    workdir, _ = default_run
    report = tmp_path / "report.html"
    completed = run_snakemake(workdir, "--report", str(report), timeout_s=300)
    assert completed.returncode == 0, describe(completed)
    shot, table_shot = tmp_path / "report-screenshot.png", tmp_path / "report-table.png"
    check = report_browser.check_report(report, shot, table_shot, figure="throughput_vs_energy")
    print(f"report screenshots: {shot} {table_shot}")
    assert check.errors == []
    assert {"Figures", "Power timelines", "Campaign"} <= set(check.categories)
    assert check.figures_opened[0]["width"] >= 1000  # the figure itself decoded, not an icon
    assert check.summary_rows == 4 and check.summary_units >= 10
    assert check.captions >= len(plots.FIGURE_NAMES)
    for path in (shot, table_shot):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


def test_figures_only_mode_regenerates_from_a_copied_results_tree(default_run, tmp_path):
    workdir, _ = default_run
    reader = copy_workflow(tmp_path / "reader")
    # A reader has the archived results only: no models, no datasets, no resources/ at all.
    shutil.copytree(workdir / "results" / "experiments", reader / "archive" / "experiments")
    shutil.copytree(workdir / "results" / "runs", reader / "archive" / "runs")
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
    for figure in plots.FIGURE_NAMES:
        assert (reader / "archive" / "figures" / f"{figure}.png").stat().st_size > 0
    # every figure, the per-experiment timelines and the report pages come back from the archive
    timelines = sorted(p.name for p in (reader / "archive" / "figures" / plots.TIMELINES_DIR).glob("*.png"))
    assert timelines == sorted(p.name for p in (workdir / "results" / "figures" / plots.TIMELINES_DIR).glob("*.png"))
    for page in ("summary", "flags", "provenance"):
        assert (reader / "archive" / "report" / f"{page}.html").stat().st_size > 1000
    assert "found for 4 of 4 experiments" in (reader / "archive" / "report" / "provenance.html").read_text()
