"""EnergySession on a recorded fake GPU: counter windows, flags, baseline, phases, settings."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from llm_energy import clock, hardware
from llm_energy.artifacts import read_json_artifact, write_json_artifact
from llm_energy.energy import EnergySession, EnergySettings, split_prefill_decode
from llm_energy.errors import ConfigError

from tests.fake_nvml import FakeGpu, FakeNvml

UUID0, UUID1 = "GPU-aaaaaaaa-0000", "GPU-bbbbbbbb-1111"
FAST = {
    "codecarbon": False,
    "timeline_period_ms": 50,
    "min_counter_updates": 3,
    "counter_timeline_tolerance": 0.15,  # a busy 2-core test machine delays edge reads
    "baseline": {"duration_s": 0.3, "max_age_s": 3600},
}


@pytest.fixture
def fake_box(monkeypatch):
    """Install a fake NVML with the given GPUs; CUDA_VISIBLE_DEVICES as given."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def install(*gpus: FakeGpu, visible: str | None = None) -> FakeNvml:
        if visible is not None:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        fake = FakeNvml(list(gpus))
        hardware.set_nvml_module(fake)
        return fake

    yield install
    hardware.set_nvml_module(None)


def session_for(
    tmp_path: Path, baseline_path: Path | None = None, sampler: str = "thread", **overrides
) -> EnergySession:
    settings = EnergySettings.from_config({**FAST, **overrides})
    return EnergySession(
        settings,
        devices=hardware.visible_gpus(),
        baseline_path=baseline_path,
        powercap_root=tmp_path / "no-powercap",
        measure_counter_period=False,
        sampler=sampler,
    )


def run_window(session: EnergySession, seconds: float, name: str = "inference", during=None) -> dict:
    handle = session.open_window(name)
    if during:
        during()
    time.sleep(seconds)
    return session.close_window(handle)


@pytest.mark.parametrize("visible", ["1", UUID1])
def test_only_the_used_gpu_is_counted(fake_box, tmp_path, visible):
    fake_box(FakeGpu(UUID0, power_w=300.0), FakeGpu(UUID1, power_w=100.0), visible=visible)
    with session_for(tmp_path) as session:
        record = run_window(session, 0.5)
        frame = session.timeline_frame()
    gpu = record["domains"]["gpu"]
    assert [d["uuid"] for d in gpu["devices"]] == [UUID1]
    # aligned edges: counter energy = 100 W x the window (5 % allows for a busy test machine
    # delaying a tick's detection; 300 W from the other GPU would be far outside)
    assert gpu["gross_j"] == pytest.approx(100.0 * record["duration_s"], rel=0.05)
    assert gpu["timeline_j"] == pytest.approx(100.0 * record["duration_s"], rel=0.02)
    assert abs(gpu["timeline_vs_counter_rel_diff"]) < 0.05
    assert gpu["baseline_w"] is None and gpu["net_j"] is None and "ensure_baseline" in gpu["baseline_reason"]
    assert record["flags"] == []
    assert set(frame["device_uuid"]) == {UUID1}
    assert record["domains"]["cpu"] == {
        "available": False,
        "reason": f"no RAPL: {tmp_path / 'no-powercap'} is absent; no estimate either: "
        "disabled by config (energy.codecarbon: false)",
    }
    assert record["emissions"]["available"] is False


def test_throttle_flags_from_clock_event_reasons(fake_box, tmp_path):
    state = {"mask": 0x1}
    fake_box(FakeGpu(UUID0, power_w=200.0, reasons=lambda t: state["mask"]))
    with session_for(tmp_path) as session:
        state["mask"] = 0x4  # SW power cap
        power = run_window(session, 0.3)
        state["mask"] = 0x20 | 0x8  # SW thermal + HW slowdown
        thermal = run_window(session, 0.3)
        state["mask"] = 0x8  # HW slowdown alone
        slowdown = run_window(session, 0.3)
        state["mask"] = 0x1
        calm = run_window(session, 0.3)
    assert power["flags"] == ["power_throttled"]
    assert thermal["flags"] == ["thermal_throttled"]
    assert slowdown["flags"] == ["hw_slowdown"]
    assert calm["flags"] == []


def test_power_limit_change_flags_settings_changed(fake_box, tmp_path):
    state = {"limit_w": 700.0}
    fake_box(FakeGpu(UUID0, power_w=200.0, power_limit_w=lambda t: state["limit_w"]))
    with session_for(tmp_path) as session:
        record = run_window(session, 0.3, during=lambda: (time.sleep(0.1), state.update(limit_w=500.0)))
        steady = run_window(session, 0.3)
    assert "gpu_settings_changed" in record["flags"]
    assert "gpu_settings_changed" not in steady["flags"]


