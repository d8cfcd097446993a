"""EnergySession: the one object the harness uses to measure energy around windows.

    session = EnergySession(settings, devices=hardware.visible_gpus(), baseline_path=path)
    session.start()              # sampler process + CodeCarbon probe, once, before any window
    session.ensure_baseline()    # static idle power per domain, before any CUDA context
    handle = session.open_window("model_load")
    ...                          # load the model
    session.bind_to_process_gpus()   # only the GPUs holding this process tree's contexts
    record = session.close_window(handle)
    ...                          # warm-up
    session.use_baseline(session.measure_active_idle(5.0))   # idle in the loaded state
    handle = session.open_window("inference")
    ...                          # the work
    record = session.close_window(handle)
    session.stop()

Nothing of the session runs inside a window in the measured process: the power timeline is
sampled by a separate process (sampler.py), whose rows are read when a window closes, and
CodeCarbon's tracker threads are stopped after its start (codecarbon.py). Between `open_window`
and `close_window` the measured process runs its own threads only.

Edges are read in mirror order, so that the GPU counter (the precise measurement) sits innermost,
right next to the work, with RAPL read right after it at both edges (so both cover the same span):
open = CodeCarbon, GPU settings/processes, GPU counter (aligned), RAPL;
close = GPU counter (aligned), RAPL, CodeCarbon, GPU settings/processes.
CodeCarbon's estimate is a power model over its own read times, which lie outside the window's
edges; it is scaled to the window's duration.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llm_energy import clock, hardware
from llm_energy.energy import timeline, validity
from llm_energy.energy.base import (
    METHOD_ESTIMATED,
    METHOD_MEASURED,
    SOURCE_CODECARBON,
    SOURCE_EMISSIONS,
    SOURCE_NVML,
    SOURCE_RAPL,
    EnergySettings,
    SourceStatus,
    net_energy,
    unavailable,
)
from llm_energy.energy.baseline import (
    active_idle_from_window,
    baseline_from_window,
    baseline_power,
    load_fresh_baseline,
    save_baseline,
)
from llm_energy.energy.codecarbon import CodeCarbonReading, CodeCarbonSource
from llm_energy.energy.nvml import CounterEdge, NvmlEnergySource, own_process_tree
from llm_energy.energy.rapl import POWERCAP_ROOT, RaplRaw, RaplReader
from llm_energy.energy.sampler import ProcessSampler, SamplerDevice, SamplerSink, ThreadSampler
from llm_energy.energy.timeline import TimelineStore, integrate_power

logger = logging.getLogger(__name__)

GAP_FLAG_PERIODS = 5  # a timeline gap longer than this many periods raises "timeline_gaps"
IDLE_UTILIZATION_PCT = 5.0  # mean GPU utilisation above this during the baseline: "gpu_not_idle"


def _disabled(key: str) -> str:
    return f"disabled by config (energy.{key}: false)"


@dataclass
class WindowHandle:
    """What `open_window` read at the opening edge. Pass it back to `close_window`."""

    name: str
    start_s: float
    gpu_edge: CounterEdge | None = None
    gpu_error: str | None = None
    rapl_start: RaplRaw | None = None
    rapl_error: str | None = None
    codecarbon_start: CodeCarbonReading | None = None
    gpu_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    gpu_pids: dict[str, set[int]] = field(default_factory=dict)
    closed: bool = False


class EnergySession:
    """Energy of GPU (NVML counter), CPU and DRAM (RAPL or CodeCarbon estimate) over windows."""

    def __init__(
        self,
        settings: EnergySettings,
        devices: Sequence[hardware.GpuDevice] | None = None,
        baseline_path: Path | str | None = None,
        *,
        nvml_module: Any = None,
        powercap_root: Path | str = POWERCAP_ROOT,
        rapl_read_text: Callable[[Path], str] | None = None,
        codecarbon_factory: Callable[..., Any] | None = None,
        measure_counter_period: bool = True,
        sampler: str = "process",
        sampler_nvml_module: str | None = None,
    ):
        """`sampler`: "process" (the sampler child process; always in production) or "thread"
        (unit tests that inject a fake `nvml_module`, which a child process cannot share).
        `sampler_nvml_module`: `module:factory` the child imports instead of pynvml (tests)."""
        if sampler not in ("process", "thread"):
            raise ValueError(f"sampler must be 'process' or 'thread', not {sampler!r}")
        self.settings = settings
        self.baseline_path = Path(baseline_path) if baseline_path is not None else None
        self.baseline: dict[str, Any] | None = None  # static idle (no CUDA context)
        self.active_baseline: dict[str, Any] | None = None  # active idle (model resident)
        self._no_baseline_reason = "no idle baseline was measured (call ensure_baseline)"
        self._measure_counter_period = measure_counter_period
        self._sampler_mode = sampler
        self._sampler_nvml_module = sampler_nvml_module
        self._started = False
        self._stopped = False
        self._lock = threading.Lock()
        self._store = TimelineStore()
        self._sink = SamplerSink(self._store.extend)
        self._timeline_reason: str | None = None if settings.timeline else _disabled("timeline")
        self.binding: dict[str, Any] = {
            "method": "not bound (bind_to_process_gpus not called)",
            "bound": False,
            "candidates": [],
            "uuids": [],
        }

        # GPU: the NVML counter of each used GPU
        self.gpu: NvmlEnergySource | None = None
        self._gpu_reason: str | None = None
        if not settings.gpu:
            self._gpu_reason = _disabled("gpu")
        else:
            if devices is None:
                devices = hardware.visible_gpus()
            nv = nvml_module if nvml_module is not None else (hardware.nvml() if devices else None)
            if not devices or nv is None:
                self._gpu_reason = hardware.gpu_unavailable_reason() or "no GPU in use"
            else:
                self.gpu = NvmlEnergySource(nv, devices)
                injected = getattr(nv, "__name__", None) != "pynvml"
                if injected and sampler == "process" and sampler_nvml_module is None:
                    raise ValueError(
                        "an injected NVML module cannot reach the sampler process: "
                        "use sampler='thread' or give sampler_nvml_module"
                    )

        # CPU/DRAM: RAPL
        self.rapl: RaplReader | None = None
        if settings.rapl:
            kwargs = {"read_text": rapl_read_text} if rapl_read_text is not None else {}
            self.rapl = RaplReader(powercap_root, **kwargs)

        # Emissions and the CPU/RAM estimate: CodeCarbon
        self.codecarbon: CodeCarbonSource | None = None
        if settings.codecarbon:
            self.codecarbon = CodeCarbonSource(
                settings.country_iso_code, settings.region, tracker_factory=codecarbon_factory
            )
        self.sampler: ProcessSampler | ThreadSampler | None = None

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Open the sources and start the sampler and CodeCarbon (once; later calls do nothing)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        started = clock.now()
        if self.gpu is not None:
            self.gpu.start(measure_period=self._measure_counter_period)
            if not self.gpu.status.available:
                self._gpu_reason = self.gpu.status.reason
        if self.rapl is not None:
            self.rapl.open()
        if self._gpu_ok:
            self.binding["candidates"] = self.binding["uuids"] = self._counter_uuids()
        if self.codecarbon is not None:
            self.codecarbon.start()
        if self.settings.timeline:
            self._start_sampler()
        logger.info(
            "energy session started in %.2f s: %s",
            clock.now() - started,
            "; ".join(f"{s['name']}: {'ok' if s['available'] else s['reason']}" for s in self.describe()["sources"]),
        )

    def _start_sampler(self) -> None:
        rapl_ok = self.rapl is not None and self.rapl.status.available
        if not (self._gpu_ok or rapl_ok):
            self._timeline_reason = self._gpu_reason or "no GPU in use"
            return
        period_s = self.settings.timeline_period_s
        if self._sampler_mode == "thread":
            slow_tasks: list[Callable[[], None]] = []
            if rapl_ok:
                slow_tasks.append(lambda: self._sink.rapl(self.rapl.read_raw()))
            if self._gpu_ok:
                slow_tasks.append(self._observe_pids)
            sample = self.gpu.sample if self._gpu_ok else (lambda include_counter: [])
            self.sampler = ThreadSampler(sample, self._sink, period_s, slow_tasks=slow_tasks)
        else:
            devices = (
                [SamplerDevice(c.index, c.uuid, self.gpu.power_methods[c.uuid]) for c in self.gpu.counters]
                if self._gpu_ok
                else []
            )
            zones = [str(z.path) for z in self.rapl.zones] if rapl_ok else []
            self.sampler = ProcessSampler(
                devices, self._sink, period_s, rapl_zones=zones, nvml_module=self._sampler_nvml_module
            )
        try:
            self.sampler.start()
        except RuntimeError as exc:  # no timeline must not fail the run: say why instead
            self.sampler = None
            self._timeline_reason = str(exc)
            logger.warning("power timeline unavailable: %s", exc)
        if not self._gpu_ok:
            self._timeline_reason = self._gpu_reason or "no GPU in use"

    def stop(self) -> None:
        """Stop the sampler and CodeCarbon. Safe to call twice."""
        with self._lock:
            if self._stopped or not self._started:
                self._stopped = True
                return
            self._stopped = True
        if self.sampler is not None:
            self.sampler.stop()
        if self.codecarbon is not None:
            self.codecarbon.stop()

    def __enter__(self) -> EnergySession:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def _gpu_ok(self) -> bool:
        return self.gpu is not None and self.gpu.status.available

    def _observe_pids(self) -> None:
        now = clock.now()
        for uuid, pids in self.gpu.compute_pids().items():
            self._sink.pids(now, uuid, frozenset(pids))

    @property
    def _timeline_on(self) -> bool:
        """A sampler records the GPU power timeline (a cross-check of every window)."""
        return self.sampler is not None and self._gpu_ok

    # -- the GPUs the job uses --------------------------------------------------------------

    def bind_to_process_gpus(self, uuids: Sequence[str] | None = None) -> list[str]:
        """Narrow the measured GPUs to those this job uses; call it right after model load.

        With `CUDA_VISIBLE_DEVICES` set, or a single candidate GPU, the candidates are the job's
        GPUs already: nothing changes. Otherwise the GPUs whose NVML compute-process list holds
        this process or one of its descendants (e.g. engine workers) are kept; `uuids` names them
        instead where the caller knows better. Windows closed afterwards report these GPUs only
        (a window opened before, e.g. model_load, read every candidate at its opening edge and
        reports the bound ones). Returns the UUIDs of the energy counters measured from now on.
        """
        if not self._gpu_ok:
            return []
        current = self._counter_uuids()
        if uuids is None:
            if os.environ.get("CUDA_VISIBLE_DEVICES") is not None or len(current) == 1:
                method = "CUDA_VISIBLE_DEVICES" if os.environ.get("CUDA_VISIBLE_DEVICES") is not None else "single GPU"
                self.binding.update(method=method, bound=True, uuids=current)
                return current
            own = own_process_tree()
            held = self.compute_processes() or {}
            uuids = [u for u in current if held.get(u, set()) & own]
            if not uuids:
                reason = (
                    "no candidate GPU lists a compute process of this process tree (in a "
                    "container the PID namespace can hide them): every candidate GPU stays "
                    "measured; set CUDA_VISIBLE_DEVICES to measure only the job's GPUs"
                )
                logger.warning(reason)
                self.binding.update(method="compute processes", bound=False, reason=reason)
                return current
            method = "compute processes of this process tree"
        else:
            unknown = [u for u in uuids if u not in current]
            if unknown:
                raise ValueError(f"GPU {unknown[0]} is not one of the measured GPUs {current}")
            uuids = [u for u in current if u in set(uuids)]
            method = "given by the caller"
        self.gpu.restrict(uuids)
        if self.sampler is not None:
            self.sampler.bind(uuids)
        self.binding.update(method=method, bound=True, uuids=list(uuids))
        self.binding.pop("reason", None)
        logger.info("measuring GPUs %s (%s)", uuids, method)
        return list(uuids)

    def compute_processes(self) -> dict[str, set[int]] | None:
        """NVML's compute processes on each measured GPU now (None without GPU energy)."""
        if not self._gpu_ok:
            return None
        try:
            return self.gpu.compute_pids()
        except self.gpu.nv.NVMLError as exc:
            logger.warning("NVML compute-process list failed: %s", exc)
            return None

    # -- windows --------------------------------------------------------------------------

    def open_window(self, name: str) -> WindowHandle:
        """Read every source at the opening edge; the GPU counter last, next to the work."""
        if self._stopped:
            raise RuntimeError("this EnergySession is stopped; create a new one for more windows")
        if not self._started:
            logger.warning("open_window before start(): starting now (CodeCarbon's first start takes 1-3 s)")
            self.start()
        handle = WindowHandle(name=name, start_s=math.nan)
        if self.codecarbon is not None:
            handle.codecarbon_start = self.codecarbon.read()
        if self._gpu_ok:
            try:
                handle.gpu_settings = self.gpu.settings_snapshot()
                handle.gpu_pids = self.gpu.compute_pids()
                handle.gpu_edge = self.gpu.read_edge(self.settings.align_counter_edges)
            except self.gpu.nv.NVMLError as exc:
                handle.gpu_error = f"NVML read failed at window open: {exc}"
        if self.rapl is not None and self.rapl.status.available:
            try:
                handle.rapl_start = self.rapl.read_raw()
            except OSError as exc:
                handle.rapl_error = f"RAPL read failed at window open: {exc}"
        handle.start_s = handle.gpu_edge.time_s if handle.gpu_edge else clock.now()
        if handle.gpu_edge is not None:
            self._store.extend(self.gpu.edge_rows(handle.gpu_edge))
        return handle

    def close_window(self, handle: WindowHandle) -> dict[str, Any]:
        """Read every source at the closing edge and return the window record (JSON-able)."""
        if handle.closed:
            raise ValueError(f"window {handle.name!r} is already closed")
        handle.closed = True
        gpu_edge: CounterEdge | None = None
        gpu_error = handle.gpu_error
        if self._gpu_ok and handle.gpu_edge is not None:
            try:
                gpu_edge = self.gpu.read_edge(self.settings.align_counter_edges)
            except self.gpu.nv.NVMLError as exc:
                gpu_error = f"NVML read failed at window close: {exc}"
        end_s = gpu_edge.time_s if gpu_edge else clock.now()
        rapl_end = None
        rapl_error = handle.rapl_error
        if handle.rapl_start is not None:
            try:
                rapl_end = self.rapl.read_raw()
            except OSError as exc:
                rapl_error = f"RAPL read failed at window close: {exc}"
        if gpu_edge is not None:
            self._store.extend(self.gpu.edge_rows(gpu_edge))
        cc_end = self.codecarbon.read() if self.codecarbon is not None else None
        gpu_settings_end: dict[str, dict[str, Any]] = {}
        gpu_pids_end: dict[str, set[int]] = {}
        if gpu_edge is not None:
            try:
                gpu_settings_end = self.gpu.settings_snapshot()
                gpu_pids_end = self.gpu.compute_pids()
            except self.gpu.nv.NVMLError as exc:
                logger.warning("NVML settings read failed at window close: %s", exc)
                gpu_settings_end = handle.gpu_settings
        # The sampler's rows, pids and raw RAPL values up to past the window's end: read now,
        # after the work, never during it.
        if self.sampler is not None:
            if self._timeline_on and gpu_edge is not None:
                if not self.sampler.wait_past(end_s):
                    logger.warning("timeline sampler wrote no row past the end of window %r", handle.name)
            else:
                self.sampler.collect()
        rapl_energy = None
        if handle.rapl_start is not None and rapl_end is not None:
            rapl_energy = self.rapl.energy_between(handle.rapl_start, rapl_end, self._sink.rapl_samples)

        start_s = handle.start_s
        duration_s = end_s - start_s
        flags: set[str] = set()
        domains: dict[str, Any] = {}
        domains["gpu"] = self._gpu_domain(
            handle, gpu_edge, gpu_error, gpu_settings_end, gpu_pids_end, start_s, end_s, flags
        )
        for domain in ("cpu", "dram"):
            domains[domain] = self._host_domain(
                domain, rapl_energy, rapl_error, handle.codecarbon_start, cc_end, duration_s
            )
        return {
            "name": handle.name,
            "start_s": start_s,
            "end_s": end_s,
            "duration_s": duration_s,
            "domains": domains,
            "emissions": self._emissions(domains),
            "baseline": self._baseline_summary(),
            "flags": sorted(flags),
        }

    # -- domains --------------------------------------------------------------------------

    def _gpu_domain(
        self,
        handle: WindowHandle,
        edge: CounterEdge | None,
        error: str | None,
        settings_end: dict[str, dict[str, Any]],
        pids_end: dict[str, set[int]],
        start_s: float,
        end_s: float,
        flags: set[str],
    ) -> dict[str, Any]:
        if not self._gpu_ok:
            return unavailable(self._gpu_reason or "no GPU in use")
        if edge is None or handle.gpu_edge is None:
            return unavailable(error or "the GPU counters were not read at both edges")
        gpu = self.gpu
        duration_s = end_s - start_s
        period_s = gpu.period_s
        # the window's rows plus neighbours on both sides, for interpolation at the edges
        margin_s = max(1.0, 3 * self.settings.timeline_period_s)
        frame = self._store.frame_between(start_s - margin_s, end_s + margin_s)
        devices: list[dict[str, Any]] = []
        gross_j = 0.0
        timeline_j: float | None = 0.0
        max_gap_s = 0.0
        for counter in gpu.counters:
            delta_mj = edge.counters_mj[counter.uuid] - handle.gpu_edge.counters_mj[counter.uuid]
            if delta_mj < 0:
                flags.add("counter_reset")
                return unavailable(
                    f"the NVML energy counter of GPU {counter.index} ({counter.uuid}) went "
                    f"backwards during window {handle.name!r} (driver reloaded?)"
                )
            device_j = delta_mj / 1000.0
            gross_j += device_j
            devices.append(
                {
                    "index": counter.index,
                    "uuid": counter.uuid,
                    "gross_j": device_j,
                    "counter_updates": validity.counter_updates(duration_s, period_s),
                }
            )
            if not self._timeline_on:
                timeline_j = None
                continue
            rows = frame[frame["device_uuid"] == counter.uuid]
            integral = integrate_power(
                rows["time_s"].to_numpy(), rows["power_w"].to_numpy(), start_s, end_s, max_edge_gap_s=2.5 * period_s
            )
            if integral.energy_j is None or timeline_j is None:
                timeline_j = None
            else:
                timeline_j += integral.energy_j
                max_gap_s = max(max_gap_s, integral.max_gap_s)

        if min(d["counter_updates"] for d in devices) < self.settings.min_counter_updates:
            flags.add("short_window")
        if self.settings.align_counter_edges and (handle.gpu_edge.aligned is False or edge.aligned is False):
            flags.add("counter_edge_unaligned")
        frame = frame[frame["device_uuid"].isin(self._counter_uuids())]
        window_rows = frame[(frame["time_s"] >= start_s) & (frame["time_s"] <= end_s)]
        rel_diff = None
        if not self._timeline_on:
            pass  # no sampler: no cross-check, so no timeline flags (timeline_reason says why)
        elif timeline_j is None:
            flags.add("timeline_gaps")  # power reads failed: the samples do not cover the window
        else:
            rel_diff = validity.relative_difference(timeline_j, gross_j)
            if rel_diff is not None and abs(rel_diff) > self.settings.counter_timeline_tolerance:
                flags.add("timeline_counter_disagree")
            if max_gap_s > GAP_FLAG_PERIODS * self.settings.timeline_period_s:
                flags.add("timeline_gaps")
        reasons = window_rows["clocks_event_reasons"].dropna()
        flags |= validity.throttle_flags(int(r) for r in reasons)
        # A window opened before bind_to_process_gpus read every candidate at its opening edge:
        # compare only the GPUs measured now.
        measured = set(self._counter_uuids())
        settings_start = {u: v for u, v in handle.gpu_settings.items() if u in measured}
        pids_start = {u: v for u, v in handle.gpu_pids.items() if u in measured}
        if validity.settings_changed(settings_start, settings_end, window_rows["power_limit_w"].to_numpy()):
            flags.add("gpu_settings_changed")
        observed = set().union(
            *pids_start.values(),
            *pids_end.values(),
            *(
                pids
                for t, uuid, pids in list(self._sink.pid_observations)
                if start_s <= t <= end_s and uuid in self._counter_uuids()
            ),
        )
        foreign = validity.foreign_pids(observed, own_process_tree())
        if foreign:
            flags.add("foreign_processes")
            logger.warning("window %r: other processes on the measured GPUs: %s", handle.name, sorted(foreign))

        baseline_w, baseline_reason, baseline_kind = self._baseline_for("gpu", SOURCE_NVML)
        if baseline_kind == "active_idle" and self._power_state_differs(window_rows):
            flags.add("baseline_power_state_differs")
        record: dict[str, Any] = {
            "available": True,
            "source": SOURCE_NVML,
            "method": METHOD_MEASURED,
            "gross_j": gross_j,
            "baseline_w": baseline_w,
            "net_j": net_energy(gross_j, baseline_w, duration_s),
            "baseline_reason": baseline_reason,
            "baseline_kind": baseline_kind,
            "devices": devices,
            "timeline_j": timeline_j,
            "timeline_vs_counter_rel_diff": rel_diff,
            "sm_clock_mhz_mean": _mean_sm_clock(window_rows),
        }
        if not self._timeline_on:
            record["timeline_reason"] = self._timeline_reason or "no timeline sampler"
        shared = [c for c in gpu.counters if c.shares_counter]
        if shared:
            flags.add("mig_shared_counter")
            record["note"] = "; ".join(
                f"GPU {c.index} ({c.uuid}) is MIG-partitioned: its counter covers every instance "
                f"on it" + (f", measured for {', '.join(c.mig_instances)}" if c.mig_instances else "")
                for c in shared
            )
        return record

    def _host_domain(
        self,
        domain: str,
        rapl_energy: dict | None,
        rapl_error: str | None,
        cc_start: CodeCarbonReading | None,
        cc_end: CodeCarbonReading | None,
        duration_s: float,
    ) -> dict[str, Any]:
        """cpu or dram: RAPL where it exists, else CodeCarbon's estimate, else unavailable."""
        if self.rapl is None:
            rapl_reason = _disabled("rapl")
        else:
            rapl_reason = rapl_error or self.rapl.domain_reasons.get(domain)
        if rapl_energy is not None and rapl_reason is None:
            gross_j = rapl_energy["domains"][domain]
            baseline_w, baseline_reason, baseline_kind = self._baseline_for(domain, SOURCE_RAPL)
            return {
                "available": True,
                "source": SOURCE_RAPL,
                "method": METHOD_MEASURED,
                "gross_j": gross_j,
                "baseline_w": baseline_w,
                "net_j": net_energy(gross_j, baseline_w, duration_s),
                "baseline_reason": baseline_reason,
                "baseline_kind": baseline_kind,
                "zones": [
                    {"name": name, "path": path, "gross_j": total}
                    for path, (name, zone_domain, total) in rapl_energy["zones"].items()
                    if zone_domain == domain
                ],
            }
        if cc_start is not None and cc_end is not None:
            attribute = "cpu_j" if domain == "cpu" else "ram_j"
            # A model estimate (power x time) over CodeCarbon's own read times, which bracket the
            # window's edges by up to the GPU alignment wait: scale it to the window's duration.
            cc_span_s = cc_end.time_s - cc_start.time_s
            scale = duration_s / cc_span_s if cc_span_s > 0 else 1.0
            gross_j = (getattr(cc_end, attribute) - getattr(cc_start, attribute)) * scale
            baseline_w, baseline_reason, baseline_kind = self._baseline_for(domain, SOURCE_CODECARBON)
            estimators = ", ".join(self.codecarbon.status.details.get("estimators", []))
            return {
                "available": True,
                "source": SOURCE_CODECARBON,
                "method": METHOD_ESTIMATED,
                "gross_j": gross_j,
                "baseline_w": baseline_w,
                "net_j": net_energy(gross_j, baseline_w, duration_s),
                "baseline_reason": baseline_reason,
                "baseline_kind": baseline_kind,
                "note": (
                    f"RAPL unavailable ({rapl_reason}); CodeCarbon's model estimate "
                    f"({estimators}, whole machine), not a measurement"
                ),
            }
        if self.codecarbon is None:
            cc_reason = _disabled("codecarbon")
        else:
            cc_reason = self.codecarbon.status.reason or "CodeCarbon gave no reading"
        return unavailable(f"{rapl_reason}; no estimate either: {cc_reason}")

    # -- baselines used by windows -----------------------------------------------------------

    def _baseline_for(self, domain: str, source: str) -> tuple[float | None, str | None, str | None]:
        """(power W, why none, "active_idle"|"static_idle"): active idle first, where it has
        the domain from the same source; the GPU power is that of the measured GPUs only."""
        uuids = self._counter_uuids() if domain == "gpu" else None
        if self.active_baseline is not None:
            watts, reason = baseline_power(self.active_baseline, domain, source, gpu_uuids=uuids)
            if watts is not None:
                return watts, None, "active_idle"
        watts, reason = baseline_power(self.baseline, domain, source, self._no_baseline_reason, gpu_uuids=uuids)
        return watts, reason, ("static_idle" if watts is not None else None)

    def _power_state_differs(self, window_rows: pd.DataFrame) -> bool:
        reference = (self.active_baseline or {}).get("sm_clock_mhz_mean")
        window = _mean_sm_clock(window_rows)
        if reference is None or window is None or reference <= 0:
            return False
        return abs(window - reference) / reference > self.settings.baseline_clock_tolerance

    def _baseline_summary(self) -> dict[str, Any]:
        """Both baselines' power per domain (W), for every window record."""

        def powers(data: dict[str, Any] | None) -> dict[str, Any] | None:
            if data is None:
                return None
            summary = {d: (e.get("power_w") if e.get("available") else None) for d, e in data["domains"].items()}
            if "sm_clock_mhz_mean" in data:
                summary["sm_clock_mhz_mean"] = data["sm_clock_mhz_mean"]
            return summary

        return {"active_idle": powers(self.active_baseline), "static_idle": powers(self.baseline)}

    def _emissions(self, domains: dict[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = {
            "available": False,
            "source": SOURCE_EMISSIONS,
            "country_iso_code": self.settings.country_iso_code,
            "pue": self.settings.pue,
            "kg_co2eq": None,
            "reason": None,
        }
        if self.codecarbon is None:
            record["reason"] = _disabled("codecarbon")
            return record
        energy_j = sum(d["gross_j"] for d in domains.values() if d.get("available"))
        kg = self.codecarbon.emissions_kg(energy_j, self.settings.pue)
        if kg is None:
            record["reason"] = self.codecarbon.emissions_reason or "no carbon intensity"
            return record
        record["available"] = True
        record["kg_co2eq"] = kg
        return record

    # -- baseline -------------------------------------------------------------------------

    def _counter_uuids(self) -> list[str]:
        return [c.uuid for c in self.gpu.counters] if self._gpu_ok else []

    def ensure_baseline(self) -> dict[str, Any]:
        """Idle power per domain: reuse `baseline_path` if fresh, else measure (and save) it."""
        if not self._started:
            self.start()
        if self.settings.baseline.duration_s == 0:
            self._no_baseline_reason = "idle baseline skipped (energy.baseline.duration_s: 0)"
            logger.info(self._no_baseline_reason)
            return {"skipped": True, "reason": self._no_baseline_reason, "reused": False, "path": None}
        if self.baseline_path is not None:
            data, why = load_fresh_baseline(self.baseline_path, self.settings.baseline.max_age_s, self._counter_uuids())
            logger.info("idle baseline: %s", why)
            if data is not None:
                self.baseline = data
                return {**data, "reused": True, "path": str(self.baseline_path)}
        data = self.measure_baseline()
        if self.baseline_path is not None:
            from llm_energy import provenance

            save_baseline(self.baseline_path, data, provenance.collect())
        self.baseline = data
        return {**data, "reused": False, "path": str(self.baseline_path) if self.baseline_path else None}

    def measure_baseline(self) -> dict[str, Any]:
        """Measure idle power for `energy.baseline.duration_s` with nothing running."""
        duration_s = self.settings.baseline.duration_s
        logger.info("measuring idle baseline for %.1f s", duration_s)
        saved, self.baseline = self.baseline, None
        try:
            handle = self.open_window("idle_baseline")
            time.sleep(duration_s)
            record = self.close_window(handle)
        finally:
            self.baseline = saved
        self._flag_busy(record)
        return baseline_from_window(record, self._counter_uuids())

    def _window_rows(self, record: dict[str, Any]) -> pd.DataFrame:
        frame = self._store.frame_between(record["start_s"], record["end_s"])
        return frame[frame["device_uuid"].isin(self._counter_uuids())]

    def _flag_busy(self, record: dict[str, Any]) -> None:
        utilization = self._window_rows(record)["gpu_utilization_pct"].to_numpy(dtype=float)
        if len(utilization) and np.nanmean(utilization) > IDLE_UTILIZATION_PCT:
            record["flags"] = sorted(set(record["flags"]) | {"gpu_not_idle"})
        if record["flags"]:
            logger.warning("%s flags: %s", record["name"], ", ".join(record["flags"]))

    def measure_active_idle(self, duration_s: float) -> dict[str, Any]:
        """Idle power in the current state (model resident, CUDA context held, after warm-up).

        Returns a baseline record like the static one (power per domain, per GPU) plus
        `kind: "active_idle"` and the mean SM clock over its span (None, with
        `sm_clock_reason`, without a timeline). Pass it to `use_baseline` for net energy.
        """
        if duration_s <= 0:
            raise ValueError("measure_active_idle needs a duration > 0 s")
        logger.info("measuring active-idle baseline for %.1f s", duration_s)
        saved_static, saved_active = self.baseline, self.active_baseline
        self.baseline = self.active_baseline = None
        try:
            handle = self.open_window("active_idle_baseline")
            time.sleep(duration_s)
            record = self.close_window(handle)
        finally:
            self.baseline, self.active_baseline = saved_static, saved_active
        self._flag_busy(record)
        clock_mhz = _mean_sm_clock(self._window_rows(record)) if self._timeline_on else None
        reason = (
            None if clock_mhz is not None else (self._timeline_reason or "no SM clock sample in the active-idle window")
        )
        return active_idle_from_window(record, self._counter_uuids(), clock_mhz, reason)

    def use_baseline(self, record: dict[str, Any]) -> None:
        """Later windows' net energy = gross - this baseline's power x duration (per domain where
        it has the window's source; the static idle baseline otherwise)."""
        if record.get("kind") != "active_idle" or "domains" not in record:
            raise ValueError("use_baseline takes the record of measure_active_idle")
        self.active_baseline = record

    # -- outputs --------------------------------------------------------------------------

    def timeline_frame(self) -> pd.DataFrame:
        """Every sample of the measured GPUs (zero rows, same columns, without GPU)."""
        if self.sampler is not None:
            self.sampler.collect()
        frame = self._store.frame()
        return frame[frame["device_uuid"].isin(self._counter_uuids())].reset_index(drop=True)

    def describe(self) -> dict[str, Any]:
        """Each source with its domains, availability and reason, plus the settings."""
        sources: list[dict[str, Any]] = []
        if self.gpu is not None:
            sources.append(self.gpu.status.describe())
        else:
            sources.append(
                SourceStatus(
                    "nvml", ["gpu"], False, self._gpu_reason, METHOD_MEASURED, {"source": SOURCE_NVML}
                ).describe()
            )
        if self.rapl is not None:
            sources.append(self.rapl.status.describe())
        else:
            sources.append(
                SourceStatus(
                    "rapl", ["cpu", "dram"], False, _disabled("rapl"), METHOD_MEASURED, {"source": SOURCE_RAPL}
                ).describe()
            )
        if self.codecarbon is not None:
            cc = self.codecarbon.status.describe()
            # CodeCarbon estimates only the domains RAPL does not measure.
            rapl_domains = self.rapl.status.domains if self.rapl is not None else []
            cc["domains"] = [d for d in cc["domains"] if d not in rapl_domains] + (
                ["emissions"] if self.codecarbon.intensity_kg_per_kwh is not None else []
            )
            cc["emissions_reason"] = self.codecarbon.emissions_reason
            sources.append(cc)
        else:
            sources.append(
                SourceStatus(
                    "codecarbon", [], False, _disabled("codecarbon"), METHOD_ESTIMATED, {"source": SOURCE_CODECARBON}
                ).describe()
            )
        update_period = None
        if self._timeline_on:  # timeline_frame() collects the sampler's rows and counts first
            update_period = timeline.power_update_period_s(self.timeline_frame())
        elif self.sampler is not None:
            self.sampler.collect()
        sink = self._sink
        sources.append(
            {
                "name": "timeline",
                "domains": ["gpu"] if self._timeline_on else [],
                "available": self._timeline_on,
                "reason": None if self._timeline_on else (self._timeline_reason or "no GPU in use"),
                "method": "sampled",
                "period_s": self.settings.timeline_period_s,
                # how often the power reading itself changed in this run's samples (None: too few changes)
                "power_update_period_s": update_period,
                "sampler": self.sampler.mode if self.sampler is not None else None,
                "ticks": sink.ticks,
                "missed_ticks": sink.missed_ticks,
                "read_errors": sink.errors,
                "first_error": sink.first_error,
            }
        )
        return {
            "sources": sources,
            "settings": self.settings.to_dict(),
            "gpu_binding": dict(self.binding),
            "baseline": {"active_idle": self.active_baseline, "static_idle": self.baseline},
            "flag_descriptions": dict(validity.FLAG_DESCRIPTIONS),
        }


def _mean_sm_clock(rows: pd.DataFrame) -> float | None:
    """Mean SM clock (MHz) of timeline rows; None without a valid sample."""
    values = rows["sm_clock_mhz"].to_numpy(dtype=float) if len(rows) else np.array([])
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else None
