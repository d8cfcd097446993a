"""campaign.cycle_isolation: process measures each cycle in a fresh process (the real snakemake)."""

from __future__ import annotations

import copy
from pathlib import Path

from llm_energy import artifacts
from llm_energy.config import load_campaign

from tests.workflow.helpers import copy_workflow, run_campaign
from tests.workflow.test_resume import CAMPAIGN


def test_each_cycle_loads_and_warms_up_in_its_own_process(tmp_path: Path) -> None:
    config = copy.deepcopy(CAMPAIGN)
    config["campaign"].update(cycles=2, cycle_isolation="process", min_window_s=0.3)
    workdir = copy_workflow(tmp_path / "isolated")
    summary = run_campaign(workdir, config, label="cycle_isolation: process")
    (experiment_id,) = load_campaign(config).experiments
    runs = workdir / "results" / "runs" / experiment_id
    run_set = artifacts.read_json_artifact(runs / "cycles.json", "run_set")["data"]
    assert run_set["cycle_isolation"] == "process"
    assert run_set["timing"]["processes"] == 2  # one measuring process per cycle
    loads = []
    for cycle in (1, 2):
        data = artifacts.read_json_artifact(runs / f"cycle-{cycle}" / "result.json", "run_result")["data"]
        assert data["status"] == "ok"
        load = next(w for w in data["setup"]["windows"] if w["name"] == "model_load")
        loads.append(load["start_s"])
    assert loads[0] != loads[1]  # each cycle loaded the model itself
    assert summary["cycles_ok"].tolist() == [2]
