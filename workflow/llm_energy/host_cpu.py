"""Whether the host took CPU time from the measured process during a window.

Where the host sets the pace (the fast path at batch 1 and 8, where a decoding step is a few
milliseconds of Python around one CUDA-graph replay; vLLM's engine loop), a window in which the
process waited for a CPU runs slower for a reason that is neither the engine nor the harness. Three
kernel counters say whether that happened. They are read at both edges of every measured window,
outside it (three small file reads):

- **throttling** by the cgroup's CPU quota (`cpu.max` / `cpu.cfs_quota_us`): `cpu.stat` of the
  process's cgroup, v2 `throttled_usec` or v1 `throttled_time` (ns), and the number of throttled
  periods. While throttled, every task of the cgroup is stopped;
- **CPU pressure** (PSI): `some total` of the cgroup's `cpu.pressure`, else of /proc/pressure/cpu
  (the whole host), the time in which at least one task waited for a CPU;
- **steal**: the `cpu` line of /proc/stat, the time the hypervisor ran something else on this
  guest's CPUs, summed over the CPUs.

A window record's `host_cpu` holds each counter's change in seconds and its share (pressure: of the
window's wall time; steal: of the window's CPU time, wall time x CPUs), the file it came from, and,
for a counter this kernel does not have, `unavailable` with the reason. Throttling inside a window
sets the operating-condition flag `host_cpu_throttled`: the energy of the work that ran is measured
as well as ever (the run stays valid), but its pace was not the engine's alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FLAG_THROTTLED = "host_cpu_throttled"
COUNTERS = ("throttled", "pressure_some", "steal")


@dataclass(frozen=True)
class Reading:
    """One cumulative counter in seconds, with the file it came from, or why there is none."""

    seconds: float | None
    source: str | None = None
    reason: str | None = None
    count: int | None = None  # throttled periods, for throttling


@dataclass(frozen=True)
class Snapshot:
    readings: dict[str, Reading]
    cpus: int | None  # the CPUs /proc/stat counts (steal is summed over them)
    quota_cpus: float | None  # the cgroup's CPU quota in CPUs; None without a quota or unknown


def _fields(path: Path) -> dict[str, str]:
    """`key value` lines (cpu.stat)."""
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        out[key] = value.strip()
    return out


def _cgroup_dirs(root: Path) -> tuple[list[Path], list[Path]]:
    """Candidate cgroup v2 and v1-cpu directories of this process, most specific first. In a container
    without its own cgroup namespace the listed path is the host's, absent under the container's mount,
    whose root is then the container's own cgroup."""
    v2_paths, v1_paths = [], []
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        relative = path.lstrip("/")
        if hierarchy == "0" and not controllers:
            v2_paths += [root / "sys/fs/cgroup" / relative, root / "sys/fs/cgroup/unified" / relative]
        elif "cpu" in controllers.split(","):
            for mount in ("cpu,cpuacct", "cpu"):
                v1_paths.append(root / "sys/fs/cgroup" / mount / relative)
    v2_paths += [root / "sys/fs/cgroup", root / "sys/fs/cgroup/unified"]
    v1_paths += [root / "sys/fs/cgroup/cpu,cpuacct", root / "sys/fs/cgroup/cpu"]
    return v2_paths, v1_paths


def _throttling(v2_dirs: list[Path], v1_dirs: list[Path]) -> tuple[Reading, float | None]:
    for directory in v2_dirs:
        stat = directory / "cpu.stat"
        if stat.is_file() and "throttled_usec" in (fields := _fields(stat)):
            cpu_max, quota_cpus = directory / "cpu.max", None
            if cpu_max.is_file():  # "max 100000" without a quota, "200000 100000" for 2 CPUs
                quota, _, period = cpu_max.read_text().strip().partition(" ")
                quota_cpus = int(quota) / int(period) if quota != "max" and period else None
            seconds = int(fields["throttled_usec"]) / 1e6
            return Reading(seconds, str(stat), count=int(fields.get("nr_throttled", 0))), quota_cpus
    for directory in v1_dirs:
        stat = directory / "cpu.stat"
        if stat.is_file() and "throttled_time" in (fields := _fields(stat)):
            quota_file, period_file = directory / "cpu.cfs_quota_us", directory / "cpu.cfs_period_us"
            quota_cpus = None
            if quota_file.is_file() and period_file.is_file():
                quota, period = int(quota_file.read_text()), int(period_file.read_text())
                quota_cpus = quota / period if quota > 0 and period > 0 else None
            seconds = int(fields["throttled_time"]) / 1e9
            return Reading(seconds, str(stat), count=int(fields.get("nr_throttled", 0))), quota_cpus
    return Reading(
        None, reason="no cgroup cpu.stat with throttling counters (cgroup v2 throttled_usec or v1 throttled_time)"
    ), None


