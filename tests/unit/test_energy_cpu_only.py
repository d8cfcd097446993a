"""The real path on this machine: real NVML probe, real /sys/class/powercap, real CodeCarbon.

On the build machines there is no GPU and no RAPL: the session must still complete, report both as
unavailable with their reasons, fill cpu/dram with CodeCarbon's estimate and give emissions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from llm_energy import hardware
from llm_energy.artifacts import read_json_artifact
from llm_energy.energy import (
    TIMELINE_COLUMNS,
    EnergySession,
    EnergySettings,
    split_prefill_decode,
)


def busy(seconds: float) -> int:
    """Some CPU work so that the load-based estimate has something to see."""
    deadline, total = time.perf_counter() + seconds, 0
    while time.perf_counter() < deadline:
        total += sum(i * i for i in range(2000))
    return total


def test_cpu_only_session_completes_with_reasons_and_estimates(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CODECARBON_LOG_LEVEL", "error")
    started = time.perf_counter()
    hardware.set_nvml_module(None)
    devices = hardware.visible_gpus()
    settings = EnergySettings.from_config(
        {
            "country_iso_code": "FRA",
            "pue": 1.2,
            "baseline": {"duration_s": 0.5, "max_age_s": 3600},
        }
    )
    baseline_path = tmp_path / "idle_baseline.json"
    session = EnergySession(settings, devices=devices, baseline_path=baseline_path)
    session.start()
    try:
        baseline = session.ensure_baseline()
        handle = session.open_window("inference")
        busy(0.6)
        record = session.close_window(handle)
        frame = session.timeline_frame()
        described = session.describe()
    finally:
        session.stop()
    elapsed = time.perf_counter() - started

    json.dumps(record, allow_nan=False)  # JSON-able, no NaN
    assert set(record) == {"name", "start_s", "end_s", "duration_s", "domains", "emissions", "baseline", "flags"}
    assert record["duration_s"] == pytest.approx(record["end_s"] - record["start_s"])
    assert record["duration_s"] >= 0.6

    if not devices:
        assert record["domains"]["gpu"] == {"available": False, "reason": hardware.gpu_unavailable_reason()}
        assert len(frame) == 0 and list(frame.columns) == list(TIMELINE_COLUMNS)
        split = split_prefill_decode(frame, record, [(record["start_s"], record["end_s"])])
        assert split["available"] is False and split["reason"]

    if not Path("/sys/class/powercap").exists():
        for domain in ("cpu", "dram"):
            entry = record["domains"][domain]
            assert entry["available"] is True
            assert entry["source"] == "codecarbon_estimate" and entry["method"] == "estimated"
            assert entry["gross_j"] > 0
            assert "no RAPL: /sys/class/powercap is absent" in entry["note"]
            assert entry["baseline_w"] > 0
            assert entry["net_j"] == pytest.approx(entry["gross_j"] - entry["baseline_w"] * record["duration_s"])
        # RAM is a constant-power model: its window energy is that power x the window
        dram = record["domains"]["dram"]
        assert dram["gross_j"] / record["duration_s"] == pytest.approx(dram["baseline_w"], rel=0.1)

    emissions = record["emissions"]
    assert emissions["available"] is True and emissions["reason"] is None
    assert emissions["source"] == "codecarbon_offline" and emissions["country_iso_code"] == "FRA"
    total_j = sum(d["gross_j"] for d in record["domains"].values() if d["available"])
    codecarbon = next(s for s in described["sources"] if s["name"] == "codecarbon")
    intensity_kg_per_j = codecarbon["carbon_intensity_g_per_kwh"] / 1000 / 3.6e6
    assert emissions["kg_co2eq"] == pytest.approx(total_j * 1.2 * intensity_kg_per_j, rel=1e-3)
    assert 10 < codecarbon["carbon_intensity_g_per_kwh"] < 200  # France's grid is low-carbon

    assert baseline["reused"] is False
    stored = read_json_artifact(baseline_path, "idle_baseline")
    assert stored["data"]["domains"]["cpu"]["source"] in ("codecarbon_estimate", "rapl")
    names = {s["name"]: s for s in described["sources"]}
    assert set(names) == {"nvml", "rapl", "codecarbon", "timeline"}
    assert all(s["available"] or s["reason"] for s in described["sources"])
    assert elapsed < 15
