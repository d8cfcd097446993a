"""Stand-ins for pynvml, for tests of our own logic on machines without a GPU.

`FakeNvml` offers the subset of the nvidia-ml-py API that llm_energy calls, with the same names,
return types and units (mJ, mW, MHz) and the same error style (`NVMLError` with `.value`). Each
fake GPU replays either a recorded sequence of counter values (one per read) or a power profile
over time, from which the counter is derived the way the real one behaves: it advances only every
`update_period_s` (100 ms on an H100) and holds the energy up to its last tick. Nothing here is
used outside tests (it lives in tests/, not in the package); the real code paths run against `pynvml`
on a GPU machine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from llm_energy import clock

NOT_SUPPORTED = 3
LIBRARY_NOT_FOUND = 12


class NVMLError(Exception):
    def __init__(self, value: int):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return {NOT_SUPPORTED: "Not Supported", LIBRARY_NOT_FOUND: "NVML Shared Library Not Found"}.get(
            self.value, f"code {self.value}"
        )


Profile = float | Callable[[float], float]


def _at(value: Any, elapsed_s: float) -> Any:
    return value(elapsed_s) if callable(value) else value


@dataclass
class FakeGpu:
    """One recorded GPU. Callables receive the seconds elapsed since the fake was created."""

    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    power_w: Profile = 70.0  # a callable returning None simulates a failed power read
    counter_mj: Sequence[int] | None = None  # recorded reads; None: derived from power_w
    counter_start_mj: int = 5_000_000
    update_period_s: float = 0.1
    energy_supported: bool = True
    reasons: Callable[[float], int] | int = 1  # nvmlClocksEventReasonGpuIdle at rest
    power_limit_w: Profile = 700.0
    app_clocks_mhz: tuple[int, int] = (1980, 2619)
    pids: Callable[[float], list[int]] | list[int] = field(default_factory=list)
    mig_mode: int = 0
    mig_uuids: tuple[str, ...] = ()
    utilization_pct: Profile = 0.0
    instant_power: bool = True  # field NVML_FI_DEV_POWER_INSTANT supported (Hopper, recent drivers)
    _reads: int = 0


@dataclass(frozen=True)
class _Handle:
    gpu: int
    mig: str | None = None


class FakeNvml:
    """A pynvml-compatible module object over a list of FakeGpu."""

    NVMLError = NVMLError
    NVML_ERROR_NOT_SUPPORTED = NOT_SUPPORTED

    def __init__(self, gpus: Sequence[FakeGpu], *, init_error: int | None = None, counter_read_s: float = 0.0):
        self.gpus = list(gpus)
        self.init_error = init_error
        self.counter_read_s = counter_read_s  # a real H100 counter read takes ~3.9 ms
        self.t0 = clock.now()
        self.calls: dict[str, int] = {}
        # Applied to every power reading (not to the counter): None = a failed read. Tests use it
        # to make the sensor disagree with the counter or to drop samples.
        self.power_filter: Callable[[float], float | None] | None = None

    # -- helpers ---------------------------------------------------------------------------

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def _elapsed(self) -> float:
        return clock.now() - self.t0

    def _gpu(self, handle: _Handle) -> FakeGpu:
        return self.gpus[handle.gpu]

    def energy_between_j(self, gpu: FakeGpu, a_s: float, b_s: float, step_s: float = 1e-3) -> float:
        """Exact for constant power, midpoint rule (1 ms) for a profile."""
        if not callable(gpu.power_w):
            return gpu.power_w * (b_s - a_s)
        n = max(1, int(math.ceil((b_s - a_s) / step_s)))
        h = (b_s - a_s) / n
        return sum((gpu.power_w(a_s + (i + 0.5) * h) or 0.0) for i in range(n)) * h

    # -- the pynvml API --------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self._count("nvmlInit")
        if self.init_error is not None:
            raise NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        pass

    def nvmlSystemGetDriverVersion(self) -> str:
        return "580.159.04"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 13000

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        if not 0 <= index < len(self.gpus):
            raise NVMLError(2)
        return _Handle(index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> _Handle:
        for i, gpu in enumerate(self.gpus):
            if gpu.uuid == uuid:
                return _Handle(i)
            if uuid in gpu.mig_uuids:
                return _Handle(i, mig=uuid)
        raise NVMLError(6)  # NOT_FOUND

    def nvmlDeviceIsMigDeviceHandle(self, handle: _Handle) -> bool:
        return handle.mig is not None

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: _Handle) -> _Handle:
        return _Handle(handle.gpu)

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        return handle.mig or self._gpu(handle).uuid

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        return self._gpu(handle).name

    def nvmlDeviceGetIndex(self, handle: _Handle) -> int:
        return handle.gpu

    def nvmlDeviceGetMigMode(self, handle: _Handle) -> list[int]:
        mode = self._gpu(handle).mig_mode
        return [mode, mode]

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: _Handle) -> int:
        self._count("nvmlDeviceGetTotalEnergyConsumption")
        gpu = self._gpu(handle)
        if handle.mig is not None or not gpu.energy_supported:
            raise NVMLError(NOT_SUPPORTED)
        if self.counter_read_s:
            time.sleep(self.counter_read_s)
        if gpu.counter_mj is not None:
            value = gpu.counter_mj[min(gpu._reads, len(gpu.counter_mj) - 1)]
            gpu._reads += 1
            return int(value)
        last_tick = math.floor(self._elapsed() / gpu.update_period_s) * gpu.update_period_s
        return int(gpu.counter_start_mj + 1000.0 * self.energy_between_j(gpu, 0.0, last_tick))

    def _power_mw(self, handle: _Handle) -> int | None:
        watts = _at(self._gpu(handle).power_w, self._elapsed())
        if watts is not None and self.power_filter is not None:
            watts = self.power_filter(watts)
        return None if watts is None else int(round(watts * 1000))

    def nvmlDeviceGetPowerUsage(self, handle: _Handle) -> int:
        self._count("nvmlDeviceGetPowerUsage")
        power_mw = self._power_mw(handle)
        if power_mw is None:
            raise NVMLError(999)  # a failed read (e.g. NVML_ERROR_UNKNOWN); the sample is lost
        return power_mw

    def nvmlDeviceGetFieldValues(self, handle: _Handle, field_ids: list[int]) -> list[SimpleNamespace]:
        """Only NVML_FI_DEV_POWER_INSTANT (186); per-field errors go in nvmlReturn, as in NVML."""
        self._count("nvmlDeviceGetFieldValues")
        values = []
        for field_id in field_ids:
            power_mw = self._power_mw(handle) if field_id == 186 else None
            supported = field_id == 186 and self._gpu(handle).instant_power
            code = 0 if supported and power_mw is not None else (999 if supported else NOT_SUPPORTED)
            values.append(
                SimpleNamespace(
                    fieldId=field_id,
                    scopeId=0,
                    timestamp=0,
                    latencyUsec=0,
                    valueType=1,
                    nvmlReturn=code,
                    value=SimpleNamespace(uiVal=power_mw if code == 0 else 0),
                )
            )
        return values

    def nvmlDeviceGetClockInfo(self, handle: _Handle, clock_type: int) -> int:
        return 1980 if clock_type == 1 else 2619

    def nvmlDeviceGetTemperature(self, handle: _Handle, sensor: int) -> int:
        return 35

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> SimpleNamespace:
        pct = _at(self._gpu(handle).utilization_pct, self._elapsed())
        return SimpleNamespace(gpu=int(pct), memory=int(pct / 2))

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: _Handle) -> int:
        return int(_at(self._gpu(handle).reasons, self._elapsed()))

    def nvmlDeviceGetPowerManagementLimit(self, handle: _Handle) -> int:
        return int(_at(self._gpu(handle).power_limit_w, self._elapsed()) * 1000)

    def nvmlDeviceGetApplicationsClock(self, handle: _Handle, clock_type: int) -> int:
        sm, mem = self._gpu(handle).app_clocks_mhz
        return sm if clock_type == 1 else mem

    def nvmlDeviceGetComputeRunningProcesses(self, handle: _Handle) -> list[SimpleNamespace]:
        pids = _at(self._gpu(handle).pids, self._elapsed())
        return [SimpleNamespace(pid=p, usedGpuMemory=1 << 30) for p in pids]

    def nvmlDeviceGetPersistenceMode(self, handle: _Handle) -> int:
        return 1

    def nvmlDeviceGetEccMode(self, handle: _Handle) -> list[int]:
        return [1, 1]

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle) -> SimpleNamespace:
        return SimpleNamespace(total=80 * 1024**3, used=0, free=80 * 1024**3)


FAKE_NVML_ENV = "LLM_ENERGY_FAKE_NVML"


def from_environment() -> FakeNvml:
    """A FakeNvml built from `$LLM_ENERGY_FAKE_NVML` (a JSON list of FakeGpu keyword arguments).

    The sampler child process loads it with `--nvml-module tests.fake_nvml:from_environment`, so
    the real process mode runs end to end on a machine without a GPU. Only JSON-able fields (no
    power profiles given as callables) can be passed this way.
    """
    import json
    import os

    specs = json.loads(os.environ[FAKE_NVML_ENV])
    return FakeNvml([FakeGpu(**spec) for spec in specs])
