"""NVML counter source on recorded sequences: edges, alignment, update period, MIG, support."""

from __future__ import annotations

import pytest
from llm_energy import hardware
from llm_energy.energy.nvml import NvmlEnergySource, counter_devices

from tests.fake_nvml import FakeGpu, FakeNvml

UUID0, UUID1 = "GPU-0000", "GPU-1111"


@pytest.fixture
def use_fake(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def install(*gpus: FakeGpu, **kwargs) -> FakeNvml:
        fake = FakeNvml(list(gpus), **kwargs)
        hardware.set_nvml_module(fake)
        return fake

    yield install
    hardware.set_nvml_module(None)


def test_aligned_edge_waits_for_the_counter_to_tick(use_fake):
    # recorded reads: the start() check, then 1000 three times, then the tick to 1100
    fake = use_fake(FakeGpu(UUID0, counter_mj=[1000, 1000, 1000, 1000, 1100, 1100, 1200]))
    source = NvmlEnergySource(fake, hardware.visible_gpus())
    source.start(measure_period=False)
    edge = source.read_edge(align=True)
    assert edge.aligned is True and edge.counters_mj == {UUID0: 1100}


def test_unaligned_edge_gives_up_after_the_timeout(use_fake):
    fake = use_fake(FakeGpu(UUID0, counter_mj=[500]))  # a counter that never moves
    source = NvmlEnergySource(fake, hardware.visible_gpus())
    source.start(measure_period=False)
    edge = source.read_edge(align=True, timeout_s=0.05)
    assert edge.aligned is False and 0.05 <= edge.wait_s < 0.2
    assert source.read_edge(align=False).aligned is None


def test_only_the_used_gpu_is_read(use_fake, monkeypatch):
    fake = use_fake(FakeGpu(UUID0, counter_mj=[10_000, 90_000]), FakeGpu(UUID1, counter_mj=[1_000, 1_000, 3_500]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", UUID1)
    source = NvmlEnergySource(fake, hardware.visible_gpus())
    source.start(measure_period=False)  # reads 1_000 (support check)
    start, end = source.read_edge(align=False), source.read_edge(align=False)
    assert list(start.counters_mj) == [UUID1]
    assert (end.counters_mj[UUID1] - start.counters_mj[UUID1]) / 1000.0 == pytest.approx(2.5)
    assert fake.gpus[0]._reads == 0  # the idle neighbour's counter is never touched


def test_update_period_is_measured_from_counter_ticks(use_fake):
    fake = use_fake(FakeGpu(UUID0, power_w=300.0, update_period_s=0.05))
    source = NvmlEnergySource(fake, hardware.visible_gpus())
    source.start(measure_period=True)
    assert source.update_period_measured
    assert source.period_s == pytest.approx(0.05, abs=0.005)


def test_gpu_without_energy_counter_is_unavailable_with_reason(use_fake):
    fake = use_fake(FakeGpu(UUID0, name="Tesla P100", energy_supported=False))
    source = NvmlEnergySource(fake, hardware.visible_gpus())
    source.start()
    assert not source.status.available
    assert "Tesla P100" in source.status.reason and "Volta or newer" in source.status.reason


def test_two_mig_instances_of_one_gpu_share_one_counter(use_fake, monkeypatch):
    use_fake(FakeGpu(UUID0, mig_mode=1, mig_uuids=("MIG-a", "MIG-b")))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-a,MIG-b")
    (counter,) = counter_devices(hardware.visible_gpus())
    assert counter.uuid == UUID0 and counter.mig_instances == ("MIG-a", "MIG-b")
    assert counter.shares_counter


def test_samples_skip_unsupported_queries_after_the_first_failure(use_fake):
    fake = use_fake(FakeGpu(UUID0))
    fake.nvmlDeviceGetUtilizationRates = _not_supported(fake)
    source = NvmlEnergySource(fake, hardware.visible_gpus())
    source.start(measure_period=False)
    for _ in range(3):
        (row,) = source.sample(include_counter=False)
    assert row[8] != row[8]  # NaN utilisation
    assert fake.calls["unsupported"] == 1


def _not_supported(fake: FakeNvml):
    def query(handle):
        fake.calls["unsupported"] = fake.calls.get("unsupported", 0) + 1
        raise fake.NVMLError(fake.NVML_ERROR_NOT_SUPPORTED)

    return query


@pytest.mark.parametrize("instant, method", [(True, "nvml_field_power_instant"), (False, "nvmlDeviceGetPowerUsage")])
def test_timeline_power_prefers_the_instant_field(use_fake, instant, method):
    # nvmlDeviceGetPowerUsage is a ~1 s average on Ampere and newer; the instant field is not
    fake = use_fake(FakeGpu(UUID0, power_w=250.0, instant_power=instant))
    source = NvmlEnergySource(fake, hardware.visible_gpus())
    source.start(measure_period=False)
    (row,) = source.sample(include_counter=True)
    assert source.status.details["timeline_power"] == [method]
    assert row[3] == pytest.approx(250.0) and row[4] == pytest.approx(5_000.0, abs=100)
    used = "nvmlDeviceGetFieldValues" if instant else "nvmlDeviceGetPowerUsage"
    assert fake.calls.get(used, 0) >= 1
    if instant:
        assert "nvmlDeviceGetPowerUsage" not in fake.calls
