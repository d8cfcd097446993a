"""build_tables / write_tables: the narrow summary and the long metrics table (columns, units in the
names, one row per experiment x metric, no constant settings), and CSV == Parquet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from llm_energy import artifacts
from llm_energy.errors import ArtifactError
from llm_energy.statistics import describe
from llm_energy.summary import (
    ALWAYS_COLUMNS,
    HEADLINE_LATENCY,
    HEADLINE_METRICS,
    METRICS_COLUMNS,
    TablePaths,
    build_tables,
    read_summary,
    read_tables,
    write_tables,
)
from llm_energy.units import unit_of


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
        "experiment_id": experiment_id,
        "status": status,
        "experiment": {
            "model": model,
            "backend": "pytorch",
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
                "batching": "token_budget" if token_budget else "fixed",
                "token_budget": token_budget,
            },
        },
        "gpu_name": gpu_name,
        "gpu_count": 1 if gpu_name else 0,
        "cycles_ok": len(ok),
        "cycles_ok_list": ok,
        "cycles_failed": failures or [],
        "cycles_invalid": [],
        "metrics": {} if status == "failed" else {k: describe(v) for k, v in cycle_metrics.items()},
        "metrics_info": info or {},
        "flags": flags or {},
        "flops": {
            "method": "analytic",
            "confidence": "high",
            "total_flops": 1e12,
            "decode_bytes_min": None,
            "cycles": [
                {"cycle": 1, "window_flops": 1e12, "decode_bytes_min": 0.0, "requests": 8, "confidence": "high"}
            ],
        },
    }


def write_experiment(directory: Path, data: dict[str, Any]) -> Path:
    path = directory / "experiments" / f"{data['experiment_id']}.json"
    artifacts.write_json_artifact(path, "experiment_result", data, {"experiment": data["experiment_id"]})
    return path


@pytest.fixture()
def experiment_paths(tmp_path: Path) -> list[Path]:
    info = {"gpu_energy_source": "nvml_energy_counter", "gpu_energy_method": "measured"}
    return [
        write_experiment(
            tmp_path,
            experiment_result_data(
                "b.bs8",
                "model-b",
                8,
                {"gpu_energy_per_output_token_j": [0.11, 0.12, 0.13], "output_tokens_per_s": [900.0, 910.0, 920.0]},
                info,
                flags={"short_window": 1, "clock_throttled": 2},
            ),
        ),
        write_experiment(
            tmp_path,
            experiment_result_data(
                "a.bs16",
                "model-a",
                16,
                {"gpu_energy_per_output_token_j": [0.05, 0.06, 0.055], "output_tokens_per_s": [2000.0, 2100.0, 2050.0]},
                {**info, "latency_source": "host_clock"},
                token_budget=4096,
            ),
        ),
        write_experiment(
            tmp_path,
            experiment_result_data(
                "a.bs1", "model-a", 1, {"gpu_energy_per_output_token_j": [0.9], "ttft_p50_s": [0.02]}, info
            ),
        ),
        write_experiment(
            tmp_path,
            experiment_result_data(
                "a.bs64",
                "model-a",
                64,
                {"x": [None]},
                status="failed",
                failures=[{"cycle": 1, "error": "CUDA out of memory"}, {"cycle": 2, "error": "CUDA out of memory"}],
                flags={"failed": 2},
            ),
        ),
    ]


def test_summary_columns_order_and_types(experiment_paths: list[Path]) -> None:
    frame = build_tables(experiment_paths).summary
    assert [c for c in frame.columns if c in ALWAYS_COLUMNS] == list(ALWAYS_COLUMNS)
    assert frame.columns[0] == "experiment_id"
    # sorted by model, backend, dataset, batch_size
    assert frame["experiment_id"].tolist() == ["a.bs1", "a.bs16", "a.bs64", "b.bs8"]
    assert frame["batch_size"].dtype == np.int64
    assert frame["cycles_ok"].tolist() == [1, 3, 0, 3]
    assert frame["cycles_failed"].tolist() == [0, 0, 2, 0]
    assert frame["token_budget"].dtype == "Int64"  # differs between experiments: in the summary
    assert frame["token_budget"].isna().tolist() == [True, False, True, True]
    assert frame["batching"].tolist() == ["fixed", "token_budget", "fixed", "fixed"]
    assert frame["status"].tolist() == ["ok", "ok", "failed", "ok"]
    assert frame.loc[3, "flags"] == "clock_throttled;short_window"
    assert frame.loc[2, "flags"] == "failed"
    assert frame.loc[2, "errors"] == "cycle 1: CUDA out of memory; cycle 2: CUDA out of memory"
    assert frame.loc[0, "gpu_name"] == "NVIDIA H100 80GB HBM3"
    assert frame.loc[0, "dtype"] == "bf16"  # the same everywhere, but always there (the roofline's peak)

    # headline metrics: mean and 95 % CI; NaN where unavailable (single cycle, failed experiment)
    stats = describe([0.05, 0.06, 0.055])
    row = frame.loc[1]
    assert row["gpu_energy_per_output_token_j"] == pytest.approx(stats["mean"])
    assert row["gpu_energy_per_output_token_j_ci95_low"] == pytest.approx(stats["ci95_low"])
    assert row["gpu_energy_per_output_token_j_ci95_high"] == pytest.approx(stats["ci95_high"])
    assert frame.loc[0, "gpu_energy_per_output_token_j"] == 0.9
    assert np.isnan(frame.loc[0, "gpu_energy_per_output_token_j_ci95_low"])
    assert np.isnan(frame.loc[2, "gpu_energy_per_output_token_j"])
    # every headline column exists in every campaign, null where nothing measured it
    assert frame["node_energy_per_output_token_j"].isna().all() and frame["ttft_p50_s"].dtype == np.float64
    # how the energy was obtained stays beside it; other metrics_info prose is in the experiment JSON only
    assert frame.loc[0, "gpu_energy_source"] == "nvml_energy_counter"
    assert "latency_source" not in frame.columns


def test_summary_is_narrow_units_in_the_names_and_no_constant_settings(experiment_paths: list[Path]) -> None:
    frame = build_tables(experiment_paths).summary
    metric_columns = [
        *HEADLINE_METRICS,
        *(m + s for m in HEADLINE_METRICS for s in ("_ci95_low", "_ci95_high")),
        *HEADLINE_LATENCY,
    ]
    assert set(metric_columns) <= set(frame.columns)
    assert 25 <= len(HEADLINE_METRICS) + len(HEADLINE_LATENCY) <= 40 and len(frame.columns) < 150
    assert all(unit_of(c) != "-" for c in metric_columns), [c for c in metric_columns if unit_of(c) == "-"]
    # no std/cv columns (they are in the metrics table) and no non-headline metric
    assert not [c for c in frame.columns if c.endswith(("_std", "_cv"))]
    assert "x" not in frame.columns
    # settings shared by every experiment are left out (each experiment JSON has them), and so is a
    # backend_variant column when no backend has variants
    for constant in (
        "max_input_tokens",
        "max_output_tokens",
        "temperature",
        "top_p",
        "top_k",
        "decoding_mode",
        "output_length",
        "total_flops",
        "backend_variant",
        "request_rate_per_s",
    ):
        assert constant not in frame.columns, constant


def test_metrics_table_one_row_per_experiment_and_metric(experiment_paths: list[Path]) -> None:
    table = build_tables(experiment_paths).metrics
    assert list(table.columns) == list(METRICS_COLUMNS)  # no settings repeated on every row
    assert not table.duplicated(["experiment_id", "metric"]).any()
    assert sorted(zip(table["experiment_id"], table["metric"])) == sorted(
        [
            ("a.bs1", "gpu_energy_per_output_token_j"),
            ("a.bs1", "ttft_p50_s"),
            ("a.bs16", "gpu_energy_per_output_token_j"),
            ("a.bs16", "output_tokens_per_s"),
            ("b.bs8", "gpu_energy_per_output_token_j"),
            ("b.bs8", "output_tokens_per_s"),
        ]
    )
    assert table["experiment_id"].tolist()[:2] == ["a.bs1", "a.bs1"]  # in the summary's order
    row = table.set_index(["experiment_id", "metric"]).loc[("a.bs16", "gpu_energy_per_output_token_j")]
    stats = describe([0.05, 0.06, 0.055])
    for key in ("mean", "std", "ci95_low", "ci95_high", "cv"):
        assert row[key] == pytest.approx(stats[key])
    assert row["n"] == 3 and row["unit"] == "J/output token"
    assert dict(zip(table["metric"], table["unit"]))["output_tokens_per_s"] == "tokens/s"
    assert table["n"].dtype == np.int64 and table["mean"].dtype == np.float64


def test_csv_equals_parquet(tmp_path: Path, experiment_paths: list[Path]) -> None:
    tables = build_tables(experiment_paths)
    paths = TablePaths.in_dir(tmp_path)
    write_tables(tables, paths, {"experiment": None, "inputs": {}})
    back = read_tables(paths.summary_parquet)
    for frame, from_parquet, csv_path, schema in (
        (tables.summary, back.summary, paths.summary_csv, "summary_table"),
        (tables.metrics, back.metrics, paths.metrics_csv, "metrics_table"),
    ):
        _, meta = artifacts.read_table_artifact(csv_path.with_suffix(".parquet"), schema)
        assert meta["schema"] == f"llm_energy/{schema}"
        pd.testing.assert_frame_equal(from_parquet, frame)
        from_csv = pd.read_csv(csv_path, float_precision="round_trip")  # floats are written exactly
        assert list(from_csv.columns) == list(from_parquet.columns)

        # Same values; CSV cannot tell an empty string (no flags) from a missing value, and it loses
        # the dtypes of all-missing and nullable integer columns.
        def normalised(table: pd.DataFrame) -> pd.DataFrame:
            table = table.astype(object).where(table.notna(), None)
            return table.replace("", None)

        pd.testing.assert_frame_equal(
            normalised(from_csv), normalised(from_parquet), check_dtype=False, check_exact=True
        )
    assert read_summary(paths.summary_parquet)["experiment_id"].tolist() == tables.summary["experiment_id"].tolist()


def test_empty_tables_have_their_columns(tmp_path: Path) -> None:
    tables = build_tables([])
    assert tables.summary.empty and tables.metrics.empty
    assert [c for c in tables.summary.columns if c in ALWAYS_COLUMNS] == list(ALWAYS_COLUMNS)
    assert list(tables.metrics.columns) == list(METRICS_COLUMNS)
    paths = TablePaths.in_dir(tmp_path)
    write_tables(tables, paths, {})
    assert read_tables(paths.summary_parquet).summary.empty
    assert paths.summary_csv.read_text().startswith("experiment_id,model,backend,engine_path,dataset,batch_size")
    assert paths.metrics_csv.read_text() == "experiment_id,metric,unit,n,mean,std,ci95_low,ci95_high,cv\n"
    assert tables.for_figures().empty


def test_a_table_without_identity_columns_is_refused(tmp_path: Path) -> None:
    from llm_energy.summary import Tables

    with pytest.raises(ArtifactError, match="lacks required columns"):
        write_tables(Tables(pd.DataFrame({"x": [1.0]}), build_tables([]).metrics), TablePaths.in_dir(tmp_path), {})
    assert not (tmp_path / "summary.csv").exists()


def test_a_summary_without_its_metrics_table_names_the_file(tmp_path: Path, experiment_paths: list[Path]) -> None:
    paths = TablePaths.in_dir(tmp_path)
    write_tables(build_tables(experiment_paths), paths, {})
    paths.metrics_parquet.unlink()
    with pytest.raises(ArtifactError, match="metrics.parquet.*summarize"):
        read_tables(paths.summary_parquet)


def test_pooled_latency_in_both_tables(tmp_path: Path) -> None:
    """The experiment's pooled latency: its headline percentiles in the summary (seconds, one value, no
    interval); every statistic in the metrics table with n = the requests pooled. An experiment without
    latency (all cycles failed) gets nulls in the summary and no rows."""
    from llm_energy.metrics import latency_distributions

    latency, _ = latency_distributions({"ttft": [0.1] * 150, "e2e": [1.0, 2.0]})
    measured = experiment_result_data("a.bs1", "model-a", 1, {"gpu_energy_per_output_token_j": [0.9]})
    measured["latency"] = latency
    failed = experiment_result_data("a.bs64", "model-a", 64, {"x": [None]}, status="failed")
    tables = build_tables([write_experiment(tmp_path, measured), write_experiment(tmp_path, failed)])
    frame = tables.summary
    assert "ttft_p99_s_ci95_low" not in frame.columns and "ttft_n" not in frame.columns
    assert frame.loc[0, "ttft_p99_s"] == pytest.approx(0.1) and frame["ttft_p99_s"].dtype == np.float64
    assert frame.loc[0, "e2e_p50_s"] == pytest.approx(1.5) and np.isnan(frame.loc[0, "e2e_p90_s"])
    assert np.isnan(frame.loc[1, "ttft_p50_s"])
    rows = tables.metrics.set_index(["experiment_id", "metric"])
    assert rows.loc[("a.bs1", "ttft_p99_s"), "n"] == 150 and rows.loc[("a.bs1", "ttft_p99_s"), "unit"] == "s"
    assert rows.loc[("a.bs1", "ttft_p99_s"), "mean"] == pytest.approx(0.1)
    assert np.isnan(rows.loc[("a.bs1", "ttft_p99_s"), "ci95_low"])
    assert rows.loc[("a.bs1", "e2e_mean_s"), "n"] == 2
    assert "a.bs64" not in set(tables.metrics["experiment_id"])


def test_figures_get_every_metric_joined(experiment_paths: list[Path]) -> None:
    wide = build_tables(experiment_paths).for_figures()
    assert len(wide) == 4 and wide["experiment_id"].tolist() == ["a.bs1", "a.bs16", "a.bs64", "b.bs8"]
    stats = describe([0.05, 0.06, 0.055])
    assert wide.loc[1, "gpu_energy_per_output_token_j_ci95_low"] == pytest.approx(stats["ci95_low"])
    assert wide.loc[1, "gpu_energy_per_output_token_j"] == pytest.approx(stats["mean"])
    assert wide["gpu_energy_per_output_token_j"].notna().tolist() == [True, True, False, True]


def test_backend_variant_quantization_and_weight_bytes_columns(tmp_path: Path) -> None:
    paths = []
    for variant, method, weight_bytes in (("none", "none", 15803648), ("int8", "torchao_int8_weight_only", 7151744)):
        data = experiment_result_data(f"m.pytorch-{variant}.bs1", "m", 1, {"output_tokens_per_s": [10.0]})
        data["experiment"]["variant"] = variant
        data["load"] = {
            "device": "cpu",
            "dtype": "float32",
            "details": {"quantization": method, "weight_bytes": weight_bytes},
        }
        paths.append(write_experiment(tmp_path, data))
    paths.append(
        write_experiment(tmp_path, experiment_result_data("m.pytorch.bs1", "m", 1, {"output_tokens_per_s": [9.0]}))
    )
    frame = build_tables(paths).summary
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
    write_tables(build_tables(paths), TablePaths.in_dir(tmp_path), {})
    assert read_summary(tmp_path / "summary.parquet")["backend_variant"].tolist() == frame["backend_variant"].tolist()
