"""Validity flags of a measurement window, and what each one means.

A flag does not discard a measurement; it tells the reader (and the aggregation step) why a number
may not be comparable with others. The list of flags of a window is sorted and duplicate-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# nvmlClocksEventReason* bits (nvml.h; same values in nvidia-ml-py 13)
REASON_GPU_IDLE = 0x1
REASON_SW_POWER_CAP = 0x4
REASON_HW_SLOWDOWN = 0x8
REASON_SW_THERMAL = 0x20
REASON_HW_THERMAL = 0x40
REASON_HW_POWER_BRAKE = 0x80

POWER_BITS = REASON_SW_POWER_CAP | REASON_HW_POWER_BRAKE
THERMAL_BITS = REASON_SW_THERMAL | REASON_HW_THERMAL

FLAG_DESCRIPTIONS: dict[str, str] = {
    "short_window": "fewer NVML counter updates in the window than energy.min_counter_updates: "
    "the 100 ms counter granularity makes the GPU energy uncertain",
    "counter_edge_unaligned": "the NVML counter did not tick within the alignment timeout at an "
    "edge: that edge carries up to one update period of uncertainty",
    "timeline_counter_disagree": "the integral of sampled power differs from the counter by more "
    "than energy.counter_timeline_tolerance",
    "timeline_gaps": "the power timeline has gaps longer than 5 sampling periods in the window",
    "power_throttled": "clocks were reduced by the power cap or a power brake during the window",
    "thermal_throttled": "clocks were reduced by a thermal slowdown during the window",
    "hw_slowdown": "HW slowdown (thermal, power brake or a fast power trigger) without a more specific reason bit",
    "gpu_settings_changed": "the power limit or the application clocks changed during the window",
    "foreign_processes": "other processes ran compute work on a measured GPU during the window",
    "mig_shared_counter": "a MIG instance was measured through its parent GPU's counter, which "
    "also counts the other instances on that GPU",
    "counter_reset": "an NVML energy counter went backwards (driver reloaded): GPU energy invalid",
    "gpu_not_idle": "the GPU was busy while the idle baseline was measured",
    "baseline_power_state_differs": "the window's mean SM clock differs from the active-idle "
    "baseline's by more than energy.baseline_clock_tolerance: "
    "the GPU ran in another power state than its baseline",
    "host_shared": "other measurement jobs ran on this host's other GPUs during the window "
    "(campaign.gpus.jobs: parallel): the host's CPU and DRAM energy covers them too, so it "
    "is kept in the window record (domains.<cpu|dram>.shared_host) and left out of this "
    "experiment's cpu, dram and node metrics; its GPU energy is its own GPUs' only "
    "(campaign.gpus.jobs: exclusive measures the host for one experiment)",
}


# Flags that describe how the GPU ran rather than how well it was measured. An H100 at full load sits
# on its power cap, so power_throttled is the normal state of a heavy run, not a broken measurement;
# these reach the summary but do not make a run invalid.
# baseline_power_state_differs is expected too: a loaded GPU at its power cap clocks lower than idle.
# pace_varied_in_window (set by llm_energy.measure) says the same: the engine or its host changed pace
# inside the window; the energy of the work that ran is measured as well as ever.
# host_cpu_throttled (llm_energy.host_cpu): the cgroup's CPU quota stopped the process for a while;
# the work that ran is measured, at a pace the host set.
OPERATING_CONDITION_FLAGS = frozenset(
    {
        "power_throttled",
        "thermal_throttled",
        "hw_slowdown",
        "baseline_power_state_differs",
        "pace_varied_in_window",
        "host_cpu_throttled",
    }
)


# Flags that say which energy is not this experiment's alone: the domain concerned is reported as
# unavailable with the reason, and what is reported stays valid (GPU energy of the job's own GPUs).
ATTRIBUTION_FLAGS = frozenset({"host_shared"})


def invalidating_flags(flags: Iterable[str]) -> list[str]:
    """The flags that make a window's energy figure unreliable (every flag but operating conditions
    and attribution flags)."""
    return sorted(set(flags) - OPERATING_CONDITION_FLAGS - ATTRIBUTION_FLAGS)


def flag_effect(flag: str) -> str:
    """What a flag does to a run, in words (the report's flags table)."""
    if flag in OPERATING_CONDITION_FLAGS:
        return "operating condition (run stays valid)"
    if flag in ATTRIBUTION_FLAGS:
        return "host CPU/DRAM energy not attributed to the experiment (run stays valid)"
    return "makes the energy figure unreliable"


def throttle_flags(reasons: Iterable[int]) -> set[str]:
    """Flags for the union of clock-event reason masks seen in a window."""
    union = 0
    for mask in reasons:
        union |= int(mask)
    flags: set[str] = set()
    if union & POWER_BITS:
        flags.add("power_throttled")
    if union & THERMAL_BITS:
        flags.add("thermal_throttled")
    if union & REASON_HW_SLOWDOWN and not union & (POWER_BITS | THERMAL_BITS):
        flags.add("hw_slowdown")
    return flags


def settings_changed(
    at_open: Mapping[str, Mapping[str, Any]],
    at_close: Mapping[str, Mapping[str, Any]],
    sampled_power_limits_w: Iterable[float] = (),
) -> bool:
    """True if a GPU's power limit or application clocks differ between the edges or within."""
    if dict(at_open) != dict(at_close):
        return True
    limits = {round(float(v), 3) for v in sampled_power_limits_w if v == v}  # v == v: not NaN
    return len(limits) > 1


def foreign_pids(observed: Iterable[int], own: set[int]) -> set[int]:
    return {pid for pid in observed if pid not in own}


def counter_updates(duration_s: float, update_period_s: float) -> int:
    """Counter updates inside a window of `duration_s` (the counter ticks every period)."""
    if update_period_s <= 0:
        return 0
    return int(round(duration_s / update_period_s))


def relative_difference(value: float, reference: float) -> float | None:
    if reference == 0:
        return None
    return (value - reference) / reference
