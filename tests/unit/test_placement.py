"""Which GPUs a run_inference job is given (llm_energy.placement), the host_shared flag of windows that
overlap other jobs (llm_energy.energy.host_share), the refusals before any job, and the topology record
(llm_energy.topology) from a recorded `nvidia-smi topo -m`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from llm_energy import gpu_allocation, hardware, placement, topology
from llm_energy.backends import backend_class
from llm_energy.config import load_campaign
from llm_energy.energy.host_share import FLAG_HOST_SHARED, HostShareWatch
from llm_energy.energy.validity import flag_effect, invalidating_flags
from llm_energy.errors import ConfigError
from llm_energy.metrics import energy_metrics

from tests.fake_nvml import FakeGpu, FakeNvml

UUIDS = ["GPU-00000000-aaaa", "GPU-11111111-bbbb", "GPU-22222222-cccc", "GPU-33333333-dddd"]

# Recorded on a 4-GPU NVLink box (driver 550); the NUMA column is padded with an empty cell.
TOPO_4_GPUS = (
    "\tGPU0\tGPU1\tGPU2\tGPU3\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\n"
    "GPU0\t X \tNV18\tNV18\tNV18\tPXB\t0-55,112-167\t0\t\tN/A\n"
    "GPU1\tNV18\t X \tNV18\tNV18\tSYS\t0-55,112-167\t0\t\tN/A\n"
    "GPU2\tNV18\tNV18\t X \tNV18\tSYS\t56-111,168-223\t1\t\tN/A\n"
    "GPU3\tNV18\tNV18\tNV18\t X \tSYS\t56-111,168-223\t1\t\tN/A\n"
    "NIC0\tPXB\tSYS\tSYS\tSYS\t X \t\t\t\t\n"
    "\nLegend:\n\n  X    = Self\n  SYS  = Connection traversing PCIe as well as the SMP interconnect\n"
    "  NV#  = Connection traversing a bonded set of # NVLinks\n\nNIC Legend:\n\n  NIC0: mlx5_0\n"
)
# Recorded on a 2-GPU PCIe workstation.
TOPO_PCIE = (
    "\tGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\n"
    "GPU0\t X \tSYS\t0-15\t0\t\tN/A\n"
    "GPU1\tSYS\t X \t0-15\t0\t\tN/A\n\nLegend:\n\n  X    = Self\n"
)


def _campaign(**settings) -> dict:
    return load_campaign(
        {
            "models": {"m": {"source": "builtin"}},
            "datasets": {"d": {"source": "bundled"}},
            "backends": ["pytorch"],
            "grid": {"batch_size": [1, 2]},
            "backend_settings": {"pytorch": settings},
        }
    )


def _spec(tmp_path: Path, **values) -> placement.GpuJobsSpec:
    return placement.GpuJobsSpec.of({"lock_dir": str(tmp_path / "locks"), **values})


@pytest.fixture(autouse=True)
def job_environment():
    """Each test starts, and leaves, CUDA_VISIBLE_DEVICES unset (as snakemake starts a job)."""
    before = os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    yield
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    if before is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = before


@pytest.fixture
def four_gpus():
    hardware.set_nvml_module(FakeNvml([FakeGpu(u) for u in UUIDS]))
    yield hardware.visible_gpus()
    hardware.set_nvml_module(None)


def test_defaults_and_ids_unchanged() -> None:
    campaign = _campaign()
    assert campaign.config["campaign"]["gpus"] == {
        "devices": None,
        "jobs": "parallel",
        "wait_s": 600,
        "lock_dir": "/tmp/llm-energy-gpu-locks",
    }
    # data_parallel: 1 (the default) leaves the ids as they were before the key existed
    assert list(campaign.experiments) == list(
        _campaign(data_parallel=1, tensor_parallel=1, data_parallel_timeout_s=5).experiments
    )
    assert set(campaign.experiments).isdisjoint(_campaign(data_parallel=2).experiments)


def test_box_gpus_resolve_indices_and_uuid_prefixes(four_gpus, tmp_path: Path) -> None:
    assert placement.box_gpus(_spec(tmp_path)) == UUIDS
    assert placement.box_gpus(_spec(tmp_path, devices=[2, "GPU-0000"])) == [UUIDS[2], UUIDS[0]]
    with pytest.raises(ConfigError, match=r"campaign\.gpus\.devices\[1\].*matches no GPU"):
        placement.box_gpus(_spec(tmp_path, devices=[0, 7]))
    with pytest.raises(ConfigError, match=r"campaign\.gpus\.devices\[1\].*listed before"):
        placement.box_gpus(_spec(tmp_path, devices=[1, UUIDS[1]]))


def test_without_nvml_the_configured_entries_are_taken_as_written(tmp_path: Path) -> None:
    assert placement.box_gpus(_spec(tmp_path, devices=["fake0", "fake1"]), devices=[]) == ["fake0", "fake1"]
    assert placement.box_gpus(_spec(tmp_path), devices=[]) == []


def test_gpu_slots_follow_the_declaration_and_the_mode(tmp_path: Path) -> None:
    pytorch = backend_class("pytorch")
    one, two = pytorch.execution({}), pytorch.execution({"data_parallel": 2})
    attached = backend_class("openai_server").execution({"server": {"url": "http://127.0.0.1:8000"}})
    parallel, exclusive = _spec(tmp_path), _spec(tmp_path, jobs="exclusive")
    assert placement.gpu_capacity(0) == 1 and placement.gpu_capacity(8) == 8
    assert [placement.job_gpu_slots(e, 0, parallel) for e in (one, two, attached)] == [1, 1, 1]  # CPU: one at a time
    assert [placement.job_gpu_slots(e, 8, parallel) for e in (one, two, attached)] == [1, 2, 8]
    assert [placement.job_gpu_slots(e, 8, exclusive) for e in (one, two)] == [8, 8]


def test_a_job_claims_its_gpus_share_of_the_cores() -> None:
    # An 8-GPU box with 128 cores: a one-GPU job takes 16, so Snakemake can run eight side by side.
    assert placement.job_threads(128, 1, 8) == 16
    assert placement.job_threads(128, 2, 8) == 32
    assert placement.job_threads(128, 8, 8) == 128  # the whole box (or exclusive mode): every core
    assert placement.job_threads(2, 1, 0) == 2 and placement.job_threads(2, 1, 1) == 2
    assert placement.job_threads(2, 1, 4) == 1  # never zero


def test_an_experiment_needing_more_gpus_than_the_box_is_refused(tmp_path: Path) -> None:
    campaign = _campaign(data_parallel=4)
    placement.check_fits(campaign.experiments, 0, _spec(tmp_path))  # no GPU: the replicas share the CPU
    placement.check_fits(campaign.experiments, 4, _spec(tmp_path))
    with pytest.raises(ConfigError, match=r"backend_settings\.pytorch\.data_parallel.*needs 4 GPUs.*has 2"):
        placement.check_fits(campaign.experiments, 2, _spec(tmp_path))


def test_a_parallelism_the_backend_does_not_declare_is_refused_before_any_job() -> None:
    with pytest.raises(
        ConfigError,
        match=r"backend_settings\.vllm\.extra_engine_args\.data_parallel_size.*does not "
        r"support.*backends with data parallel: pytorch",
    ):
        load_campaign(
            {
                "models": {"m": {"source": "builtin"}},
                "datasets": {"d": {"source": "bundled"}},
                "backends": ["vllm"],
                "backend_settings": {"vllm": {"extra_engine_args": {"data_parallel_size": 2}}},
            }
        )
    with pytest.raises(ConfigError, match=r"backend_settings\.pytorch\.data_parallel.*device_map"):
        backend_class("pytorch").check_settings({"data_parallel": 2, "device_map": "auto"})


def test_declarations() -> None:
    pytorch, vllm = backend_class("pytorch"), backend_class("vllm")
    assert pytorch.execution({}).launch == "in_process"
    assert pytorch.execution({"data_parallel": 3}).describe()["launch"] == "data_parallel_workers"
    tp = pytorch.execution({"tensor_parallel": 2})
    assert (tp.launch, tp.gpus, tp.keys["tensor_parallel"]) == ("tensor_parallel_workers", 2, "tensor_parallel")
    with pytest.raises(ConfigError, match=r"backend_settings\.pytorch\.tensor_parallel.*alone"):
        pytorch.check_settings({"tensor_parallel": 2, "data_parallel": 2})
    vllm_tp = vllm.execution({"tensor_parallel_size": 2, "pipeline_parallel_size": 2})
    assert (vllm_tp.launch, vllm_tp.harness_may_init_cuda, vllm_tp.gpus) == ("engine_processes", False, 4)
    assert backend_class("openai_server").execution({"server": {"command": "x"}}).whole_box is False


def test_two_jobs_get_disjoint_gpus_and_a_third_waits_then_fails_naming_the_key(four_gpus, tmp_path: Path) -> None:
    first, second = _campaign().experiments.values()
    spec = {"lock_dir": str(tmp_path / "locks"), "devices": [0, 1], "wait_s": 0}
    with placement.placed(first, spec) as a:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == UUIDS[0] == a.cuda_visible_devices
        # The next job is a process of its own, started with snakemake's environment.
        os.environ.pop("CUDA_VISIBLE_DEVICES")
        with placement.placed(second, spec) as b:
            assert b.visible == [UUIDS[1]] and os.environ["CUDA_VISIBLE_DEVICES"] == UUIDS[1]
            assert gpu_allocation.holder_of(tmp_path / "locks", UUIDS[0])["holder"] == first.id
            os.environ.pop("CUDA_VISIBLE_DEVICES")
            with pytest.raises(ConfigError, match=r"campaign\.gpus\.wait_s.*fewer were free"):
                with placement.placed(first, spec):
                    pass
        assert "CUDA_VISIBLE_DEVICES" not in os.environ  # restored as the job found it
        assert a.watches_host_sharing and a.describe()["held_gpus"] == [UUIDS[0]]
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert gpu_allocation.holder_of(tmp_path / "locks", UUIDS[0]) is None


def test_exclusive_holds_every_gpu_and_uses_what_it_needs(four_gpus, tmp_path: Path) -> None:
    experiment = next(iter(_campaign().experiments.values()))
    with placement.placed(experiment, {"lock_dir": str(tmp_path / "locks"), "jobs": "exclusive"}) as placed:
        assert placed.held == UUIDS and placed.visible == [UUIDS[0]]
        assert not placed.watches_host_sharing


def test_one_gpu_box_keeps_the_environment_as_it_was(tmp_path: Path) -> None:
    hardware.set_nvml_module(FakeNvml([FakeGpu(UUIDS[0])]))
    try:
        experiment = next(iter(_campaign().experiments.values()))
        with placement.placed(experiment, {"lock_dir": str(tmp_path / "locks")}) as placed:
            assert placed.held == [UUIDS[0]] and placed.cuda_visible_devices is None
            assert "CUDA_VISIBLE_DEVICES" not in os.environ
            assert gpu_allocation.holder_of(tmp_path / "locks", UUIDS[0]) is not None  # still locked
    finally:
        hardware.set_nvml_module(None)


def test_no_gpu_allocates_nothing(tmp_path: Path) -> None:
    hardware.set_nvml_module(FakeNvml([]))
    try:
        experiment = next(iter(_campaign().experiments.values()))
        with placement.placed(experiment, {"lock_dir": str(tmp_path / "locks")}) as placed:
            assert placed.held == [] and placed.reason and not placed.watches_host_sharing
        assert not (tmp_path / "locks").exists()
    finally:
        hardware.set_nvml_module(None)


# -- host_shared ---------------------------------------------------------------------------------


def _window() -> dict:
    return {
        "duration_s": 1.0,
        "flags": [],
        "domains": {
            "gpu": {"available": True, "gross_j": 100.0, "net_j": 50.0, "method": "measured", "source": "nvml"},
            "cpu": {"available": True, "gross_j": 30.0, "net_j": 10.0, "method": "measured", "source": "rapl"},
            "dram": {"available": True, "gross_j": 5.0, "net_j": 1.0, "method": "measured", "source": "rapl"},
        },
    }


def _hold_in_other_process(lock_dir: Path, uuid: str, seconds: float) -> subprocess.Popen:
    code = (
        "import sys, time; from pathlib import Path; from llm_energy import gpu_allocation as g; "
        f"lease = g.acquire([{uuid!r}], 1, Path({str(lock_dir)!r}), holder='other-experiment'); "
        f"print('held', flush=True); time.sleep({seconds})"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_window_alone_on_the_box_is_not_shared(tmp_path: Path) -> None:
    watch = HostShareWatch(tmp_path, UUIDS[:2], [UUIDS[0]])
    watch.open()
    record = watch.close(_window())
    assert record["flags"] == [] and record["domains"]["cpu"]["gross_j"] == 30.0


def test_a_window_beside_another_job_is_host_shared(tmp_path: Path) -> None:
    other = _hold_in_other_process(tmp_path, UUIDS[1], 30)
    try:
        watch = HostShareWatch(tmp_path, UUIDS[:2], [UUIDS[0]])
        watch.open()
        record = watch.close(_window())
    finally:
        other.kill()
        other.wait()
    assert record["flags"] == [FLAG_HOST_SHARED]
    assert record["host_shared_with"][0]["holder"] == "other-experiment"
    assert record["domains"]["cpu"]["shared_host"]["gross_j"] == 30.0
    numbers, info = energy_metrics(record)
    assert numbers["gpu_energy_j"] == 100.0 and numbers["cpu_energy_j"] is None and numbers["dram_energy_j"] is None
    assert numbers["node_energy_j"] == 100.0 and info["node_energy_domains"] == "gpu"
    assert info["cpu_unavailable_reason"].startswith("host_shared")
    assert invalidating_flags(record["flags"]) == [] and "not attributed" in flag_effect(FLAG_HOST_SHARED)


def test_a_job_that_started_and_ended_inside_the_window_is_seen(tmp_path: Path) -> None:
    watch = HostShareWatch(tmp_path, UUIDS[:2], [UUIDS[0]])
    watch.open()
    time.sleep(0.05)
    other = _hold_in_other_process(tmp_path, UUIDS[1], 0)
    other.wait()
    assert watch.close(_window())["flags"] == [FLAG_HOST_SHARED]


# -- topology ------------------------------------------------------------------------------------


def test_topo_matrix_is_parsed() -> None:
    matrix = topology.parse_topo_matrix(TOPO_4_GPUS)
    assert matrix["links"][(0, 3)] == "NV18" and (0, 0) not in matrix["links"] and len(matrix["links"]) == 12
    assert matrix["cpu_affinity"][2] == "56-111,168-223" and matrix["numa_affinity"][3] == "1"
    assert topology.parse_topo_matrix(TOPO_PCIE)["links"] == {(0, 1): "SYS", (1, 0): "SYS"}
    with pytest.raises(ValueError):
        topology.parse_topo_matrix("No devices were found\n")


def test_topology_of_the_gpus_used(four_gpus) -> None:
    used = [four_gpus[0], four_gpus[2]]
    record = topology.describe(
        used,
        {"mode": "parallel"},
        [{"role": "harness", "pid": 1, "gpus": [UUIDS[0]]}],
        {UUIDS[0]: {1}, UUIDS[2]: set()},
        run_command=lambda: (TOPO_4_GPUS, None),
    )
    assert record["interconnect"]["pairs"] == [
        {"gpus": [0, 2], "link": "NV18", "meaning": "NVLink (NV<n>: n bonded links)"}
    ]
    assert record["interconnect"]["numa_affinity"] == {"0": "0", "2": "1"}
    assert [g["uuid"] for g in record["gpus"]] == [UUIDS[0], UUIDS[2]] and record["mig_instances"] == []
    assert record["nvml_compute_processes"] == {UUIDS[0]: [1], UUIDS[2]: []}
    assert record["processes"][0]["role"] == "harness" and record["allocation"] == {"mode": "parallel"}


def test_topology_says_why_it_is_unavailable(four_gpus) -> None:
    assert topology.interconnect([])["reason"] == "unavailable, because this job uses no GPU"
    missing = topology.interconnect(four_gpus, run_command=lambda: (None, "nvidia-smi is not on PATH"))
    assert missing == {"available": False, "reason": "unavailable, because nvidia-smi is not on PATH"}
    garbled = topology.interconnect(four_gpus, run_command=lambda: ("garbage", None))
    assert garbled["reason"].startswith("unavailable, because the output was not understood")
    one = topology.interconnect(four_gpus[:1], run_command=lambda: (TOPO_4_GPUS, None))
    assert one["pairs"] == [] and "one physical GPU" in one["note"]


# -- energy of the job's GPUs only, per GPU and summed --------------------------------------------


def test_a_job_measures_its_own_gpus_per_gpu_and_summed(tmp_path: Path) -> None:
    """Two jobs' worth of GPUs on a fake 4-GPU box: the data-parallel job given GPUs 0 and 2 (its
    CUDA_VISIBLE_DEVICES as placement sets it) measures those two, each on its own and summed, and
    never the 200 W of the neighbours."""
    from llm_energy.energy import EnergySession, EnergySettings

    hardware.set_nvml_module(
        FakeNvml(
            [
                FakeGpu(UUIDS[0], power_w=300.0),
                FakeGpu(UUIDS[1], power_w=200.0),
                FakeGpu(UUIDS[2], power_w=50.0),
                FakeGpu(UUIDS[3], power_w=200.0),
            ]
        )
    )
    try:
        experiment = next(iter(_campaign(data_parallel=2).experiments.values()))
        with placement.placed(experiment, {"lock_dir": str(tmp_path / "locks"), "devices": [0, 2]}) as placed:
            assert os.environ["CUDA_VISIBLE_DEVICES"] == f"{UUIDS[0]},{UUIDS[2]}"
            settings = EnergySettings.from_config(
                {"rapl": False, "codecarbon": False, "align_counter_edges": True, "baseline": {"duration_s": 0}}
            )
            with EnergySession(
                settings,
                devices=hardware.visible_gpus(),
                powercap_root=tmp_path / "none",
                measure_counter_period=False,
                sampler="thread",
            ) as session:
                assert session.bind_to_process_gpus() == placed.visible
                handle = session.open_window("inference")
                time.sleep(0.5)
                record = session.close_window(handle)
    finally:
        hardware.set_nvml_module(None)
    gpu = record["domains"]["gpu"]
    per_gpu = {d["uuid"]: d["gross_j"] for d in gpu["devices"]}
    assert list(per_gpu) == [UUIDS[0], UUIDS[2]]
    assert per_gpu[UUIDS[0]] == pytest.approx(300.0 * record["duration_s"], rel=0.05)
    assert per_gpu[UUIDS[2]] == pytest.approx(50.0 * record["duration_s"], rel=0.05)
    assert gpu["gross_j"] == pytest.approx(sum(per_gpu.values()))


def test_worker_processes_under_a_request_rate_are_refused() -> None:
    from llm_energy.config import _check_backend_parallelism

    for key in ("data_parallel", "tensor_parallel"):
        with pytest.raises(ConfigError, match=rf"backend_settings\.pytorch\.{key}.*static batches only"):
            _check_backend_parallelism("pytorch", None, {key: 2}, under_load=True)
        _check_backend_parallelism("pytorch", None, {key: 2}, under_load=False)


def test_a_cuda_context_before_an_engine_that_forbids_it_is_refused(monkeypatch) -> None:
    from types import SimpleNamespace

    from llm_energy.errors import BackendError
    from llm_energy.measure import require_cuda_untouched

    campaign = load_campaign(
        {
            "models": {"m": {"source": "builtin"}},
            "datasets": {"d": {"source": "bundled"}},
            "backends": ["vllm", "pytorch"],
        }
    )
    vllm, pytorch = (next(e for e in campaign.experiments.values() if e.backend == b) for b in ("vllm", "pytorch"))
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=SimpleNamespace(is_initialized=lambda: True)))
    with pytest.raises(BackendError, match="backend 'vllm' starts its engine in processes of its own"):
        require_cuda_untouched(vllm)
    require_cuda_untouched(pytorch)  # transformers runs in this process: allowed
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=SimpleNamespace(is_initialized=lambda: False)))
    require_cuda_untouched(vllm)
