"""llm_energy.host_cpu on recorded /proc and /sys trees: which counter comes from which file, the
window's deltas and shares, and the reasons where a kernel has no such counter."""

from __future__ import annotations

import os
from pathlib import Path

from llm_energy import host_cpu

TICK = os.sysconf("SC_CLK_TCK")


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _proc_stat(steal_ticks: int, cpus: int = 4) -> str:
    lines = [f"cpu  100 0 50 1000 5 0 3 {steal_ticks} 0 0"]
    lines += [f"cpu{i} 25 0 12 250 1 0 1 {steal_ticks // cpus} 0 0" for i in range(cpus)]
    return "\n".join(lines + ["intr 1", "ctxt 2"]) + "\n"


def _cgroup_v2(root: Path, throttled_usec: int, periods: int, pressure_usec: int, steal_ticks: int) -> None:
    _write(root, "proc/self/cgroup", "0::/job.slice/step_0\n")
    group = "sys/fs/cgroup/job.slice/step_0"
    _write(
        root,
        f"{group}/cpu.stat",
        f"usage_usec 9\nnr_periods 40\nnr_throttled {periods}\nthrottled_usec {throttled_usec}\n",
    )
    _write(root, f"{group}/cpu.max", "200000 100000\n")
    _write(
        root, f"{group}/cpu.pressure", f"some avg10=1.00 avg60=0.50 avg300=0.10 total={pressure_usec}\nfull total=0\n"
    )
    _write(root, "proc/stat", _proc_stat(steal_ticks))


def test_a_quota_cgroup_v2_window_reports_throttling_pressure_and_steal_and_is_flagged(tmp_path: Path) -> None:
    before_root, after_root = tmp_path / "before", tmp_path / "after"
    _cgroup_v2(before_root, throttled_usec=250_000, periods=3, pressure_usec=1_000_000, steal_ticks=TICK // 2)
    _cgroup_v2(after_root, throttled_usec=750_000, periods=8, pressure_usec=1_500_000, steal_ticks=TICK * 3 // 2)
    record = host_cpu.window_record(host_cpu.snapshot(before_root), host_cpu.snapshot(after_root), 2.0)
    assert record["throttled_s"] == 0.5 and record["throttled_periods"] == 5 and record["quota_cpus"] == 2.0
    assert record["pressure_some_s"] == 0.5 and record["pressure_some_share"] == 0.25
    assert record["cpus"] == 4 and record["steal_s"] == 1.0 and record["steal_share"] == 1.0 / (2.0 * 4)
    assert record["sources"]["throttled"].endswith("sys/fs/cgroup/job.slice/step_0/cpu.stat")
    assert record["sources"]["pressure_some"].endswith("job.slice/step_0/cpu.pressure")
    assert record["unavailable"] == {}
    assert host_cpu.flags(record) == {host_cpu.FLAG_THROTTLED}
    assert host_cpu.window_metrics(record) == (
        {"host_cpu_throttled_s": 0.5, "host_cpu_pressure_some_share": 0.25, "host_cpu_steal_share": 0.125},
        {},
    )


def test_a_hybrid_v1_host_without_a_quota_reads_v1_throttling_and_v2_pressure(tmp_path: Path) -> None:
    # cgroup v1 for the cpu controller, v2 mounted at unified/ for pressure (this CI machine's layout).
    _write(tmp_path, "proc/self/cgroup", "2:cpuacct:/\n1:cpu:/\n0::/\n")
    _write(tmp_path, "sys/fs/cgroup/cpu/cpu.stat", "nr_periods 0\nnr_throttled 0\nthrottled_time 0\n")
    _write(tmp_path, "sys/fs/cgroup/cpu/cpu.cfs_quota_us", "-1\n")
    _write(tmp_path, "sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n")
    _write(tmp_path, "sys/fs/cgroup/unified/cpu.stat", "usage_usec 10\n")  # no throttling counters in v2 here
    _write(tmp_path, "sys/fs/cgroup/unified/cpu.pressure", "some avg10=0 avg60=0 avg300=0 total=42\n")
    _write(tmp_path, "proc/stat", _proc_stat(0, cpus=2))
    snap = host_cpu.snapshot(tmp_path)
    record = host_cpu.window_record(snap, snap, 1.0)
    assert record["throttled_s"] == 0.0 and record["quota_cpus"] is None
    assert record["sources"]["throttled"].endswith("sys/fs/cgroup/cpu/cpu.stat")
    assert record["sources"]["pressure_some"].endswith("sys/fs/cgroup/unified/cpu.pressure")
    assert record["steal_share"] == 0.0 and host_cpu.flags(record) == set()


def test_a_container_sees_the_hosts_cgroup_path_and_reads_its_mount_root(tmp_path: Path) -> None:
    _write(tmp_path, "proc/self/cgroup", "0::/kubepods/burstable/pod1/abc\n")  # absent under the mount
    _write(tmp_path, "sys/fs/cgroup/cpu.stat", "nr_throttled 1\nthrottled_usec 5\n")
    _write(tmp_path, "sys/fs/cgroup/cpu.max", "max 100000\n")
    snap = host_cpu.snapshot(tmp_path)
    assert snap.readings["throttled"].source.endswith("sys/fs/cgroup/cpu.stat") and snap.quota_cpus is None


def test_a_kernel_without_the_counters_says_why_each_is_unavailable(tmp_path: Path) -> None:
    snap = host_cpu.snapshot(tmp_path)
    record = host_cpu.window_record(snap, snap, 1.0)
    assert record["throttled_s"] is None and record["pressure_some_s"] is None and record["steal_s"] is None
    assert set(record["unavailable"]) == {"throttled", "pressure_some", "steal"}
    assert "PSI" in record["unavailable"]["pressure_some"] and "/proc/stat" in record["unavailable"]["steal"]
    assert "pressure_some_share" not in record and host_cpu.flags(record) == set()
    # As run metrics: None where a counter is missing, with the reason beside it in metrics_info.
    values, reasons = host_cpu.window_metrics(record)
    assert values == dict.fromkeys(host_cpu.METRICS)
    assert set(reasons) == {f"host_cpu_{name}_unavailable_reason" for name in ("throttled", "pressure_some", "steal")}
    assert reasons["host_cpu_steal_unavailable_reason"] == record["unavailable"]["steal"]


def test_this_machine_has_at_least_the_steal_counter() -> None:
    snap = host_cpu.snapshot()
    assert snap.readings["steal"].seconds is not None and snap.cpus and snap.cpus >= 1


def test_a_counter_in_a_format_it_cannot_parse_is_unavailable_with_the_reason(tmp_path: Path) -> None:
    _write(tmp_path, "proc/self/cgroup", "0::/\n")
    _write(tmp_path, "sys/fs/cgroup/cpu.stat", "nr_throttled x\nthrottled_usec not-a-number\n")
    _write(tmp_path, "proc/pressure/cpu", "some avg10=0.00\n")  # no total=
    _write(tmp_path, "proc/stat", _proc_stat(TICK))
    snap = host_cpu.snapshot(tmp_path)
    assert snap.readings["throttled"].seconds is None and "ValueError" in snap.readings["throttled"].reason
    assert snap.readings["pressure_some"].seconds is None and "KeyError" in snap.readings["pressure_some"].reason
    assert snap.readings["steal"].seconds == 1.0  # the others still read