def test_short_window_flag(fake_box, tmp_path):
    fake_box(FakeGpu(UUID0, power_w=150.0))
    with session_for(tmp_path, min_counter_updates=20) as session:
        record = run_window(session, 0.3)
    assert record["domains"]["gpu"]["devices"][0]["counter_updates"] < 20
    assert "short_window" in record["flags"]


def test_foreign_processes_flag(fake_box, tmp_path):
    state = {"pids": [os.getpid()]}
    fake_box(FakeGpu(UUID0, power_w=150.0, pids=lambda t: state["pids"]))
    with session_for(tmp_path) as session:
        alone = run_window(session, 0.2)
        state["pids"] = [os.getpid(), 4_000_000]  # a pid that is not ours
        shared = run_window(session, 0.2)
    assert "foreign_processes" not in alone["flags"]
    assert "foreign_processes" in shared["flags"]


def test_timeline_disagreeing_with_the_counter_and_missing_samples(fake_box, tmp_path):
    fake = fake_box(FakeGpu(UUID0, power_w=200.0))
    state = {"scale": 0.5, "fail_until": 0.0}
    # the sensor reads half the counter's power, then fails for a while (lost samples)
    fake.power_filter = lambda watts: None if clock.now() < state["fail_until"] else watts * state["scale"]
    with session_for(tmp_path) as session:
        low = run_window(session, 0.3)
        state["scale"] = 1.0
        time.sleep(0.1)  # samples at the new scale before the window
        handle = session.open_window("gappy")
        time.sleep(0.05)
        state["fail_until"] = clock.now() + 0.25  # 0.25 s of failed power reads in the window
        time.sleep(0.45)
        gappy = session.close_window(handle)
    assert low["domains"]["gpu"]["timeline_vs_counter_rel_diff"] == pytest.approx(-0.5, abs=0.05)
    assert "timeline_counter_disagree" in low["flags"]
    assert "timeline_gaps" in gappy["flags"]
    # the integral bridges the gap linearly: constant power is still integrated exactly
    assert gappy["domains"]["gpu"]["timeline_j"] == pytest.approx(200.0 * gappy["duration_s"], rel=0.01)


def test_mig_instance_flags_the_shared_counter(fake_box, tmp_path):
    fake_box(FakeGpu(UUID0, power_w=120.0, mig_mode=1, mig_uuids=("MIG-x",)), visible="MIG-x")
    with session_for(tmp_path) as session:
        record = run_window(session, 0.3)
    gpu = record["domains"]["gpu"]
    assert "mig_shared_counter" in record["flags"]
    assert gpu["devices"][0]["uuid"] == UUID0 and "MIG-x" in gpu["note"]


def test_baseline_is_measured_saved_reused_and_remeasured_when_stale(fake_box, tmp_path):
    fake_box(FakeGpu(UUID0, power_w=70.0))
    path = tmp_path / "baseline.json"
    with session_for(tmp_path, baseline_path=path) as session:
        first = session.ensure_baseline()
        record = run_window(session, 0.4)
    assert first["reused"] is False and path.is_file()
    assert first["domains"]["gpu"]["power_w"] == pytest.approx(70.0, rel=0.05)
    assert first["domains"]["cpu"]["available"] is False
    gpu = record["domains"]["gpu"]
    assert gpu["baseline_w"] == pytest.approx(70.0, rel=0.05)
    assert gpu["net_j"] == pytest.approx(gpu["gross_j"] - gpu["baseline_w"] * record["duration_s"])
    assert abs(gpu["net_j"]) < 0.08 * gpu["gross_j"]  # idle work: net ~ 0

    stored = path.read_bytes()
    with session_for(tmp_path, baseline_path=path) as session:
        again = session.ensure_baseline()
    assert again["reused"] is True and path.read_bytes() == stored

    document = read_json_artifact(path, "idle_baseline")
    stale = {**document["data"], "measured_unix_s": time.time() - 7200}
    write_json_artifact(path, "idle_baseline", stale, document["provenance"])
    with session_for(tmp_path, baseline_path=path) as session:
        fresh = session.ensure_baseline()
    assert fresh["reused"] is False and fresh["measured_unix_s"] > time.time() - 60

    other_gpus = {**fresh, "gpu_uuids": ["GPU-somewhere-else"]}
    other_gpus.pop("reused"), other_gpus.pop("path")
    write_json_artifact(path, "idle_baseline", other_gpus, document["provenance"])
    with session_for(tmp_path, baseline_path=path) as session:
        assert session.ensure_baseline()["reused"] is False