def _pressure(root: Path, v2_dirs: list[Path]) -> Reading:
    for path in [d / "cpu.pressure" for d in v2_dirs] + [root / "proc/pressure/cpu"]:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("some "):
                total = dict(item.split("=", 1) for item in line.split()[1:])["total"]
                return Reading(int(total) / 1e6, str(path))
    return Reading(None, reason="no CPU pressure information (PSI): the kernel lacks it or runs with psi=0")


def _steal(root: Path) -> tuple[Reading, int | None]:
    try:
        lines = (root / "proc/stat").read_text().splitlines()
    except OSError:
        return Reading(None, reason="/proc/stat is not readable"), None
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    total = next((line.split() for line in lines if line.startswith("cpu ")), None)
    if total is None or len(total) < 9:
        return Reading(None, reason="/proc/stat has no steal field (kernel before 2.6.11)"), cpus or None
    return Reading(int(total[8]) / os.sysconf("SC_CLK_TCK"), str(root / "proc/stat")), cpus or None


def snapshot(root: Path = Path("/")) -> Snapshot:
    """The three counters now. `root` is the file system they are read under (a recorded tree in tests)."""
    v2_dirs, v1_dirs = _cgroup_dirs(root)
    throttled, quota_cpus = _unless_unreadable(lambda: _throttling(v2_dirs, v1_dirs), "cgroup throttling")
    (pressure, _) = _unless_unreadable(lambda: (_pressure(root, v2_dirs), None), "CPU pressure")
    steal, cpus = _unless_unreadable(lambda: _steal(root), "steal time")
    return Snapshot({"throttled": throttled, "pressure_some": pressure, "steal": steal}, cpus, quota_cpus)


def _unless_unreadable(read, what: str) -> tuple[Reading, Any]:
    """A counter that exists but cannot be read or parsed (permissions, a kernel's other format) is
    unavailable with that reason: it never stops a measured window."""
    try:
        return read()
    except (OSError, ValueError, KeyError, IndexError) as exc:
        return Reading(None, reason=f"{what} could not be read: {type(exc).__name__}: {exc}"), None


def window_record(before: Snapshot, after: Snapshot, duration_s: float) -> dict[str, Any]:
    """What the host took from a window of `duration_s` seconds between two snapshots."""
    record: dict[str, Any] = {"quota_cpus": after.quota_cpus, "cpus": after.cpus, "sources": {}, "unavailable": {}}
    for name in COUNTERS:
        first, last = before.readings[name], after.readings[name]
        if first.seconds is None or last.seconds is None:
            record[f"{name}_s"] = None
            record["unavailable"][name] = first.reason or last.reason
            continue
        record[f"{name}_s"] = max(0.0, last.seconds - first.seconds)
        record["sources"][name] = last.source
    if record["throttled_s"] is not None:
        record["throttled_periods"] = (after.readings["throttled"].count or 0) - (
            before.readings["throttled"].count or 0
        )
    if record["pressure_some_s"] is not None and duration_s > 0:
        record["pressure_some_share"] = record["pressure_some_s"] / duration_s
    if record["steal_s"] is not None and duration_s > 0 and after.cpus:
        record["steal_share"] = record["steal_s"] / (duration_s * after.cpus)
    return record


# A window's host_cpu record as run metrics: aggregated over cycles like every metric (mean, CI, in
# metrics.csv with their units), so a campaign's tables say what the host took from each experiment.
METRICS = {
    "host_cpu_throttled_s": "throttled_s",
    "host_cpu_pressure_some_share": "pressure_some_share",
    "host_cpu_steal_share": "steal_share",
}


def window_metrics(record: dict[str, Any]) -> tuple[dict[str, float | None], dict[str, str]]:
    """The run metrics of a window's host_cpu record, and for each counter the kernel lacks (None) the
    reason, for metrics_info."""
    values = {metric: record.get(key) for metric, key in METRICS.items()}
    reasons = {f"host_cpu_{name}_unavailable_reason": why for name, why in record.get("unavailable", {}).items()}
    return values, reasons


def flags(record: dict[str, Any]) -> set[str]:
    return {FLAG_THROTTLED} if record.get("throttled_s") else set()
