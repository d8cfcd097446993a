"""CPU package and DRAM energy from Linux RAPL counters (/sys/class/powercap).

Zones: `intel-rapl:N` (or `amd-rapl:N`) named `package-N` are CPU packages, summed into the cpu
domain; their subzones named `dram` are summed into the dram domain. `core`/`uncore` subzones are
parts of a package (adding them would count twice) and `psys` covers the whole platform including
the packages, so both are ignored.

Wraps: `energy_uj` wraps at `max_energy_range_uj` (about 262 kJ, i.e. 20+ minutes even at 200 W per
package). A window's energy is the sum of wrap-corrected steps along a chain of raw reads: the
raw value read at the opening edge, the raw values the timeline sampler recorded about once a
second *between* the edges (`RaplRaw` samples, written by the sampler process, so the measured
process runs no polling thread), and the raw value read at the closing edge
(`energy_between`). Each step spans at most ~1 s, far less than one wrap period, so a step that
goes backwards wrapped exactly once. Without a sampler (`energy.timeline: false`) the chain is the
two edges alone, which is exact for windows shorter than one wrap period.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_energy import clock
from llm_energy.energy.base import METHOD_MEASURED, SOURCE_RAPL, SourceStatus

logger = logging.getLogger(__name__)

POWERCAP_ROOT = Path("/sys/class/powercap")
_TOP_ZONE = re.compile(r"^(intel|amd)-rapl:(\d+)$")
_SUB_ZONE = re.compile(r"^(intel|amd)-rapl:(\d+):(\d+)$")
PERMISSION_FIX = (
    "run as root or chmod a+r /sys/class/powercap/intel-rapl:*/energy_uj "
    "/sys/class/powercap/intel-rapl:*:*/energy_uj (see README)"
)


@dataclass(frozen=True)
class RaplRaw:
    """Raw `energy_uj` of every zone at one instant (`llm_energy.clock.now()` time)."""

    time_s: float
    raw_uj: dict[str, int]  # zone path -> energy_uj


@dataclass
class RaplZone:
    name: str  # package-0, dram, ...
    path: Path
    domain: str  # "cpu" or "dram"
    max_energy_range_uj: int
    last_raw_uj: int | None = None
    total_uj: int = 0  # wrap-corrected energy since the first read


def _default_read_text(path: Path) -> str:
    return path.read_text()


class RaplReader:
    """Wrap-corrected cumulative energy per RAPL domain. Thread-safe (edges and the sampler read)."""

    def __init__(self, root: Path | str = POWERCAP_ROOT, read_text: Callable[[Path], str] = _default_read_text):
        self.root = Path(root)
        self._read_text = read_text
        self._lock = threading.Lock()
        self.zones: list[RaplZone] = []
        self.domain_reasons: dict[str, str | None] = {"cpu": None, "dram": None}
        self.status = SourceStatus(
            name="rapl",
            domains=[],
            available=False,
            reason="RAPL not opened yet",
            method=METHOD_MEASURED,
            details={"source": SOURCE_RAPL},
        )

    # -- discovery ------------------------------------------------------------------------

    def open(self) -> None:
        """Find the zones and read them once; sets status and per-domain reasons."""
        reason = self._discover()
        if reason is None:
            try:
                self.read_j()
            except OSError as exc:
                reason = self._read_failure(exc)
                self.zones = []
        if reason is not None:
            self.domain_reasons = {"cpu": reason, "dram": reason}
            self.status.available, self.status.reason, self.status.domains = False, reason, []
            logger.info("RAPL unavailable: %s", reason)
            return
        domains = sorted({z.domain for z in self.zones}, key=["cpu", "dram"].index)
        if "dram" not in domains:
            self.domain_reasons["dram"] = f"RAPL under {self.root} exposes no dram zone on this CPU"
        self.status.available, self.status.reason, self.status.domains = True, None, domains
        self.status.details["zones"] = [
            {"name": z.name, "path": str(z.path), "domain": z.domain, "max_energy_range_uj": z.max_energy_range_uj}
            for z in self.zones
        ]

    def _read_failure(self, exc: OSError) -> str:
        where = getattr(exc, "filename", None) or "a RAPL energy_uj file"
        if isinstance(exc, PermissionError):
            return f"cannot read {where}: permission denied; {PERMISSION_FIX}"
        return f"cannot read {where}: {exc.strerror or exc}"

    def _zone(self, path: Path, domain: str) -> RaplZone:
        name = self._read_text(path / "name").strip()
        max_range = int(self._read_text(path / "max_energy_range_uj").strip())
        return RaplZone(name=name, path=path, domain=domain, max_energy_range_uj=max_range)

    def _discover(self) -> str | None:
        if not self.root.is_dir():
            return f"no RAPL: {self.root} is absent"
        self.zones = []
        seen: set[Path] = set()
        try:
            entries = sorted(self.root.iterdir())
            tops = [p for p in entries if _TOP_ZONE.match(p.name)]
            for top in tops:
                name = self._read_text(top / "name").strip()
                if name.startswith("package"):
                    self.zones.append(self._zone(top, "cpu"))
                    seen.add(top.resolve())
                elif name == "dram":  # some servers expose DRAM as a top-level zone
                    self.zones.append(self._zone(top, "dram"))
                    seen.add(top.resolve())
                # psys (whole platform) would double count the packages: ignored
            # Subzones are listed both in the root (class view) and inside their package.
            subs = [p for p in entries if _SUB_ZONE.match(p.name)]
            for top in tops:
                subs += [p for p in sorted(top.iterdir()) if _SUB_ZONE.match(p.name)]
            for sub in subs:
                if sub.resolve() in seen:
                    continue
                seen.add(sub.resolve())
                if self._read_text(sub / "name").strip() == "dram":
                    self.zones.append(self._zone(sub, "dram"))
        except OSError as exc:
            return self._read_failure(exc)
        except ValueError as exc:
            return f"unreadable RAPL zone under {self.root}: {exc}"
        if not any(z.domain == "cpu" for z in self.zones):
            return f"no RAPL package zone under {self.root}"
        return None

    # -- reading --------------------------------------------------------------------------

    def read_j(self) -> dict[str, Any]:
        """Cumulative energy per domain since the first read (J), wrap-corrected, and per zone."""
        with self._lock:
            for zone in self.zones:
                raw = int(self._read_text(zone.path / "energy_uj").strip())
                if zone.last_raw_uj is not None:
                    delta = raw - zone.last_raw_uj
                    if delta < 0:  # the counter wrapped past max_energy_range_uj
                        delta += zone.max_energy_range_uj
                    zone.total_uj += delta
                zone.last_raw_uj = raw
            totals: dict[str, float] = {}
            for zone in self.zones:
                totals[zone.domain] = totals.get(zone.domain, 0.0) + zone.total_uj / 1e6
            return {
                "time_s": clock.now(),
                "domains": totals,
                "zones": {str(z.path): (z.name, z.domain, z.total_uj / 1e6) for z in self.zones},
            }

    def read_raw(self) -> RaplRaw:
        """Raw `energy_uj` of every zone (no accumulation): one edge or sampler read."""
        raw = {str(z.path): int(self._read_text(z.path / "energy_uj").strip()) for z in self.zones}
        return RaplRaw(time_s=clock.now(), raw_uj=raw)

    def energy_between(self, start: RaplRaw, end: RaplRaw, between: list[RaplRaw] = ()) -> dict[str, Any]:
        """Energy per domain and per zone (J) from `start` to `end`, wrap-corrected along the chain.

        `between` may hold samples from any time: only those strictly between the two edges are
        used (in time order), each one step of the chain.
        """
        chain = (
            [start]
            + sorted((r for r in between if start.time_s < r.time_s < end.time_s), key=lambda r: r.time_s)
            + [end]
        )
        domains: dict[str, float] = {}
        zones: dict[str, tuple[str, str, float]] = {}
        for zone in self.zones:
            path = str(zone.path)
            values = [r.raw_uj[path] for r in chain if path in r.raw_uj]
            total_uj = 0
            for previous, current in zip(values, values[1:]):
                step = current - previous
                if step < 0:  # wrapped past max_energy_range_uj (once: a step is ~1 s)
                    step += zone.max_energy_range_uj
                total_uj += step
            domains[zone.domain] = domains.get(zone.domain, 0.0) + total_uj / 1e6
            zones[path] = (zone.name, zone.domain, total_uj / 1e6)
        return {"domains": domains, "zones": zones}

    def poll(self) -> None:
        """Read without using the result: keeps the wrap correction valid on long windows."""
        if self.status.available:
            try:
                self.read_j()
            except OSError as exc:
                logger.warning("RAPL poll failed: %s", exc)
