"""The pytorch backend under a request rate: transformers' continuous batching on the real built-in tiny
Llama (CPU). Requests submitted at their arrival times, the cap on requests in flight, per-request
timestamps taken as tokens reach the caller, and the decoding of the offline path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from llm_energy import models
from llm_energy.backends import continuous_batching
from llm_energy.backends.base import DecodingSettings, Request, RequestRecord
from llm_energy.backends.pytorch import PytorchBackend
from llm_energy.errors import BackendError
from llm_energy.load import LoadSpec, Schedule, in_flight_steps

MAX_INPUT_TOKENS = 16
N = 8  # output tokens per request in fixed-length mode
BATCH = 3
MAX_MODEL_LEN = 64


def weights_of(model_folder: Path) -> Path:
    return models.resolve_model_path(model_folder / "manifest.json")


def load(tiny_llama: Path, **settings) -> PytorchBackend:
    backend = PytorchBackend({"device": "cpu", "serving": True, "seed": 0, **settings})
    backend.load(weights_of(tiny_llama), "float32", max_model_len=MAX_MODEL_LEN, batch_size=BATCH)
    return backend


@pytest.fixture(scope="module")
def served(tiny_llama: Path) -> Iterator[PytorchBackend]:
    backend = load(tiny_llama)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def offline(tiny_llama: Path) -> Iterator[PytorchBackend]:
    backend = PytorchBackend({"device": "cpu"})
    backend.load(weights_of(tiny_llama), "float32", max_model_len=MAX_MODEL_LEN, batch_size=1)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def requests(served: PytorchBackend) -> list[Request]:
    return served.tokenize(models.read_prompt_corpus()[:6], MAX_INPUT_TOKENS)


def check_timestamps(records: list[RequestRecord], tokens: int | None = N) -> None:
    for r in records:
        times, counts = r.arrivals()
        assert r.latency_source == continuous_batching.LATENCY_SOURCE
        assert sum(counts) == r.output_tokens == len(r.output_token_ids)
        if tokens is not None:
            assert r.output_tokens == tokens
        assert r.submitted_s <= r.first_token_s == times[0] <= r.last_token_s == times[-1] == r.finished_s
        assert times == sorted(times)
        assert 0 < r.ttft_s <= r.e2e_s


def test_engine_path_and_start_outside_the_windows(served: PytorchBackend, requests) -> None:
    decoding = DecodingSettings(max_output_tokens=N)
    facts = served.compile([requests[:BATCH]], decoding)
    assert served.engine_path == facts["engine_path"] == "continuous-batching"
    cb = facts["continuous_batching"]
    # sized as the static path's cache: batch size x max_model_len, no prefix sharing, EOS masked
    assert (cb["max_requests_per_batch"], cb["allow_block_sharing"]) == (BATCH, False)
    assert cb["kv_cache_tokens"] >= BATCH * MAX_MODEL_LEN and cb["max_batch_tokens"] == BATCH * MAX_MODEL_LEN
    assert cb["logits_processors"] == ["SuppressTokensLogitsProcessor"]
    # the configured kernels, never switched to flash attention (5.17 names its paged sdpa "paged|sdpa")
    assert cb["attn_implementation"]["configured"] == "sdpa"
    assert cb["attn_implementation"]["running"] in ("sdpa", "paged|sdpa")
    engine = served._cb_engine
    served.generate(requests, BATCH, decoding)  # the same decoding: the engine started in compile() runs it
    assert served._cb_engine is engine
    memory = served.memory_report()
    assert memory["kv_cache_bytes"] > 0 and memory["kv_cache_source"] == "paged_cache_allocation"


def test_requests_are_submitted_at_their_arrival_times_without_waiting(served: PytorchBackend, requests) -> None:
    # 40 requests/s: a request lasts longer than the gaps, so later ones arrive while earlier ones run
    schedule = Schedule.open_loop(len(requests), LoadSpec(request_rate=40), seed=3)
    records = served.serve(requests, DecodingSettings(max_output_tokens=N), schedule)
    assert [r.index for r in records] == [r.index for r in requests]
    check_timestamps(records)
    first_due = min(r.due_s for r in records)
    for r, offset in zip(records, schedule.offsets_s):
        assert r.due_s - first_due == pytest.approx(offset, abs=1e-6)
        assert 0 <= r.queue_s < 0.05  # open loop: submitted when due, whatever the others are doing
        assert r.due_s <= r.submitted_s < r.first_token_s
    _, in_flight = in_flight_steps(records)
    assert in_flight.max() >= 2  # requests overlapped: continuous batching ran them together


def test_max_concurrency_holds_arrivals_back(served: PytorchBackend, requests) -> None:
    records = served.serve(requests, DecodingSettings(max_output_tokens=N), Schedule((0.0,) * len(requests), 2))
    check_timestamps(records)
    _, in_flight = in_flight_steps(records)
    assert in_flight.max() == 2
    assert sum(r.queue_s > 0.005 for r in records) >= len(requests) - 2  # waited for a free slot


def test_greedy_fixed_length_decodes_as_the_offline_path(
    served: PytorchBackend, offline: PytorchBackend, requests
) -> None:
    decoding = DecodingSettings(max_output_tokens=N)
    alone = offline.generate(requests, 1, decoding)  # batch 1: no padding in the reference
    together = served.generate(requests, BATCH, decoding)
    check_timestamps(together)
    assert [r.output_token_ids for r in together] == [r.output_token_ids for r in alone]


def declare_eos(backend: PytorchBackend, token_id: int) -> int:
    """Make `token_id` the tokenizer's EOS (the backend's own copy of the model: no other test shares it)."""
    old = backend.tokenizer.eos_token_id
    backend.tokenizer.eos_token_id = token_id
    backend.model.generation_config.eos_token_id = token_id
    assert backend.eos_token_ids() == {token_id}
    return old


def test_eos_and_fixed_length_as_the_offline_path(tiny_llama: Path, offline: PytorchBackend, requests) -> None:
    """A token the model really generates declared EOS: output_length eos stops there (EOS counted),
    fixed length masks it and still gives exactly N tokens, as min_new_tokens does offline."""
    backend = load(tiny_llama)
    try:
        free = backend.generate(requests, BATCH, DecodingSettings(max_output_tokens=12, output_length="eos"))
        target = next(
            tok
            for r in free
            for pos, tok in enumerate(r.output_token_ids)
            if pos >= 1 and tok not in r.output_token_ids[:pos]
        )
        declare_eos(backend, target)
        stopped = backend.generate(requests, BATCH, DecodingSettings(max_output_tokens=12, output_length="eos"))
        check_timestamps(stopped, tokens=None)
        for before, after in zip(free, stopped):
            ids = before.output_token_ids
            expected = ids.index(target) + 1 if target in ids else 12
            assert after.output_token_ids == ids[:expected]
        assert any(r.output_tokens < 12 for r in stopped)
        fixed = backend.generate(requests, BATCH, DecodingSettings(max_output_tokens=N))
        check_timestamps(fixed)
        assert all(target not in r.output_token_ids for r in fixed)
        # the offline path with the same EOS masks the same logits: the same tokens
        old = declare_eos(offline, target)
        try:
            assert [r.output_token_ids for r in fixed] == [
                r.output_token_ids for r in offline.generate(requests, 1, DecodingSettings(max_output_tokens=N))
            ]
        finally:
            declare_eos(offline, old)
    finally:
        backend.close()


def test_sampling_runs_its_processors_and_is_seeded(served: PytorchBackend, requests) -> None:
    def run(seed: int) -> list[list[int]]:
        decoding = DecodingSettings(
            mode="sampling", temperature=0.8, top_p=0.9, top_k=20, max_output_tokens=N, seed=seed
        )
        records = served.generate(requests[:1], BATCH, decoding)  # one request: no batching in the way
        check_timestamps(records)
        return [r.output_token_ids for r in records]

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert served._cb_engine.facts["logits_processors"] == [
        "SuppressTokensLogitsProcessor",
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
    ]


def test_a_prompt_longer_than_the_cache_holds_is_refused(served: PytorchBackend) -> None:
    long = [Request(0, tuple(range(5, 5 + MAX_MODEL_LEN)))]
    with pytest.raises(BackendError, match="exceeds max_model_len 64"):
        served.serve(long, DecodingSettings(max_output_tokens=N), Schedule((0.0,)))


def test_serve_needs_the_serving_setting(offline: PytorchBackend, requests) -> None:
    assert offline.engine_path == "eager"
    with pytest.raises(BackendError, match="settings\\['serving'\\]"):
        offline.serve(requests, DecodingSettings(max_output_tokens=N), Schedule((0.0,) * len(requests)))


def test_settings_it_cannot_honour_are_refused_at_load_too(tiny_llama: Path) -> None:
    # the campaign check refuses them before any job (test_config); load() guards other callers
    backend = PytorchBackend({"device": "cpu", "serving": True, "compile": "default"})
    with pytest.raises(BackendError, match="backend_settings.pytorch.compile is 'default'"):
        backend.load(weights_of(tiny_llama), "float32", max_model_len=MAX_MODEL_LEN, batch_size=BATCH)


def test_engine_sizes() -> None:
    sizes = continuous_batching.EngineSizes.of(batch_size=4, max_model_len=300, page_size=256)
    assert (sizes.max_requests_per_batch, sizes.num_blocks, sizes.max_batch_tokens) == (4, 8, 1200)
    assert continuous_batching.EngineSizes.of(64, 4096, 256).max_batch_tokens == 8192  # transformers' default cap


def test_a_generation_config_processor_it_would_drop_is_refused(tiny_llama: Path, requests) -> None:
    backend = load(tiny_llama)
    try:
        backend.model.generation_config.repetition_penalty = 1.2  # as a hub model's generation_config.json may set
        with pytest.raises(BackendError, match="drops RepetitionPenaltyLogitsProcessor"):
            backend.generate(requests, BATCH, DecodingSettings(max_output_tokens=N))
    finally:
        backend.close()


def test_a_request_the_engine_fails_is_a_backend_error_not_a_hang(tiny_llama: Path, requests) -> None:
    # A token id past the vocabulary makes the model's forward fail in the engine's thread: the engine
    # fails every request in flight, and serve() says so instead of waiting for tokens that never come.
    backend = load(tiny_llama)
    try:
        vocabulary = backend.model.config.vocab_size
        broken = [requests[0], Request(1, (vocabulary + 5,) * 4), requests[2]]
        with pytest.raises(BackendError, match="continuous batching"):
            backend.serve(broken, DecodingSettings(max_output_tokens=N), Schedule((0.0, 0.0, 0.0)))
    finally:
        backend.close()