def test_prefill_decode_split_by_power_share(fake_box, tmp_path):
    # recorded profile: 400 W during a 0.3 s prefill burst, 100 W otherwise
    fake = fake_box(FakeGpu(UUID0, power_w=lambda t: 400.0 if 0.3 <= t < 0.6 else 100.0))
    with session_for(tmp_path) as session:
        handle = session.open_window("inference")
        time.sleep(max(0.0, fake.t0 + 1.1 - clock.now()))
        record = session.close_window(handle)
        frame = session.timeline_frame()
    span = (fake.t0 + 0.3, fake.t0 + 0.6)
    split = split_prefill_decode(frame, record, [span, (span[0] + 0.1, span[1] - 0.1)])
    gross = record["domains"]["gpu"]["gross_j"]
    assert split["available"] and split["prefill_j"] + split["decode_j"] == pytest.approx(gross)
    inside = 400.0 * 0.3
    outside = 100.0 * (record["end_s"] - record["start_s"] - 0.3)
    assert split["prefill_share"] == pytest.approx(inside / (inside + outside), abs=0.04)
    assert split["prefill_time_s"] == pytest.approx(0.3)
    assert "power" in split["method"]


def test_codecarbon_failure_leaves_the_run_complete(fake_box, tmp_path):
    fake_box(FakeGpu(UUID0, power_w=100.0))

    def broken_tracker(**kwargs):
        raise RuntimeError("no energy mix data")

    settings = EnergySettings.from_config({**FAST, "codecarbon": True})
    with EnergySession(
        settings,
        devices=hardware.visible_gpus(),
        powercap_root=tmp_path / "none",
        codecarbon_factory=broken_tracker,
        sampler="thread",
        measure_counter_period=False,
    ) as session:
        record = run_window(session, 0.2)
        described = session.describe()
    assert record["domains"]["gpu"]["available"] is True
    emissions = record["emissions"]
    assert emissions["available"] is False and emissions["kg_co2eq"] is None
    assert "no energy mix data" in emissions["reason"]
    assert "no energy mix data" in record["domains"]["dram"]["reason"]
    codecarbon = next(s for s in described["sources"] if s["name"] == "codecarbon")
    assert codecarbon["available"] is False and "RuntimeError" in codecarbon["reason"]


def test_gpu_disabled_by_config(fake_box, tmp_path):
    fake_box(FakeGpu(UUID0))
    with session_for(tmp_path, gpu=False) as session:
        record = run_window(session, 0.05)
        assert session.timeline_frame().empty
    assert record["domains"]["gpu"] == {"available": False, "reason": "disabled by config (energy.gpu: false)"}


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"pue": 0.9}, "energy.pue"),
        ({"country_iso_code": "France"}, "energy.country_iso_code"),
        ({"timeline_period_ms": 1}, "energy.timeline_period_ms"),
        ({"baseline": {"duration_s": -1}}, "energy.baseline.duration_s"),
        ({"rapl": "yes"}, "energy.rapl"),
        ({"sampling": 1}, "energy.sampling"),
        # One behaviour with the config schema: upper-case codes only, at least one counter update.
        ({"country_iso_code": "deu"}, "energy.country_iso_code"),
        ({"min_counter_updates": 0}, "energy.min_counter_updates"),
    ],
)
def test_settings_errors_name_the_key(cfg, key):
    with pytest.raises(ConfigError) as error:
        EnergySettings.from_config(cfg)
    assert error.value.key == key and error.value.fix


def test_settings_defaults_and_values():
    settings = EnergySettings.from_config({"country_iso_code": "DEU", "pue": 1.2, "baseline": {"duration_s": 5}})
    assert settings.country_iso_code == "DEU" and settings.pue == 1.2
    assert settings.baseline.duration_s == 5.0 and settings.baseline.max_age_s == 3600.0
    assert settings.timeline_period_s == 0.1 and settings.min_counter_updates == 20


def test_busy_gpu_during_baseline_is_flagged(fake_box, tmp_path):
    fake_box(FakeGpu(UUID0, power_w=300.0, utilization_pct=60.0))
    with session_for(tmp_path) as session:
        baseline = session.ensure_baseline()
    assert "gpu_not_idle" in baseline["flags"] and baseline["path"] is None
    assert session.describe()["flag_descriptions"]["gpu_not_idle"]
    with pytest.raises(RuntimeError, match="stopped"):
        session.open_window("late")


def test_zero_baseline_duration_skips_the_baseline_with_a_reason(fake_box, tmp_path):
    fake_box(FakeGpu(UUID0, power_w=90.0))
    with session_for(tmp_path, baseline={"duration_s": 0}) as session:
        skipped = session.ensure_baseline()
        record = run_window(session, 0.2)
    assert skipped["skipped"] is True
    gpu = record["domains"]["gpu"]
    assert gpu["net_j"] is None and "duration_s: 0" in gpu["baseline_reason"]


def test_operating_conditions_do_not_invalidate_a_window():
    from llm_energy.energy.validity import invalidating_flags

    assert invalidating_flags(["power_throttled", "thermal_throttled"]) == []
    assert invalidating_flags(["power_throttled", "short_window", "foreign_processes"]) == [
        "foreign_processes",
        "short_window",
    ]
