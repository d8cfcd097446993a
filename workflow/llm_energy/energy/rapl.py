"""CPU package and DRAM energy from Linux RAPL counters (/sys/class/powercap).

Zones: `intel-rapl:N` (or `amd-rapl:N`) named `package-N` are CPU packages, summed into the cpu
domain; their subzones named `dram` are summed into the dram domain. `core`/`uncore` subzones are
parts of a package (adding them would count twice) and `psys` covers the whole platform including
the packages, so both are ignored. `energy_uj` wraps at `max_energy_range_uj`; reads keep a per-zone
accumulator, and the sampler polls about once a second so that at most one wrap happens between
two reads (a wrap takes minutes even at full load).
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

    def __init__(self, root: Path | str = POWERCAP_ROOT,
                 read_text: Callable[[Path], str] = _default_read_text):
        self.root = Path(root)
        self._read_text = read_text
        self._lock = threading.Lock()
        self.zones: list[RaplZone] = []
        self.domain_reasons: dict[str, str | None] = {"cpu": None, "dram": None}
        self.status = SourceStatus(name="rapl", domains=[], available=False,
                                   reason="RAPL not opened yet", method=METHOD_MEASURED,
                                   details={"source": SOURCE_RAPL})

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
            self.domain_reasons["dram"] = (
                f"RAPL under {self.root} exposes no dram zone on this CPU"
            )
        self.status.available, self.status.reason, self.status.domains = True, None, domains
        self.status.details["zones"] = [
            {"name": z.name, "path": str(z.path), "domain": z.domain,
             "max_energy_range_uj": z.max_energy_range_uj} for z in self.zones
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

    def poll(self) -> None:
        """Read without using the result: keeps the wrap correction valid on long windows."""
        if self.status.available:
            try:
                self.read_j()
            except OSError as exc:
                logger.warning("RAPL poll failed: %s", exc)
