"""Every figure is written (PNG + SVG) for a normal campaign, one experiment, failures and nothing;
each names its energy source and method, the GPU and the validity flags."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from llm_energy import artifacts, plots
from llm_energy.statistics import describe
from llm_energy.summary import build_tables

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = plots.FIGURE_NAMES
# Figures that draw one series per backend (the others show time, hardware limits or raw runs).
SERIES_FIGURES = ("energy_vs_batch_size", "throughput_vs_energy", "energy_breakdown")


def draw(name: str, summary: pd.DataFrame | Path, png: Path, svg: Path, runs_dir: Path | None = None) -> None:
    plots.plot(name, summary, png, svg, runs_dir=runs_dir)


GPU_INFO = {
    "gpu_energy_source": "nvml_energy_counter",
    "gpu_energy_method": "measured",
    "cpu_unavailable_reason": "no RAPL",
    "dram_unavailable_reason": "no RAPL",
    "node_energy_domains": "gpu",
    "node_energy_method": "measured",
}
CPU_INFO = {
    "gpu_unavailable_reason": "no NVIDIA GPU",
    "cpu_energy_source": "codecarbon_estimate",
    "cpu_energy_method": "estimated",
    "dram_energy_source": "codecarbon_estimate",
    "dram_energy_method": "estimated",
    "node_energy_domains": "none",
    "node_energy_method": "none",
    "host_estimated_energy_domains": "cpu+dram",
    "host_estimated_energy_method": "estimated (CodeCarbon model)",
}


def _result(
    experiment_id: str,
    model: str,
    backend: str,
    batch_size: int,
    cycles: dict[str, list],
    info: dict[str, str],
    status: str = "ok",
) -> dict[str, Any]:
    return {
        "experiment_id": experiment_id,
        "status": status,
        "experiment": {
            "model": model,
            "backend": backend,
            "dataset": "builtin",
            "parameters": {
                "batch_size": batch_size,
                "dtype": "bf16",
                "max_input_tokens": 128,
                "max_output_tokens": 64,
                "decoding_mode": "greedy",
                "temperature": 1.0,
                "top_p": 1.0,
                "top_k": 0,
                "output_length": "fixed",
                "batching": "fixed",
                "token_budget": None,
            },
        },
        "gpu_name": "NVIDIA H100 80GB HBM3" if "gpu_energy_j" in cycles else None,
        "gpu_count": 1,
        "cycles_ok": 0 if status == "failed" else 3,
        "cycles_ok_list": [],
        "cycles_failed": [{"cycle": 1, "error": "OOM"}] if status == "failed" else [],
        "cycles_invalid": [],
        "flags": {},
        "metrics": {} if status == "failed" else {k: describe(v) for k, v in cycles.items()},
        "metrics_info": info,
        "flops": None,
    }


def gpu_cycles(batch_size: int, scale: float = 1.0) -> dict[str, list]:
    """Plausible H100 numbers: J/token falls and tokens/s rises with the batch size."""
    rng = np.random.default_rng(batch_size)
    jitter = lambda: list(1 + 0.03 * rng.standard_normal(3))  # noqa: E731
    tokens_per_s = 80.0 * batch_size**0.85 / scale
    j_per_token = 1.7 * scale * batch_size**-0.75
    return {
        "gpu_energy_j": [j_per_token * 512 * f for f in jitter()],
        "gpu_energy_per_output_token_j": [j_per_token * f for f in jitter()],
        "cpu_energy_per_output_token_j": [None] * 3,
        "dram_energy_per_output_token_j": [None] * 3,
        "output_tokens_per_s": [tokens_per_s * f for f in jitter()],
        "ttft_p50_s": [0.01 * batch_size**0.5 * f for f in jitter()],
        "ttft_p90_s": [0.015 * batch_size**0.5 * f for f in jitter()],
        "e2e_p50_s": [0.8 * f for f in jitter()],
        "e2e_p90_s": [1.1 * f for f in jitter()],
    }


def cpu_cycles(batch_size: int) -> dict[str, list]:
    return {
        "gpu_energy_per_output_token_j": [None] * 3,
        # a CPU-only machine without RAPL measures nothing: only CodeCarbon's estimate exists
        "cpu_energy_per_output_token_j": [None] * 3,
        "node_energy_per_output_token_j": [None] * 3,
        "cpu_estimated_energy_per_output_token_j": [0.4 / batch_size, 0.41 / batch_size, 0.39 / batch_size],
        "dram_estimated_energy_per_output_token_j": [0.2 / batch_size] * 3,
        "host_estimated_energy_per_output_token_j": [0.6 / batch_size, 0.62 / batch_size, 0.59 / batch_size],
        "output_tokens_per_s": [50.0 * batch_size] * 3,
        "e2e_p50_s": [2.0, 2.1, 2.05],
    }


def summary_of(tmp_path: Path, results: list[dict[str, Any]]) -> pd.DataFrame:
    paths = []
    for data in results:
        path = tmp_path / "experiments" / f"{data['experiment_id']}.json"
        artifacts.write_json_artifact(path, "experiment_result", data, {})
        paths.append(path)
    return build_tables(paths).for_figures()


@pytest.fixture()
def campaign(tmp_path: Path) -> pd.DataFrame:
    """Two models x two backends over batch sizes 1-64 on a GPU, plus one failed experiment."""
    results = [
        _result(f"{model}.{backend}.bs{bs}", model, backend, bs, gpu_cycles(bs, scale * factor), GPU_INFO)
        for model, scale in (("llama-1b", 1.0), ("llama-8b", 6.0))
        for backend, factor in (("pytorch", 1.0), ("vllm", 0.4))
        for bs in (1, 4, 16, 64)
    ]
    results.append(_result("llama-8b.pytorch.bs256", "llama-8b", "pytorch", 256, {}, GPU_INFO, status="failed"))
    return summary_of(tmp_path, results)


def assert_figure_files(png: Path, svg: Path) -> str:
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000
    text = svg.read_text()
    root = ElementTree.fromstring(text)
    assert root.tag.endswith("svg")
    assert not list(png.parent.glob(".*.tmp"))  # atomic writes leave no temp file behind
    return text


@pytest.mark.parametrize("name", PLOTS)
def test_normal_campaign(tmp_path: Path, campaign: pd.DataFrame, name: str) -> None:
    png, svg = tmp_path / "fig" / f"{name}.png", tmp_path / "fig" / f"{name}.svg"
    draw(name, campaign, png, svg)
    text = assert_figure_files(png, svg)
    # texts stay <text> in the SVG (svg.fonttype none): the failed experiment is named on the figure
    assert "Skipped 1 failed experiment(s): llama-8b.pytorch.bs256" in text
    # every figure says which energy it shows (or that it shows none) and on which GPU
    assert "GPU: 1 x NVIDIA H100 80GB HBM3" in text
    assert "Energy: GPU energy, measured, nvml_energy_counter" in text or "Energy: none shown" in text


@pytest.mark.parametrize("name", PLOTS)
def test_single_experiment(tmp_path: Path, name: str) -> None:
    summary = summary_of(tmp_path, [_result("only.bs8", "llama-1b", "pytorch", 8, gpu_cycles(8), GPU_INFO)])
    draw(name, summary, tmp_path / f"{name}.png", tmp_path / f"{name}.svg")
    assert_figure_files(tmp_path / f"{name}.png", tmp_path / f"{name}.svg")


@pytest.mark.parametrize("name", PLOTS)
def test_empty_and_all_failed_summaries(tmp_path: Path, name: str) -> None:
    for label, summary in (
        ("empty", build_tables([]).for_figures()),
        ("failed", summary_of(tmp_path, [_result("x.bs1", "m", "pytorch", 1, {}, {}, status="failed")])),
    ):
        png, svg = tmp_path / f"{name}-{label}.png", tmp_path / f"{name}-{label}.svg"
        draw(name, summary, png, svg)
        assert plots.NO_SUCCESS_TEXT in assert_figure_files(png, svg)


@pytest.mark.parametrize("name", PLOTS)
def test_cpu_only_campaign_with_missing_metrics(tmp_path: Path, name: str) -> None:
    """No measured energy, no TTFT, estimated CPU/DRAM: estimated host boundary, labelled so."""
    summary = summary_of(
        tmp_path, [_result(f"tiny.pytorch.bs{bs}", "tiny", "pytorch", bs, cpu_cycles(bs), CPU_INFO) for bs in (1, 2, 4)]
    )
    png, svg = tmp_path / f"{name}.png", tmp_path / f"{name}.svg"
    draw(name, summary, png, svg)
    text = assert_figure_files(png, svg)
    assert "GPU: no GPU (CPU only)" in text
    if name in ("energy_vs_batch_size", "throughput_vs_energy"):
        assert "Host energy per output token (J)" in text
        assert "estimated (CodeCarbon model)" in text
        assert "Energy: host energy, cpu+dram; estimated (CodeCarbon model)" in text
    if name == "energy_breakdown":
        # no measured energy of setup and windows on this machine, said so; the domains are estimates
        assert "not available: no measured node energy" in text
        assert "gpu: n/a" in text and "estimated (CodeCarbon model)" in text
    if name == "latency":
        assert "no per-request latency data" in text  # no runs/ given
    if name == "roofline":
        assert "needs a GPU with known peak figures" in text


def test_boundary_label_names_gpu_and_method(campaign: pd.DataFrame) -> None:
    ok = campaign[campaign["status"] == "ok"]
    boundary = plots.choose_boundary(ok)
    assert boundary is not None and boundary.name == "gpu"
    assert boundary.column == "gpu_energy_per_output_token_j"
    assert "GPU energy per output token (J)" in boundary.label
    assert "measured, nvml_energy_counter" in boundary.label
    assert plots.choose_boundary(ok.drop(columns=[c for c in ok.columns if "energy" in c])) is None


def test_pareto_front() -> None:
    throughput = [100.0, 200.0, 150.0, 300.0, float("nan")]
    energy = [1.0, 0.5, 0.4, 0.6, 0.1]
    # (150, 0.4) beats (100, 1.0); (200, 0.5) is faster than (150, 0.4); (300, 0.6) is fastest.
    assert plots.pareto_front(throughput, energy) == [2, 1, 3]
    assert plots.pareto_front([], []) == []


def test_same_summary_gives_identical_svg(tmp_path: Path, campaign: pd.DataFrame) -> None:
    draw("energy_vs_batch_size", campaign, tmp_path / "a.png", tmp_path / "a.svg")
    draw("energy_vs_batch_size", campaign, tmp_path / "b.png", tmp_path / "b.svg")
    assert (tmp_path / "a.svg").read_bytes() == (tmp_path / "b.svg").read_bytes()


def test_reads_the_summary_parquet_artifact(tmp_path: Path, campaign: pd.DataFrame) -> None:
    from llm_energy.summary import TablePaths, write_tables

    write_tables(build_tables(sorted((tmp_path / "experiments").glob("*.json"))), TablePaths.in_dir(tmp_path), {})
    draw("energy_breakdown", tmp_path / "summary.parquet", tmp_path / "l.png", tmp_path / "l.svg")
    assert_figure_files(tmp_path / "l.png", tmp_path / "l.svg")


@pytest.mark.parametrize("name", PLOTS)
def test_validity_flags_are_named_on_every_figure(tmp_path: Path, campaign: pd.DataFrame, name: str) -> None:
    flagged = campaign.copy()
    first_ok = flagged.index[flagged["status"] == "ok"][0]
    flagged.loc[first_ok, "flags"] = "short_window"
    png, svg = tmp_path / f"{name}.png", tmp_path / f"{name}.svg"
    draw(name, flagged, png, svg)
    text = assert_figure_files(png, svg)
    assert "Validity flags" in text and "short_window (1: llama-1b.pytorch.bs1)" in text


def pytorch_series(field: str, names_and_factors: tuple[tuple[str, float], ...]) -> list[dict]:
    """Pytorch results at batch 1 and 4, one series per name, the name set as experiment[field]."""
    results = []
    for name, factor in names_and_factors:
        for bs in (1, 4):
            data = _result(f"m.pytorch-{name}.bs{bs}", "llama-1b", "pytorch", bs, gpu_cycles(bs, factor), GPU_INFO)
            data["experiment"][field] = name
            results.append(data)
    return results


def test_a_backends_variants_are_labelled_backend_dash_variant(tmp_path: Path) -> None:
    results = pytorch_series("variant", (("none", 1.0), ("int8", 0.5)))
    results.append(_result("m.vllm.bs1", "llama-1b", "vllm", 1, gpu_cycles(1, 0.4), GPU_INFO))
    summary = summary_of(tmp_path, results)
    for name in SERIES_FIGURES:
        draw(name, summary, tmp_path / f"{name}.png", tmp_path / f"{name}.svg")
        text = (tmp_path / f"{name}.svg").read_text()
        assert "pytorch-none" in text and "pytorch-int8" in text, name
        assert "vllm-" not in text, name  # a backend without variants keeps its plain name
    assert summary["backend"].tolist().count("pytorch") == 4  # the summary itself is left as it is


def test_pytorch_engine_paths_are_labelled_where_no_variant_names_them(tmp_path: Path) -> None:
    summary = summary_of(tmp_path, pytorch_series("engine_path", (("eager", 1.0), ("fast", 0.3))))
    draw("energy_vs_batch_size", summary, tmp_path / "e.png", tmp_path / "e.svg")
    text = (tmp_path / "e.svg").read_text()
    assert "pytorch (eager)" in text and "pytorch (fast)" in text


def _batch_labels(points: list[tuple[float, float, float]]) -> list[tuple[str, tuple[float, float]]]:
    from llm_energy.plots import style

    figure = style.new_figure()
    ax = figure.subplots()
    ax.scatter([p[0] for p in points], [p[1] for p in points])
    ax.set_xscale("log")
    style.label_batches(ax, points)
    return [(a.get_text(), tuple(a.xyann)) for a in ax.texts]


def test_batch_labels_of_coinciding_points_are_drawn_once_and_others_move_aside() -> None:
    # Two engines at the same speed and energy at batch 1: one "bs1" names both.
    assert [t for t, _ in _batch_labels([(400.0, 0.6, 1), (401.0, 0.6, 1), (3000.0, 0.09, 8)])] == ["bs1", "bs8"]
    # Different batch sizes at one spot: both are labelled, at different corners.
    (first, first_at), (second, second_at) = _batch_labels([(400.0, 0.6, 1), (400.0, 0.6, 8)])
    assert (first, second) == ("bs1", "bs8") and first_at != second_at
    # Far apart, every label takes the first corner.
    assert {at for _, at in _batch_labels([(10.0, 0.1, 1), (1e4, 0.9, 8)])} == {(4.0, 3.0)}
    # Above MAX_LABELLED_POINTS, none (marker sizes say it); NaN points are skipped.
    assert _batch_labels([(float(i + 1), 1.0, i) for i in range(17)]) == []
    assert [t for t, _ in _batch_labels([(1.0, float("nan"), 1), (2.0, 1.0, 2)])] == ["bs2"]
