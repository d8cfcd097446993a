"""Several GPUs on one box, with the real snakemake on CPU: the `gpu` resource is the campaign's GPUs
(campaign.gpus.devices, taken as written where no NVML lists GPUs), two experiments run side by side
on disjoint devices (each job's CUDA_VISIBLE_DEVICES and lock, recorded in its result.json), their
overlapping windows are flagged host_shared, and a data-parallel experiment takes both devices and runs
two worker processes, one per device, as does a tensor-parallel one (two ranks of transformers' tp_plan
over gloo)."""

from __future__ import annotations

import copy
from pathlib import Path

from llm_energy import artifacts
from llm_energy.config import load_campaign

from tests.workflow.helpers import copy_workflow, describe, run_snakemake
from tests.workflow.test_resume import CAMPAIGN

DEVICES = ["fake-gpu-0", "fake-gpu-1"]


def _results(workdir: Path, experiment_id: str) -> dict:
    path = workdir / "results" / "runs" / experiment_id / "cycle-1" / "result.json"
    return artifacts.read_json_artifact(path, "run_result")["data"]


def test_parallel_experiments_get_disjoint_devices_and_data_parallel_takes_both(tmp_path: Path) -> None:
    import yaml

    config = copy.deepcopy(CAMPAIGN)
    # Windows long enough to overlap; the two batch sizes are two experiments that may run side by side.
    config["campaign"].update(
        cycles=1, min_window_s=4.0, gpus={"devices": DEVICES, "lock_dir": str(tmp_path / "locks"), "wait_s": 300}
    )
    config["grid"]["batch_size"] = [1, 2]
    config["backend_settings"] = {
        "pytorch": {
            "num_threads": 1,
            "variants": {"one": {}, "dp2": {"data_parallel": 2}, "tp2": {"tensor_parallel": 2}},
        }
    }
    config["exclude"] = [{"variant": "dp2", "batch_size": 1}, {"variant": "tp2", "batch_size": 1}]
    campaign = load_campaign(config)
    single = [e for e in campaign.experiments.values() if e.variant == "one"]
    assert len(single) == 2
    (parallel,) = [e for e in campaign.experiments.values() if e.variant == "dp2"]
    (tensor,) = [e for e in campaign.experiments.values() if e.variant == "tp2"]
    workdir = copy_workflow(tmp_path / "several")
    (workdir / "campaign.yaml").write_text(yaml.safe_dump(config))
    # 4 cores: run_inference takes the machine's 2 as threads, so two jobs fit beside each other.
    completed = run_snakemake(
        workdir, "--cores", "4", "--configfile", "campaign.yaml", label="several GPUs (CPU)", timeout_s=1200
    )
    assert completed.returncode == 0, describe(completed)

    placements = {e.id: _results(workdir, e.id)["placement"] for e in campaign.experiments.values()}
    for experiment in single:
        placed = placements[experiment.id]
        assert placed["box_gpus"] == DEVICES and placed["mode"] == "parallel"
        assert len(placed["held_gpus"]) == 1 and placed["cuda_visible_devices"] == placed["held_gpus"][0]
        assert placed["execution"]["launch"] == "in_process"
        assert placed["topology"]["interconnect"]["available"] is False  # no GPU here: said why
    dp = placements[parallel.id]
    assert dp["held_gpus"] == DEVICES and dp["cuda_visible_devices"] == ",".join(DEVICES)
    assert dp["execution"] == {
        "launch": "data_parallel_workers",
        "harness_may_init_cuda": True,
        "data_parallel": 2,
        "tensor_parallel": 1,
        "pipeline_parallel": 1,
        "gpus": 2,
        "whole_box": False,
    }
    workers = [p for p in dp["topology"]["processes"] if p["role"] == "data_parallel_worker"]
    assert [w["gpus"] for w in workers] == [[DEVICES[0]], [DEVICES[1]]]
    dp_result = _results(workdir, parallel.id)
    assert dp_result["status"] == "ok" and dp_result["experiment"]["engine_path"].endswith("+dp2")
    assert dp_result["tokens"]["output_tokens"] > 0
    tp = placements[tensor.id]
    assert tp["held_gpus"] == DEVICES and tp["execution"]["launch"] == "tensor_parallel_workers"
    assert [p["gpus"] for p in tp["topology"]["processes"] if p["role"] == "tensor_parallel_rank"] == [
        [d] for d in DEVICES
    ]
    tp_result = _results(workdir, tensor.id)
    assert tp_result["status"] == "ok" and tp_result["experiment"]["engine_path"].endswith("+tp2")
    assert tp_result["load"]["details"]["tensor_parallel"] == 2

    # The single-device jobs ran at once or one after the other (Snakemake's choice); when their windows
    # overlapped, they held different devices and each window says so; the host's energy is not theirs alone.
    a, b = (placements[e.id] for e in single)
    windows = [_results(workdir, e.id)["window"] for e in single]
    overlapped = (
        windows[0]["start_unix_s"] < windows[1]["start_unix_s"] + windows[1]["duration_s"]
        and windows[1]["start_unix_s"] < windows[0]["start_unix_s"] + windows[0]["duration_s"]
    )
    if overlapped:
        assert set(a["held_gpus"]).isdisjoint(b["held_gpus"])
        assert all("host_shared" in _results(workdir, e.id)["validity"]["flags"] for e in single)
        assert all(_results(workdir, e.id)["validity"]["valid"] for e in single)
