"""Worker processes of llm_energy.data_parallel, real ones on CPU: data parallel (the batches dealt over
the replicas, which generate what one process generates; a killed worker fails the call with its exit
status, a stuck one at the barrier's timeout, an error is sent back) and tensor parallel (two ranks of
transformers' tp_plan over gloo: the same tokens; a killed rank). Nothing hangs."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from llm_energy.backends import create_backend
from llm_energy.backends.base import DecodingSettings, Request
from llm_energy.backends.pytorch import PytorchBackend
from llm_energy.data_parallel import TENSOR, DataParallelBackend, deal_batches
from llm_energy.errors import BackendError

from tests.unit.test_backend_pytorch import prompts, weights_of

BATCH = 2
DECODING = DecodingSettings(max_output_tokens=4)


def _settings(tmp_path: Path, **extra) -> dict:
    return {
        "device": "cpu",
        "num_threads": 1,
        "batching": "fixed",
        "token_budget": None,
        "seed": 0,
        "trust_remote_code": False,
        "log_dir": str(tmp_path),
        "data_parallel": 2,
        **extra,
    }


def _requests(n: int) -> list[Request]:
    return [Request(index=i, prompt_token_ids=tuple(range(5 + i, 12 + 2 * i))) for i in range(n)]


def _one_process(tiny_llama: Path) -> tuple[list[Request], dict[int, list[int]]]:
    """The requests of the bundled prompts and the tokens one process generates for them."""
    single = PytorchBackend({"device": "cpu", "num_threads": 1})
    single.load(weights_of(tiny_llama), "float32", 64, BATCH)
    requests = single.tokenize(prompts(), 16)
    expected = {r.index: r.output_token_ids for r in single.generate(requests, BATCH, DECODING)}
    single.close()
    return requests, expected


def test_batches_are_dealt_in_turn_and_the_turn_carries_over() -> None:
    batches = [[r] for r in _requests(5)]
    dealt = deal_batches(batches, 2, start=1)
    assert [[k for k, _ in share] for share in dealt] == [[1, 3], [0, 2, 4]]
    assert deal_batches(batches[:1], 3, start=2)[2][0][0] == 0


def test_create_backend_follows_the_declaration(tmp_path: Path) -> None:
    backend = create_backend("pytorch", _settings(tmp_path))
    assert isinstance(backend, DataParallelBackend) and backend.replicas == 2 and backend.timeout_s == 900
    assert isinstance(create_backend("pytorch", _settings(tmp_path, data_parallel=1)), PytorchBackend)


def test_two_workers_generate_what_one_process_generates(tiny_llama: Path, tmp_path: Path) -> None:
    requests, expected = _one_process(tiny_llama)

    backend = DataParallelBackend("pytorch", _settings(tmp_path), replicas=2, timeout_s=120, gpus=[])
    try:
        report = backend.load(weights_of(tiny_llama), "float32", 64, BATCH)
        assert report.details["data_parallel"] == 2 and len(report.details["replicas"]) == 2
        assert backend.tokenize(prompts(), 16) == requests
        pids = {p["pid"] for p in backend.processes()}
        assert len(pids) == 2 and os.getpid() not in pids
        records = backend.generate(requests, BATCH, DECODING)
        # 5 requests in batches of 2: batches 0 and 2 on the first replica, 1 on the second
        assert [r.index for r in records] == [0, 1, 2, 3, 4]
        assert {r.index: r.output_token_ids for r in records} == expected
        assert sorted({r.batch_index for r in records}) == [0, 1, 2]
        backend.synchronize()
        assert backend.engine_path.endswith("+dp2")
        memory = backend.memory_report()
        assert len(memory["per_replica"]) == 2
    finally:
        backend.close()
    assert [p.returncode for p in backend.workers] == [0, 0]


def test_a_killed_worker_fails_the_experiment_with_the_reason(tiny_llama: Path, tmp_path: Path) -> None:
    backend = DataParallelBackend("pytorch", _settings(tmp_path), replicas=2, timeout_s=120, gpus=[])
    try:
        backend.load(weights_of(tiny_llama), "float32", 64, BATCH)
        victim = backend.workers[1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)
        started = time.monotonic()
        with pytest.raises(BackendError, match=r"rank 2 \(pid \d+\) was killed by signal SIGKILL"):
            backend.generate(_requests(4), BATCH, DECODING)
        assert time.monotonic() - started < 30  # the dead peer's connection fails it, not the timeout
        assert all(p.poll() is not None for p in backend.workers)  # the survivor was ended too
    finally:
        backend.close()


def test_a_stuck_worker_fails_at_the_barrier_timeout(tiny_llama: Path, tmp_path: Path) -> None:
    backend = DataParallelBackend("pytorch", _settings(tmp_path), replicas=2, timeout_s=120, gpus=[])
    try:
        backend.load(weights_of(tiny_llama), "float32", 64, BATCH)
        backend.timeout_s = 5  # loading on a busy 2-core machine can take longer than the barrier's wait here
        os.kill(backend.workers[0].pid, signal.SIGSTOP)  # alive, but never reaches the barrier
        started = time.monotonic()
        with pytest.raises(
            BackendError,
            match=r"data parallel \(2 processes\), during synchronize: no worker "
            r"exited, but ranks \[1\] did not answer",
        ):
            backend.synchronize()
        assert time.monotonic() - started < 60
    finally:
        for process in backend.workers:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
        backend.close()


def test_a_worker_error_is_sent_back(tiny_llama: Path, tmp_path: Path) -> None:
    backend = DataParallelBackend("pytorch", _settings(tmp_path), replicas=2, timeout_s=120, gpus=[])
    try:
        with pytest.raises(BackendError, match="rank 1, load"):
            backend.load(tmp_path / "no-such-model", "float32", 64, BATCH)
        backend.synchronize()  # the group is still in step after the error
    finally:
        backend.close()
    assert [p.returncode for p in backend.workers] == [0, 0]


def test_fewer_gpus_than_replicas_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="data_parallel is 2 but the job sees 1 GPUs.*one GPU per process"):
        DataParallelBackend("pytorch", _settings(tmp_path), replicas=2, timeout_s=5, gpus=["GPU-a"])


# -- tensor parallel: the workers are the ranks of one model (transformers' tp_plan over gloo on CPU) --


def test_two_tensor_parallel_ranks_generate_what_one_process_generates(tiny_llama: Path, tmp_path: Path) -> None:
    requests, expected = _one_process(tiny_llama)

    backend = create_backend("pytorch", _settings(tmp_path, data_parallel=1, tensor_parallel=2))
    assert isinstance(backend, DataParallelBackend) and backend.mode == TENSOR
    try:
        report = backend.load(weights_of(tiny_llama), "float32", 64, BATCH)
        assert report.details["tensor_parallel"] == 2
        assert [p["role"] for p in backend.processes()] == ["tensor_parallel_rank"] * 2
        records = backend.generate(requests, BATCH, DECODING)
        assert {r.index: r.output_token_ids for r in records} == expected
        assert backend.engine_path.endswith("+tp2")
    finally:
        backend.close()
    assert [p.returncode for p in backend.workers] == [0, 0]


def test_a_killed_tensor_parallel_rank_fails_the_experiment(tiny_llama: Path, tmp_path: Path) -> None:
    backend = create_backend("pytorch", _settings(tmp_path, data_parallel=1, tensor_parallel=2))
    try:
        backend.load(weights_of(tiny_llama), "float32", 64, BATCH)
        os.kill(backend.workers[0].pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(BackendError, match=r"rank 1 \(pid \d+\) was killed by signal SIGKILL"):
            backend.generate(_requests(2), BATCH, DECODING)
        assert time.monotonic() - started < 60
        assert all(p.poll() is not None for p in backend.workers)
    finally:
        backend.close()
