"""hardware: CUDA_VISIBLE_DEVICES -> NVML devices, reasons without GPU, provenance facts."""

from __future__ import annotations

import pytest
from llm_energy import hardware

from tests.fake_nvml import LIBRARY_NOT_FOUND, FakeGpu, FakeNvml

UUID0 = "GPU-11111111-aaaa-bbbb-cccc-000000000000"
UUID1 = "GPU-22222222-aaaa-bbbb-cccc-111111111111"
MIG1 = "MIG-33333333-aaaa-bbbb-cccc-222222222222"


@pytest.fixture
def fake_nvml(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = FakeNvml([FakeGpu(UUID0), FakeGpu(UUID1, mig_mode=1, mig_uuids=(MIG1,))])
    hardware.set_nvml_module(fake)
    yield fake
    hardware.set_nvml_module(None)


def test_unset_cuda_visible_devices_means_every_gpu(fake_nvml):
    devices = hardware.visible_gpus()
    assert [(d.index, d.uuid, d.visible_index) for d in devices] == [(0, UUID0, 0), (1, UUID1, 1)]
    assert hardware.gpu_unavailable_reason() is None


@pytest.mark.parametrize("value", ["1", UUID1, UUID1[:12]])
def test_cuda_visible_devices_by_index_uuid_or_prefix(fake_nvml, monkeypatch, value):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    devices = hardware.visible_gpus()
    assert [(d.index, d.uuid, d.visible_index) for d in devices] == [(1, UUID1, 0)]
    assert devices[0].mig_mode_enabled and devices[0].shares_counter


def test_invalid_entry_hides_the_rest_like_cuda(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,7,1")
    assert [d.uuid for d in hardware.visible_gpus()] == [UUID0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,1")  # a repeated device is invalid too
    assert [d.uuid for d in hardware.visible_gpus()] == [UUID1]


def test_empty_cuda_visible_devices_hides_every_gpu(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert hardware.visible_gpus() == []
    assert "CUDA_VISIBLE_DEVICES" in hardware.gpu_unavailable_reason()


def test_mig_instance_is_measured_through_its_parent(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", MIG1)
    (device,) = hardware.visible_gpus()
    assert device.is_mig_instance and device.uuid == MIG1
    assert device.parent_uuid == UUID1 and device.counter_uuid == UUID1 and device.index == 1
    assert fake_nvml.nvmlDeviceGetUUID(device.counter_handle) == UUID1


def test_no_driver_gives_a_reason(monkeypatch):
    hardware.set_nvml_module(FakeNvml([], init_error=LIBRARY_NOT_FOUND))
    try:
        assert hardware.visible_gpus() == []
        assert hardware.gpu_unavailable_reason() == "no NVIDIA driver (NVML library not found)"
        assert hardware.describe_gpus() == []
    finally:
        hardware.set_nvml_module(None)


def test_real_nvml_on_this_machine_reports_why_there_is_no_gpu():
    hardware.set_nvml_module(None)
    devices = hardware.visible_gpus()
    if devices:  # a GPU machine: the real facts must be complete
        facts = hardware.describe_gpus(devices)
        assert facts[0]["uuid"].startswith(("GPU-", "MIG-")) and facts[0]["driver"]
    else:
        assert hardware.gpu_unavailable_reason()


def test_describe_gpus_has_the_provenance_facts(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    (facts,) = hardware.describe_gpus()
    assert facts == {
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": UUID0,
        "index": 0,
        "visible_index": 0,
        "driver": "580.159.04",
        "cuda_driver_version": "13.0",
        "power_limit_w": 700.0,
        "persistence_mode": True,
        "applications_clock_sm_mhz": 1980,
        "applications_clock_mem_mhz": 2619,
        "ecc_enabled": True,
        "mig_mode": False,
        "is_mig_instance": False,
        "parent_uuid": None,
        "temperature_c": 35,
        "memory_total_bytes": 80 * 1024**3,
    }
