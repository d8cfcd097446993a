"""Shared pieces of the energy sources: settings, source status, domain records.

An energy *domain* is what is measured (gpu, cpu, dram); a *source* is how (NVML energy counter,
RAPL, CodeCarbon's estimate). Every domain in a window record says its source and method, and a
domain that cannot be measured is reported unavailable with the reason, never as zero.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from llm_energy.errors import ConfigError

DOMAINS = ("gpu", "cpu", "dram")

# `source` values of domain records
SOURCE_NVML = "nvml_energy_counter"
SOURCE_RAPL = "rapl"
SOURCE_CODECARBON = "codecarbon_estimate"
SOURCE_EMISSIONS = "codecarbon_offline"
METHOD_MEASURED = "measured"
METHOD_ESTIMATED = "estimated"

J_PER_KWH = 3.6e6


@dataclass(frozen=True)
class BaselineSettings:
    duration_s: float = 10.0
    max_age_s: float = 3600.0


PHASE_SPLITS = ("differential", "timeline", "off")


@dataclass(frozen=True)
class EnergySettings:
    """The validated `energy` block of the campaign config."""

    gpu: bool = True
    rapl: bool = True
    codecarbon: bool = True
    country_iso_code: str = "FRA"
    region: str | None = None
    pue: float = 1.0
    timeline_period_ms: int = 100
    baseline: BaselineSettings = field(default_factory=BaselineSettings)
    align_counter_edges: bool = True
    counter_timeline_tolerance: float = 0.05
    min_counter_updates: int = 20
    timeline: bool = True  # false: no sampler process (no power timeline, no cross-check)
    # relative difference of a window's mean SM clock from the active-idle baseline's above which
    # the window is flagged baseline_power_state_differs
    baseline_clock_tolerance: float = 0.10
    # prefill/decode energy: "differential" (a prefill-only window), "timeline" (power share), "off"
    phase_split: str = "differential"

    @property
    def timeline_period_s(self) -> float:
        return self.timeline_period_ms / 1000.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> EnergySettings:
        """Build settings from the `energy` config dict; missing keys take the defaults.

        The config schema validates types first; this re-checks what a schema cannot express
        (ranges, the ISO code's form) so that a bad value fails here with the key named.
        """
        cfg = dict(cfg or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(
                f"energy.{unknown[0]}", "is not a known energy setting",
                f"Remove it or use one of: {', '.join(sorted(known))}.",
            )
        defaults = cls()
        baseline_cfg = dict(cfg.pop("baseline", None) or {})
        unknown_baseline = sorted(set(baseline_cfg) - {"duration_s", "max_age_s"})
        if unknown_baseline:
            raise ConfigError(
                f"energy.baseline.{unknown_baseline[0]}", "is not a known baseline setting",
                "Use duration_s and max_age_s.",
            )
        baseline = BaselineSettings(
            # 0 skips the baseline: net energy is then unavailable, with that reason
            duration_s=_number(baseline_cfg, "duration_s", defaults.baseline.duration_s,
                               "energy.baseline.duration_s", minimum=0.0),
            max_age_s=_number(baseline_cfg, "max_age_s", defaults.baseline.max_age_s,
                              "energy.baseline.max_age_s", minimum=0.0),
        )
        country = cfg.get("country_iso_code", defaults.country_iso_code)
        if not isinstance(country, str) or not re.fullmatch(r"[A-Za-z]{3}", country):
            raise ConfigError(
                "energy.country_iso_code", f"{country!r} is not a 3-letter ISO 3166 code",
                "Set it to the country of the machine's grid, e.g. FRA, USA, DEU.",
            )
        region = cfg.get("region", defaults.region)
        if region is not None and not isinstance(region, str):
            raise ConfigError("energy.region", f"{region!r} is not a string",
                              "Use a state/province name (USA, Canada) or null.")
        period_ms = cfg.get("timeline_period_ms", defaults.timeline_period_ms)
        if isinstance(period_ms, bool) or not isinstance(period_ms, int) or not 10 <= period_ms <= 10_000:
            raise ConfigError(
                "energy.timeline_period_ms", f"{period_ms!r} is not an integer in 10..10000",
                "Use 100 (the NVML counter's own update period) unless you need finer samples.",
            )
        min_updates = cfg.get("min_counter_updates", defaults.min_counter_updates)
        if isinstance(min_updates, bool) or not isinstance(min_updates, int) or min_updates < 0:
            raise ConfigError("energy.min_counter_updates", f"{min_updates!r} is not an integer >= 0",
                              "Use 20 (about 2 s of 100 ms counter updates, 5 % edge uncertainty).")
        phase_split = cfg.get("phase_split", defaults.phase_split)
        if phase_split not in PHASE_SPLITS:
            raise ConfigError("energy.phase_split", f"{phase_split!r} is not a known method",
                              f"Use one of: {', '.join(PHASE_SPLITS)}.")
        return cls(
            gpu=_flag(cfg, "gpu", defaults.gpu),
            rapl=_flag(cfg, "rapl", defaults.rapl),
            codecarbon=_flag(cfg, "codecarbon", defaults.codecarbon),
            country_iso_code=country.upper(),
            region=region,
            pue=_number(cfg, "pue", defaults.pue, "energy.pue", minimum=1.0),
            timeline_period_ms=period_ms,
            baseline=baseline,
            align_counter_edges=_flag(cfg, "align_counter_edges", defaults.align_counter_edges),
            counter_timeline_tolerance=_number(
                cfg, "counter_timeline_tolerance", defaults.counter_timeline_tolerance,
                "energy.counter_timeline_tolerance", minimum=0.0, strict=True),
            min_counter_updates=min_updates,
            timeline=_flag(cfg, "timeline", defaults.timeline),
            baseline_clock_tolerance=_number(
                cfg, "baseline_clock_tolerance", defaults.baseline_clock_tolerance,
                "energy.baseline_clock_tolerance", minimum=0.0, strict=True),
            phase_split=phase_split,
        )


def _flag(cfg: Mapping[str, Any], key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"energy.{key}", f"{value!r} is not true or false", "Use true or false.")
    return value


def _number(cfg: Mapping[str, Any], key: str, default: float, where: str, *, minimum: float,
            strict: bool = False) -> float:
    value = cfg.get(key, default)
    fix = f"Use a number {'>' if strict else '>='} {minimum}."
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(where, f"{value!r} is not a number", fix)
    if value < minimum or (strict and value == minimum):
        raise ConfigError(where, f"{value!r} is out of range", fix)
    return float(value)


@dataclass
class SourceStatus:
    """What `EnergySession.describe()` says about one source."""

    name: str
    domains: list[str]
    available: bool
    reason: str | None
    method: str
    details: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "domains": list(self.domains), "available": self.available,
            "reason": self.reason, "method": self.method, **self.details,
        }


def unavailable(reason: str) -> dict[str, Any]:
    """The record of a domain that could not be measured."""
    return {"available": False, "reason": reason}


def net_energy(gross_j: float, baseline_w: float | None, duration_s: float) -> float | None:
    """Gross energy minus idle power over the window (None without a baseline)."""
    if baseline_w is None:
        return None
    return gross_j - baseline_w * duration_s
