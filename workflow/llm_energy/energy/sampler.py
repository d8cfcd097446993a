"""The timeline sampler, run in its own OS process so that the measured process runs no extra thread.

Why a process: a sampler thread inside the measured process takes the GIL every period (NVML power,
clocks, utilisation) and for ~4 ms per GPU every second (the energy-counter read), inside a
host-bound generate loop; on an H200 the harness made generation 21-28 % slower. Like Zeus's
PowerMonitor, the sampler here is a child process:

    python -m llm_energy.energy.sampler --out FILE --parent-pid PID --period-s 0.1 \\
        --device INDEX:UUID:POWER_METHOD ... [--rapl-zone PATH ...] [--nvml-module MOD:FACTORY]

It initialises NVML itself, opens the run's GPUs by UUID, and every period writes one JSON line per
GPU with the columns of `timeline.TIMELINE_COLUMNS`; about once a second it also reads the energy
counters (into the same rows), the GPU compute-process list and the raw RAPL `energy_uj` of each
zone (the parent chains those raw values between window edges to count wraps, see rapl.py). Time
stamps are `llm_energy.clock.now()` (perf_counter = CLOCK_MONOTONIC, one clock for every process
of the machine on Linux), so child rows and parent edges are directly comparable.

The parent reads the file only when it needs rows: when a window closes (after waiting, bounded,
until the child has written a tick past the window's end) and when the timeline is requested.
The child stops when its stdin closes (the parent stopped it or died) or when its parent pid
changes (reparented to init); `ProcessSampler.stop()` sends `stop`, closes stdin and reaps it. The
commands go through stdin: `bind UUID,...` narrows the sampled GPUs (after
`EnergySession.bind_to_process_gpus`), `stop` ends the child even where a forked process still holds
the pipe open.

`ThreadSampler` is the same interface on an in-process thread: only for unit tests that inject a
fake NVML object (which a child process cannot share).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_energy import clock
from llm_energy.energy.rapl import RaplRaw

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0  # the child imports numpy/pandas and initialises NVML
STOP_TIMEOUT_S = 5.0
WAIT_PERIODS = 5  # close_window waits at most this many periods (+ slack) for rows past its end
WAIT_SLACK_S = 0.5


@dataclass(frozen=True)
class SamplerDevice:
    """One energy counter to sample: NVML index, UUID and the power method chosen by the parent."""

    index: int
    uuid: str
    power_method: str

    def argument(self) -> str:
        return f"{self.index}:{self.uuid}:{self.power_method}"

    @classmethod
    def parse(cls, text: str) -> SamplerDevice:
        index, rest = text.split(":", 1)
        uuid, method = rest.rsplit(":", 1)
        return cls(int(index), uuid, method)


class SamplerSink:
    """What a sampler produces, kept in the parent: timeline rows, GPU pids, raw RAPL reads."""

    def __init__(self, extend_rows: Callable[[Sequence[tuple]], None]):
        self.extend_rows = extend_rows
        self.pid_observations: list[tuple[float, str, frozenset[int]]] = []
        self.rapl_samples: list[RaplRaw] = []
        self.last_time_s = -float("inf")  # latest sample time written
        self.ticks = 0
        self.missed_ticks = 0
        self.errors = 0
        self.first_error: str | None = None

    def rows(self, rows: Sequence[tuple]) -> None:
        self.extend_rows(rows)
        if rows:
            self.last_time_s = max(self.last_time_s, max(float(r[0]) for r in rows))

    def pids(self, time_s: float, uuid: str, pids: frozenset[int]) -> None:
        self.pid_observations.append((time_s, uuid, pids))

    def rapl(self, sample: RaplRaw) -> None:
        self.rapl_samples.append(sample)


# ---------------------------------------------------------------------------------------------
# Parent side


class ThreadSampler:
    """In-process sampler thread (unit tests with an injected fake NVML only)."""

    mode = "thread"

    def __init__(
        self,
        sample: Callable[[bool], list[tuple]],
        sink: SamplerSink,
        period_s: float,
        slow_tasks: Sequence[Callable[[], None]] = (),
    ):
        from llm_energy.energy.timeline import TimelineSampler

        self.sink = sink
        self.period_s = period_s
        self._sampler = TimelineSampler(sample, _SinkStore(sink), period_s, slow_tasks=slow_tasks)

    def start(self) -> None:
        self._sampler.start()

    def collect(self) -> None:
        s = self._sampler
        self.sink.ticks, self.sink.missed_ticks, self.sink.errors = s.ticks, s.missed_ticks, s.errors

    def wait_past(self, time_s: float) -> bool:
        return _wait_past(self, time_s)

    def bind(self, uuids: Sequence[str]) -> None:
        pass  # the session's NvmlEnergySource is shared with the thread: narrowing it is enough

    def stop(self) -> None:
        self._sampler.stop()
        self.collect()

    @property
    def running(self) -> bool:
        return self._sampler.running


class _SinkStore:
    """TimelineSampler writes through `extend`; route it to the sink."""

    def __init__(self, sink: SamplerSink):
        self._sink = sink

    def extend(self, rows: Sequence[tuple]) -> None:
        self._sink.rows(rows)


def _wait_past(sampler: ThreadSampler | ProcessSampler, time_s: float) -> bool:
    """Collect until a sample later than `time_s` arrived; bounded by a few periods."""
    deadline = clock.now() + WAIT_PERIODS * sampler.period_s + WAIT_SLACK_S
    while True:
        sampler.collect()
        if sampler.sink.last_time_s > time_s:
            return True
        if clock.now() >= deadline or not sampler.running:
            return False
        threading.Event().wait(sampler.period_s / 4)


def child_environment() -> dict[str, str]:
    """The parent's environment with the llm_energy package's folder first on PYTHONPATH.

    A Snakemake `script:` imports the package through sys.path rather than PYTHONPATH, so the
    child would not find it otherwise.
    """
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    paths = [package_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    paths += [p for p in sys.path if p and p not in paths and Path(p).is_dir()]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


class ProcessSampler:
    """Starts, reads and reaps the sampler child process."""

    mode = "process"

    def __init__(
        self,
        devices: Sequence[SamplerDevice],
        sink: SamplerSink,
        period_s: float,
        rapl_zones: Sequence[str] = (),
        nvml_module: str | None = None,
        slow_period_s: float = 1.0,
    ):
        self.devices = list(devices)
        self.sink = sink
        self.period_s = period_s
        self.slow_period_s = slow_period_s
        self.rapl_zones = list(rapl_zones)
        self.nvml_module = nvml_module
        self.process: subprocess.Popen | None = None
        self.hello: dict[str, Any] | None = None
        self._dir: tempfile.TemporaryDirectory | None = None
        self._file: Any = None
        self._partial = b""

    def command(self, out: Path) -> list[str]:
        command = [
            sys.executable,
            "-m",
            "llm_energy.energy.sampler",
            "--out",
            str(out),
            "--parent-pid",
            str(os.getpid()),
            "--period-s",
            repr(self.period_s),
            "--slow-period-s",
            repr(self.slow_period_s),
        ]
        for device in self.devices:
            command += ["--device", device.argument()]
        for zone in self.rapl_zones:
            command += ["--rapl-zone", zone]
        if self.nvml_module:
            command += ["--nvml-module", self.nvml_module]
        return command

    def start(self) -> None:
        """Start the child and wait until it has written its first line (or failed)."""
        self._dir = tempfile.TemporaryDirectory(prefix="llm-energy-sampler-")
        out = Path(self._dir.name) / "samples.jsonl"
        out.touch()
        log_path = Path(self._dir.name) / "sampler.log"
        with open(log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                self.command(out),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                env=child_environment(),
                close_fds=True,
            )
        self._file = open(out, "rb")
        deadline = clock.now() + START_TIMEOUT_S
        while self.hello is None:
            self.collect()
            if self.hello is not None:
                break
            if self.process.poll() is not None or clock.now() > deadline:
                error = log_path.read_text(errors="replace").strip()[-2000:]
                self.stop()
                raise RuntimeError(
                    f"the timeline sampler process did not start "
                    f"(exit code {self.process.returncode}): {error or 'no output'}"
                )
            threading.Event().wait(0.02)

    def collect(self) -> None:
        """Read every complete line the child has written since the last call."""
        if self._file is None:
            return
        data = self._partial + self._file.read()
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for the next read
        rows: list[tuple] = []
        for line in lines:
            if not line:
                continue
            kind, *body = json.loads(line)
            if kind == "s":
                rows.append(tuple(body))
            elif kind == "p":
                self.sink.pids(float(body[0]), str(body[1]), frozenset(int(p) for p in body[2]))
            elif kind == "r":
                self.sink.rapl(RaplRaw(float(body[0]), {k: int(v) for k, v in body[1].items()}))
            elif kind == "stats":
                self.sink.ticks, self.sink.missed_ticks, self.sink.errors = map(int, body[:3])
            elif kind == "error":
                self.sink.first_error = self.sink.first_error or str(body[0])
            elif kind == "hello":
                self.hello = dict(body[0])
        if rows:
            self.sink.rows(rows)

    def wait_past(self, time_s: float) -> bool:
        return _wait_past(self, time_s)

    def bind(self, uuids: Sequence[str]) -> None:
        self._send("bind " + ",".join(uuids))

    def _send(self, line: str) -> None:
        if self.process is not None and self.process.stdin and self.process.poll() is None:
            try:
                self.process.stdin.write((line + "\n").encode())
                self.process.stdin.flush()
            except (BrokenPipeError, OSError) as exc:
                logger.warning("timeline sampler: command %r not delivered: %s", line, exc)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Tell the child to stop, close its stdin, reap it, read what it wrote last.

        The `stop` line comes first because end of file alone is not enough: a process forked from
        the parent after the child started (vLLM's engine core is one) inherits the pipe's write end,
        so closing ours never gives the child EOF; it then waited STOP_TIMEOUT_S and was killed at
        the end of every vLLM job on the H200."""
        process = self.process
        if process is not None:
            self._send("stop")
            if process.stdin:
                try:
                    process.stdin.close()
                except OSError:
                    pass
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("timeline sampler pid %d did not stop: killing it", process.pid)
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)
        self.collect()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


