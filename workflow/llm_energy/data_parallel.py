"""Backend replicas in worker processes, one GPU each, driven by the harness: data and tensor parallel.

A backend that declares `launch: data_parallel_workers` (Backend.execution; pytorch with
backend_settings.pytorch.data_parallel: N) is wrapped by `DataParallelBackend`: N worker processes, each
with CUDA_VISIBLE_DEVICES naming one of the job's GPUs, each running the backend on its own. With
`launch: tensor_parallel_workers` (pytorch's tensor_parallel: N) the N workers are the ranks of one model
split by transformers' tp_plan: they form their own torch.distributed group (torchrun's variables; gloo
on CPU, NCCL on GPUs), see all of the job's GPUs, and every call goes to all of them. The harness's
process creates no CUDA context and measures as for one process: the energy session covers every GPU of
the job (per GPU and summed, see the window's domains.gpu.devices).

The harness talks to the workers over one authenticated local connection each
(multiprocessing.connection), not over torch.distributed: tensor parallel needs the default process group
to be its ranks' alone (transformers builds its mesh over the whole group). A call is sent to every worker
and its replies are awaited together: a barrier of all processes with the timeout
(backend_settings.<name>.data_parallel_timeout_s). A worker whose process died fails the call at once (its
connection closes) with its exit status and the tail of its log, one that raised sends the error back,
a stuck one fails it at the timeout, and workers die with the harness (PR_SET_PDEATHSIG, and the closed
connection). Nothing waits without a bound.

How data parallel shares the work: a generate call's requests are cut into the campaign's batches (the
same shapes a single replica runs), and the batches are dealt to the replicas in turn, continuing from
where the previous call stopped, so a window's batches spread over every replica and warm-up's one-batch
calls rotate over them. Timestamps of every process come from clock.now() (CLOCK_MONOTONIC, one clock for
the whole host), so request records of all replicas share the window's time axis.
"""

from __future__ import annotations

import contextlib
import ctypes
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
from multiprocessing.connection import (
    AuthenticationError,
    Client,
    Connection,
    answer_challenge,
    deliver_challenge,
    wait,
)
from pathlib import Path
from typing import Any

from llm_energy import hardware
from llm_energy.backends.base import Backend, DecodingSettings, LoadReport, Request, RequestRecord
from llm_energy.backends.batching import batches_for_settings
from llm_energy.errors import BackendError

log = logging.getLogger(__name__)

WORKER_MODULE = "llm_energy.data_parallel"
EXIT_WAIT_S = 30.0
ACCEPT_S = 120.0  # a worker connects back within this (it imports torch first)
PR_SET_PDEATHSIG = 1
DATA = "data"  # each replica its own batches
TENSOR = "tensor"  # every rank the same call: one model split over the ranks (transformers' tp_plan)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def deal_batches(
    batches: Sequence[Sequence[Request]], replicas: int, start: int
) -> list[list[tuple[int, list[Request]]]]:
    """(global batch index, batch) per replica: batch k goes to replica (start + k) % replicas."""
    dealt: list[list[tuple[int, list[Request]]]] = [[] for _ in range(replicas)]
    for position, batch in enumerate(batches):
        dealt[(start + position) % replicas].append((position, list(batch)))
    return dealt


def _sum_or_none(values: Sequence[Any]) -> Any:
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return sum(numbers) if values and len(numbers) == len(values) else None


