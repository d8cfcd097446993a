"""Host energy that concurrent jobs share: the `host_shared` flag.

RAPL (and CodeCarbon's estimate) see the whole host: while other measurement jobs run on other GPUs
of the same box, a window's CPU and DRAM energy covers their work too. Such a window keeps the host
reading under `domains.<cpu|dram>.shared_host`, reports the domain as unavailable for this experiment
(so no cpu, dram or node metric presents it as this experiment's alone) and carries `host_shared`.
GPU energy stays this job's own: it is read from the counters of its GPUs only.

Other jobs are seen through the GPU allocator's lock files (llm_energy.gpu_allocation): held at the
window's opening edge, or held or taken by the closing edge.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm_energy import gpu_allocation

FLAG_HOST_SHARED = "host_shared"
HOST_DOMAINS = ("cpu", "dram")


class HostShareWatch:
    """Looks at the box's other GPUs at both edges of a window (outside the window's work)."""

    def __init__(self, lock_dir: Path | str, box: Sequence[str], own: Sequence[str]):
        self.lock_dir = Path(lock_dir)
        self.box = list(box)
        self.own = list(own)
        self._opened_unix_s = 0.0
        self._at_open: dict[str, dict] = {}

    def open(self) -> None:
        self._opened_unix_s = time.time()
        self._at_open = gpu_allocation.others_active(self.lock_dir, self.box, self.own, self._opened_unix_s)

    def close(self, record: dict[str, Any]) -> dict[str, Any]:
        others = {
            **self._at_open,
            **gpu_allocation.others_active(self.lock_dir, self.box, self.own, self._opened_unix_s),
        }
        if others:
            mark_shared(record, others)
        return record


def mark_shared(record: dict[str, Any], others: dict[str, dict]) -> dict[str, Any]:
    """Take the host domains of a window record out of this experiment's energy and flag it."""
    who = ", ".join(
        f"{gpu} ({held.get('holder') or 'pid ' + str(held.get('pid'))})" for gpu, held in sorted(others.items())
    )
    domains = record.setdefault("domains", {})
    for domain in HOST_DOMAINS:
        reading = domains.get(domain)
        if reading and reading.get("available"):
            domains[domain] = {
                "available": False,
                "shared_host": reading,
                "reason": f"host_shared: other jobs ran on this host during the window ({who}); "
                f"the host's {domain} energy is in shared_host, not this experiment's",
            }
    record["host_shared_with"] = [{"gpu": gpu, **held} for gpu, held in sorted(others.items())]
    record["flags"] = sorted(set(record.get("flags", [])) | {FLAG_HOST_SHARED})
    return record
