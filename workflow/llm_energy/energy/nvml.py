"""GPU energy from the NVML total-energy counter, and the power/clock samples of the timeline.

The counter (`nvmlDeviceGetTotalEnergyConsumption`, mJ since the driver loaded) is the measurement:
a window's GPU energy is counter(end) - counter(start), summed over the GPUs the process uses.
On an H100 the counter advances every 100 ms and one read costs about 4 ms, while a power read
costs about 4 us: the sampler reads power every period and the counter only about once a second;
window edges read the counter, optionally after waiting for it to tick so that the edge falls on
an update instead of up to 100 ms after one.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llm_energy import clock
from llm_energy.energy.base import METHOD_MEASURED, SOURCE_NVML, SourceStatus
from llm_energy.hardware import (
    NVML_CLOCK_MEM,
    NVML_CLOCK_SM,
    NVML_ERROR_FUNCTION_NOT_FOUND,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_TEMPERATURE_GPU,
    GpuDevice,
    nvml_error_code,
)

logger = logging.getLogger(__name__)

DEFAULT_UPDATE_PERIOD_S = 0.1  # measured on an H100; re-measured at start where possible
ALIGN_TIMEOUT_S = 0.15
# nvmlDeviceGetFieldValues field ids (nvml.h). On Ampere and newer nvmlDeviceGetPowerUsage is a
# ~1 s moving average; the instant field is not. Measured on an H100 (driver 580): instant power
# integrated at 10 ms matched the counter within 0.6 % on 0.3 s bursts where the averaged reading
# was 4.9 % low and put only half of the burst energy inside the bursts. A read costs ~5 us.
FIELD_POWER_INSTANT = 186
POWER_INSTANT = "nvml_field_power_instant"
POWER_AVERAGE = "nvmlDeviceGetPowerUsage"


@dataclass(frozen=True)
class CounterDevice:
    """One physical energy counter to read (MIG instances of one GPU share their parent's)."""

    index: int
    uuid: str
    name: str
    handle: Any = field(compare=False, repr=False)
    mig_instances: tuple[str, ...] = ()
    shares_counter: bool = False


def counter_devices(devices: Sequence[GpuDevice]) -> list[CounterDevice]:
    """Distinct counters behind `devices`: two MIG instances of one GPU are counted once."""
    by_uuid: dict[str, CounterDevice] = {}
    for device in devices:
        key = device.counter_uuid
        existing = by_uuid.get(key)
        migs = (device.uuid,) if device.is_mig_instance else ()
        if existing is None:
            by_uuid[key] = CounterDevice(
                index=device.counter_index,
                uuid=key,
                name=device.name,
                handle=device.counter_handle if device.counter_handle is not None else device.handle,
                mig_instances=migs,
                shares_counter=device.shares_counter,
            )
        else:
            by_uuid[key] = CounterDevice(
                index=existing.index,
                uuid=key,
                name=existing.name,
                handle=existing.handle,
                mig_instances=existing.mig_instances + migs,
                shares_counter=existing.shares_counter or device.shares_counter,
            )
    return list(by_uuid.values())


@dataclass
class CounterEdge:
    """Counter values read at one window edge."""

    time_s: float
    counters_mj: dict[str, int]
    aligned: bool | None  # None: alignment not asked; False: no tick seen within the timeout
    wait_s: float = 0.0


# One timeline row: see timeline.TIMELINE_COLUMNS for names and units.
SampleRow = tuple[float, int, str, float, float, float, float, float, float, float, "int | None", float]


class NvmlEnergySource:
    """Reads the counters, settings and samples of the GPUs a run uses."""

    def __init__(self, nvml_module: Any, devices: Sequence[GpuDevice]):
        self.nv = nvml_module
        self.devices = list(devices)
        self.counters = counter_devices(self.devices)
        self.update_period_s: float | None = None
        self.update_period_measured = False
        self._unsupported: set[tuple[str, str]] = set()
        self.power_methods: dict[str, str] = {}  # uuid -> POWER_INSTANT or POWER_AVERAGE
        self.status = SourceStatus(
            name="nvml",
            domains=["gpu"],
            available=bool(self.counters),
            reason=None if self.counters else "no GPU in use",
            method=METHOD_MEASURED,
            details={"source": SOURCE_NVML},
        )

    # -- counters -------------------------------------------------------------------------

    def start(self, measure_period: bool = True) -> None:
        """Check that every counter can be read and measure how often it updates."""
        if not self.status.available:
            return
        for device in self.counters:
            try:
                self.nv.nvmlDeviceGetTotalEnergyConsumption(device.handle)
            except self.nv.NVMLError as exc:
                code = nvml_error_code(exc)
                hint = (
                    " (the total-energy counter needs a Volta or newer GPU)"
                    if code in (NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_FUNCTION_NOT_FOUND)
                    else ""
                )
                self.status.available = False
                self.status.reason = (
                    f"nvmlDeviceGetTotalEnergyConsumption failed on GPU {device.index} "
                    f"({device.name}, {device.uuid}): {exc}{hint}"
                )
                logger.warning("GPU energy unavailable: %s", self.status.reason)
                return
        for device in self.counters:
            instant = self._instant_power_w(device)
            self.power_methods[device.uuid] = POWER_INSTANT if instant is not None else POWER_AVERAGE
        if measure_period:
            self.update_period_s = self.measure_update_period()
            self.update_period_measured = self.update_period_s is not None
        self.status.details.update(self.describe_details())

    def describe_details(self) -> dict[str, Any]:
        return {
            "source": SOURCE_NVML,
            "counter_update_period_s": self.period_s,
            "counter_update_period_measured": self.update_period_measured,
            "timeline_power": sorted(set(self.power_methods.values())),
            "devices": [
                {
                    "index": c.index,
                    "uuid": c.uuid,
                    "name": c.name,
                    "mig_instances": list(c.mig_instances),
                    "shares_counter": c.shares_counter,
                }
                for c in self.counters
            ],
        }

    def restrict(self, uuids: Sequence[str]) -> None:
        """Read only these counters from now on (the GPUs the job turned out to use)."""
        wanted = set(uuids)
        self.counters = [c for c in self.counters if c.uuid in wanted]
        if self.status.available:
            self.status.details.update(self.describe_details())

    @property
    def period_s(self) -> float:
        return self.update_period_s or DEFAULT_UPDATE_PERIOD_S

    def read_counter_mj(self, device: CounterDevice) -> int:
        return int(self.nv.nvmlDeviceGetTotalEnergyConsumption(device.handle))

    def read_counters_mj(self) -> dict[str, int]:
        return {d.uuid: self.read_counter_mj(d) for d in self.counters}

    def measure_update_period(self, max_s: float = 0.35) -> float | None:
        """Median interval between counter changes of the first GPU over at most `max_s`."""
        device = self.counters[0]
        change_times: list[float] = []
        last = self.read_counter_mj(device)
        deadline = clock.now() + max_s
        while clock.now() < deadline and len(change_times) < 4:
            value = self.read_counter_mj(device)
            if value != last:
                change_times.append(clock.now())
                last = value
        if len(change_times) < 3:
            return None  # an idle GPU may not tick that often; keep the default
        return statistics.median(b - a for a, b in zip(change_times[:-1], change_times[1:], strict=True))

    def read_edge(self, align: bool, timeout_s: float = ALIGN_TIMEOUT_S) -> CounterEdge:
        """Read every counter; with `align`, first wait (bounded) for the first GPU's counter to tick.

        After a tick the counter holds the energy up to that instant, so the edge time is exact to
        one read (~4 ms) instead of up to one update period. Only the first GPU is aligned: the
        counters of several GPUs tick independently, and waiting for each would stretch the edge.
        """
        first, rest = self.counters[0], self.counters[1:]
        started = clock.now()
        aligned: bool | None = None
        value = self.read_counter_mj(first)
        time_s = clock.now()
        if align:
            aligned = False
            previous = value
            while time_s - started < timeout_s:
                before = clock.now()  # the tick happened after the previous (unchanged) read
                value = self.read_counter_mj(first)
                after = clock.now()
                time_s = after
                if value != previous:
                    aligned = True
                    # The tick lies between the last unchanged read and this one: the midpoint
                    # halves the error when a read is slow (~4 ms on an H100) or the thread was
                    # descheduled between reads.
                    time_s = (before + after) / 2.0
                    break
        counters = {first.uuid: value}
        for device in rest:
            counters[device.uuid] = self.read_counter_mj(device)
        return CounterEdge(time_s=time_s, counters_mj=counters, aligned=aligned, wait_s=time_s - started)

    # -- settings and processes -----------------------------------------------------------

    def _query(self, device: CounterDevice, function_name: str, *args: Any) -> Any | None:
        """One NVML query; NaN-able None when unsupported (remembered, so it is not retried)."""
        key = (function_name, device.uuid)
        if key in self._unsupported:
            return None
        try:
            return getattr(self.nv, function_name)(device.handle, *args)
        except self.nv.NVMLError as exc:
            if nvml_error_code(exc) in (NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_FUNCTION_NOT_FOUND):
                self._unsupported.add(key)
            logger.debug("NVML %s on GPU %s failed: %s", function_name, device.index, exc)
            return None

    def settings_snapshot(self) -> dict[str, dict[str, float | None]]:
        """Settings whose change during a window makes it incomparable (power limit, app clocks)."""
        snapshot: dict[str, dict[str, float | None]] = {}
        for device in self.counters:
            limit_mw = self._query(device, "nvmlDeviceGetPowerManagementLimit")
            snapshot[device.uuid] = {
                "power_limit_w": limit_mw / 1000.0 if limit_mw is not None else None,
                "applications_clock_sm_mhz": self._query(device, "nvmlDeviceGetApplicationsClock", NVML_CLOCK_SM),
                "applications_clock_mem_mhz": self._query(device, "nvmlDeviceGetApplicationsClock", NVML_CLOCK_MEM),
            }
        return snapshot

    def compute_pids(self) -> dict[str, set[int]]:
        """PIDs of the compute processes on each GPU (as NVML sees them)."""
        pids: dict[str, set[int]] = {}
        for device in self.counters:
            processes = self._query(device, "nvmlDeviceGetComputeRunningProcesses") or []
            pids[device.uuid] = {int(p.pid) for p in processes}
        return pids

    # -- timeline samples -----------------------------------------------------------------

    def _instant_power_w(self, device: CounterDevice) -> float | None:
        """Instantaneous power from the field API (W), None if this read failed."""
        try:
            (field_value,) = self.nv.nvmlDeviceGetFieldValues(device.handle, [FIELD_POWER_INSTANT])
            if field_value.nvmlReturn != 0:
                raise LookupError(f"field {FIELD_POWER_INSTANT} returned {field_value.nvmlReturn}")
            return _field_number(field_value) / 1000.0  # mW
        except (self.nv.NVMLError, LookupError, AttributeError, ValueError) as exc:
            # AttributeError: an nvidia-ml-py without the field API
            logger.debug("instant power read failed on GPU %s: %s", device.index, exc)
            return None

    def power_w(self, device: CounterDevice) -> float:
        """Power of one GPU in W with the method chosen at start(); NaN when the read failed.

        The method never changes within a session, so a timeline never mixes instant and
        averaged readings; a failed read is a missing sample, bridged by the integral.
        """
        if self.power_methods.get(device.uuid) == POWER_INSTANT:
            watts = self._instant_power_w(device)
            return watts if watts is not None else math.nan
        power_mw = self._query(device, "nvmlDeviceGetPowerUsage")
        return power_mw / 1000.0 if power_mw is not None else math.nan

    def sample(self, include_counter: bool) -> list[SampleRow]:
        """One row per GPU: power, clocks, temperature, utilisation, clock-event reasons."""
        rows: list[SampleRow] = []
        for device in self.counters:
            time_s = clock.now()
            power_w = self.power_w(device)
            counter_j = math.nan
            if include_counter:
                try:
                    counter_j = self.read_counter_mj(device) / 1000.0
                except self.nv.NVMLError:
                    pass
            sm = self._query(device, "nvmlDeviceGetClockInfo", NVML_CLOCK_SM)
            mem = self._query(device, "nvmlDeviceGetClockInfo", NVML_CLOCK_MEM)
            temp = self._query(device, "nvmlDeviceGetTemperature", NVML_TEMPERATURE_GPU)
            util = self._query(device, "nvmlDeviceGetUtilizationRates")
            reasons = self._query(device, "nvmlDeviceGetCurrentClocksEventReasons")
            limit_mw = self._query(device, "nvmlDeviceGetPowerManagementLimit")
            rows.append(
                (
                    time_s,
                    device.index,
                    device.uuid,
                    power_w,
                    counter_j,
                    _num(sm),
                    _num(mem),
                    _num(temp),
                    _num(getattr(util, "gpu", None)),
                    _num(getattr(util, "memory", None)),
                    int(reasons) if reasons is not None else None,
                    limit_mw / 1000.0 if limit_mw is not None else math.nan,
                )
            )
        return rows

    def edge_rows(self, edge: CounterEdge) -> list[SampleRow]:
        """Timeline rows for an edge: a full sample with the counter values read at the edge."""
        rows = self.sample(include_counter=False)
        return [(edge.time_s,) + row[1:4] + (edge.counters_mj[row[2]] / 1000.0,) + row[5:] for row in rows]


# nvmlValueType_t -> the union member holding the value
_FIELD_MEMBERS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


def _field_number(field_value: Any) -> float:
    member = _FIELD_MEMBERS.get(int(field_value.valueType))
    if member is None:
        raise ValueError(f"unknown NVML value type {field_value.valueType}")
    return float(getattr(field_value.value, member))


def _num(value: Any) -> float:
    return float(value) if value is not None else math.nan


def own_process_tree() -> set[int]:
    """This process and its descendants (e.g. vLLM's engine workers) are not foreign."""
    pids = {os.getpid()}
    try:
        import psutil

        pids |= {child.pid for child in psutil.Process().children(recursive=True)}
    except Exception:  # psutil missing or a child vanished: our own pid still counts
        pass
    return pids
