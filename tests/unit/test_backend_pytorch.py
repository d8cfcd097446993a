"""The pytorch backend on the real built-in tiny models (CPU): token counts, padding, timestamps, errors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from llm_energy import models
from llm_energy.backends import BACKENDS, backend_class, create_backend
from llm_energy.backends.base import DecodingSettings, Request, RequestRecord
from llm_energy.backends.batching import make_batches
from llm_energy.backends.pytorch import PytorchBackend
from llm_energy.errors import BackendError

MAX_INPUT_TOKENS = 16
N = 8  # output tokens per request in fixed-length mode


@contextlib.contextmanager
def eos_token(backend: PytorchBackend, token_id: int) -> Iterator[None]:
    """Temporarily declare `token_id` the tokenizer's EOS (monkeypatch cannot undo this attribute:
    transformers' tokenizer serves eos_token_id through __getattr__, so undo would delattr it)."""
    old = backend.tokenizer.eos_token_id
    backend.tokenizer.eos_token_id = token_id
    try:
        assert backend.tokenizer.eos_token_id == token_id
        yield
    finally:
        backend.tokenizer.eos_token_id = old
        assert backend.tokenizer.eos_token_id == old


def weights_of(model_folder: Path) -> Path:
    return models.resolve_model_path(model_folder / "manifest.json")


def prompts() -> list[str]:
    # Five bundled prompts: the first is short (not truncated), the others are cut at MAX_INPUT_TOKENS,
    # so batches mix lengths and left padding matters.
    return models.read_prompt_corpus()[:5]


@pytest.fixture(scope="module")
def llama(tiny_llama: Path) -> Iterator[PytorchBackend]:
    backend = PytorchBackend({"device": "cpu"})
    backend.load(weights_of(tiny_llama), "float32", max_model_len=256, batch_size=3)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def llama_requests(llama: PytorchBackend) -> list[Request]:
    return llama.tokenize(prompts(), MAX_INPUT_TOKENS)


@pytest.fixture(scope="module")
def greedy_bs1(llama: PytorchBackend, llama_requests: list[Request]) -> list[RequestRecord]:
    return llama.generate(llama_requests, 1, DecodingSettings(max_output_tokens=N))


@pytest.fixture(scope="module")
def greedy_bs3(llama: PytorchBackend, llama_requests: list[Request]) -> list[RequestRecord]:
    return llama.generate(llama_requests, 3, DecodingSettings(max_output_tokens=N))


# ---------------------------------------------------------------------------------------------
# Registry


def test_registry_creates_pytorch_backend() -> None:
    assert "pytorch" in BACKENDS
    assert backend_class("pytorch") is PytorchBackend
    assert PytorchBackend.unavailable_reason() is None
    backend = create_backend("pytorch", {"device": "cpu"})
    assert isinstance(backend, PytorchBackend) and backend.settings == {"device": "cpu"}
    with pytest.raises(BackendError, match="unknown backend 'tensorrt'"):
        create_backend("tensorrt")


def test_load_report(llama: PytorchBackend) -> None:
    assert llama.device == "cpu"
    assert llama.tokenizer.padding_side == "left"
    assert llama.tokenizer.pad_token_id is not None
    assert next(llama.model.parameters()).dtype == torch.float32
    assert not llama.model.training


def test_load_report_values(tiny_llama: Path) -> None:
    backend = PytorchBackend({"device": "cpu", "attn_implementation": "eager"})
    report = backend.load(weights_of(tiny_llama), "bfloat16", max_model_len=256, batch_size=1)
    try:
        assert (report.device, report.dtype) == ("cpu", "bfloat16")
        assert next(backend.model.parameters()).dtype == torch.bfloat16
        assert report.details["attn_implementation"] == "eager"
        assert "parameters" not in report.details  # the model manifest's count is the one
        assert report.details["device_map"] == "cpu"
    finally:
        backend.close()
    assert backend.model is None


