"""The GPU topology of one run, for its artifact: the GPUs used, how they are connected, their MIG
instances, and which process ran on which GPU.

The interconnect comes from `nvidia-smi topo -m` (the driver's own matrix: NV<n> = n NVLinks, PIX/PXB/
PHB/NODE/SYS = PCIe paths of growing length), reduced to the pairs of GPUs this job used; where it
cannot be had the record says "unavailable" and why. Nothing here touches CUDA: the harness may run
before an engine that must create the first CUDA context itself.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from llm_energy import hardware

TOPO_COMMAND = ("nvidia-smi", "topo", "-m")
TOPO_TIMEOUT_S = 20.0
LINK_MEANINGS = {
    "X": "self",
    "SYS": "PCIe and the SMP interconnect between NUMA nodes (e.g. QPI/UPI)",
    "NODE": "PCIe and the interconnect between PCIe host bridges within a NUMA node",
    "PHB": "PCIe and a PCIe host bridge (typically the CPU)",
    "PXB": "several PCIe bridges",
    "PIX": "at most one PCIe bridge",
    "NV": "NVLink (NV<n>: n bonded links)",
}


def run_topo_command(timeout_s: float = TOPO_TIMEOUT_S) -> tuple[str | None, str | None]:
    """`nvidia-smi topo -m`'s output, or None and why not."""
    if shutil.which(TOPO_COMMAND[0]) is None:
        return None, "nvidia-smi is not on PATH (no NVIDIA driver on this machine)"
    try:
        done = subprocess.run(TOPO_COMMAND, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return None, f"`{' '.join(TOPO_COMMAND)}` did not answer within {timeout_s:g} s"
    except OSError as exc:
        return None, f"`{' '.join(TOPO_COMMAND)}` could not run: {exc}"
    if done.returncode != 0:
        return None, f"`{' '.join(TOPO_COMMAND)}` exited with {done.returncode}: {done.stderr.strip()[-300:]}"
    return done.stdout, None


def parse_topo_matrix(text: str) -> dict[str, Any]:
    """`nvidia-smi topo -m` -> {"links": {(i, j): "NV18"}, "cpu_affinity": {i: "0-47"}, "numa_affinity": {i: "0"}}
    keyed by the GPUs' nvidia-smi (= NVML) indices; NIC rows and columns are left out."""
    lines = [line for line in text.splitlines() if line.strip()]
    header_at = next((i for i, line in enumerate(lines) if line.lstrip().startswith("GPU0")), None)
    if header_at is None:
        raise ValueError("no GPU0 column header in the nvidia-smi topo -m output")
    columns = [c.strip() for c in lines[header_at].strip().split("\t") if c.strip()]
    # The device columns (GPU<n>, NIC<n>) come first, one cell each; the affinity columns after them are
    # padded with empty cells on some drivers, so they are read as the non-empty cells that follow.
    devices = [c for c in columns if c[:3] in ("GPU", "NIC") and c[3:].isdigit()]
    links: dict[tuple[int, int], str] = {}
    cpu: dict[int, str] = {}
    numa: dict[int, str] = {}
    for line in lines[header_at + 1 :]:
        if line.startswith("Legend"):
            break
        cells = [c.strip() for c in line.split("\t")]
        name = cells[0]
        if not name.startswith("GPU") or not name[3:].isdigit():
            continue
        row = int(name[3:])
        for column, value in zip(devices, cells[1 : 1 + len(devices)]):
            if column.startswith("GPU") and int(column[3:]) != row:
                links[(row, int(column[3:]))] = value
        rest = [c for c in cells[1 + len(devices) :] if c]
        if "CPU Affinity" in columns and rest:
            cpu[row] = rest[0]
        if "NUMA Affinity" in columns and len(rest) > 1:
            numa[row] = rest[1]
    return {"links": links, "cpu_affinity": cpu, "numa_affinity": numa}


def _link_meaning(link: str) -> str:
    return LINK_MEANINGS.get("NV" if link.startswith("NV") else link, "unknown link type")


def interconnect(
    devices: Sequence[hardware.GpuDevice], run_command: Callable[[], tuple[str | None, str | None]] = run_topo_command
) -> dict[str, Any]:
    """How the job's GPUs are connected to each other and to the CPUs (nvidia-smi's matrix)."""
    if not devices:
        return {"available": False, "reason": "unavailable, because this job uses no GPU"}
    text, reason = run_command()
    if text is None:
        return {"available": False, "reason": f"unavailable, because {reason}"}
    try:
        matrix = parse_topo_matrix(text)
    except ValueError as exc:
        return {"available": False, "reason": f"unavailable, because the output was not understood ({exc})"}
    physical = sorted({d.index for d in devices})
    pairs = [
        {"gpus": [i, j], "link": matrix["links"][(i, j)], "meaning": _link_meaning(matrix["links"][(i, j)])}
        for i in physical
        for j in physical
        if i < j and (i, j) in matrix["links"]
    ]
    record: dict[str, Any] = {
        "available": True,
        "source": " ".join(TOPO_COMMAND),
        "pairs": pairs,
        "cpu_affinity": {str(i): matrix["cpu_affinity"].get(i) for i in physical},
        "numa_affinity": {str(i): matrix["numa_affinity"].get(i) for i in physical},
    }
    if len(physical) < 2:
        record["note"] = "one physical GPU: no GPU-to-GPU link is used"
    return record


def describe(
    devices: Sequence[hardware.GpuDevice],
    placement: Mapping[str, Any] | None,
    processes: Sequence[Mapping[str, Any]],
    compute_pids: Mapping[str, set[int]] | None = None,
    run_command: Callable[[], tuple[str | None, str | None]] = run_topo_command,
) -> dict[str, Any]:
    """The topology record of a run. `processes`: the job's processes and the GPUs each was given
    ({role, pid, gpus}); `compute_pids`: NVML's compute processes per measured GPU, as observed."""
    gpus = [
        {
            "visible_index": d.visible_index,
            "nvml_index": d.index,
            "uuid": d.uuid,
            "name": d.name,
            "mig_instance": d.is_mig_instance,
            "parent_uuid": d.parent_uuid,
        }
        for d in devices
    ]
    mig = [{"uuid": d.uuid, "parent_uuid": d.parent_uuid, "nvml_index": d.index} for d in devices if d.is_mig_instance]
    return {
        "gpus": gpus,
        "interconnect": interconnect(devices, run_command),
        "mig_instances": mig,
        "mig_note": (
            "MIG instances are measured through their parent GPU's counter (flag mig_shared_counter)"
            if mig
            else "no MIG instance in use"
        ),
        "processes": [dict(p) for p in processes],
        "nvml_compute_processes": (
            {uuid: sorted(pids) for uuid, pids in compute_pids.items()} if compute_pids is not None else None
        ),
        "allocation": dict(placement) if placement else None,
    }
