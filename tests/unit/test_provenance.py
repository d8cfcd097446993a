"""Unit tests of llm_energy.provenance.collect: complete, hashed, JSON-able and free of secrets."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import llm_energy
import pytest
from llm_energy import provenance
from llm_energy.artifacts import read_json_artifact, write_json_artifact

PROVENANCE_KEYS = {"experiment", "config_sha256", "inputs", "code", "software", "host", "gpus", "created_utc"}
SECRET = "hf_Zq9SecretTokenThatMustNeverBeRecorded"


def sha256_bytes(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def test_collect_has_every_key() -> None:
    result = provenance.collect(experiment="exp.a", config_sha256="f" * 64)
    assert set(result) == PROVENANCE_KEYS
    assert result["experiment"] == "exp.a"
    assert result["config_sha256"] == "f" * 64
    assert result["inputs"] == {}
    assert result["code"]["package_version"] == llm_energy.__version__
    assert "git_commit" in result["code"]
    commit = result["code"]["git_commit"]
    assert commit is None or len(commit.removesuffix("-dirty")) == 40
    software = result["software"]
    assert software["python"].count(".") == 2
    for package in ("torch", "transformers", "numpy", "pandas"):
        assert software[package], package  # installed in the test environment: a version string
    assert set(provenance.TRACKED_PACKAGES) <= set(software)
    host = result["host"]
    assert host["hostname"] and host["machine"] and host["cpu_count"] >= 1
    assert isinstance(host["environment"], dict)
    assert isinstance(result["gpus"], list)
    created = dt.datetime.fromisoformat(result["created_utc"])
    assert created.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.UTC) - created).total_seconds()) < 60


def test_defaults_and_extra() -> None:
    result = provenance.collect(include_gpus=False, extra={"stage": "measure", "experiment": "override"})
    assert result["experiment"] == "override"  # extra wins: callers may add or replace fields
    assert result["stage"] == "measure"
    assert result["config_sha256"] is None
    assert result["gpus"] == []


def test_inputs_hashed_files_and_folder_manifest(tmp_path: Path) -> None:
    data_file = tmp_path / "prompts.jsonl"
    data_file.write_bytes(b'{"prompt": "hi"}\n')
    model_dir = tmp_path / "models" / "tiny"
    (model_dir / "weights").mkdir(parents=True)
    (model_dir / "manifest.json").write_bytes(b'{"schema": "llm_energy/model_manifest"}')
    (model_dir / "weights" / "model.safetensors").write_bytes(b"\x00" * 64)

    result = provenance.collect(inputs=[data_file, str(model_dir)])
    assert result["inputs"] == {
        str(data_file): sha256_bytes(b'{"prompt": "hi"}\n'),
        # A folder is recorded by the hash of its manifest.json (which hashes its files).
        str(model_dir): sha256_bytes(b'{"schema": "llm_energy/model_manifest"}'),
    }


def test_inputs_mapping_taken_as_is() -> None:
    hashes = {"a.json": "1" * 64, "b.parquet": "2" * 64}
    assert provenance.collect(inputs=hashes)["inputs"] == hashes


def test_input_hash_changes_with_content(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("a: 1\n")
    before = provenance.collect(inputs=[path])["inputs"][str(path)]
    path.write_text("a: 2\n")
    after = provenance.collect(inputs=[path])["inputs"][str(path)]
    assert before != after


def test_recorded_environment_but_never_secrets(monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", SECRET)
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    result = provenance.collect(experiment="e", inputs={"x": "0" * 64})
    dumped = json.dumps(result)
    assert SECRET not in dumped
    assert "HF_TOKEN" not in dumped
    environment = result["host"]["environment"]
    assert environment["OMP_NUM_THREADS"] == "3"
    assert environment["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert set(environment) <= set(provenance.RECORDED_ENVIRONMENT)


def test_provenance_goes_into_an_artifact(tmp_path: Path) -> None:
    # What every rule does: collect, then write an artifact with it; it must be JSON-able and survive.
    result = provenance.collect(experiment="e", config_sha256="a" * 64, inputs=[__file__])
    path = tmp_path / "run.json"
    data = {
        "experiment_id": "e",
        "cycle": 1,
        "status": "failed",
        "error": "boom",
        "experiment": {
            "model": "m",
            "backend": "pytorch",
            "dataset": "d",
            "parameters": {
                k: None
                for k in (
                    "batch_size",
                    "dtype",
                    "max_input_tokens",
                    "max_output_tokens",
                    "decoding_mode",
                    "temperature",
                    "top_p",
                    "top_k",
                    "output_length",
                    "batching",
                    "token_budget",
                )
            },
        },
        "load": None,
        "setup": {"duration_s": 0.0, "windows": []},
        "window": None,
        "tokens": None,
        "metrics": {},
        "metrics_info": {},
        "phases": None,
        "energy_sources": {},
        "validity": {"flags": ["failed"], "valid": False},
    }
    write_json_artifact(path, "run_result", data, result)
    assert read_json_artifact(path, "run_result")["provenance"] == json.loads(json.dumps(result))


@pytest.mark.parametrize("name", ["torch", "numpy"])
def test_software_versions_match_installed(name: str) -> None:
    import importlib.metadata

    assert provenance.software_versions()[name] == importlib.metadata.version(name)


def test_git_commit_of_a_tree_without_git_comes_from_the_environment(monkeypatch):
    import subprocess

    from llm_energy import provenance

    def no_git(*args, **kwargs):
        raise subprocess.CalledProcessError(128, "git")

    monkeypatch.setattr(provenance.subprocess, "run", no_git)
    monkeypatch.setenv("LLM_ENERGY_GIT_COMMIT", "99fbc72")
    provenance.git_commit.cache_clear()
    try:
        assert provenance.git_commit() == "99fbc72"
        monkeypatch.delenv("LLM_ENERGY_GIT_COMMIT")
        provenance.git_commit.cache_clear()
        assert provenance.git_commit() is None
    finally:
        provenance.git_commit.cache_clear()


def test_git_commit_from_the_environment_wins_over_a_stale_checkout(monkeypatch):
    from llm_energy import provenance

    monkeypatch.setenv("LLM_ENERGY_GIT_COMMIT", "7094582")
    provenance.git_commit.cache_clear()
    try:
        assert provenance.git_commit() == "7094582"  # this checkout has a .git, the variable still wins
    finally:
        provenance.git_commit.cache_clear()
