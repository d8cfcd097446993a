"""The sampler child process end to end (fake NVML loaded by the child), GPU binding on a
recorded 8-GPU box, the active-idle baseline and its power-state flag, RAPL wraps along the
sampler's raw reads, and no thread in the measured process during a window."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from llm_energy import clock, hardware
from llm_energy.energy import EnergySession, EnergySettings
from llm_energy.energy.rapl import RaplRaw, RaplReader
from llm_energy.energy.sampler import ProcessSampler, SamplerDevice, SamplerSink

from tests.fake_nvml import FAKE_NVML_ENV, FakeGpu, FakeNvml

REPO = Path(__file__).resolve().parents[2]
FAKE_SPEC = "tests.fake_nvml:from_environment"
FAST = {
    "timeline_period_ms": 50,
    "min_counter_updates": 3,
    "counter_timeline_tolerance": 0.15,
    "baseline": {"duration_s": 0.3, "max_age_s": 3600},
}
UUIDS = [f"GPU-{i}{i}{i}{i}-box" for i in range(8)]


@pytest.fixture
def fake_box(monkeypatch):
    """The same recorded GPUs in this process (hardware) and in the child (environment)."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{REPO / 'workflow'}")

    def install(specs: list[dict]) -> FakeNvml:
        monkeypatch.setenv(FAKE_NVML_ENV, json.dumps(specs))
        fake = FakeNvml([FakeGpu(**spec) for spec in specs])
        hardware.set_nvml_module(fake)
        return fake

    yield install
    hardware.set_nvml_module(None)


def process_session(tmp_path: Path, codecarbon_factory=None, **overrides) -> EnergySession:
    settings = EnergySettings.from_config({"codecarbon": codecarbon_factory is not None, **FAST, **overrides})
    return EnergySession(
        settings,
        devices=hardware.visible_gpus(),
        powercap_root=tmp_path / "no-powercap",
        measure_counter_period=False,
        codecarbon_factory=codecarbon_factory,
        sampler="process",
        sampler_nvml_module=FAKE_SPEC,
    )


def test_child_clock_is_the_parents_clock(fake_box):
    fake_box([{"uuid": UUIDS[0], "power_w": 100.0}])
    sink = SamplerSink(lambda rows: None)
    sampler = ProcessSampler(
        [SamplerDevice(0, UUIDS[0], "nvml_field_power_instant")], sink, 0.05, nvml_module=FAKE_SPEC
    )
    before = clock.now()
    sampler.start()
    after = clock.now()
    try:
        # CLOCK_MONOTONIC is one clock for every process: the child's reading lies between ours
        assert before < sampler.hello["clock_s"] < after
        pid = sampler.process.pid
    finally:
        sampler.stop()
    assert sampler.process.returncode == 0 and not sampler.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, no orphan


def test_the_child_stops_at_once_while_a_forked_process_holds_its_stdin_open(fake_box):
    """vLLM forks its engine core from the measured process: the fork inherits the write end of the
    sampler's stdin, so closing the parent's end gives the child no EOF; `stop` must end it anyway."""
    fake_box([{"uuid": UUIDS[0], "power_w": 100.0}])
    sampler = ProcessSampler(
        [SamplerDevice(0, UUIDS[0], "nvml_field_power_instant")],
        SamplerSink(lambda rows: None),
        0.05,
        nvml_module=FAKE_SPEC,
    )
    sampler.start()
    holder = os.fork()
    if holder == 0:  # the "engine core": keeps every inherited descriptor, the pipe too
        time.sleep(30)
        os._exit(0)
    try:
        started = clock.now()
        sampler.stop()
        stopped_in_s = clock.now() - started
    finally:
        os.kill(holder, 9)
        os.waitpid(holder, 0)
    assert sampler.process.returncode == 0  # ended by itself, not killed
    assert stopped_in_s < 2.0


