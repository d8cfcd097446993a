"""Idle baselines: the power each domain draws while nothing runs.

Two kinds, both measured with the same sources as the windows:
- *static idle*: before any CUDA context exists, over `energy.baseline.duration_s`; saved
  atomically as artifact `idle_baseline` and reused while younger than `energy.baseline.max_age_s`
  on the same host with the same GPUs. A GPU without a context idles in a deep power state (on an
  H200 about 72 W at 900 MHz).
- *active idle*: in the measured process after warm-up, model resident and CUDA context held (on
  an H200 about 115 W at 1,980 MHz): the power state the windows run in. It carries the mean SM
  clock over its span so that a window in another power state can be flagged
  (`baseline_power_state_differs`). Net energy uses it where measured.
Net energy = gross - baseline_w x duration. A GPU baseline keeps per-device power, so that a
window of a subset of the GPUs (after `EnergySession.bind_to_process_gpus`) subtracts only theirs.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llm_energy.artifacts import read_json_artifact, write_json_artifact
from llm_energy.energy.base import DOMAINS
from llm_energy.errors import ArtifactError

logger = logging.getLogger(__name__)

ARTIFACT = "idle_baseline"


def baseline_from_window(
    record: Mapping[str, Any], gpu_uuids: Sequence[str], measured_unix_s: float | None = None
) -> dict[str, Any]:
    """Turn the record of an idle window into baseline data (power per domain = gross / duration)."""
    duration_s = float(record["duration_s"])
    domains: dict[str, Any] = {}
    for name in DOMAINS:
        domain = record["domains"].get(name, {"available": False, "reason": "not measured"})
        if not domain.get("available"):
            domains[name] = {
                "available": False,
                "power_w": None,
                "source": None,
                "method": None,
                "reason": domain.get("reason"),
            }
            continue
        entry: dict[str, Any] = {
            "available": True,
            "power_w": domain["gross_j"] / duration_s,
            "source": domain["source"],
            "method": domain["method"],
            "reason": None,
        }
        if name == "gpu":
            entry["devices"] = [
                {"uuid": d["uuid"], "index": d["index"], "power_w": d["gross_j"] / duration_s}
                for d in domain.get("devices", [])
            ]
        domains[name] = entry
    return {
        "host": socket.gethostname(),
        "gpu_uuids": sorted(gpu_uuids),
        "measured_unix_s": time.time() if measured_unix_s is None else measured_unix_s,
        "duration_s": duration_s,
        "domains": domains,
        "flags": list(record.get("flags", [])),
    }


def active_idle_from_window(
    record: Mapping[str, Any], gpu_uuids: Sequence[str], sm_clock_mhz_mean: float | None, sm_clock_reason: str | None
) -> dict[str, Any]:
    """The active-idle baseline of an idle window measured in the loaded state."""
    return {
        **baseline_from_window(record, gpu_uuids),
        "kind": "active_idle",
        # its span on the run's clock (llm_energy.clock), for the power timeline figure
        "start_s": record["start_s"],
        "end_s": record["end_s"],
        "sm_clock_mhz_mean": sm_clock_mhz_mean,
        "sm_clock_reason": sm_clock_reason,
    }


def save_baseline(path: Path | str, data: Mapping[str, Any], provenance: Mapping[str, Any]) -> None:
    write_json_artifact(path, ARTIFACT, data, provenance)


def load_fresh_baseline(
    path: Path | str, max_age_s: float, gpu_uuids: Sequence[str], now_unix_s: float | None = None
) -> tuple[dict[str, Any] | None, str]:
    """The stored baseline if it can be reused, else None; and why (for the log)."""
    path = Path(path)
    if not path.is_file():
        return None, f"no baseline at {path}"
    try:
        data = read_json_artifact(path, ARTIFACT)["data"]
    except ArtifactError as exc:
        return None, f"stored baseline unusable ({exc})"
    now_unix_s = time.time() if now_unix_s is None else now_unix_s
    age_s = now_unix_s - float(data["measured_unix_s"])
    if age_s > max_age_s or age_s < 0:
        return None, f"stored baseline is {age_s:.0f} s old (energy.baseline.max_age_s={max_age_s:.0f})"
    if data["host"] != socket.gethostname():
        return None, f"stored baseline was measured on host {data['host']!r}"
    if sorted(data["gpu_uuids"]) != sorted(gpu_uuids):
        return None, "stored baseline was measured on other GPUs"
    return data, f"reusing baseline from {path} ({age_s:.0f} s old)"


def baseline_power(
    baseline: Mapping[str, Any] | None,
    domain: str,
    source: str,
    missing_reason: str = "no idle baseline was measured (call ensure_baseline)",
    gpu_uuids: Sequence[str] | None = None,
) -> tuple[float | None, str | None]:
    """Idle power of `domain` if the baseline has it from the same source; else (None, why).

    For the gpu domain with `gpu_uuids`, the sum of those devices' idle power only.
    """
    if baseline is None:
        return None, missing_reason
    entry = baseline["domains"].get(domain)
    if not entry or not entry.get("available"):
        why = entry.get("reason") if entry else None
        return None, f"the idle baseline has no {domain} power" + (f": {why}" if why else "")
    if entry["source"] != source:
        return None, (f"the idle baseline's {domain} power comes from {entry['source']}, the window's from {source}")
    if domain == "gpu" and gpu_uuids is not None and entry.get("devices"):
        by_uuid = {d["uuid"]: float(d["power_w"]) for d in entry["devices"]}
        missing = [u for u in gpu_uuids if u not in by_uuid]
        if missing:
            return None, f"the idle baseline has no power for GPU {missing[0]}"
        return sum(by_uuid[u] for u in gpu_uuids), None
    return float(entry["power_w"]), None
