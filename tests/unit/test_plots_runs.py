"""The figures that read raw runs (timelines, per-request latency) and the arithmetic behind the
energy and time shares, on a synthetic results tree of valid artifacts (llm_energy.synthetic)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from llm_energy import artifacts, plots, synthetic
from llm_energy.plots import breakdown, data, latency, runs, timeline
from llm_energy.summary import TablePaths, build_tables, write_tables


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """12 synthetic experiments (several models, backends, datasets), 2 cycles each, with a summary."""
    root = tmp_path_factory.mktemp("tree")
    synthetic.write_tree(root, 12, cycles=2)
    write_tables(build_tables(sorted((root / "experiments").glob("*.json"))), TablePaths.in_dir(root), {})
    return root


@pytest.fixture(scope="module")
def summary(tree: Path) -> pd.DataFrame:
    return data.load(tree / "summary.parquet")


def svg_text(path: Path) -> str:
    return path.read_text()


@pytest.mark.parametrize("name", plots.FIGURE_NAMES)
def test_every_figure_from_a_tree_with_runs(tmp_path: Path, tree: Path, name: str) -> None:
    png, svg = tmp_path / f"{name}.png", tmp_path / f"{name}.svg"
    plots.plot(name, tree / "summary.parquet", png, svg, runs_dir=tree / "runs")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 20_000
    text = svg_text(svg)
    assert "GPU: 1 x NVIDIA H100 80GB HBM3" in text and "Validity flags" in text
    assert "not available" not in text and "No per-request data" not in text  # everything was archived


def test_comparisons_are_small_multiples_by_model_and_dataset(summary: pd.DataFrame) -> None:
    inputs = plots.FigureInputs(summary)
    figure = plots.FIGURES["energy_vs_batch_size"].draw(inputs, "t")
    facets = summary[["model", "dataset"]].drop_duplicates()
    assert len(figure.axes) == len(facets)
    titles = {ax.get_title() for ax in figure.axes}
    assert titles == {f"{m} / {d}" for m, d in facets.itertuples(index=False)}
    # one colour per series, the same in every panel: as many legend entries as series
    legend = figure.legends[0]
    assert {t.get_text() for t in legend.get_texts()} == set(data.layout(summary).series)


def test_pareto_front_is_drawn_per_panel(summary: pd.DataFrame) -> None:
    figure = plots.FIGURES["throughput_vs_energy"].draw(plots.FigureInputs(summary), "t")
    lay = data.layout(summary)
    for ax in figure.axes:
        rows = summary.loc[lay.facets == ax.get_title()]
        front = data.pareto_front(
            data.column(rows, "output_tokens_per_s").to_numpy(),
            data.column(rows, "gpu_energy_per_output_token_j").to_numpy(),
        )
        dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert len(dashed) == 1 and len(dashed[0].get_xdata()) == len(front)


def test_phase_energies_split_the_window_above_idle_by_the_prefill_share() -> None:
    row = pd.DataFrame(
        [
            {
                "setup_model_load_gpu_energy_j": 10.0,
                "setup_compile_gpu_energy_j": 5.0,
                "setup_warmup_gpu_energy_j": 3.0,
                "gpu_energy_j": 100.0,
                "gpu_net_energy_j": 60.0,
                "prefill_gpu_energy_j": 20.0,
                "decode_gpu_energy_j": 80.0,
            }
        ]
    )
    parts = breakdown.phase_energies(row, "gpu")
    assert parts["baseline"] == pytest.approx(40.0)  # gross - net: active-idle power x window
    assert parts["prefill"] == pytest.approx(12.0) and parts["decode"] == pytest.approx(48.0)
    assert (parts["model_load"], parts["compile"], parts["warmup"]) == (10.0, 5.0, 3.0)
    assert math.isnan(parts["window"])  # everything above idle was split
    # without a prefill/decode split the window above idle stays one part, never invented
    unsplit = breakdown.phase_energies(row.drop(columns=["prefill_gpu_energy_j", "decode_gpu_energy_j"]), "gpu")
    assert unsplit["window"] == pytest.approx(60.0) and math.isnan(unsplit["prefill"])


def test_time_parts_put_the_unaccounted_rest_into_gaps() -> None:
    rows = pd.DataFrame(
        [
            {
                "job_wall_s": 100.0,
                "job_windows_s": 40.0,
                "job_model_load_s": 20.0,
                "job_compile_s": 10.0,
                "job_warmup_s": 15.0,
                "job_baseline_s": 5.0,
            },
            {
                "job_wall_s": 50.0,
                "job_windows_s": 30.0,
                "job_model_load_s": 10.0,
                "job_compile_s": np.nan,
                "job_warmup_s": 5.0,
                "job_baseline_s": 2.0,
            },
        ]
    )
    parts = breakdown.time_parts(rows)
    assert parts["windows"] == 70.0 and parts["compile"] == 10.0
    assert parts["gaps"] == pytest.approx(150.0 - (70 + 30 + 10 + 20 + 7))


def test_many_experiments_become_one_bar_per_facet_and_series() -> None:
    summary = data.load(build_tables([]))
    few = pd.DataFrame(
        {
            "experiment_id": [f"e{i}" for i in range(3)],
            "model": "m",
            "backend": ["a", "b", "a"],
            "dataset": "d",
            "batch_size": [1, 2, 4],
        }
    )
    assert len(breakdown.bar_groups(few).labels) == 3 and breakdown.bar_groups(few).per_experiment
    many = pd.DataFrame(
        {
            "experiment_id": [f"e{i}" for i in range(90)],
            "model": ["m1", "m2", "m3"] * 30,
            "backend": ["a", "b"] * 45,
            "dataset": "d",
            "batch_size": range(90),
        }
    )
    bars = breakdown.bar_groups(many)
    assert not bars.per_experiment and len(bars.labels) == 6 and sum(len(r) for r in bars.rows) == 90
    assert summary.empty


def test_error_bars_never_cross_zero() -> None:
    frame = pd.DataFrame({"x": [0.01, 1.0], "x_ci95_low": [-0.05, 0.5], "x_ci95_high": [0.07, 1.5]})
    low, high = data.error(frame, "x", floor_positive=False)
    assert (frame["x"] - low >= 0).all() and list(high) == pytest.approx([0.06, 0.5])


def test_latency_boxes_are_request_percentiles_and_stay_positive() -> None:
    values = np.array([0.001, 0.002, 0.003, 0.004, 100.0, np.nan])
    stats = latency.box_stats(values)
    assert stats["n"] == 5 and stats["med"] == 0.003
    assert stats["whislo"] == pytest.approx(np.percentile(values[:5], 5)) and stats["whislo"] > 0
    assert latency.box_stats(np.array([np.nan])) is None


def test_pooled_requests_take_every_ok_cycle_and_name_experiments_without_runs(tree: Path, tmp_path: Path) -> None:
    ids = sorted(p.stem for p in (tree / "experiments").glob("*.json"))
    pooled, missing = runs.pooled_requests(tree / "runs", [*ids[:2], "not-archived"])
    assert missing == ["not-archived"]
    assert len(pooled) == 2 * 2 * synthetic.REQUESTS_PER_CYCLE
    assert list(pooled.columns) == [*runs.LATENCY_COLUMNS, "experiment_id"]
    # a failed cycle in the run set is left out
    copy = tmp_path / "runs" / ids[0]
    import shutil

    shutil.copytree(tree / "runs" / ids[0], copy)
    document = artifacts.read_json_artifact(copy / "cycles.json", "run_set")
    document["data"]["cycles"][1]["status"] = "failed"
    artifacts.write_json_artifact(copy / "cycles.json", "run_set", document["data"], {})
    pooled, _ = runs.pooled_requests(tmp_path / "runs", [ids[0]])
    assert len(pooled) == synthetic.REQUESTS_PER_CYCLE


def test_run_spans_cover_setup_baseline_windows_with_their_counter_energy(tree: Path) -> None:
    eid = sorted(p.name for p in (tree / "runs").iterdir())[0]
    run, reason = runs.first_cycle(tree / "runs", eid)
    assert run is not None and reason == "" and run.cycle == 1
    spans, notes = timeline.spans_of(run.result)
    kinds = [s.kind for s in spans]
    assert kinds == ["model_load", "compile", "warmup", "baseline", "inference", "prefill_only"] and notes == []
    window = run.result["window"]
    inference = spans[kinds.index("inference")]
    assert (inference.start_s, inference.end_s, inference.gpu_j) == (
        window["start_s"],
        window["end_s"],
        window["domains"]["gpu"]["gross_j"],
    )
    baseline = spans[kinds.index("baseline")]
    assert baseline.gpu_j == pytest.approx(125.0 * 3.0)  # idle power x its duration
    # an older run: no prefill-window timestamps, the baseline only as unix end time -> said, or derived
    older = json.loads(json.dumps(run.result))
    del older["phases"]["prefill_window"]["start_s"]
    active = older["setup"]["baseline"]["active_idle"]
    offset = window["start_unix_s"] - window["start_s"]
    active["measured_unix_s"] = active.pop("end_s") + offset
    del active["start_s"]
    spans, notes = timeline.spans_of(older)
    derived = [s for s in spans if s.kind == "baseline"][0]
    assert derived.end_s == pytest.approx(baseline.end_s) and derived.start_s == pytest.approx(baseline.start_s)
    assert "prefill-only window: timestamps not recorded" in notes[0]


def test_prefill_spans_are_merged_where_requests_overlap() -> None:
    requests = pd.DataFrame({"submitted_s": [1.0, 1.0, 3.0, 2.5], "first_token_s": [1.5, 2.0, 3.2, np.nan]})
    assert timeline.prefill_spans(requests) == [(1.0, 1.0), (3.0, pytest.approx(0.2))]


def test_one_timeline_per_experiment_and_reused_baselines_are_named_not_drawn(
    tree: Path, tmp_path: Path, summary: pd.DataFrame
) -> None:
    out = tmp_path / "timelines"
    skipped = plots.plot_run_timelines(tree / "summary.parquet", tree / "runs", out, workers=2)
    assert skipped == []
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(summary["experiment_id"])
    assert len(list(out.glob("*.svg"))) == len(summary)
    text = next(out.glob("*.svg")).read_text()
    for label in (
        "model load",
        "compile",
        "warm-up",
        "idle baseline",
        "measured window",
        "prefill-only window",
        "prefill spans (requests)",
        "GPU power (W)",
        "SM clock (MHz)",
        "Temperature",
    ):
        assert label in text, label
    # a static baseline measured long before this job is listed under the plot, not drawn
    eid = sorted(summary["experiment_id"])[0]
    run, _ = runs.first_cycle(tree / "runs", eid)
    result = json.loads(json.dumps(run.result))
    result["setup"]["baseline"]["static_idle"] = {
        "measured_unix_s": result["window"]["start_unix_s"] - 5000.0,
        "duration_s": 10.0,
        "domains": {"gpu": {"power_w": 72.0, "method": "measured"}},
    }
    figure = timeline.draw_run_timeline(runs.CycleRun(1, result, run.timeline, run.requests), "t", "gpu", "")
    notes = " ".join(t.get_text() for t in figure.texts)
    assert "measured outside this job's timeline (reused), 720 J in 10.0 s" in notes
    left, right = figure.axes[0].get_xlim()
    assert right - left < 100  # the axis spans this job, not the 5,000 s before it


def test_archive_without_runs_gets_figures_that_say_so(tmp_path: Path, tree: Path) -> None:
    for name in ("latency", "timeline_overview"):
        plots.plot(
            name,
            tree / "summary.parquet",
            tmp_path / f"{name}.png",
            tmp_path / f"{name}.svg",
            runs_dir=tmp_path / "absent",
        )
        text = (tmp_path / f"{name}.svg").read_text()
        assert "not archived" in text, name
    out = tmp_path / "timelines"
    skipped = plots.plot_run_timelines(tree / "summary.parquet", tmp_path / "absent", out)
    assert len(skipped) == 12 and (out / "none.png").is_file()


def test_campaign_overview_has_one_row_per_experiment(tree: Path, summary: pd.DataFrame) -> None:
    labels, rows, windows, skipped = timeline.overview_rows(summary, tree / "runs")
    assert len(labels) == len(summary) and skipped == []
    assert all(np.nanmax(r) > 100 for r in rows)  # the window's power is in each row
    assert all(0 < start < end for start, end in windows)
