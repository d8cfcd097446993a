"""Energy measurement: GPU by NVML energy counter, CPU/DRAM by RAPL (or CodeCarbon's estimate),
emissions by CodeCarbon's offline data, a sampled power timeline and an idle baseline.

The harness uses `EnergySettings.from_config(cfg["energy"])` and `EnergySession`; see session.py.
"""

from llm_energy.energy.base import BaselineSettings, EnergySettings
from llm_energy.energy.phases import split_prefill_decode
from llm_energy.energy.session import EnergySession, WindowHandle
from llm_energy.energy.timeline import TIMELINE_COLUMNS
from llm_energy.energy.validity import FLAG_DESCRIPTIONS

__all__ = [
    "BaselineSettings",
    "EnergySession",
    "EnergySettings",
    "FLAG_DESCRIPTIONS",
    "TIMELINE_COLUMNS",
    "WindowHandle",
    "split_prefill_decode",
]
