"""Unit tests of llm_energy.artifacts: envelope, validation, atomic writes, versions, Parquet tables."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from llm_energy import artifacts
from llm_energy.artifacts import (
    SCHEMA_VERSIONS,
    atomic_write_bytes,
    read_json_artifact,
    read_table_artifact,
    sha256_file,
    sha256_json,
    validate_table,
    write_json_artifact,
    write_table_artifact,
)
from llm_energy.errors import ArtifactError

PROVENANCE = {"experiment": "exp-1", "config_sha256": "c" * 64, "inputs": {"a.json": "0" * 64}}


def domain_measured(gross_j: float) -> dict[str, Any]:
    return {
        "available": True,
        "source": "nvml",
        "method": "measured",
        "gross_j": gross_j,
        "baseline_w": 5.0,
        "net_j": gross_j - 10.0,
    }


def energy_window(name: str = "measure") -> dict[str, Any]:
    return {
        "name": name,
        "start_s": 10.0,
        "end_s": 12.5,
        "duration_s": 2.5,
        "domains": {
            "gpu": domain_measured(100.0),
            "cpu": {"available": True, "source": "codecarbon", "method": "estimated", "gross_j": 20.0},
            "dram": {"available": False, "reason": "no RAPL on this machine"},
        },
        "flags": [],
    }


def run_result_data() -> dict[str, Any]:
    """A complete, valid `run_result` data part."""
    return {
        "experiment_id": "m.pytorch.d.bs1-float32-in8-out4-greedy.0123abcd",
        "cycle": 1,
        "status": "ok",
        "error": None,
        "experiment": {
            "model": "m",
            "backend": "pytorch",
            "dataset": "d",
            "parameters": {
                "batch_size": 1,
                "dtype": "float32",
                "max_input_tokens": 8,
                "max_output_tokens": 4,
                "decoding_mode": "greedy",
                "temperature": 0.0,
                "top_p": 1.0,
                "top_k": 0,
                "output_length": "fixed",
                "batching": "fixed",
                "token_budget": None,
            },
        },
        "load": {"device": "cpu", "dtype": "float32", "details": {"parameters": 1234}},
        "setup": {"duration_s": 1.5, "windows": [energy_window("load")]},
        "window": energy_window(),
        "tokens": {"requests": 2, "input_tokens": 10, "output_tokens": 8},
        "metrics": {"output_tokens_per_s": 3.2, "gpu_energy_j": 100.0, "dram_energy_j": None},
        "metrics_info": {"node_energy_domains": "gpu+cpu"},
        "phases": None,
        "energy_sources": {"gpu": "nvml"},
        "validity": {"flags": [], "valid": True},
    }


def requests_frame(rows: int = 3) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "request_index": list(range(rows)),
            "batch_index": [i // 2 for i in range(rows)],
            "input_tokens": [5 + i for i in range(rows)],
            "output_tokens": [4] * rows,
            "submitted_s": [1.0 + i for i in range(rows)],
            "first_token_s": [1.5 + i if i else float("nan") for i in range(rows)],
            "finished_s": [3.0 + i for i in range(rows)],
            "e2e_s": [2.0] * rows,
            "ttft_s": [0.5 if i else float("nan") for i in range(rows)],
            "tpot_s": [0.5] * rows,
            "itl_mean_s": [0.5] * rows,
            "token_times_s": [[1.5 + i, 2.0 + i, 2.5 + i, 3.0 + i] for i in range(rows)],
            "latency_source": ["host_clock_per_step"] * rows,
        }
    )


def tmp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------------------------------------
# JSON artifacts


def test_json_round_trip_with_envelope(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "cycle1.json"  # parent folders are created
    data = run_result_data()
    written = write_json_artifact(path, "run_result", data, PROVENANCE)
    on_disk = json.loads(path.read_text())
    assert on_disk == written
    assert list(on_disk) == ["schema", "schema_version", "provenance", "data"]
    assert on_disk["schema"] == "llm_energy/run_result"
    assert on_disk["schema_version"] == SCHEMA_VERSIONS["run_result"] == 2
    assert on_disk["provenance"] == PROVENANCE
    assert on_disk["data"] == data
    read = read_json_artifact(path, "run_result")
    assert read == on_disk
    assert tmp_files(path.parent) == []


def test_write_validation_failure_names_path_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    data = run_result_data()
    data["cycle"] = 0  # minimum is 1
    with pytest.raises(ArtifactError) as info:
        write_json_artifact(path, "run_result", data, PROVENANCE)
    message = str(info.value)
    assert str(path) in message
    assert "'cycle'" in message and "run_result" in message
    assert not path.exists()
    assert tmp_files(tmp_path) == []


def test_write_validation_failure_nested_field_and_missing_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    data = run_result_data()
    data["window"]["domains"]["cpu"] = {"available": False}  # an unavailable domain needs a reason
    with pytest.raises(ArtifactError) as info:
        write_json_artifact(path, "run_result", data, PROVENANCE)
    assert str(path) in str(info.value)
    assert "window/domains/cpu" in str(info.value)

    data = run_result_data()
    del data["validity"]
    with pytest.raises(ArtifactError) as info:
        write_json_artifact(path, "run_result", data, PROVENANCE)
    assert "'validity' is a required property" in str(info.value)


def test_validation_failure_keeps_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    write_json_artifact(path, "run_result", run_result_data(), PROVENANCE)
    before = path.read_bytes()
    bad = run_result_data()
    bad["status"] = "maybe"
    with pytest.raises(ArtifactError):
        write_json_artifact(path, "run_result", bad, PROVENANCE)
    assert path.read_bytes() == before


def test_unknown_artifact_type_on_write(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no_such_type"):
        write_json_artifact(tmp_path / "x.json", "no_such_type", {}, PROVENANCE)


def test_nan_and_inf_become_null(tmp_path: Path) -> None:
    path = tmp_path / "nan.json"
    data = run_result_data()
    data["metrics"] = {"a_j": float("nan"), "b_j": float("inf"), "c_j": np.float64(2.5), "d_j": np.float32("nan")}
    provenance = {**PROVENANCE, "extra_w": float("-inf")}
    write_json_artifact(path, "run_result", data, provenance)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    document = read_json_artifact(path, "run_result")
    assert document["data"]["metrics"] == {"a_j": None, "b_j": None, "c_j": 2.5, "d_j": None}
    assert document["provenance"]["extra_w"] is None


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    atomic_write_bytes(path, b"old contents")
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert tmp_files(tmp_path) == []


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "result.json"
    write_json_artifact(path, "run_result", run_result_data(), PROVENANCE)
    before = path.read_bytes()

    def failing_replace(src, dst):
        # The temporary file is complete at this point: the failure is at the rename.
        assert Path(src).read_bytes().startswith(b"{")
        raise OSError("disk went away")

    monkeypatch.setattr(artifacts.os, "replace", failing_replace)
    changed = run_result_data()
    changed["cycle"] = 2
    with pytest.raises(OSError, match="disk went away"):
        write_json_artifact(path, "run_result", changed, PROVENANCE)
    assert path.read_bytes() == before
    assert tmp_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_atomic_write_failure_while_writing_payload(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "blob.bin"
    atomic_write_bytes(path, b"old")

    def failing_fsync(fd):
        raise OSError("fsync failed")

    monkeypatch.setattr(artifacts.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="fsync failed"):
        atomic_write_bytes(path, b"new payload")
    assert path.read_bytes() == b"old"
    assert tmp_files(tmp_path) == []


def _write_raw(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document))


def test_read_wrong_schema_name(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    write_json_artifact(path, "run_result", run_result_data(), PROVENANCE)
    with pytest.raises(ArtifactError) as info:
        read_json_artifact(path, "experiment_result")
    assert str(path) in str(info.value)
    assert "'llm_energy/run_result'" in str(info.value)
    assert "llm_energy/experiment_result" in str(info.value)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("[1, 2]", "not an llm_energy artifact"),
        ('{"data": {}}', "not an llm_energy artifact"),
        ("{not json", "not valid JSON"),
    ],
)
def test_read_malformed(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(ArtifactError, match=match):
        read_json_artifact(path, "run_result")


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="artifact not found"):
        read_json_artifact(tmp_path / "absent.json", "run_result")


def test_read_newer_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    document = write_json_artifact(path, "run_result", run_result_data(), PROVENANCE)
    document["schema_version"] = SCHEMA_VERSIONS["run_result"] + 1
    _write_raw(path, document)
    with pytest.raises(ArtifactError) as info:
        read_json_artifact(path, "run_result")
    assert "newer" in str(info.value) and "upgrade" in str(info.value)
    assert str(path) in str(info.value)


def test_read_non_integer_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    document = write_json_artifact(path, "run_result", run_result_data(), PROVENANCE)
    document["schema_version"] = "1"
    _write_raw(path, document)
    with pytest.raises(ArtifactError, match="schema_version"):
        read_json_artifact(path, "run_result")


def test_read_older_version_without_migration(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "run.json"
    write_json_artifact(path, "run_result", run_result_data(), PROVENANCE)  # version 2 (current)
    monkeypatch.setitem(SCHEMA_VERSIONS, "run_result", 3)
    monkeypatch.setattr(artifacts, "MIGRATIONS", {})
    with pytest.raises(ArtifactError) as info:
        read_json_artifact(path, "run_result")
    assert "schema_version 2" in str(info.value) and "cannot be migrated to 3" in str(info.value)


def test_read_older_version_with_migrations(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "run.json"
    original = run_result_data()
    write_json_artifact(path, "run_result", original, PROVENANCE)  # version 2 (current)
    calls: list[int] = []

    def v2_to_v3(data: dict) -> dict:
        calls.append(2)
        data = copy.deepcopy(data)
        data["metrics"]["renamed_in_v3_j"] = data["metrics"].pop("gpu_energy_j")
        return data

    def v3_to_v4(data: dict) -> dict:
        calls.append(3)
        data = copy.deepcopy(data)
        data["metrics_info"]["migrated"] = "v4"
        return data

    monkeypatch.setitem(SCHEMA_VERSIONS, "run_result", 4)
    monkeypatch.setattr(artifacts, "MIGRATIONS", {("run_result", 2): v2_to_v3, ("run_result", 3): v3_to_v4})
    document = read_json_artifact(path, "run_result")
    assert calls == [2, 3]  # applied in order, each once
    assert document["schema_version"] == 4
    assert document["data"]["metrics"] == {"output_tokens_per_s": 3.2, "renamed_in_v3_j": 100.0, "dram_energy_j": None}
    assert document["data"]["metrics_info"] == {"node_energy_domains": "gpu+cpu", "migrated": "v4"}
    assert document["provenance"] == PROVENANCE


def test_migrated_data_is_validated(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "run.json"
    write_json_artifact(path, "run_result", run_result_data(), PROVENANCE)
    monkeypatch.setitem(SCHEMA_VERSIONS, "run_result", 3)
    monkeypatch.setattr(artifacts, "MIGRATIONS", {("run_result", 2): lambda d: {**d, "cycle": "one"}})
    with pytest.raises(ArtifactError, match="cycle"):
        read_json_artifact(path, "run_result")


# ---------------------------------------------------------------------------------------------
# Parquet tables


def test_table_round_trip_with_envelope(tmp_path: Path) -> None:
    path = tmp_path / "requests.parquet"
    frame = requests_frame()
    write_table_artifact(path, "requests_table", frame, PROVENANCE, extra={"window_s": 2.5, "bad": float("nan")})
    read, meta = read_table_artifact(path, "requests_table")
    assert meta == {
        "schema": "llm_energy/requests_table",
        "schema_version": 1,
        "provenance": PROVENANCE,
        "table": {"window_s": 2.5, "bad": None},
    }
    assert list(read.columns) == list(frame.columns)
    pd.testing.assert_frame_equal(read.drop(columns="token_times_s"), frame.drop(columns="token_times_s"))
    assert [list(v) for v in read["token_times_s"]] == list(frame["token_times_s"])
    assert math.isnan(read["first_token_s"][0]) and read["first_token_s"][1] == 2.5
    assert tmp_files(tmp_path) == []


def test_empty_table_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    # How llm_energy.measure builds the table of a failed run: no rows, every column untyped.
    frame = pd.DataFrame([], columns=list(requests_frame().columns))
    write_table_artifact(path, "requests_table", frame, PROVENANCE)
    read, meta = read_table_artifact(path, "requests_table")
    assert len(read) == 0 and list(read.columns) == list(frame.columns)
    assert meta["schema"] == "llm_energy/requests_table"


def test_validate_table_missing_column() -> None:
    frame = requests_frame().drop(columns=["ttft_s", "e2e_s"])
    with pytest.raises(ArtifactError) as info:
        validate_table("requests_table", frame, where="runs/x.parquet")
    assert "runs/x.parquet" in str(info.value)
    assert "'e2e_s'" in str(info.value) and "'ttft_s'" in str(info.value)


def test_validate_table_unexpected_column() -> None:
    frame = requests_frame().assign(surprise_j=1.0)
    with pytest.raises(ArtifactError, match="surprise_j"):
        validate_table("requests_table", frame)


@pytest.mark.parametrize(
    ("column", "values"),
    [
        ("input_tokens", ["5", "6", "7"]),  # strings where integers belong
        ("output_tokens", [4.0, 4.5, float("nan")]),  # floats in an integer column
        ("latency_source", [1, 2, 3]),  # integers in a string column
        ("e2e_s", ["a", "b", "c"]),
    ],
)
def test_validate_table_wrong_dtype(column: str, values: list) -> None:
    frame = requests_frame()
    frame[column] = values
    with pytest.raises(ArtifactError) as info:
        validate_table("requests_table", frame, where="t.parquet")
    assert f"column '{column}'" in str(info.value)
    assert str(frame[column].dtype) in str(info.value)


def test_validate_table_accepts_integers_in_number_columns() -> None:
    frame = requests_frame()
    frame["e2e_s"] = [2, 2, 2]  # JSON "number" includes integers
    validate_table("requests_table", frame)


def test_write_table_rejects_invalid_frame_and_keeps_old(tmp_path: Path) -> None:
    path = tmp_path / "requests.parquet"
    write_table_artifact(path, "requests_table", requests_frame(), PROVENANCE)
    before = path.read_bytes()
    with pytest.raises(ArtifactError, match=str(path)):
        write_table_artifact(path, "requests_table", requests_frame().drop(columns="e2e_s"), PROVENANCE)
    assert path.read_bytes() == before


def test_read_table_wrong_type_missing_envelope_and_corrupt(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "requests.parquet"
    write_table_artifact(path, "requests_table", requests_frame(), PROVENANCE)
    with pytest.raises(ArtifactError, match="expected 'llm_energy/summary_table'"):
        read_table_artifact(path, "summary_table")

    plain = tmp_path / "plain.parquet"
    requests_frame().to_parquet(plain)
    with pytest.raises(ArtifactError, match="no llm_energy envelope"):
        read_table_artifact(plain, "requests_table")

    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ArtifactError, match="not a readable Parquet file"):
        read_table_artifact(corrupt, "requests_table")

    with pytest.raises(ArtifactError, match="artifact not found"):
        read_table_artifact(tmp_path / "absent.parquet", "requests_table")

    monkeypatch.setitem(SCHEMA_VERSIONS, "requests_table", 0)
    with pytest.raises(ArtifactError, match="newer"):
        read_table_artifact(path, "requests_table")


# ---------------------------------------------------------------------------------------------
# Hashes


def test_sha256_json_stable_and_order_independent() -> None:
    value = {"b": [1, 2.5, None], "a": {"y": "z", "x": True}}
    reordered = {"a": {"x": True, "y": "z"}, "b": [1, 2.5, None]}
    expected = hashlib.sha256(b'{"a":{"x":true,"y":"z"},"b":[1,2.5,null]}').hexdigest()
    assert sha256_json(value) == sha256_json(reordered) == expected
    assert sha256_json({"a": float("nan")}) == sha256_json({"a": None})
    assert sha256_json({"a": np.int64(3)}) == sha256_json({"a": 3})
    assert sha256_json({"a": 1}) != sha256_json({"a": 2})
    assert sha256_json([1, 2]) != sha256_json([2, 1])  # lists keep their order


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    payload = os.urandom(3000)
    path.write_bytes(payload)
    assert sha256_file(path, chunk_size=1024) == hashlib.sha256(payload).hexdigest()


def test_load_schema_unknown_type_names_expected_file() -> None:
    with pytest.raises(ArtifactError) as info:
        artifacts.load_schema("no_such_type")
    assert "no_such_type.schema.json" in str(info.value)
    assert artifacts.load_schema("run_result")["title"].startswith("llm_energy/run_result")