def test_real_child_process_measures_windows_without_any_thread_in_the_parent(fake_box, tmp_path):
    fake_box([{"uuid": UUIDS[0], "power_w": 150.0, "pids": [os.getpid()]}])
    threads_inside: list[list[str]] = []

    class FakeTracker:  # shaped like OfflineEmissionsTracker where CodeCarbonSource touches it
        def __init__(self, **kwargs):
            self._start_time = None
            self._hardware = ["fake CPU model"]
            self._conf = {}
            self.started_at = 0.0

        def start(self):
            self._start_time = self.started_at = clock.now()

        def _measure_power_and_energy(self):
            pass

        @property
        def _total_cpu_energy(self):
            return _Kwh(20.0 * (clock.now() - self.started_at) / 3.6e6)

        _total_ram_energy = _total_cpu_energy
        _total_gpu_energy = _total_cpu_energy

        def stop(self):
            pass

    # Threads an earlier test left behind (e.g. a daemon thread of another library still ending)
    # are not the session's; on their own, only the main thread runs.
    before = {t.name for t in threading.enumerate()}
    with process_session(tmp_path, codecarbon_factory=FakeTracker) as session:
        assert session.sampler.mode == "process" and session.sampler.running
        handle = session.open_window("inference")
        threads_inside.append([t.name for t in threading.enumerate()])
        time.sleep(0.6)
        threads_inside.append([t.name for t in threading.enumerate()])
        record = session.close_window(handle)
        frame = session.timeline_frame()
        child = session.sampler.process
        (timeline_source,) = [s for s in session.describe()["sources"] if s["name"] == "timeline"]
    # The fake's power never changes, so the sensor's own update period cannot be read from it.
    assert "power_update_period_s" in timeline_source and timeline_source["power_update_period_s"] is None
    assert all(set(names) <= before | {"MainThread"} and "MainThread" in names for names in threads_inside), (
        threads_inside,
        before,
    )
    assert child.returncode == 0
    gpu = record["domains"]["gpu"]
    assert gpu["gross_j"] == pytest.approx(150.0 * record["duration_s"], rel=0.05)
    # rows from the child cover the window up to its end (close_window waited for them)
    inside = frame[(frame["time_s"] > record["start_s"]) & (frame["time_s"] < record["end_s"])]
    assert len(inside) >= 6 and frame["time_s"].max() > record["end_s"]
    assert gpu["timeline_j"] == pytest.approx(gpu["gross_j"], rel=0.1)
    assert "foreign_processes" not in record["flags"]
    assert record["domains"]["cpu"]["method"] == "estimated"


class _Kwh:
    def __init__(self, kwh: float):
        self.kWh = kwh


def test_real_codecarbon_runs_no_thread_during_a_window(fake_box, tmp_path):
    pytest.importorskip("codecarbon")
    fake_box([{"uuid": UUIDS[0], "power_w": 120.0}])
    settings = EnergySettings.from_config({**FAST})
    started = time.perf_counter()
    # Threads earlier tests left behind (other libraries' pools) are not this session's.
    before = set(threading.enumerate())
    with EnergySession(
        settings,
        devices=hardware.visible_gpus(),
        powercap_root=tmp_path / "none",
        measure_counter_period=False,
        sampler_nvml_module=FAKE_SPEC,
    ) as session:
        handle = session.open_window("inference")
        alive = set(threading.enumerate()) - before
        time.sleep(0.4)
        alive |= set(threading.enumerate()) - before
        record = session.close_window(handle)
    assert not alive, [t.name for t in alive]
    assert record["domains"]["dram"]["source"] == "codecarbon_estimate"
    assert record["domains"]["dram"]["gross_j"] > 0
    assert time.perf_counter() - started < 20


def test_timeline_off_starts_no_sampler_and_raises_no_timeline_flag(fake_box, tmp_path):
    fake_box([{"uuid": UUIDS[0], "power_w": 100.0}])
    with process_session(tmp_path, timeline=False) as session:
        record = run_window(session, 0.3)
        assert session.sampler is None
        described = session.describe()
    gpu = record["domains"]["gpu"]
    assert gpu["timeline_j"] is None and gpu["timeline_vs_counter_rel_diff"] is None
    assert gpu["timeline_reason"] == "disabled by config (energy.timeline: false)"
    assert not {"timeline_gaps", "timeline_counter_disagree"} & set(record["flags"])
    timeline = next(s for s in described["sources"] if s["name"] == "timeline")
    assert timeline["available"] is False and "energy.timeline" in timeline["reason"]


def run_window(session: EnergySession, seconds: float, name: str = "inference") -> dict:
    handle = session.open_window(name)
    time.sleep(seconds)
    return session.close_window(handle)


