"""Data parallel: one replica of a backend per GPU, each in a worker process, driven by the harness.

A backend that declares `launch: data_parallel_workers` (Backend.execution; pytorch with
backend_settings.pytorch.data_parallel: N) is wrapped by `DataParallelBackend`: the harness's process
is rank 0 of a torch.distributed group (gloo: it carries Python objects between processes and runs on
CPU alike) and creates no CUDA context; ranks 1..N are workers, each with CUDA_VISIBLE_DEVICES naming
one of the job's GPUs, each running the backend on its own. The harness keeps measuring as for one
process: the energy session covers every GPU of the job (per GPU and summed, see the window's
domains.gpu.devices), and the window's edges are collectives of all processes.

How the work is shared: a generate call's requests are cut into the campaign's batches (the same
shapes a single replica runs), and the batches are dealt to the replicas in turn, continuing from where
the previous call stopped, so a window's batches spread over every replica and warm-up's one-batch
calls rotate over them. Each replica runs whole batches of the campaign's batch size: its kernels are
those of the single-GPU experiment. Timestamps of every process come from clock.now() (CLOCK_MONOTONIC,
one clock for the whole host), so request records of all replicas share the window's time axis.

Nothing hangs: every collective has the group's timeout (backend_settings.<name>.data_parallel_timeout_s),
a worker whose process died fails the call at once (its peer connection closes) with its exit status
and the tail of its log, a worker that raised sends the error back instead of leaving the others
waiting, and workers die with the harness (PR_SET_PDEATHSIG) and at the group's timeout.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm_energy import hardware
from llm_energy.backends.base import Backend, DecodingSettings, LoadReport, Request, RequestRecord
from llm_energy.backends.batching import make_batches
from llm_energy.errors import BackendError

log = logging.getLogger(__name__)

WORKER_MODULE = "llm_energy.data_parallel"
EXIT_WAIT_S = 30.0
PR_SET_PDEATHSIG = 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _init_group(rank: int, world_size: int, port: int, timeout_s: float) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def deal_batches(batches: Sequence[Sequence[Request]], replicas: int, start: int) -> list[list[tuple[int, list[Request]]]]:
    """(global batch index, batch) per replica: batch k goes to replica (start + k) % replicas."""
    dealt: list[list[tuple[int, list[Request]]]] = [[] for _ in range(replicas)]
    for position, batch in enumerate(batches):
        dealt[(start + position) % replicas].append((position, list(batch)))
    return dealt


def _sum_or_none(values: Sequence[Any]) -> Any:
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return sum(numbers) if values and len(numbers) == len(values) else None


class DataParallelBackend(Backend):
    """`replicas` copies of backend `name`, one worker process (and GPU) each."""

    def __init__(self, name: str, settings: dict[str, Any], replicas: int, timeout_s: float,
                 gpus: Sequence[str] | None = None):
        super().__init__(settings)
        self.name = name
        self.replicas = replicas
        self.timeout_s = float(timeout_s)
        # The job's GPUs, one per worker; none on a machine without GPUs (the replicas share the CPU).
        if gpus is None:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            gpus = [g for g in visible.split(",") if g] if visible is not None else [d.uuid for d in hardware.visible_gpus()]
        if gpus and len(gpus) < replicas:
            raise BackendError(f"backend_settings.{name}.data_parallel is {replicas} but the job sees {len(gpus)} GPUs "
                               f"({','.join(gpus)}): one GPU per replica is needed")
        self.gpus = list(gpus)[:replicas] if gpus else []
        self.workers: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self._group = False
        self._next_replica = 0
        self._path = "default"
        self._batch_size = 1

    # -- the workers ----------------------------------------------------------------------------

    def _start(self) -> None:
        port = _free_port()
        log_dir = Path(self.settings.get("log_dir") or ".")
        log_dir.mkdir(parents=True, exist_ok=True)
        for rank in range(1, self.replicas + 1):
            env = dict(os.environ)
            if self.gpus:
                env["CUDA_VISIBLE_DEVICES"] = self.gpus[rank - 1]
            path = log_dir / f"data-parallel-rank{rank}.log"
            handle = open(path, "w")  # noqa: SIM115 (the worker writes it; closed after the worker ends)
            payload = json.dumps({"backend": self.name, "settings": self.settings, "rank": rank,
                                  "world_size": self.replicas + 1, "port": port, "timeout_s": self.timeout_s})
            process = subprocess.Popen([sys.executable, "-m", WORKER_MODULE], stdin=subprocess.PIPE, stdout=handle,
                                       stderr=subprocess.STDOUT, env=env, text=True)
            handle.close()
            assert process.stdin is not None
            process.stdin.write(payload)
            process.stdin.close()
            self.workers.append(process)
            self.logs.append(path)
        log.info("data parallel: %d workers (pids %s) on %s", self.replicas, [p.pid for p in self.workers],
                 self.gpus or "the CPU")
        try:
            _init_group(0, self.replicas + 1, port, self.timeout_s)
        except Exception as exc:
            error = self._failure("starting the process group", exc)
            self._abandon()
            raise error from None
        self._group = True

    def _failure(self, what: str, exc: BaseException | None) -> BackendError:
        """The experiment's error: which worker ended and how, with its log's tail."""
        # The collective may fail a moment before the dying worker is reaped: give it that moment.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and all(p.poll() is None for p in self.workers):
            time.sleep(0.05)
        dead = [(rank, p) for rank, p in enumerate(self.workers, start=1) if p.poll() is not None]
        parts = []
        for rank, process in dead:
            code = process.returncode
            how = f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            tail = self.logs[rank - 1].read_text(errors="replace")[-1500:] if self.logs[rank - 1].exists() else ""
            parts.append(f"data-parallel worker rank {rank} (pid {process.pid}) {how}; its log ends: {tail.strip()}")
        if not parts:
            parts.append(f"no worker exited; the collective failed: {exc} (backend_settings.{self.name}."
                         f"data_parallel_timeout_s is {self.timeout_s:g} s)")
        return BackendError(f"data parallel ({self.replicas} replicas), {what}: " + " | ".join(parts))

    def _call(self, method: str, per_rank: Sequence[Any] | None = None, common: Any = None) -> list[Any]:
        """Run `method` on every worker (its arguments: `common`, or per_rank[rank - 1]) and return
        their results in rank order. A collective: every process waits here for all the others."""
        import torch.distributed as dist

        if not self._group:
            raise BackendError("data parallel: the workers are not running (load() first)")
        try:
            dist.broadcast_object_list([(method, common, list(per_rank) if per_rank is not None else None)], src=0)
            gathered: list[Any] = [None] * (self.replicas + 1)
            dist.gather_object(("ok", None), gathered, dst=0)
        except Exception as exc:  # a worker died or the timeout passed: never wait on
            error = self._failure(f"during {method}", exc)  # before the others are ended
            self._abandon()
            raise error from None
        results = []
        for rank, (status, value) in enumerate(gathered[1:], start=1):
            if status != "ok":
                raise BackendError(f"data-parallel worker rank {rank}, {method}: {value}")
            results.append(value)
        return results

    def _abandon(self) -> None:
        """After a failed collective: end the workers and the group, so that nothing waits on them."""
        for process in self.workers:
            if process.poll() is None:
                process.kill()
        for process in self.workers:
            with contextlib.suppress(Exception):
                process.wait(timeout=EXIT_WAIT_S)
        self._destroy_group()

    def _destroy_group(self) -> None:
        if self._group:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            self._group = False

    def processes(self) -> list[dict[str, Any]]:
        return [{"role": "data_parallel_worker", "rank": rank, "pid": p.pid,
                 "gpus": [self.gpus[rank - 1]] if self.gpus else [], "log": str(self.logs[rank - 1])}
                for rank, p in enumerate(self.workers, start=1)]

    # -- the Backend interface --------------------------------------------------------------------

    def load(self, model_dir: Path, dtype: str, max_model_len: int, batch_size: int) -> LoadReport:
        self._batch_size = batch_size
        self._start()
        reports = self._call("load", common=(str(model_dir), dtype, max_model_len, batch_size))
        paths = self._call("engine_path")
        self._path = f"{paths[0]}+dp{self.replicas}"
        first = reports[0]
        return LoadReport(device=first.device, dtype=first.dtype,
                          details={**first.details, "data_parallel": self.replicas,
                                   "replicas": [{"rank": rank, "device": r.device, "details": r.details}
                                                for rank, r in enumerate(reports, start=1)],
                                   "processes": self.processes()})

    def tokenize(self, prompts: list[str], max_input_tokens: int) -> list[Request]:
        # Every replica has the same tokenizer; each tokenizes (cheap, and keeps the calls collective).
        return self._call("tokenize", common=(prompts, max_input_tokens))[0]

    def _deal(self, requests: list[Request], batch_size: int, decoding: DecodingSettings) -> list[list[tuple[int, list[Request]]]]:
        batches = make_batches(requests, batch_size, self.settings.get("batching", "fixed"),
                               self.settings.get("token_budget"), decoding.max_output_tokens)
        dealt = deal_batches(batches, self.replicas, self._next_replica)
        self._next_replica = (self._next_replica + len(batches)) % self.replicas
        return dealt

    def generate(self, requests: list[Request], batch_size: int, decoding: DecodingSettings) -> list[RequestRecord]:
        dealt = self._deal(requests, batch_size, decoding)
        shards = self._call("generate_batches", per_rank=dealt, common=(batch_size, decoding))
        return sorted((r for shard in shards for r in shard), key=lambda r: r.index)

    @property
    def engine_path(self) -> str:
        return self._path

    def compile(self, batches: list[list[Request]], decoding: DecodingSettings) -> dict[str, Any]:
        # Every replica compiles every shape: any of them may run any batch.
        facts = self._call("compile", common=(batches, decoding))
        return {**facts[0], "replicas": facts}

    def compilation_count(self) -> int | None:
        return _sum_or_none(self._call("compilation_count"))

    def reset_peak_memory(self) -> None:
        self._call("reset_peak_memory")

    def memory_report(self) -> dict[str, Any]:
        reports = self._call("memory_report")
        keys = {k for r in reports for k in r}
        summed = {k: _sum_or_none([r.get(k) for r in reports]) for k in keys
                  if all(isinstance(r.get(k), (int, float, type(None))) for r in reports)}
        return {**summed, "per_replica": reports}

    def synchronize(self) -> None:
        self._call("synchronize")

    def close(self) -> None:
        if self._group:
            with contextlib.suppress(BackendError):
                self._call("close")
                import torch.distributed as dist

                dist.broadcast_object_list([("exit", None, None)], src=0)
        for process in self.workers:
            try:
                process.wait(timeout=EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=EXIT_WAIT_S)
        self._destroy_group()


# ---------------------------------------------------------------------------------------------
# The worker process: python -m llm_energy.data_parallel (arguments as JSON on stdin)


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the harness's process ends, however it ends."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _run(backend: Backend, method: str, common: Any, mine: Any) -> Any:
    if method == "load":
        model_dir, dtype, max_model_len, batch_size = common
        return backend.load(Path(model_dir), dtype, max_model_len, batch_size)
    if method == "tokenize":
        return backend.tokenize(*common)
    if method == "engine_path":
        return backend.engine_path
    if method == "generate_batches":
        batch_size, decoding = common
        records: list[RequestRecord] = []
        for batch_index, batch in mine:
            for record in backend.generate(batch, batch_size, decoding):
                record.batch_index = batch_index
                records.append(record)
        return records
    if method == "compile":
        return backend.compile(*common)
    if method in ("compilation_count", "reset_peak_memory", "memory_report", "synchronize", "close"):
        return getattr(backend, method)()
    raise ValueError(f"unknown data-parallel call {method!r}")


def worker_main() -> int:
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s rank %(process)d %(name)s %(levelname)s %(message)s")
    arguments = json.loads(sys.stdin.read())
    rank = arguments["rank"]
    import torch.distributed as dist

    from llm_energy.backends import backend_class

    _init_group(rank, arguments["world_size"], arguments["port"], arguments["timeout_s"])
    backend = backend_class(arguments["backend"])(arguments["settings"])
    log.info("rank %d: %s replica, CUDA_VISIBLE_DEVICES=%s", rank, arguments["backend"],
             os.environ.get("CUDA_VISIBLE_DEVICES"))
    while True:
        command: list[Any] = [None]
        dist.broadcast_object_list(command, src=0)  # raises when the harness is gone or the timeout passed
        method, common, per_rank = command[0]
        if method == "exit":
            break
        try:
            outcome = ("ok", _run(backend, method, common, per_rank[rank - 1] if per_rank is not None else None))
        except BaseException as exc:  # sent back, so that the harness fails the experiment with it
            outcome = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}")
        dist.gather_object(outcome, None, dst=0)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
