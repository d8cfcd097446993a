"""The raw run artifacts a few figures need beside the summary: a cycle's result, power timeline and
per-request table (results/runs/{experiment}/cycle-{n}/). An archived tree may lack them (only
experiments/ copied): the figures then say so instead of failing."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from llm_energy import artifacts
from llm_energy.errors import ArtifactError

log = logging.getLogger(__name__)

LATENCY_COLUMNS = ("ttft_s", "tpot_s", "e2e_s")
TIMELINE_COLUMNS = ("time_s", "device_index", "power_w", "sm_clock_mhz", "temperature_c")
SPAN_COLUMNS = ("submitted_s", "first_token_s", "finished_s")


@dataclass(frozen=True)
class CycleRun:
    """One measured cycle: its result's data, its timeline (GPU samples) and its requests."""

    cycle: int
    result: dict[str, Any]
    timeline: pd.DataFrame
    requests: pd.DataFrame


def cycle_statuses(experiment_dir: Path) -> dict[int, str]:
    """{cycle: status} from the run set (cycles.json), else from each cycle's result.json."""
    run_set = experiment_dir / "cycles.json"
    if run_set.is_file():
        entries = artifacts.read_json_artifact(run_set, "run_set")["data"]["cycles"]
        return {int(e["cycle"]): str(e["status"]) for e in entries}
    statuses = {}
    for result in sorted(experiment_dir.glob("cycle-*/result.json")):
        try:
            statuses[int(result.parent.name.removeprefix("cycle-"))] = artifacts.read_json_artifact(
                result, "run_result"
            )["data"]["status"]
        except (ArtifactError, ValueError) as exc:
            log.warning("%s unreadable: %s", result, exc)
    return statuses


def first_cycle(
    runs_dir: Path | str | None, experiment_id: str, with_requests: bool = True
) -> tuple[CycleRun | None, str]:
    """The experiment's first successful cycle (cycle 1 unless it failed), or None and why. Only the
    timeline columns the figures draw are read; the requests' spans unless with_requests is False."""
    if runs_dir is None:
        return None, "no runs directory given"
    experiment_dir = Path(runs_dir) / experiment_id
    if not experiment_dir.is_dir():
        return None, f"no raw runs archived ({experiment_dir} absent)"
    statuses = cycle_statuses(experiment_dir)
    ok = sorted(c for c, s in statuses.items() if s == "ok")
    if not ok:
        return None, "no successful cycle"
    cycle = ok[0]
    directory = experiment_dir / f"cycle-{cycle}"
    try:
        result = artifacts.read_json_artifact(directory / "result.json", "run_result")["data"]
        timeline, _ = artifacts.read_table_artifact(
            directory / "timeline.parquet", "timeline_table", columns=TIMELINE_COLUMNS
        )
        requests = pd.DataFrame(columns=list(SPAN_COLUMNS))
        if with_requests:
            requests, _ = artifacts.read_table_artifact(
                directory / "requests.parquet", "requests_table", columns=SPAN_COLUMNS
            )
    except ArtifactError as exc:
        return None, str(exc)
    return CycleRun(cycle, result, timeline, requests), ""


def pooled_requests(
    runs_dir: Path | str | None, experiment_ids: Iterable[str], columns: Sequence[str] = LATENCY_COLUMNS
) -> tuple[pd.DataFrame, list[str]]:
    """Every request of every successful cycle, `columns` plus experiment_id; and the experiments
    without per-request data (no runs archived, or no successful cycle)."""
    paths, owners, missing = [], [], []
    for experiment_id in experiment_ids:
        experiment_dir = Path(runs_dir) / experiment_id if runs_dir is not None else None
        found = []
        if experiment_dir is not None and experiment_dir.is_dir():
            found = [
                experiment_dir / f"cycle-{cycle}" / "requests.parquet"
                for cycle, status in sorted(cycle_statuses(experiment_dir).items())
                if status == "ok"
            ]
            found = [path for path in found if path.is_file()]
        if not found:
            missing.append(experiment_id)
        paths += found
        owners += [experiment_id] * len(found)
    pooled = artifacts.read_table_artifacts(paths, "requests_table", list(columns), "experiment_id", owners)
    return pooled, missing
