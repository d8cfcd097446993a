"""Where a run_inference job runs on a box with several GPUs: which GPUs it is given.

The campaign's GPUs (campaign.gpus.devices, or every GPU NVML lists) are the Snakemake `gpu` resource,
so Snakemake starts no more jobs than there are GPUs for; each job asks for as many as its backend
declares (Backend.execution: one per data-parallel replica times the GPUs a replica is split over),
takes them from the allocator (llm_energy.gpu_allocation: a flock per GPU, all or none, held until the
job's process exits however it exits), and runs with CUDA_VISIBLE_DEVICES naming exactly those, set
before any CUDA context exists. The energy session then measures those GPUs only.

`campaign.gpus.jobs: exclusive` keeps one experiment at a time on the box (whole-node energy studies):
each job takes every GPU of the box (the resource and the locks), and uses the ones it needs.

On a machine without GPUs nothing is allocated and nothing changes: jobs take one `gpu` slot of a
capacity of one, so CPU measurements never overlap either.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_energy import gpu_allocation, hardware
from llm_energy.errors import ConfigError
from llm_energy.specs import schema_spec, section_spec

log = logging.getLogger(__name__)

KEY = "campaign.gpus"
JOBS_PARALLEL = "parallel"
JOBS_EXCLUSIVE = "exclusive"


@schema_spec("#/properties/campaign/properties/gpus")
@dataclass(frozen=True)
class GpuJobsSpec:
    """campaign.gpus, typed; types, defaults and meanings are the config schema's."""

    devices: list[int | str] | None
    jobs: str
    wait_s: float
    lock_dir: str

    @classmethod
    def of(cls, values: GpuJobsSpec | Mapping[str, Any] | None) -> GpuJobsSpec:
        return values if isinstance(values, cls) else section_spec(cls, values)


def box_gpus(spec: GpuJobsSpec, devices: Sequence[hardware.GpuDevice] | None = None) -> list[str]:
    """The campaign's GPUs as CUDA_VISIBLE_DEVICES entries: campaign.gpus.devices (NVML indices or
    UUIDs, resolved to UUIDs where NVML lists the GPU), or every GPU this process sees. Without NVML
    the configured entries are taken as written (nothing can check them, and no CUDA sees them)."""
    devices = list(hardware.visible_gpus() if devices is None else devices)
    if spec.devices is None:
        return [d.uuid for d in devices]
    chosen: list[str] = []
    for position, entry in enumerate(spec.devices):
        text = str(entry)
        if not devices:
            uuid = text
        else:
            matches = [
                d.uuid
                for d in devices
                if (text.isdigit() and d.index == int(text) and not d.is_mig_instance) or d.uuid.startswith(text)
            ]
            if len(matches) != 1:
                raise ConfigError(
                    f"{KEY}.devices[{position}]",
                    f"{entry!r} matches {'no' if not matches else 'more than one'} GPU of this machine",
                    "Use NVML indices or UUIDs of: " + ", ".join(f"{d.index} {d.uuid}" for d in devices),
                )
            uuid = matches[0]
        if uuid in chosen:
            raise ConfigError(
                f"{KEY}.devices[{position}]", f"{entry!r} names a GPU listed before", "List each GPU once."
            )
        chosen.append(uuid)
    return chosen


def execution_of(experiment: Any):
    """The backend's declaration of how this experiment's engine runs (Backend.execution)."""
    from llm_energy.backends import backend_class

    return backend_class(experiment.backend).execution(dict(experiment.backend_settings))


def takes_whole_box(execution: Any, spec: GpuJobsSpec) -> bool:
    return spec.jobs == JOBS_EXCLUSIVE or execution.whole_box


def gpu_capacity(box: int) -> int:
    """The Snakemake `gpu` resource of a box with `box` GPUs (1 without GPUs: one job at a time)."""
    return max(box, 1)


def job_gpu_slots(execution: Any, box: int, spec: GpuJobsSpec) -> int:
    """The `gpu` resource one run_inference job takes."""
    if box == 0:
        return 1
    return box if takes_whole_box(execution, spec) else execution.gpus


