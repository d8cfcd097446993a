"""build_summary / write_summary: columns, types, order, and CSV == Parquet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from llm_energy import artifacts
from llm_energy.errors import ArtifactError
from llm_energy.statistics import describe
from llm_energy.summary import IDENTITY_COLUMNS, build_summary, read_summary, write_summary


def experiment_result_data(
    experiment_id: str,
    model: str,
    batch_size: int,
    cycle_metrics: dict[str, list[float | None]],
    info: dict[str, str] | None = None,
    status: str = "ok",
    failures: list[dict[str, Any]] | None = None,
    flags: dict[str, int] | None = None,
    token_budget: int | None = None,
    gpu_name: str | None = "NVIDIA H100 80GB HBM3",
) -> dict[str, Any]:
    """experiment_result `data` as llm_energy.aggregate writes it."""
    ok = [] if status == "failed" else [1, 2, 3][: max(len(v) for v in cycle_metrics.values())]
    return {
        "experiment_id": experiment_id, "status": status,
        "experiment": {"model": model, "backend": "pytorch", "dataset": "builtin", "parameters": {
            "batch_size": batch_size, "dtype": "bf16", "max_input_tokens": 128, "max_output_tokens": 64,
            "decoding_mode": "greedy", "temperature": 1.0, "top_p": 1.0, "top_k": 0,
            "output_length": "fixed", "batching": "token_budget" if token_budget else "fixed",
            "token_budget": token_budget}},
        "gpu_name": gpu_name, "gpu_count": 1 if gpu_name else 0,
        "cycles_ok": len(ok), "cycles_ok_list": ok,
        "cycles_failed": failures or [], "cycles_invalid": [],
        "metrics": {} if status == "failed" else {k: describe(v) for k, v in cycle_metrics.items()},
        "metrics_info": info or {}, "flags": flags or {},
        "flops": {"method": "analytic", "confidence": "high", "total_flops": 1e12, "decode_bytes_min": None,
                  "cycles": [{"cycle": 1, "window_flops": 1e12, "decode_bytes_min": 0.0, "requests": 8, "confidence": "high"}]},
    }


def write_experiment(directory: Path, data: dict[str, Any]) -> Path:
    path = directory / "experiments" / f"{data['experiment_id']}.json"
    artifacts.write_json_artifact(path, "experiment_result", data, {"experiment": data["experiment_id"]})
    return path


@pytest.fixture()
def experiment_paths(tmp_path: Path) -> list[Path]:
    info = {"gpu_energy_source": "nvml_energy_counter", "gpu_energy_method": "measured"}
    return [
        write_experiment(tmp_path, experiment_result_data(
            "b.bs8", "model-b", 8, {"gpu_energy_per_output_token_j": [0.11, 0.12, 0.13],
                                     "output_tokens_per_s": [900.0, 910.0, 920.0]}, info,
            flags={"short_window": 1, "clock_throttled": 2})),
        write_experiment(tmp_path, experiment_result_data(
            "a.bs16", "model-a", 16, {"gpu_energy_per_output_token_j": [0.05, 0.06, 0.055],
                                       "output_tokens_per_s": [2000.0, 2100.0, 2050.0]},
            {**info, "latency_source": "host_clock"}, token_budget=4096)),
        write_experiment(tmp_path, experiment_result_data(
            "a.bs1", "model-a", 1, {"gpu_energy_per_output_token_j": [0.9],
                                     "ttft_p50_s": [0.02]}, info)),
        write_experiment(tmp_path, experiment_result_data(
            "a.bs64", "model-a", 64, {"x": [None]}, status="failed",
            failures=[{"cycle": 1, "error": "CUDA out of memory"}, {"cycle": 2, "error": "CUDA out of memory"}],
            flags={"failed": 2})),
    ]


def test_columns_order_and_types(experiment_paths: list[Path]) -> None:
    frame = build_summary(experiment_paths)
    assert list(frame.columns[: len(IDENTITY_COLUMNS)]) == list(IDENTITY_COLUMNS)
    # sorted by model, backend, dataset, batch_size
    assert frame["experiment_id"].tolist() == ["a.bs1", "a.bs16", "a.bs64", "b.bs8"]
    assert frame["batch_size"].dtype == np.int64
    assert frame["cycles_ok"].tolist() == [1, 3, 0, 3]
    assert frame["cycles_failed"].tolist() == [0, 0, 2, 0]
    assert frame["token_budget"].dtype == "Int64"
    assert frame["token_budget"].isna().tolist() == [True, False, True, True]
    assert frame["temperature"].dtype == np.float64
    assert frame["status"].tolist() == ["ok", "ok", "failed", "ok"]
    assert frame.loc[3, "flags"] == "clock_throttled;short_window"
    assert frame.loc[2, "flags"] == "failed"
    assert frame.loc[2, "errors"] == "cycle 1: CUDA out of memory; cycle 2: CUDA out of memory"
    assert frame.loc[0, "gpu_name"] == "NVIDIA H100 80GB HBM3"

    # per metric: mean, std, CI, cv; NaN where unavailable (single cycle, failed experiment)
    stats = describe([0.05, 0.06, 0.055])
    row = frame.loc[1]
    assert row["gpu_energy_per_output_token_j"] == pytest.approx(stats["mean"])
    assert row["gpu_energy_per_output_token_j_std"] == pytest.approx(stats["std"])
    assert row["gpu_energy_per_output_token_j_ci95_low"] == pytest.approx(stats["ci95_low"])
    assert row["gpu_energy_per_output_token_j_ci95_high"] == pytest.approx(stats["ci95_high"])
    assert row["gpu_energy_per_output_token_j_cv"] == pytest.approx(stats["cv"])
    assert frame.loc[0, "gpu_energy_per_output_token_j"] == 0.9
    assert np.isnan(frame.loc[0, "gpu_energy_per_output_token_j_std"])
    assert np.isnan(frame.loc[2, "gpu_energy_per_output_token_j"])
    assert frame["ttft_p50_s"].dtype == np.float64
    # metrics_info strings become columns
    assert frame.loc[1, "latency_source"] == "host_clock"
    assert frame.loc[0, "latency_source"] is None
    assert frame.loc[0, "gpu_energy_source"] == "nvml_energy_counter"
    assert frame["total_flops"].tolist() == [1e12] * 4


def test_csv_equals_parquet(tmp_path: Path, experiment_paths: list[Path]) -> None:
    frame = build_summary(experiment_paths)
    csv_path, parquet_path = tmp_path / "summary.csv", tmp_path / "summary.parquet"
    write_summary(frame, csv_path, parquet_path, {"experiment": None, "inputs": {}})

    from_parquet, meta = artifacts.read_table_artifact(parquet_path, "summary_table")
    assert meta["schema"] == "llm_energy/summary_table"
    pd.testing.assert_frame_equal(from_parquet, frame)

    from_csv = pd.read_csv(csv_path, float_precision="round_trip")  # floats are written exactly
    assert list(from_csv.columns) == list(from_parquet.columns)
    # Same values; CSV cannot tell an empty string (no flags) from a missing value, and it loses
    # the dtypes of all-missing and nullable integer columns.
    def normalised(table: pd.DataFrame) -> pd.DataFrame:
        table = table.astype(object).where(table.notna(), None)
        return table.replace("", None)

    pd.testing.assert_frame_equal(normalised(from_csv), normalised(from_parquet), check_dtype=False,
                                  check_exact=True)
    assert read_summary(parquet_path)["experiment_id"].tolist() == frame["experiment_id"].tolist()


def test_empty_summary_has_the_identity_columns(tmp_path: Path) -> None:
    frame = build_summary([])
    assert frame.empty
    assert list(frame.columns[: len(IDENTITY_COLUMNS)]) == list(IDENTITY_COLUMNS)
    write_summary(frame, tmp_path / "s.csv", tmp_path / "s.parquet", {})
    assert read_summary(tmp_path / "s.parquet").empty
    assert (tmp_path / "s.csv").read_text().startswith(
        "experiment_id,model,backend,backend_variant,dataset,engine_path,batch_size")


def test_a_table_without_identity_columns_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="lacks required columns"):
        write_summary(pd.DataFrame({"x": [1.0]}), tmp_path / "s.csv", tmp_path / "s.parquet", {})
    assert not (tmp_path / "s.csv").exists()


def test_info_key_colliding_with_a_metric_column_is_prefixed(tmp_path: Path) -> None:
    path = write_experiment(tmp_path, experiment_result_data(
        "c", "m", 1, {"mfu": [0.1, 0.2]}, info={"mfu": "a note that collides"}))
    frame = build_summary([path])
    assert frame.loc[0, "mfu"] == pytest.approx(0.15)
    assert frame.loc[0, "info_mfu"] == "a note that collides"


def test_pooled_latency_columns_with_units_and_n(tmp_path: Path) -> None:
    """The experiment's pooled latency becomes one column per statistic (seconds) plus <name>_n
    (int); an experiment without latency (all cycles failed) gets nulls and n = 0."""
    from llm_energy.metrics import LATENCY_METRIC_NAMES, latency_distributions

    latency, _ = latency_distributions({"ttft": [0.1] * 150, "e2e": [1.0, 2.0]})
    measured = experiment_result_data("a.bs1", "model-a", 1, {"gpu_energy_per_output_token_j": [0.9]})
    measured["latency"] = latency
    failed = experiment_result_data("a.bs64", "model-a", 64, {"x": [None]}, status="failed")
    frame = build_summary([write_experiment(tmp_path, measured), write_experiment(tmp_path, failed)])
    assert set(LATENCY_METRIC_NAMES) <= set(frame.columns)
    assert "ttft_p99_s_std" not in frame.columns  # one pooled value per experiment, no spread columns
    assert frame["ttft_n"].tolist() == [150, 0] and frame["ttft_n"].dtype == np.int64
    assert frame.loc[0, "ttft_p99_s"] == pytest.approx(0.1) and frame["ttft_p99_s"].dtype == np.float64
    assert frame.loc[0, "e2e_p50_s"] == pytest.approx(1.5) and np.isnan(frame.loc[0, "e2e_p90_s"])
    assert np.isnan(frame.loc[1, "ttft_p50_s"])


def test_backend_variant_quantization_and_weight_bytes_columns(tmp_path: Path) -> None:
    paths = []
    for variant, method, weight_bytes in (("none", "none", 15803648), ("int8", "torchao_int8_weight_only", 7151744)):
        data = experiment_result_data(f"m.pytorch-{variant}.bs1", "m", 1, {"output_tokens_per_s": [10.0]})
        data["experiment"]["variant"] = variant
        data["load"] = {"device": "cpu", "dtype": "float32",
                        "details": {"quantization": method, "weight_bytes": weight_bytes}}
        paths.append(write_experiment(tmp_path, data))
    paths.append(write_experiment(tmp_path, experiment_result_data("m.pytorch.bs1", "m", 1, {"output_tokens_per_s": [9.0]})))
    frame = build_summary(paths)
    columns = list(frame.columns)
    assert columns.index("backend_variant") == columns.index("backend") + 1
    rows = frame.set_index("experiment_id")
    assert rows.loc["m.pytorch-int8.bs1", "backend_variant"] == "int8"
    assert rows.loc["m.pytorch-int8.bs1", "quantization"] == "torchao_int8_weight_only"
    assert rows.loc["m.pytorch-int8.bs1", "weight_bytes"] == 7151744
    assert rows.loc["m.pytorch-none.bs1", "weight_bytes"] == 15803648
    # an experiment without variant or load report (older results, vLLM): null, not a made-up value
    assert rows.loc["m.pytorch.bs1", ["backend_variant", "quantization"]].isna().all()
    assert pd.isna(rows.loc["m.pytorch.bs1", "weight_bytes"])
    write_summary(frame, tmp_path / "s.csv", tmp_path / "s.parquet", {})
    assert read_summary(tmp_path / "s.parquet")["backend_variant"].tolist() == frame["backend_variant"].tolist()