# ---------------------------------------------------------------------------------------------
# Tokenization


def test_tokenize_counts_match_tokenizer(llama: PytorchBackend, tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(weights_of(tiny_llama))  # independent of the backend
    requests = llama.tokenize(prompts(), MAX_INPUT_TOKENS)
    full = [len(tokenizer(p).input_ids) for p in prompts()]
    assert [r.index for r in requests] == list(range(5))
    assert [r.input_tokens for r in requests] == [min(n, MAX_INPUT_TOKENS) for n in full]
    assert [r.prompt_token_ids for r in requests] == [
        tuple(tokenizer(p).input_ids[:MAX_INPUT_TOKENS]) for p in prompts()
    ]
    # The sample covers both cases: truncated and not.
    assert any(n > MAX_INPUT_TOKENS for n in full) and any(n < MAX_INPUT_TOKENS for n in full)


# ---------------------------------------------------------------------------------------------
# Fixed-length greedy generation


@pytest.mark.parametrize("batch", ["greedy_bs1", "greedy_bs3"])
def test_fixed_length_exact_token_counts_and_times(batch: str, request, llama_requests: list[Request]) -> None:
    records: list[RequestRecord] = request.getfixturevalue(batch)
    assert [r.index for r in records] == [0, 1, 2, 3, 4]
    for record, req in zip(records, llama_requests):
        assert record.output_tokens == N
        assert len(record.output_token_ids) == N
        assert record.input_tokens == req.input_tokens
        times = record.token_times_s
        assert times is not None and len(times) == N
        assert all(a <= b for a, b in zip(times, times[1:]))
        assert record.first_token_s == times[0]
        assert record.first_token_s >= record.submitted_s
        assert record.finished_s >= times[-1]
        assert record.ttft_s is not None and 0 <= record.ttft_s <= record.e2e_s
        assert record.latency_source == "host_clock_per_step"


def test_batch_indices(greedy_bs1: list[RequestRecord], greedy_bs3: list[RequestRecord]) -> None:
    assert [r.batch_index for r in greedy_bs1] == [0, 1, 2, 3, 4]
    assert [r.batch_index for r in greedy_bs3] == [0, 0, 0, 1, 1]
    # Requests of one batch are submitted and finished together.
    assert greedy_bs3[0].submitted_s == greedy_bs3[2].submitted_s < greedy_bs3[3].submitted_s
    assert greedy_bs3[0].finished_s == greedy_bs3[1].finished_s


def test_greedy_tokens_same_at_batch_1_and_3(greedy_bs1, greedy_bs3, llama_requests) -> None:
    # Request 0 is shorter than the others and left-padded in its batch of 3: a wrong padding side or
    # mask would change its tokens.
    assert llama_requests[0].input_tokens < llama_requests[1].input_tokens
    assert [r.output_token_ids for r in greedy_bs1] == [r.output_token_ids for r in greedy_bs3]


def test_greedy_is_deterministic(llama: PytorchBackend, llama_requests, greedy_bs3) -> None:
    again = llama.generate(llama_requests, 3, DecodingSettings(max_output_tokens=N))
    assert [r.output_token_ids for r in again] == [r.output_token_ids for r in greedy_bs3]


def test_gpt2_greedy_same_at_batch_1_and_3(tiny_gpt2: Path) -> None:
    backend = PytorchBackend({"device": "cpu"})
    backend.load(weights_of(tiny_gpt2), "float32", max_model_len=256, batch_size=3)
    try:
        requests = backend.tokenize(prompts(), MAX_INPUT_TOKENS)
        one = backend.generate(requests, 1, DecodingSettings(max_output_tokens=6))
        three = backend.generate(requests, 3, DecodingSettings(max_output_tokens=6))
    finally:
        backend.close()
    assert [r.output_tokens for r in three] == [6] * 5
    assert [r.output_token_ids for r in one] == [r.output_token_ids for r in three]


# ---------------------------------------------------------------------------------------------
# EOS mode


def test_count_output_tokens_stops_at_first_eos_inclusive() -> None:
    backend = PytorchBackend()
    backend.tokenizer = SimpleNamespace(eos_token_id=2)
    assert backend.count_output_tokens([5, 6, 2, 7, 2], fixed_length=False) == 3
    assert backend.count_output_tokens([2, 5, 6], fixed_length=False) == 1
    assert backend.count_output_tokens([5, 6, 7], fixed_length=False) == 3
    assert backend.count_output_tokens([5, 2, 0, 0], fixed_length=False) == 2  # padding after EOS not counted
    assert backend.count_output_tokens([], fixed_length=False) == 0
    # Fixed length: EOS was masked by min_new_tokens, every generated token counts.
    assert backend.count_output_tokens([5, 6, 2, 7, 2], fixed_length=True) == 5
    # Several EOS ids (some generation configs list more than one).
    backend.tokenizer = SimpleNamespace(eos_token_id=[2, 9])
    assert backend.count_output_tokens([5, 9, 2, 7], fixed_length=False) == 2
    backend.tokenizer = SimpleNamespace(eos_token_id=(9,))
    assert backend.count_output_tokens([5, 6, 9], fixed_length=False) == 3
    # The generation config's EOS ids stop a sequence too (as they do in generate and in vLLM).
    backend.tokenizer = SimpleNamespace(eos_token_id=2)
    backend.model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[2, 7]))
    assert backend.count_output_tokens([5, 7, 2], fixed_length=False) == 2


