"""The GPU allocator with real processes and real kernel locks: never one GPU to two jobs, and a GPU
whose job was killed is free again."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from llm_energy.gpu_allocation import GpuUnavailable, acquire, holder_of

GPUS = ["GPU-aaaa", "GPU-bbbb", "GPU-cccc"]
REPO_WORKFLOW = str(Path(__file__).resolve().parents[2] / "workflow")


def holder_process(lock_dir: Path, count: int, name: str, timeout_s: float = 0.0) -> subprocess.Popen:
    """A job in its own process: acquires, prints what it got (or the error), then holds until killed."""
    code = (
        "import json, sys, time\n"
        f"sys.path.insert(0, {REPO_WORKFLOW!r})\n"
        "from llm_energy.gpu_allocation import GpuUnavailable, acquire\n"
        "try:\n"
        f"    lease = acquire({GPUS!r}, {count}, __import__('pathlib').Path({str(lock_dir)!r}), {name!r}, {timeout_s})\n"
        "except GpuUnavailable as exc:\n"
        "    print(json.dumps({'error': str(exc)}), flush=True); sys.exit(3)\n"
        "print(json.dumps({'uuids': lease.uuids}), flush=True)\n"
        "time.sleep(60)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def first_line(process: subprocess.Popen) -> dict:
    return json.loads(process.stdout.readline())


def test_concurrent_jobs_never_share_a_gpu_and_a_killed_jobs_gpu_comes_free(tmp_path: Path) -> None:
    jobs = [holder_process(tmp_path, 1, f"exp-{i}") for i in range(3)]
    try:
        got = [first_line(j)["uuids"] for j in jobs]
        assert sorted(u for g in got for u in g) == sorted(GPUS)  # three jobs, three distinct GPUs
        fourth = holder_process(tmp_path, 1, "exp-3")
        out = first_line(fourth)
        assert fourth.wait(10) == 3 and "exp-0" in out["error"] and "fewer were free" in out["error"]
        jobs[1].send_signal(signal.SIGKILL)  # dies holding its lock: the kernel drops it
        jobs[1].wait(10)
        fifth = holder_process(tmp_path, 1, "exp-4")
        jobs.append(fifth)
        assert first_line(fifth)["uuids"] == got[1]
    finally:
        for j in jobs:
            j.kill()
            j.wait()


def test_a_job_waits_for_enough_gpus_and_takes_all_or_none(tmp_path: Path) -> None:
    holder = holder_process(tmp_path, 2, "big")
    try:
        assert first_line(holder)["uuids"] == GPUS[:2]
        with pytest.raises(GpuUnavailable):
            acquire(GPUS, 2, tmp_path, "waits", timeout_s=0.2)  # only one is free
        assert holder_of(tmp_path, GPUS[2]) is None  # all or none: the free one was let go again
        assert holder_of(tmp_path, GPUS[0])["holder"] == "big"
        holder.kill()
        holder.wait()
        started = time.monotonic()
        with acquire(GPUS, 2, tmp_path, "waits", timeout_s=5) as lease:
            assert lease.uuids == GPUS[:2] and lease.cuda_visible_devices() == "GPU-aaaa,GPU-bbbb"
        assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()


def test_two_leases_in_one_process_never_overlap(tmp_path: Path) -> None:
    with acquire(GPUS, 2, tmp_path, "one") as one, acquire(GPUS, 1, tmp_path, "two") as two:
        assert set(one.uuids).isdisjoint(two.uuids)
    with pytest.raises(GpuUnavailable, match="can see only 3"):
        acquire(GPUS, 4, tmp_path)
