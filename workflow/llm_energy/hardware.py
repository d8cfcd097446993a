"""GPU facts through NVML: which GPUs this process uses, and what they are.

`visible_gpus()` maps `CUDA_VISIBLE_DEVICES` (indices, `GPU-...` UUIDs or their prefixes, `MIG-...`
ids; unset means every GPU) to NVML handles, so that energy is read from exactly the GPUs the
experiment used and never from idle neighbours on the same box. Without a driver or without
nvidia-ml-py it returns [] and `gpu_unavailable_reason()` says why.

NVML is reached through one module object (the real `pynvml` from nvidia-ml-py, or a recorded fake
set by `set_nvml_module` in tests) so that every code path here runs on machines without a GPU.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# NVML return codes we tell apart (values from nvml.h; the fake module in tests uses the same).
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_TEMPERATURE_GPU = 0


@dataclass(frozen=True)
class GpuDevice:
    """One GPU (or MIG instance) this process uses.

    `index`/`uuid` identify the device itself; `counter_index`/`counter_uuid`/`counter_handle` the
    physical GPU whose energy counter and power sensor cover it (the parent GPU for a MIG instance,
    whose counter is shared with the other instances on that GPU).
    """

    index: int  # NVML index of the physical GPU (the parent's for a MIG instance)
    uuid: str  # GPU-... or MIG-...
    name: str
    visible_index: int  # position in CUDA_VISIBLE_DEVICES, i.e. N in torch's cuda:N
    is_mig_instance: bool = False
    parent_uuid: str | None = None
    mig_mode_enabled: bool = False  # the physical GPU is partitioned (its counter is shared)
    handle: Any = field(default=None, compare=False, repr=False)
    counter_handle: Any = field(default=None, compare=False, repr=False)

    @property
    def counter_uuid(self) -> str:
        return self.parent_uuid if self.is_mig_instance and self.parent_uuid else self.uuid

    @property
    def counter_index(self) -> int:
        return self.index

    @property
    def shares_counter(self) -> bool:
        """True when the energy counter read for this device also covers other MIG instances."""
        return self.is_mig_instance or self.mig_mode_enabled


# ---------------------------------------------------------------------------------------------
# The NVML module: loaded and initialised once per process


class _NvmlState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.module: Any = None
        self.loaded = False
        self.reason: str | None = None
        self.injected: Any = None  # a fake set by set_nvml_module (tests)


_STATE = _NvmlState()


def set_nvml_module(module: Any | None) -> None:
    """Use `module` instead of the real `pynvml` (tests inject a recorded fake); None restores it.

    The next call that needs NVML initialises the chosen module again.
    """
    with _STATE.lock:
        _STATE.injected = module
        _STATE.module = None
        _STATE.loaded = False
        _STATE.reason = None


def nvml_error_code(exc: BaseException) -> int | None:
    """The NVML return code carried by an NVMLError (None for other exceptions)."""
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


def _init_reason(nvml: Any, exc: BaseException) -> str:
    code = nvml_error_code(exc)
    if code == NVML_ERROR_LIBRARY_NOT_FOUND:
        return "no NVIDIA driver (NVML library not found)"
    if code == NVML_ERROR_DRIVER_NOT_LOADED:
        return "NVIDIA driver not loaded (nvmlInit: Driver Not Loaded)"
    if code == NVML_ERROR_NO_PERMISSION:
        return "no permission to use NVML (nvmlInit: Insufficient Permissions)"
    return f"NVML failed to initialise: {exc}"


def nvml() -> Any | None:
    """The initialised NVML module, or None (the reason is in `nvml_unavailable_reason()`)."""
    with _STATE.lock:
        if _STATE.loaded:
            return _STATE.module
        _STATE.loaded = True
        module = _STATE.injected
        if module is None:
            try:
                import pynvml as module  # nvidia-ml-py; never the deprecated `pynvml` package
            except ImportError:
                _STATE.reason = "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
                return None
        try:
            module.nvmlInit()
        except module.NVMLError as exc:
            _STATE.reason = _init_reason(module, exc)
            logger.info("GPU energy unavailable: %s", _STATE.reason)
            return None
        except OSError as exc:  # a broken libnvidia-ml.so raises OSError from ctypes
            _STATE.reason = f"NVML library could not be loaded: {exc}"
            return None
        _STATE.module = module
        _STATE.reason = None
        return module


def nvml_unavailable_reason() -> str | None:
    nvml()
    return _STATE.reason


def _text(value: Any) -> str:
    """nvidia-ml-py returns str, old releases returned bytes."""
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_query(nvml_module: Any, function: Callable[..., Any], *args: Any) -> Any | None:
    """Call one NVML query; None where the GPU or driver does not support it or refuses it."""
    try:
        return function(*args)
    except nvml_module.NVMLError as exc:
        logger.debug("NVML %s%s failed: %s", getattr(function, "__name__", function), args, exc)
        return None


# ---------------------------------------------------------------------------------------------
# CUDA_VISIBLE_DEVICES -> NVML devices


@dataclass(frozen=True)
class _Physical:
    index: int
    uuid: str
    name: str
    handle: Any
    mig_mode_enabled: bool


def _physical_gpus(nv: Any) -> list[_Physical]:
    gpus: list[_Physical] = []
    for index in range(nv.nvmlDeviceGetCount()):
        handle = nv.nvmlDeviceGetHandleByIndex(index)
        mig = nvml_query(nv, nv.nvmlDeviceGetMigMode, handle)
        gpus.append(
            _Physical(
                index=index,
                uuid=_text(nv.nvmlDeviceGetUUID(handle)),
                name=_text(nvml_query(nv, nv.nvmlDeviceGetName, handle) or "unknown GPU"),
                handle=handle,
                mig_mode_enabled=bool(mig and mig[0] == 1),
            )
        )
    return gpus


def _device(gpu: _Physical, visible_index: int) -> GpuDevice:
    return GpuDevice(
        index=gpu.index,
        uuid=gpu.uuid,
        name=gpu.name,
        visible_index=visible_index,
        mig_mode_enabled=gpu.mig_mode_enabled,
        handle=gpu.handle,
        counter_handle=gpu.handle,
    )


def _mig_device(nv: Any, mig_id: str, gpus: Sequence[_Physical], visible_index: int) -> GpuDevice | None:
    """A MIG instance named `MIG-<uuid>` (or the legacy `MIG-GPU-<uuid>/gi/ci`)."""
    if mig_id.startswith("MIG-GPU-"):
        # Legacy form names the parent GPU and the instance ids; its counter is the parent's.
        parent_uuid = mig_id[len("MIG-") :].split("/", 1)[0]
        parent = next((g for g in gpus if g.uuid == parent_uuid), None)
        if parent is None:
            return None
        return GpuDevice(
            index=parent.index,
            uuid=mig_id,
            name=parent.name,
            visible_index=visible_index,
            is_mig_instance=True,
            parent_uuid=parent.uuid,
            mig_mode_enabled=True,
            handle=parent.handle,
            counter_handle=parent.handle,
        )
    handle = nvml_query(nv, nv.nvmlDeviceGetHandleByUUID, mig_id)
    if handle is None:
        return None
    if not nvml_query(nv, nv.nvmlDeviceIsMigDeviceHandle, handle):
        return None
    parent_handle = nv.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
    parent_uuid = _text(nv.nvmlDeviceGetUUID(parent_handle))
    parent = next((g for g in gpus if g.uuid == parent_uuid), None)
    return GpuDevice(
        index=parent.index if parent else int(nv.nvmlDeviceGetIndex(parent_handle)),
        uuid=_text(nv.nvmlDeviceGetUUID(handle)),
        name=parent.name if parent else _text(nv.nvmlDeviceGetName(parent_handle)),
        visible_index=visible_index,
        is_mig_instance=True,
        parent_uuid=parent_uuid,
        mig_mode_enabled=True,
        handle=handle,
        counter_handle=parent_handle,
    )


def parse_visible_devices(value: str | None, nv: Any, gpus: Sequence[_Physical]) -> tuple[list[GpuDevice], str | None]:
    """Apply CUDA's rules for CUDA_VISIBLE_DEVICES. Returns (devices, why the list stopped early).

    Like the CUDA runtime, the list stops at the first entry that matches no device (or repeats
    one): devices after it are invisible to CUDA, so they are not measured either.
    """
    if value is None:
        return [_device(g, i) for i, g in enumerate(gpus)], None
    devices: list[GpuDevice] = []
    seen: set[str] = set()
    for token in (t.strip() for t in value.split(",")):
        position = len(devices)
        device: GpuDevice | None = None
        if token.lstrip("-").isdigit():
            number = int(token)
            if 0 <= number < len(gpus):
                device = _device(gpus[number], position)
        elif token.startswith("GPU-"):
            matches = [g for g in gpus if g.uuid.startswith(token)]
            if len(matches) == 1:  # CUDA accepts unique UUID prefixes
                device = _device(matches[0], position)
        elif token.startswith("MIG-"):
            device = _mig_device(nv, token, gpus, position)
        if device is None or device.uuid in seen:
            stop = (
                f"CUDA_VISIBLE_DEVICES={value!r}: entry {token!r} matches no (new) GPU; CUDA "
                f"ignores it and every entry after it"
            )
            return devices, stop
        seen.add(device.uuid)
        devices.append(device)
    return devices, None


def _warn_device_order(devices: Sequence[GpuDevice], value: str | None) -> None:
    # CUDA numbers GPUs fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID, NVML in PCI order: on a
    # box with different GPU models an index in CUDA_VISIBLE_DEVICES may name another GPU in NVML.
    if value is None or os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID":
        return
    uses_indices = any(t.strip().isdigit() for t in value.split(","))
    if uses_indices and len({d.name for d in devices}) > 1:
        logger.warning(
            "CUDA_VISIBLE_DEVICES uses indices on a box with different GPU models while "
            "CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA and NVML may number the GPUs differently. "
            "Set CUDA_DEVICE_ORDER=PCI_BUS_ID or use GPU UUIDs."
        )


_LAST_REASON: dict[str, str | None] = {"reason": None}


def visible_gpus() -> list[GpuDevice]:
    """The GPUs this process uses ([] without GPU, driver or nvidia-ml-py; see gpu_unavailable_reason)."""
    nv = nvml()
    if nv is None:
        _LAST_REASON["reason"] = _STATE.reason
        return []
    try:
        gpus = _physical_gpus(nv)
    except nv.NVMLError as exc:
        _LAST_REASON["reason"] = f"NVML could not list the GPUs: {exc}"
        return []
    if not gpus:
        _LAST_REASON["reason"] = "NVML found no GPU on this machine"
        return []
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices, stopped = parse_visible_devices(value, nv, gpus)
    if stopped:
        logger.warning(stopped)
    _warn_device_order(devices, value)
    if not devices:
        _LAST_REASON["reason"] = stopped or f"CUDA_VISIBLE_DEVICES={value!r} hides every GPU of this machine"
    else:
        _LAST_REASON["reason"] = None
    return devices


def gpu_unavailable_reason() -> str | None:
    """Why `visible_gpus()` is empty (None when it is not)."""
    return None if visible_gpus() else _LAST_REASON["reason"]


# ---------------------------------------------------------------------------------------------
# Provenance


def _cuda_version_text(value: int | None) -> str | None:
    if value is None:
        return None
    return f"{value // 1000}.{(value % 1000) // 10}"


def describe_gpus(devices: Sequence[GpuDevice] | None = None) -> list[dict[str, Any]]:
    """Facts of each used GPU for provenance: model, driver, settings that change a measurement."""
    nv = nvml()
    if nv is None:
        return []
    if devices is None:
        devices = visible_gpus()
    driver = nvml_query(nv, nv.nvmlSystemGetDriverVersion)
    cuda_driver = nvml_query(nv, nv.nvmlSystemGetCudaDriverVersion)
    facts: list[dict[str, Any]] = []
    for device in devices:
        h = device.counter_handle  # settings live on the physical GPU
        limit_mw = nvml_query(nv, nv.nvmlDeviceGetPowerManagementLimit, h)
        persistence = nvml_query(nv, nv.nvmlDeviceGetPersistenceMode, h)
        ecc = nvml_query(nv, nv.nvmlDeviceGetEccMode, h)
        mig = nvml_query(nv, nv.nvmlDeviceGetMigMode, h)
        memory = nvml_query(nv, nv.nvmlDeviceGetMemoryInfo, device.handle)
        facts.append(
            {
                "name": device.name,
                "uuid": device.uuid,
                "index": device.index,
                "visible_index": device.visible_index,
                "driver": _text(driver) if driver is not None else None,
                "cuda_driver_version": _cuda_version_text(cuda_driver),
                "power_limit_w": limit_mw / 1000.0 if limit_mw is not None else None,
                "persistence_mode": bool(persistence) if persistence is not None else None,
                "applications_clock_sm_mhz": nvml_query(nv, nv.nvmlDeviceGetApplicationsClock, h, NVML_CLOCK_SM),
                "applications_clock_mem_mhz": nvml_query(nv, nv.nvmlDeviceGetApplicationsClock, h, NVML_CLOCK_MEM),
                "ecc_enabled": bool(ecc[0]) if ecc is not None else None,
                "mig_mode": bool(mig[0]) if mig is not None else None,
                "is_mig_instance": device.is_mig_instance,
                "parent_uuid": device.parent_uuid,
                "temperature_c": nvml_query(nv, nv.nvmlDeviceGetTemperature, h, NVML_TEMPERATURE_GPU),
                "memory_total_bytes": int(memory.total) if memory is not None else None,
            }
        )
    return facts