def test_count_output_tokens_real_tokenizer(llama: PytorchBackend) -> None:
    eos = llama.tokenizer.eos_token_id
    assert llama.count_output_tokens([10, 11, eos, 12], fixed_length=False) == 3


def test_eos_mode_never_counts_tokens_after_eos(llama: PytorchBackend, llama_requests) -> None:
    """Make a token the model really generates the EOS: generation must stop there, EOS counted, nothing after."""
    max_tokens = 12
    eos_mode = DecodingSettings(max_output_tokens=max_tokens, output_length="eos")
    free = llama.generate(llama_requests, 3, eos_mode)  # no token masked: pure argmax sequences
    full = [r for r in free if r.output_tokens == max_tokens]  # those that did not stop at the real EOS
    special = {llama.tokenizer.eos_token_id, llama.tokenizer.pad_token_id}
    # A token that first appears after the start of some sequence, so that sequence stops early.
    target = next(
        (
            tok
            for r in full
            for pos, tok in enumerate(r.output_token_ids)
            if pos >= 1 and tok not in special and tok not in r.output_token_ids[:pos]
        ),
        None,
    )
    assert target is not None, "the tiny model generated no usable token; cannot build the EOS case"

    with eos_token(llama, target):
        stopped = llama.generate(llama_requests, 3, eos_mode)
    stopped_early = 0
    for before, after in zip(free, stopped):
        assert after.output_tokens == len(after.output_token_ids) == len(after.token_times_s)
        assert target not in after.output_token_ids[:-1]  # nothing counted after the first EOS
        if before.output_tokens == max_tokens:
            ids = before.output_token_ids
            expected = ids.index(target) + 1 if target in ids else max_tokens
            assert after.output_tokens == expected
            assert after.output_token_ids == ids[:expected]  # same greedy prefix, EOS included
            stopped_early += expected < max_tokens
            if expected < max_tokens:
                assert after.output_token_ids[-1] == target
    assert stopped_early >= 1


def test_fixed_mode_ignores_eos(llama: PytorchBackend, llama_requests, greedy_bs3) -> None:
    # Declaring a token the model generates as EOS: fixed mode still gives N tokens each.
    target = greedy_bs3[1].output_token_ids[0]
    with eos_token(llama, target):
        records = llama.generate(llama_requests, 3, DecodingSettings(max_output_tokens=N))
    assert [r.output_tokens for r in records] == [N] * 5
    assert all(target not in r.output_token_ids for r in records)  # min_new_tokens masks the EOS