def job_threads(cores: int, slots: int, box: int) -> int:
    """Host cores one run_inference job claims: all of them when it holds the whole box (nothing else
    competes with the process that drives the GPUs), else its GPUs' share. All cores per job would
    let Snakemake (which caps a job's threads at --cores) run only one at a time, whatever GPUs are free."""
    if box <= 1 or slots >= box:
        return max(cores, 1)
    return max(cores * slots // box, 1)


def check_fits(experiments: Mapping[str, Any], box: int, spec: GpuJobsSpec) -> None:
    """Refuse, before any job, an experiment that needs more GPUs than the campaign has."""
    if box == 0:
        return
    for experiment in experiments.values():
        execution = execution_of(experiment)
        if execution.gpus > box:
            asked = ", ".join(
                f"backend_settings.{experiment.backend}.{key}: {getattr(execution, name)}"
                for name, key in execution.keys.items()
                if getattr(execution, name) > 1
            )
            raise ConfigError(
                asked.split(":")[0] if asked else f"{KEY}.devices",
                f"experiment {experiment.id} needs {execution.gpus} GPUs ({asked or 'its backend'}) but the "
                f"campaign has {box}",
                f"Lower it, or give {KEY}.devices more GPUs of this machine.",
            )


@dataclass
class Placement:
    """The GPUs one job was given, for the run artifact (result.json `placement`)."""

    mode: str  # campaign.gpus.jobs
    box: list[str]  # the campaign's GPUs
    held: list[str]  # the GPUs this job holds the locks of (every GPU of the box when it takes them all)
    visible: list[str]  # the GPUs its processes see (CUDA_VISIBLE_DEVICES), in that order
    cuda_visible_devices: str | None  # as set for the job; None: left as it was (nothing to narrow)
    lock_dir: str | None
    waited_s: float
    execution: dict[str, Any]
    reason: str | None = None  # why nothing was allocated
    since_unix_s: float = field(default_factory=time.time)

    @property
    def watches_host_sharing(self) -> bool:
        """Other jobs may run beside this one: the box has GPUs this job does not hold."""
        return self.lock_dir is not None and bool(set(self.box) - set(self.held))

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "box_gpus": list(self.box),
            "held_gpus": list(self.held),
            "visible_gpus": list(self.visible),
            "cuda_visible_devices": self.cuda_visible_devices,
            "lock_dir": self.lock_dir,
            "waited_s": self.waited_s,
            "execution": dict(self.execution),
            "reason": self.reason,
            "since_unix_s": self.since_unix_s,
        }

    @classmethod
    def from_description(cls, described: Mapping[str, Any]) -> Placement:
        return cls(
            mode=described["mode"],
            box=list(described["box_gpus"]),
            held=list(described["held_gpus"]),
            visible=list(described["visible_gpus"]),
            cuda_visible_devices=described["cuda_visible_devices"],
            lock_dir=described["lock_dir"],
            waited_s=described["waited_s"],
            execution=dict(described["execution"]),
            reason=described.get("reason"),
            since_unix_s=described["since_unix_s"],
        )


@contextlib.contextmanager
def placed(experiment: Any, campaign_gpus: GpuJobsSpec | Mapping[str, Any] | None) -> Iterator[Placement]:
    """Hold this job's GPUs and set CUDA_VISIBLE_DEVICES for it (restored on exit, the locks released)."""
    spec = GpuJobsSpec.of(campaign_gpus)
    execution = execution_of(experiment)
    box = box_gpus(spec)
    if not box:
        yield Placement(
            spec.jobs,
            [],
            [],
            [],
            None,
            None,
            0.0,
            execution.describe(),
            reason=hardware.gpu_unavailable_reason() or "no GPU on this machine: nothing to allocate",
        )
        return
    count = job_gpu_slots(execution, len(box), spec)
    lock_dir = Path(spec.lock_dir)
    started = time.monotonic()
    try:
        lease = gpu_allocation.acquire(box, count, lock_dir, holder=experiment.id, timeout_s=spec.wait_s)
    except gpu_allocation.GpuUnavailable as exc:
        raise ConfigError(
            f"{KEY}.wait_s",
            f"experiment {experiment.id}: {exc}",
            "Wait for the other jobs, raise the wait, or name free GPUs in campaign.gpus.devices.",
        ) from None
    waited_s = time.monotonic() - started
    visible = lease.uuids[: max(execution.gpus, 1)]
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    # Set unless the process already sees exactly its one GPU: a single-GPU box's job sees what it saw
    # before (the same artifacts as without an allocator), yet still holds its GPU's lock against other
    # pipelines. With several GPUs the list is always explicit: worker processes are given its entries.
    unchanged = len(visible) == 1 and [d.uuid for d in hardware.visible_gpus()] == visible
    cuda_visible = None if unchanged else ",".join(visible)
    if cuda_visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible
    log.info("experiment %s: GPUs %s (held %s, waited %.1f s)", experiment.id, visible, lease.uuids, waited_s)
    try:
        yield Placement(
            spec.jobs, box, list(lease.uuids), visible, cuda_visible, str(lock_dir), waited_s, execution.describe()
        )
    finally:
        lease.release()
        if cuda_visible is not None:
            if previous is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = previous