def test_eight_gpu_box_with_the_model_on_gpu_3_measures_gpu_3_alone(fake_box, tmp_path):
    specs = [
        {"uuid": u, "power_w": 60.0 + 10 * i, "pids": [os.getpid()] if i == 3 else [999_999]}
        for i, u in enumerate(UUIDS)
    ]
    fake_box(specs)
    with process_session(tmp_path) as session:
        load = session.open_window("model_load")
        time.sleep(0.2)
        bound = session.bind_to_process_gpus()
        load_record = session.close_window(load)
        record = run_window(session, 0.4)
        frame = session.timeline_frame()
        described = session.describe()
    assert bound == [UUIDS[3]]
    for window in (load_record, record):
        gpu = window["domains"]["gpu"]
        assert [d["uuid"] for d in gpu["devices"]] == [UUIDS[3]]
        assert gpu["gross_j"] == pytest.approx(90.0 * window["duration_s"], rel=0.06)
        assert "foreign_processes" not in window["flags"]  # other GPUs' processes are not ours
    assert set(frame["device_uuid"]) == {UUIDS[3]}
    nvml = next(s for s in described["sources"] if s["name"] == "nvml")
    assert [d["uuid"] for d in nvml["devices"]] == [UUIDS[3]]
    assert described["gpu_binding"]["bound"] is True and len(described["gpu_binding"]["candidates"]) == 8


def test_binding_is_a_no_op_with_cuda_visible_devices(fake_box, tmp_path, monkeypatch):
    fake_box([{"uuid": u, "power_w": 50.0} for u in UUIDS[:2]])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with process_session(tmp_path, timeline=False) as session:
        assert session.bind_to_process_gpus() == UUIDS[:2]
        assert session.describe()["gpu_binding"]["method"] == "CUDA_VISIBLE_DEVICES"


def test_active_idle_baseline_gives_net_energy_and_flags_another_power_state(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    state = {"sm_mhz": 1980}
    fake = FakeNvml([FakeGpu(UUIDS[0], power_w=115.0)])
    fake.nvmlDeviceGetClockInfo = lambda handle, kind: state["sm_mhz"] if kind == 1 else 2619
    hardware.set_nvml_module(fake)
    try:
        settings = EnergySettings.from_config({"codecarbon": False, **FAST})
        with EnergySession(
            settings,
            devices=hardware.visible_gpus(),
            sampler="thread",
            powercap_root=tmp_path / "none",
            measure_counter_period=False,
        ) as session:
            session.ensure_baseline()  # static idle (here the same fake power)
            active = session.measure_active_idle(0.4)
            session.use_baseline(active)
            same_state = run_window(session, 0.4)
            state["sm_mhz"] = 1500  # a recorded clock drop: another power state than the baseline
            time.sleep(0.1)
            other_state = run_window(session, 0.4)
            described = session.describe()
    finally:
        hardware.set_nvml_module(None)
    assert active["kind"] == "active_idle" and active["sm_clock_mhz_mean"] == pytest.approx(1980)
    assert active["domains"]["gpu"]["power_w"] == pytest.approx(115.0, rel=0.06)
    # its span on the run's clock (the power timeline shades it), before the windows that follow
    assert active["end_s"] - active["start_s"] == pytest.approx(0.4, abs=0.15)
    assert active["end_s"] <= same_state["start_s"]
    gpu = same_state["domains"]["gpu"]
    assert gpu["baseline_kind"] == "active_idle"
    assert gpu["net_j"] == pytest.approx(
        gpu["gross_j"] - active["domains"]["gpu"]["power_w"] * same_state["duration_s"]
    )
    assert "baseline_power_state_differs" not in same_state["flags"]
    assert "baseline_power_state_differs" in other_state["flags"]
    from llm_energy.energy.validity import FLAG_DESCRIPTIONS, invalidating_flags

    assert "baseline_power_state_differs" in FLAG_DESCRIPTIONS
    assert invalidating_flags(other_state["flags"]) == []
    assert set(same_state["baseline"]) == {"active_idle", "static_idle"}
    assert same_state["baseline"]["static_idle"]["gpu"] == pytest.approx(115.0, rel=0.06)
    assert described["baseline"]["active_idle"] is active


def test_rapl_wraps_are_counted_along_the_samplers_raw_reads(tmp_path):
    zone = tmp_path / "powercap" / "intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text("1000\n")
    (zone / "energy_uj").write_text("100\n")
    reader = RaplReader(tmp_path / "powercap")
    reader.open()
    key = str(zone)
    start, end = RaplRaw(0.0, {key: 100}), RaplRaw(10.0, {key: 300})
    # three wraps in between: 100 -> 900 -> 500 (wrap) -> 950 -> 200 (wrap) -> 300
    between = [RaplRaw(t, {key: v}) for t, v in ((1.0, 900), (2.0, 500), (3.0, 950), (4.0, 200))]
    between.append(RaplRaw(11.0, {key: 0}))  # after the window: ignored
    energy = reader.energy_between(start, end, between)
    assert energy["domains"]["cpu"] * 1e6 == pytest.approx(800 + 600 + 450 + 250 + 100)
    assert reader.energy_between(start, end)["domains"]["cpu"] * 1e6 == pytest.approx(200)