# ---------------------------------------------------------------------------------------------
# Sampling


def test_sampling_reproducible_with_seed(llama: PytorchBackend, llama_requests) -> None:
    def run(seed: int) -> list[list[int]]:
        decoding = DecodingSettings(
            mode="sampling", temperature=1.0, top_p=0.95, top_k=50, max_output_tokens=N, seed=seed
        )
        records = llama.generate(llama_requests[:3], 3, decoding)
        assert [r.output_tokens for r in records] == [N] * 3
        return [r.output_token_ids for r in records]

    first = run(7)
    assert run(7) == first
    assert run(8) != first


# ---------------------------------------------------------------------------------------------
# Batching strategies through settings


def _batches_of(records: list[RequestRecord]) -> list[list[int]]:
    grouped: dict[int, list[int]] = {}
    for record in records:
        grouped.setdefault(record.batch_index, []).append(record.index)
    return [sorted(grouped[k]) for k in sorted(grouped)]


def test_sorted_batching_via_settings(llama: PytorchBackend, llama_requests, greedy_bs1, monkeypatch) -> None:
    monkeypatch.setitem(llama.settings, "batching", "sorted")
    records = llama.generate(llama_requests, 2, DecodingSettings(max_output_tokens=N))
    expected = [sorted(r.index for r in b) for b in make_batches(llama_requests, 2, "sorted")]
    assert _batches_of(records) == expected
    assert [r.index for r in records] == [0, 1, 2, 3, 4]  # returned in request order
    assert [r.output_token_ids for r in records] == [r.output_token_ids for r in greedy_bs1]


def test_token_budget_batching_via_settings(llama: PytorchBackend, llama_requests, greedy_bs1, monkeypatch) -> None:
    budget = 2 * (MAX_INPUT_TOKENS + N)  # two full-length requests per batch at most
    monkeypatch.setitem(llama.settings, "batching", "token_budget")
    monkeypatch.setitem(llama.settings, "token_budget", budget)
    records = llama.generate(llama_requests, 3, DecodingSettings(max_output_tokens=N))
    expected = make_batches(llama_requests, 3, "token_budget", budget, N)
    assert _batches_of(records) == [sorted(r.index for r in b) for b in expected]
    assert max(len(b) for b in expected) == 2  # the budget, not batch_size 3, limited the batches
    assert [r.output_tokens for r in records] == [N] * 5
    assert [r.output_token_ids for r in records] == [r.output_token_ids for r in greedy_bs1]


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(tiny_llama: Path) -> None:
    backend = PytorchBackend({"device": "cuda"})
    with pytest.raises(BackendError) as info:
        backend.load(weights_of(tiny_llama), "float32", max_model_len=256, batch_size=1)
    assert "backend_settings.pytorch.device" in str(info.value)
    assert backend.model is None


def test_auto_device_without_cuda_is_cpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert PytorchBackend({"device": "auto"})._resolve_device() == expected
    assert PytorchBackend()._resolve_device() == expected


@pytest.mark.parametrize("broken", ["empty", "bad_config", "no_weights"])
def test_broken_model_folder(tmp_path: Path, tiny_llama: Path, broken: str) -> None:
    import shutil

    folder = tmp_path / broken
    folder.mkdir()
    if broken == "bad_config":
        shutil.copytree(weights_of(tiny_llama), folder, dirs_exist_ok=True)
        (folder / "config.json").write_text("{not json")
    elif broken == "no_weights":
        shutil.copytree(weights_of(tiny_llama), folder, dirs_exist_ok=True)
        for weights in folder.glob("*.safetensors"):
            weights.unlink()
    with pytest.raises(BackendError) as info:
        PytorchBackend({"device": "cpu"}).load(folder, "float32", max_model_len=256, batch_size=1)
    assert str(folder) in str(info.value)
