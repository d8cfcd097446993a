"""CodeCarbon 3.3.2: emissions factor, and CPU/RAM estimates where RAPL is missing.

What this module uses of CodeCarbon, and why (read from codecarbon/emissions_tracker.py 3.3.2):
- `OfflineEmissionsTracker(country_iso_code=, region=, measure_power_secs=1, output_methods=[],
  log_level="error", tracking_mode="machine", pue=1.0)`. `output_methods=[]` writes nothing (the
  older `save_to_file=False` does the same but is deprecated in 3.3 and warns). The online tracker
  is never used (it probes the network and falls back to Canada). "machine" mode, like RAPL and
  the idle baseline, covers the whole machine, so gross - baseline x duration means the same for
  every source; pue stays 1.0 here because CodeCarbon multiplies its energies by it and the window
  records IT energy (PUE is applied to emissions only).
- No tracker thread while anything is measured: `start()` starts two `PeriodicScheduler` Timer
  threads (`_scheduler` calls `_measure_power_and_energy` every `measure_power_secs`,
  `_scheduler_monitor_power` samples CPU load every second). Both are stopped (and their Timer
  threads joined) right after `start()`, once the 1-3 s hardware probe is done. The session then
  reads the estimate only at window edges, outside the GPU counter's edges:
  `tracker._measure_power_and_energy()` followed by `tracker._total_cpu_energy` /
  `_total_ram_energy` / `_total_gpu_energy` (`Energy`, kWh). Without the monitor thread a read is
  still exact for CodeCarbon's model: the CPU load meter and the power history measure from the
  previous read, so the closing read covers exactly the span since the opening one.
- `start()` is decorated with `@suppress(Exception)`, so a failure inside it is swallowed: success
  is checked through `tracker._start_time`.
- Emissions: the tracker's emissions engine gives the grid's carbon intensity for the configured
  country/region (`_emissions.get_private_infra_emissions(1 kWh, geo)`); a window's kg CO2eq is
  that intensity x PUE x the window's energy as recorded (GPU by counter of the used GPUs only,
  CPU/DRAM from RAPL or this estimate). CodeCarbon's own emissions total is not used because its GPU
  part covers every GPU of the box, idle neighbours included.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llm_energy import clock
from llm_energy.energy.base import (
    J_PER_KWH,
    METHOD_ESTIMATED,
    SOURCE_CODECARBON,
    SourceStatus,
)

logger = logging.getLogger(__name__)


@dataclass
class CodeCarbonReading:
    time_s: float
    cpu_j: float
    ram_j: float
    gpu_j: float


def _default_tracker_factory(**kwargs: Any) -> Any:
    from codecarbon import OfflineEmissionsTracker

    return OfflineEmissionsTracker(**kwargs)


class CodeCarbonSource:
    """One offline tracker for the whole session, started once before any window."""

    def __init__(self, country_iso_code: str, region: str | None, tracker_factory: Callable[..., Any] | None = None):
        self.country_iso_code = country_iso_code
        self.region = region
        self._factory = tracker_factory or _default_tracker_factory
        self._lock = threading.Lock()
        self.tracker: Any = None
        self.intensity_kg_per_kwh: float | None = None
        self.emissions_reason: str | None = "CodeCarbon not started"
        self.status = SourceStatus(
            name="codecarbon",
            domains=[],
            available=False,
            reason="CodeCarbon not started",
            method=METHOD_ESTIMATED,
            details={"source": SOURCE_CODECARBON},
        )

    def start(self) -> None:
        """Start the tracker (its first start probes the hardware for 1-3 s). Never raises."""
        started = clock.now()
        try:
            try:  # its import sets the "codecarbon" logger to INFO; silence it after that
                import codecarbon  # noqa: F401
            except ImportError:
                pass  # the factory raises a clear error below
            logging.getLogger("codecarbon").setLevel(logging.ERROR)
            self.tracker = self._factory(
                country_iso_code=self.country_iso_code,
                region=self.region,
                measure_power_secs=1,
                output_methods=[],
                log_level="error",
                tracking_mode="machine",
                pue=1.0,
                allow_multiple_runs=True,
            )
            self.tracker.start()
            if getattr(self.tracker, "_start_time", None) is None:
                raise RuntimeError(
                    "OfflineEmissionsTracker.start() did not start (its errors are "
                    "suppressed; run with CODECARBON_LOG_LEVEL=debug to see them)"
                )
            self._stop_tracker_threads()
        except Exception as exc:  # CodeCarbon failing must not fail the run
            self.tracker = None
            reason = f"CodeCarbon failed to start: {type(exc).__name__}: {exc}"
            self.status.available, self.status.reason = False, reason
            self.emissions_reason = reason
            logger.warning(reason)
            return
        self.status.available, self.status.reason = True, None
        self.status.domains = ["cpu", "dram"]
        self.status.details.update(self._hardware_facts(clock.now() - started))
        self._resolve_intensity()

    def _stop_tracker_threads(self) -> None:
        """Stop CodeCarbon's scheduler Timer threads; reads happen only at window edges."""
        for name in ("_scheduler", "_scheduler_monitor_power"):
            scheduler = getattr(self.tracker, name, None)
            if scheduler is None:
                continue
            scheduler.stop()
            timer = getattr(scheduler, "_timer", None)
            if timer is not None and timer.is_alive():
                timer.join(timeout=2.0)  # a running measurement finishes first

    def _hardware_facts(self, start_s: float) -> dict[str, Any]:
        conf = getattr(self.tracker, "_conf", {}) or {}
        return {
            "start_s": round(start_s, 3),
            "tracking_mode": "machine",
            "reads": "at window edges only (tracker threads stopped after start)",
            "estimators": [str(h) for h in getattr(self.tracker, "_hardware", [])],
            "cpu_model": conf.get("cpu_model"),
            "codecarbon_version": conf.get("codecarbon_version"),
        }

    def _resolve_intensity(self) -> None:
        try:
            from codecarbon.core.units import Energy
            from codecarbon.input import DataSource

            mix = DataSource().get_global_energy_mix_data()
            if self.country_iso_code not in mix:
                # CodeCarbon would silently fall back to a world average: say so instead.
                self.emissions_reason = (
                    f"country_iso_code {self.country_iso_code!r} is not in CodeCarbon's energy-mix "
                    f"data; set energy.country_iso_code to the 3-letter code of the grid's country"
                )
                return
            self.tracker._ensure_geo_metadata()
            self.tracker._ensure_emissions_engine()
            kg = self.tracker._emissions.get_private_infra_emissions(Energy.from_energy(kWh=1.0), self.tracker._geo)
            self.intensity_kg_per_kwh = float(kg)
            self.emissions_reason = None
            self.status.details["carbon_intensity_g_per_kwh"] = round(1000.0 * kg, 3)
            self.status.details["emissions_basis"] = (
                "carbon intensity x PUE x gross energy of the window's available domains"
            )
        except Exception as exc:
            self.emissions_reason = f"CodeCarbon could not give a carbon intensity: {exc}"
            logger.warning(self.emissions_reason)

    def read(self) -> CodeCarbonReading | None:
        """Cumulative estimates up to now (J). None if the tracker is not running."""
        if self.tracker is None:
            return None
        with self._lock:
            try:
                self.tracker._measure_power_and_energy()
                return CodeCarbonReading(
                    time_s=clock.now(),
                    cpu_j=self.tracker._total_cpu_energy.kWh * J_PER_KWH,
                    ram_j=self.tracker._total_ram_energy.kWh * J_PER_KWH,
                    gpu_j=self.tracker._total_gpu_energy.kWh * J_PER_KWH,
                )
            except Exception as exc:
                logger.warning("CodeCarbon measurement failed: %s", exc)
                return None

    def emissions_kg(self, energy_j: float, pue: float) -> float | None:
        if self.intensity_kg_per_kwh is None:
            return None
        return self.intensity_kg_per_kwh * pue * energy_j / J_PER_KWH

    def stop(self) -> None:
        if self.tracker is not None:
            with self._lock:
                try:
                    self.tracker.stop()
                except Exception as exc:
                    logger.warning("CodeCarbon stop failed: %s", exc)
            self.tracker = None
