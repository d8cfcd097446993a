"""The shipped quantization-cpu campaign (pytorch variants: none vs each method that runs on CPU) with
the real snakemake: one summary row per variant and batch size, each with its method, the bytes its
weights took as stored, its energy and its throughput."""

from __future__ import annotations

import importlib.util
import math

import pytest
import yaml
from llm_energy import artifacts
from llm_energy.backends import quantization

from tests.workflow.helpers import REPO_ROOT, copy_workflow, run_campaign

pytestmark = pytest.mark.workflow
CAMPAIGN = REPO_ROOT / "config" / "campaigns" / "quantization-cpu.yaml"


@pytest.fixture(scope="module")
def shipped() -> dict:
    return yaml.safe_load(CAMPAIGN.read_text())


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, shipped):
    for method in shipped["backend_settings"]["pytorch"]["variants"]:
        if method != quantization.NONE and importlib.util.find_spec(quantization.METHODS[method].package) is None:
            pytest.skip(f"{quantization.METHODS[method].pin} is not installed (envs/setup-venv.sh installs it)")
    workdir = copy_workflow(tmp_path_factory.mktemp("quantization"))
    config = dict(shipped)
    config["campaign"] = {**shipped["campaign"], "cycles": 1}  # one cycle: the rows, not their spread
    return workdir, run_campaign(
        workdir, config, "quantization-cpu campaign (4 pytorch variants x 2 batch sizes, 1 cycle)"
    )


def test_one_ok_row_per_variant_and_batch_size(quantized, shipped):
    _, summary = quantized
    variants = list(shipped["backend_settings"]["pytorch"]["variants"])
    assert variants == ["none", "torchao_int8_weight_only", "fp8", "bnb_8bit"]
    assert sorted(zip(summary["backend_variant"], summary["batch_size"])) == sorted(
        (v, b) for v in variants for b in shipped["grid"]["batch_size"]
    )
    assert (summary["status"] == "ok").all() and (summary["backend"] == "pytorch").all()
    for _, row in summary.iterrows():
        assert f".pytorch-{row['backend_variant']}." in row["experiment_id"]


def test_each_row_records_its_method_and_stored_weight_bytes(quantized):
    _, summary = quantized
    # the variants are named for their method
    assert (summary["quantization"] == summary["backend_variant"]).all()
    assert (summary["weight_bytes"] > 0).all()
    bytes_of = summary.groupby("backend_variant")["weight_bytes"].agg(set)
    assert all(len(values) == 1 for values in bytes_of)  # the same weights at every batch size
    none = bytes_of["none"].pop()
    # int8 and fp8 weights take 1 byte instead of float32's 4 (embeddings and lm_head stay float32)
    for method in ("torchao_int8_weight_only", "fp8", "bnb_8bit"):
        assert bytes_of[method].pop() < 0.6 * none, method


def test_each_row_has_energy_and_throughput(quantized, shipped):
    _, summary = quantized
    # Gross energy (what the machine measured or CodeCarbon estimated); net energy subtracts the idle
    # baseline and may rightly be below 0 for a domain that barely moved on a tiny model.
    per_token = [c for c in summary.columns if c.endswith("energy_per_output_token_j") and "_net_" not in c]
    assert per_token, list(summary.columns)
    for _, row in summary.iterrows():
        values = [row[c] for c in per_token if not (isinstance(row[c], float) and math.isnan(row[c]))]
        assert values and all(v > 0 for v in values), (row["experiment_id"], per_token)
    assert (summary["output_tokens_per_s"] > 0).all()
    # greedy, fixed output length: every variant produced the same tokens per pass over the request
    # set (a window repeats the set until campaign.min_window_s)
    per_pass = shipped["datasets"]["bundled"]["sample_size"] * shipped["grid"]["max_output_tokens"][0]
    assert ((summary["output_tokens"] % per_pass == 0) & (summary["output_tokens"] >= per_pass)).all()


def test_the_run_artifact_names_the_variant_and_its_weights(quantized):
    workdir, summary = quantized
    row = summary[(summary["backend_variant"] == "torchao_int8_weight_only") & (summary["batch_size"] == 1)].iloc[0]
    run = artifacts.read_json_artifact(
        workdir / "results" / "runs" / row["experiment_id"] / "cycle-1" / "result.json", "run_result"
    )["data"]
    assert run["experiment"]["backend"] == "pytorch" and run["experiment"]["variant"] == "torchao_int8_weight_only"
    assert run["load"]["details"]["quantization"] == "torchao_int8_weight_only"
    assert run["load"]["details"]["quantized_weight_type"].startswith("Int8Tensor")
    assert (workdir / "results" / "figures" / "energy_vs_batch_size.png").stat().st_size > 5_000
