"""Shared pieces of the energy sources: settings, source status, domain records.

An energy *domain* is what is measured (gpu, cpu, dram); a *source* is how (NVML energy counter,
RAPL, CodeCarbon's estimate). Every domain in a window record says its source and method, and a
domain that cannot be measured is reported unavailable with the reason, never as zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from llm_energy.specs import schema_spec, section_spec

DOMAINS = ("gpu", "cpu", "dram")

# `source` values of domain records
SOURCE_NVML = "nvml_energy_counter"
SOURCE_RAPL = "rapl"
SOURCE_CODECARBON = "codecarbon_estimate"
SOURCE_EMISSIONS = "codecarbon_offline"
METHOD_MEASURED = "measured"
METHOD_ESTIMATED = "estimated"

J_PER_KWH = 3.6e6


@schema_spec("#/properties/energy/properties/baseline")
@dataclass(frozen=True)
class BaselineSettings:
    duration_s: float  # 0 skips the baseline: net energy is then unavailable, with that reason
    max_age_s: float


@schema_spec("#/properties/energy")
@dataclass(frozen=True)
class EnergySettings:
    """The `energy` block of the campaign config, typed. Types, ranges and defaults are the config
    schema's (workflow/schemas/config.schema.json), where each key is described."""

    gpu: bool
    rapl: bool
    codecarbon: bool
    country_iso_code: str
    region: str | None
    pue: float
    timeline_period_ms: int
    baseline: BaselineSettings
    align_counter_edges: bool
    counter_timeline_tolerance: float
    min_counter_updates: int
    timeline: bool  # false: no sampler process (no power timeline, no cross-check)
    baseline_clock_tolerance: float
    phase_split: str  # "differential" (a prefill-only window), "timeline" (power share), "off"

    @property
    def timeline_period_s(self) -> float:
        return self.timeline_period_ms / 1000.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> EnergySettings:
        """Settings from the `energy` config mapping (keys left out take the schema's defaults);
        a bad value raises the ConfigError of the config validation, naming the key."""
        return section_spec(cls, cfg)


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
            "name": self.name,
            "domains": list(self.domains),
            "available": self.available,
            "reason": self.reason,
            "method": self.method,
            **self.details,
        }


def unavailable(reason: str) -> dict[str, Any]:
    """The record of a domain that could not be measured."""
    return {"available": False, "reason": reason}


def net_energy(gross_j: float, baseline_w: float | None, duration_s: float) -> float | None:
    """Gross energy minus idle power over the window (None without a baseline)."""
    if baseline_w is None:
        return None
    return gross_j - baseline_w * duration_s
