"""Which GPUs a job may use when several jobs run at once on one box.

Each GPU has a lock file (`<lock_dir>/<uuid>.lock`); a job holds an exclusive `flock` on the files of
the GPUs it was given for as long as it runs. The kernel drops a process's locks when it exits, however
it exits (kill -9, out of memory, a node reboot clears the files' locks too), so a GPU can never be held
by two jobs, and never stays held by a job that is gone. The holder's pid and experiment are written
into the file, for the message of a job that has to wait.

A job asks for `count` GPUs: it takes the first free ones in the order given (the box's GPUs as NVML
lists them, or those of the job's CUDA_VISIBLE_DEVICES), all or none, and waits (polling) while fewer
are free, up to a timeout; then its process sees only those, through CUDA_VISIBLE_DEVICES set to their
UUIDs before any CUDA context exists.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

POLL_S = 0.5


class GpuUnavailable(RuntimeError):
    """Fewer GPUs than asked for came free within the timeout."""


@dataclass
class GpuLease:
    """The GPUs a job holds (their UUIDs, in the order given) until release() or the process's exit."""

    uuids: list[str]
    _files: list[IO[str]] = field(default_factory=list, repr=False)

    def cuda_visible_devices(self) -> str:
        return ",".join(self.uuids)

    def release(self) -> None:
        for handle in self._files:
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        self._files = []

    def __enter__(self) -> GpuLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _try_lock(path: Path, holder: dict) -> IO[str] | None:
    handle = open(path, "a+")  # noqa: SIM115 (held open as long as the lock is held)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(holder) + "\n")
    handle.flush()
    return handle


def holder_of(lock_dir: Path, uuid: str) -> dict | None:
    """Who holds a GPU now (pid, experiment), or None when it is free."""
    path = lock_dir / f"{uuid}.lock"
    if not path.exists():
        return None
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            text = handle.read().strip()
            return json.loads(text) if text else {"pid": None}
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def acquire(uuids: Sequence[str], count: int, lock_dir: Path, holder: str = "", timeout_s: float = 0.0) -> GpuLease:
    """Hold `count` of `uuids` (the first free ones), all or none; wait up to timeout_s for them."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if count > len(uuids):
        raise GpuUnavailable(f"{count} GPUs asked for, but this job can see only {len(uuids)}: {list(uuids)}")
    lock_dir.mkdir(parents=True, exist_ok=True)
    info = {"pid": os.getpid(), "holder": holder, "since_unix_s": time.time()}
    deadline = time.monotonic() + timeout_s
    while True:
        taken: list[tuple[str, IO[str]]] = []
        for uuid in uuids:
            handle = _try_lock(lock_dir / f"{uuid}.lock", info)
            if handle is not None:
                taken.append((uuid, handle))
                if len(taken) == count:
                    return GpuLease([u for u, _ in taken], [h for _, h in taken])
        GpuLease([u for u, _ in taken], [h for _, h in taken]).release()  # all or none
        if time.monotonic() >= deadline:
            busy = {u: holder_of(lock_dir, u) for u in uuids}
            raise GpuUnavailable(
                f"{count} of {len(uuids)} GPUs asked for, fewer were free within {timeout_s:g} s; held: "
                + ", ".join(f"{u} by {b.get('holder') or 'pid'} {b.get('pid')}" for u, b in busy.items() if b)
            )
        time.sleep(POLL_S)


def others_active(lock_dir: Path, uuids: Sequence[str], own: Sequence[str], since_unix_s: float) -> dict[str, dict]:
    """GPUs of `uuids` other than `own` that another job holds now, or took since `since_unix_s` (a job
    may start and end between two looks: its lock file was written when it took the GPU). A job that
    only tried a GPU while waiting for more also writes the file: counted too (it errs towards shared)."""
    active: dict[str, dict] = {}
    for uuid in uuids:
        if uuid in own:
            continue
        held = holder_of(lock_dir, uuid)
        path = lock_dir / f"{uuid}.lock"
        if held is None and path.exists() and path.stat().st_mtime >= since_unix_s:
            held = {"pid": None, "holder": "a job that took it during the window and has ended"}
        if held is not None:
            active[uuid] = held
    return active