class DataParallelBackend(Backend):
    """`replicas` worker processes of backend `name`, one GPU each: data parallel (each replica its own
    batches), or tensor parallel (mode TENSOR: the workers form their own torch.distributed group, which
    transformers' tp_plan splits the model over, and every call goes to all of them)."""

    def __init__(
        self,
        name: str,
        settings: dict[str, Any],
        replicas: int,
        timeout_s: float,
        gpus: Sequence[str] | None = None,
        mode: str = DATA,
    ):
        super().__init__(settings)
        self.name = name
        self.replicas = replicas
        self.mode = mode
        self.timeout_s = float(timeout_s)
        key = "data_parallel" if mode == DATA else "tensor_parallel"
        # The job's GPUs, one per worker; none on a machine without GPUs (the replicas share the CPU).
        if gpus is None:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            gpus = (
                [g for g in visible.split(",") if g]
                if visible is not None
                else [d.uuid for d in hardware.visible_gpus()]
            )
        if gpus and len(gpus) < replicas:
            raise BackendError(
                f"backend_settings.{name}.{key} is {replicas} but the job sees {len(gpus)} GPUs "
                f"({','.join(gpus)}): one GPU per process is needed"
            )
        self.gpus = list(gpus)[:replicas] if gpus else []
        self.workers: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.connections: list[Connection] = []
        self._next_replica = 0
        self._path = "default"
        self._batch_size = 1

    # -- the workers ----------------------------------------------------------------------------

    def _environment(self, rank: int, engine_port: int) -> dict[str, str]:
        env = dict(os.environ)
        if self.mode == DATA:
            if self.gpus:
                env["CUDA_VISIBLE_DEVICES"] = self.gpus[rank - 1]
        else:
            # torchrun's variables: transformers initialises the group of the tensor-parallel ranks from
            # them, each rank on GPU LOCAL_RANK of the job's GPUs (all of them visible to every rank).
            if self.gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
            env.update(
                RANK=str(rank - 1),
                LOCAL_RANK=str(rank - 1),
                WORLD_SIZE=str(self.replicas),
                LOCAL_WORLD_SIZE=str(self.replicas),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(engine_port),
            )
        return env

    def _start(self) -> None:
        log_dir = Path(self.settings.get("log_dir") or ".")
        log_dir.mkdir(parents=True, exist_ok=True)
        authkey = os.urandom(16)
        server = socket.create_server(("127.0.0.1", 0))
        server.settimeout(ACCEPT_S)
        engine_port = _free_port()
        prefix = "data-parallel" if self.mode == DATA else "tensor-parallel"
        with server:
            for rank in range(1, self.replicas + 1):
                path = log_dir / f"{prefix}-rank{rank}.log"
                handle = open(path, "w")  # noqa: SIM115 (the worker writes it; closed once it is started)
                payload = json.dumps(
                    {
                        "backend": self.name,
                        "settings": self.settings,
                        "rank": rank,
                        "control": server.getsockname()[1],
                        "authkey": authkey.hex(),
                    }
                )
                process = subprocess.Popen(
                    [sys.executable, "-m", WORKER_MODULE],
                    stdin=subprocess.PIPE,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    env=self._environment(rank, engine_port),
                    text=True,
                )
                handle.close()
                assert process.stdin is not None
                process.stdin.write(payload)
                process.stdin.close()
                self.workers.append(process)
                self.logs.append(path)
            log.info(
                "%s: %d workers (pids %s) on %s",
                prefix,
                self.replicas,
                [p.pid for p in self.workers],
                self.gpus or "the CPU",
            )
            by_rank: dict[int, Connection] = {}
            try:
                while len(by_rank) < self.replicas:
                    peer, _ = server.accept()
                    peer.settimeout(None)
                    connection = Connection(peer.detach())
                    deliver_challenge(connection, authkey)
                    answer_challenge(connection, authkey)
                    by_rank[connection.recv()] = connection
            except (OSError, EOFError, AuthenticationError) as exc:
                error = self._failure("while the workers started", exc)
                self._abandon()
                raise error from None
        self.connections = [by_rank[rank] for rank in range(1, self.replicas + 1)]

    def _failure(self, what: str, exc: BaseException | None) -> BackendError:
        """The experiment's error: which worker ended and how, with its log's tail."""
        # The connection may close a moment before the dying worker is reaped: give it that moment.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and all(p.poll() is None for p in self.workers):
            time.sleep(0.05)
        dead = [(rank, p) for rank, p in enumerate(self.workers, start=1) if p.poll() is not None]
        parts = []
        for rank, process in dead:
            code = process.returncode
            how = f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            tail = self.logs[rank - 1].read_text(errors="replace")[-1500:] if self.logs[rank - 1].exists() else ""
            parts.append(f"worker rank {rank} (pid {process.pid}) {how}; its log ends: {tail.strip()}")
        if not parts:
            parts.append(
                f"no worker exited, but {exc} (backend_settings.{self.name}.data_parallel_timeout_s "
                f"is {self.timeout_s:g} s)"
            )
        return BackendError(f"{self.mode} parallel ({self.replicas} processes), {what}: " + " | ".join(parts))

    def _call(self, method: str, per_rank: Sequence[Any] | None = None, common: Any = None) -> list[Any]:
        """Run `method` on every worker (its arguments: `common`, and per_rank[rank - 1]) and return
        their results in rank order: a barrier of all processes, with the timeout."""
        if not self.connections:
            raise BackendError(f"{self.mode} parallel: the workers are not running (load() first)")
        replies: dict[int, Any] = {}
        try:
            for rank, connection in enumerate(self.connections, start=1):
                connection.send((method, common, per_rank[rank - 1] if per_rank is not None else None))
            deadline = time.monotonic() + self.timeout_s
            waiting = {connection: rank for rank, connection in enumerate(self.connections, start=1)}
            while waiting:
                ready = wait(list(waiting), timeout=max(deadline - time.monotonic(), 0.0))
                if not ready:
                    raise TimeoutError(
                        f"ranks {sorted(waiting.values())} did not answer {method!r} within {self.timeout_s:g} s"
                    )
                for connection in ready:
                    replies[waiting.pop(connection)] = connection.recv()  # EOFError: that worker is gone
        except (OSError, EOFError, TimeoutError) as exc:  # never wait on a dead or stuck worker
            error = self._failure(f"during {method}", exc)  # before the others are ended
            self._abandon()
            raise error from None
        results = []
        for rank in range(1, self.replicas + 1):
            status, value = replies[rank]
            if status != "ok":
                raise BackendError(f"{self.mode}-parallel worker rank {rank}, {method}: {value}")
            results.append(value)
        return results

    def _abandon(self) -> None:
        """After a failed call: end the workers, so that nothing waits on them."""
        for process in self.workers:
            if process.poll() is None:
                process.kill()
        for process in self.workers:
            with contextlib.suppress(Exception):
                process.wait(timeout=EXIT_WAIT_S)
        self._disconnect()

    def _disconnect(self) -> None:
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.close()
        self.connections = []

    def processes(self) -> list[dict[str, Any]]:
        role = "data_parallel_worker" if self.mode == DATA else "tensor_parallel_rank"
        return [
            {
                "role": role,
                "rank": rank,
                "pid": p.pid,
                "gpus": ([self.gpus[rank - 1]] if self.gpus else []),
                "log": str(self.logs[rank - 1]),
            }
            for rank, p in enumerate(self.workers, start=1)
        ]

    # -- the Backend interface --------------------------------------------------------------------

    def load(self, model_dir: Path, dtype: str, max_model_len: int, batch_size: int) -> LoadReport:
        self._batch_size = batch_size
        self._start()
        reports = self._call("load", common=(str(model_dir), dtype, max_model_len, batch_size))
        paths = self._call("engine_path")
        self._path = f"{paths[0]}+{'dp' if self.mode == DATA else 'tp'}{self.replicas}"
        first = reports[0]
        details = dict(first.details)
        if self.mode == TENSOR:  # each rank stores its shard: the model's weights are all of them
            for key in ("weight_bytes", "matmul_weight_bytes"):
                details[key] = _sum_or_none([r.details.get(key) for r in reports])
        return LoadReport(
            device=first.device,
            dtype=first.dtype,
            details={
                **details,
                f"{self.mode}_parallel": self.replicas,
                "replicas": [
                    {"rank": rank, "device": r.device, "details": r.details} for rank, r in enumerate(reports, start=1)
                ],
                "processes": self.processes(),
            },
        )

    def tokenize(self, prompts: list[str], max_input_tokens: int) -> list[Request]:
        # Every replica has the same tokenizer; each tokenizes (cheap, and keeps the calls collective).
        return self._call("tokenize", per_rank=self._first_rank_only(), common=(prompts, max_input_tokens))[0]

    def _first_rank_only(self) -> list[bool]:
        """`mine` flags for a collective call whose ranks all compute the same answer: only rank 1
        sends it back (the others reply None), so N - 1 copies are never pickled."""
        return [True] + [False] * (self.replicas - 1)

    def _deal(
        self, requests: list[Request], batch_size: int, decoding: DecodingSettings
    ) -> list[list[tuple[int, list[Request]]]]:
        batches = batches_for_settings(requests, batch_size, self.settings, decoding.max_output_tokens)
        dealt = deal_batches(batches, self.replicas, self._next_replica)
        self._next_replica = (self._next_replica + len(batches)) % self.replicas
        return dealt

    def generate(self, requests: list[Request], batch_size: int, decoding: DecodingSettings) -> list[RequestRecord]:
        if self.mode == TENSOR:  # every rank runs the same batches; they return the same tokens
            return self._call("generate", per_rank=self._first_rank_only(), common=(requests, batch_size, decoding))[0]
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
        summed = {
            k: _sum_or_none([r.get(k) for r in reports])
            for k in keys
            if all(isinstance(r.get(k), (int, float, type(None))) for r in reports)
        }
        return {**summed, "per_replica": reports}

    def synchronize(self) -> None:
        self._call("synchronize")

    def close(self) -> None:
        if self.connections:
            with contextlib.suppress(BackendError):
                self._call("close")
            for connection in self.connections:
                with contextlib.suppress(OSError):
                    connection.send(("exit", None, None))
        for process in self.workers:
            try:
                process.wait(timeout=EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=EXIT_WAIT_S)
        self._disconnect()


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
    if method == "tokenize":  # mine: whether this rank sends the answer back
        requests = backend.tokenize(*common)
        return requests if mine else None
    if method == "engine_path":
        return backend.engine_path
    if method == "generate":  # tensor parallel: every rank runs it, the first sends the records back
        records = backend.generate(*common)
        return records if mine else None
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
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    arguments = json.loads(sys.stdin.read())
    rank = arguments["rank"]
    from llm_energy.backends import backend_class

    connection = Client(("127.0.0.1", arguments["control"]), authkey=bytes.fromhex(arguments["authkey"]))
    connection.send(rank)
    backend = backend_class(arguments["backend"])(arguments["settings"])
    log.info("rank %d: %s, CUDA_VISIBLE_DEVICES=%s", rank, arguments["backend"], os.environ.get("CUDA_VISIBLE_DEVICES"))
    while True:
        try:
            method, common, mine = connection.recv()
        except EOFError:  # the harness is gone
            return 1
        if method == "exit":
            return 0
        try:
            outcome = ("ok", _run(backend, method, common, mine))
        except BaseException as exc:  # sent back, so that the harness fails the experiment with it
            outcome = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}")
        connection.send(outcome)


if __name__ == "__main__":
    sys.exit(worker_main())