# ---------------------------------------------------------------------------------------------
# Child side


class _LineWriter:
    """Writes JSON lines and flushes each batch, so the parent sees whole ticks."""

    def __init__(self, path: str):
        self._file = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, *items: list) -> None:
        text = "".join(json.dumps(item) + "\n" for item in items)
        with self._lock:
            self._file.write(text)
            self._file.flush()

    def extend(self, rows: Sequence[tuple]) -> None:  # the TimelineSampler's store interface
        if rows:
            self.write(*(["s", *row] for row in rows))


def load_nvml_module(spec: str | None) -> Any:
    """`pynvml` (nvidia-ml-py), or `module:factory` whose factory returns an NVML-like object."""
    if not spec:
        import pynvml

        return pynvml
    module_name, _, attribute = spec.partition(":")
    target = getattr(importlib.import_module(module_name), attribute)
    return target() if callable(target) and not hasattr(target, "nvmlInit") else target


def _child_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_energy.energy.sampler")
    parser.add_argument("--out", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--period-s", type=float, required=True)
    parser.add_argument("--slow-period-s", type=float, default=1.0)
    parser.add_argument("--device", action="append", default=[])
    parser.add_argument("--rapl-zone", action="append", default=[])
    parser.add_argument("--nvml-module", default=None)
    args = parser.parse_args(argv)

    from llm_energy.energy.nvml import NvmlEnergySource
    from llm_energy.energy.timeline import TimelineSampler
    from llm_energy.hardware import GpuDevice

    writer = _LineWriter(args.out)
    devices = [SamplerDevice.parse(text) for text in args.device]
    source: NvmlEnergySource | None = None
    if devices:
        nv = load_nvml_module(args.nvml_module)
        nv.nvmlInit()
        gpus = []
        for position, device in enumerate(devices):
            handle = nv.nvmlDeviceGetHandleByUUID(device.uuid)
            gpus.append(
                GpuDevice(
                    index=device.index,
                    uuid=device.uuid,
                    name="",
                    visible_index=position,
                    handle=handle,
                    counter_handle=handle,
                )
            )
        source = NvmlEnergySource(nv, gpus)
        source.power_methods = {d.uuid: d.power_method for d in devices}

    def observe_pids() -> None:
        now = clock.now()
        writer.write(*(["p", now, uuid, sorted(pids)] for uuid, pids in source.compute_pids().items()))

    def read_rapl() -> None:
        raw: dict[str, int] = {}
        for zone in args.rapl_zone:
            try:
                raw[zone] = int(Path(zone, "energy_uj").read_text().strip())
            except (OSError, ValueError):
                pass  # the edge reads report RAPL failures; a lost sample only shortens the chain
        writer.write(["r", clock.now(), raw])

    def watch_parent() -> None:
        # The parent died (we were reparented), while stdin may still be open: a process the
        # parent forked (e.g. an engine worker) can hold the pipe's write end. Exit at once.
        if os.getppid() != args.parent_pid:
            write_stats()
            os._exit(0)

    def write_stats() -> None:  # `sampler` exists by the time a slow task runs
        writer.write(["stats", sampler.ticks, sampler.missed_ticks, sampler.errors])

    slow_tasks: list[Callable[[], None]] = [watch_parent, write_stats]
    if source is not None:
        slow_tasks.append(observe_pids)
    if args.rapl_zone:
        slow_tasks.append(read_rapl)

    def sample(include_counter: bool) -> list[tuple]:
        return source.sample(include_counter) if source is not None else []

    sampler = TimelineSampler(
        sample,
        writer,
        args.period_s,
        slow_tasks=slow_tasks,
        slow_period_s=args.slow_period_s,
        on_error=lambda text: writer.write(["error", text]),
    )
    writer.write(["hello", {"pid": os.getpid(), "clock_s": clock.now(), "devices": [d.uuid for d in devices]}])
    sampler.start()
    # The main thread reads commands; end of file means the parent closed the pipe or died.
    for line in sys.stdin:
        command, _, value = line.strip().partition(" ")
        if command == "stop":
            break
        if command == "bind" and source is not None:
            wanted = set(value.split(","))
            source.counters = [c for c in source.counters if c.uuid in wanted]
    sampler.stop()
    write_stats()
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
