"""The pytorch backend's stop check (llm_energy.backends.stop_check): the choice, the checks made
before any job, and transformers' real DeferredStopCheck inside real `generate` calls on the built-in
tiny model.

DeferredStopCheck records CUDA events, which the CPU backend does not have. These tests widen the
devices it runs on to the CPU and stand in a no-op event: on CPU every copy has landed when it
returns, so the event has nothing to wait for, and what is tested is our logic around transformers'
own deferral (the extra step undone, no cache rollback, a token per step on the clock). Its speed on
CUDA is what workflow/benchmarks/harness_overhead.py measures.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from llm_energy.backends import require_installed, stop_check
from llm_energy.backends.base import DecodingSettings, RequestRecord
from llm_energy.backends.pytorch import PytorchBackend, resolve_engine_path
from llm_energy.config import load_campaign
from llm_energy.errors import BackendError, ConfigError

from tests.unit.test_backend_pytorch import eos_token, prompts, weights_of

MAX_INPUT_TOKENS = 16
N = 10
BATCH = 2
MAX_MODEL_LEN = 64


class NoOpEvent:
    """torch.Event on a device whose copies are synchronous."""

    def __init__(self, *args, **kwargs) -> None:
        self.recorded = 0

    def record(self, *args) -> None:
        self.recorded += 1

    def synchronize(self) -> None:
        pass


@pytest.fixture
def deferred_on_cpu(monkeypatch):
    monkeypatch.setattr(stop_check, "DEFERRED_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(torch, "Event", NoOpEvent)


def loaded(model_folder: Path, mode: str, batch_size: int = BATCH) -> PytorchBackend:
    backend = PytorchBackend({"device": "cpu", "cache_implementation": "static", "stop_check": mode})
    backend.load(weights_of(model_folder), "float32", max_model_len=MAX_MODEL_LEN, batch_size=batch_size)
    return backend


def run(
    model_folder: Path, mode: str, decoding: DecodingSettings, eos: int | None = None, batch_size: int = BATCH
) -> list[RequestRecord]:
    backend = loaded(model_folder, mode, batch_size)
    try:
        requests = backend.tokenize(prompts(), MAX_INPUT_TOKENS)
        if eos is None:
            return backend.generate(requests, batch_size, decoding)
        with eos_token(backend, eos):
            return backend.generate(requests, batch_size, decoding)
    finally:
        backend.close()


def test_auto_defers_on_cuda_over_a_static_cache_only() -> None:
    assert resolve_engine_path({}, "cuda").stop_check == "deferred"  # the fast path
    assert resolve_engine_path({"compile": False}, "cuda").stop_check == "deferred"  # static, not compiled
    assert resolve_engine_path({"cache_implementation": "dynamic", "compile": False}, "cuda").stop_check == "per_step"
    assert resolve_engine_path({}, "cpu").stop_check == "per_step"
    assert resolve_engine_path({"stop_check": "per_step"}, "cuda").stop_check == "per_step"


def test_settings_are_checked_before_any_job(tiny_llama: Path) -> None:
    campaign = {
        "models": {"m": {"source": "builtin"}},
        "datasets": {"d": {"source": "bundled"}},
        "backends": ["pytorch"],
    }
    settings = load_campaign(campaign).config["backend_settings"]["pytorch"]
    assert settings["stop_check"] == "auto"
    with pytest.raises(ConfigError, match=r"backend_settings\.pytorch\.stop_check"):
        load_campaign({**campaign, "backend_settings": {"pytorch": {"stop_check": "late"}}})
    with pytest.raises(ConfigError, match=r"backend_settings\.pytorch\.stop_check.*static"):
        require_installed(["pytorch"], {"pytorch": {"stop_check": "deferred", "cache_implementation": "dynamic"}})
    # The device is known at load: the CPU has no events to defer on.
    with pytest.raises(ConfigError, match=r"backend_settings\.pytorch\.stop_check.*CUDA events.*'cpu'"):
        loaded(tiny_llama, "deferred")


def test_the_load_report_names_the_stop_check(tiny_llama: Path, deferred_on_cpu) -> None:
    for mode in stop_check.STOP_CHECKS:
        backend = PytorchBackend({"device": "cpu", "cache_implementation": "static", "stop_check": mode})
        details = backend.load(weights_of(tiny_llama), "float32", max_model_len=MAX_MODEL_LEN, batch_size=1).details
        backend.close()
        assert details["stop_check"] == mode


def test_deferred_gives_the_per_step_tokens_and_a_time_per_token(tiny_llama: Path, deferred_on_cpu) -> None:
    decoding = DecodingSettings(max_output_tokens=N)
    per_step = run(tiny_llama, "per_step", decoding)
    deferred = run(tiny_llama, "deferred", decoding)
    assert [r.output_token_ids for r in deferred] == [r.output_token_ids for r in per_step]
    for record in deferred:
        assert record.output_tokens == N == len(record.token_times_s)
        assert record.token_times_s == sorted(record.token_times_s)
        assert record.submitted_s < record.first_token_s and record.finished_s == record.token_times_s[-1]


def test_deferred_undoes_the_extra_step_when_every_row_stops_at_eos(
    tiny_llama: Path, deferred_on_cpu, monkeypatch
) -> None:
    from transformers.generation import utils

    # Batches of one: when the row stops at EOS the whole batch has stopped, which the deferred check
    # learns a step late, after generate queued one more step (undone in what it returns).
    eos_mode = DecodingSettings(max_output_tokens=N, output_length="eos")
    free = run(tiny_llama, "per_step", eos_mode, batch_size=1)
    # A token that some request produces for the first time after its first token, declared EOS.
    row, stop_at, target = next(
        (r.index, pos, tok)
        for r in free
        for pos, tok in enumerate(r.output_token_ids[1:], 1)
        if tok not in r.output_token_ids[:pos]
    )
    per_step = run(tiny_llama, "per_step", eos_mode, eos=target, batch_size=1)
    undone = []
    real_undo = utils._undo_generation_steps
    monkeypatch.setattr(utils, "_undo_generation_steps", lambda n, *a: undone.append(n) or real_undo(n, *a))
    deferred = run(tiny_llama, "deferred", eos_mode, eos=target, batch_size=1)
    assert per_step[row].output_tokens == stop_at + 1 < N
    assert undone and set(undone) == {1}  # generate ran and undid the one extra step
    assert [r.output_token_ids for r in deferred] == [r.output_token_ids for r in per_step]
    assert [r.output_tokens for r in deferred] == [r.output_tokens for r in per_step]
    for record in deferred:
        assert len(record.token_times_s) == record.output_tokens


def test_a_stop_check_that_does_not_engage_is_an_error(tiny_llama: Path, deferred_on_cpu, monkeypatch) -> None:
    backend = loaded(tiny_llama, "deferred")
    try:
        requests = backend.tokenize(prompts(), MAX_INPUT_TOKENS)[:BATCH]
        # As if transformers ignored the swap (a later generate that no longer looks the class up).
        monkeypatch.setattr(stop_check, "DEFERRED_DEVICES", ("cuda",))
        with pytest.raises(BackendError, match="did not use its DeferredStopCheck"):
            backend.generate(requests, BATCH, DecodingSettings(max_output_tokens=N))
    finally:
        backend.close()


def test_the_swap_is_scoped_to_our_generate_calls(deferred_on_cpu) -> None:
    from transformers.generation import utils

    upstream = utils.DeferredStopCheck
    with stop_check.stop_check("deferred") as scope:
        assert utils.DeferredStopCheck is not upstream
        assert utils.DeferredStopCheck.is_supported(torch.device("cpu"), None, True, is_assistant=False)
        assert not utils.DeferredStopCheck.is_supported(torch.device("cpu"), None, True, is_assistant=True)
        assert scope.deferred_calls == 0
    assert utils.DeferredStopCheck is upstream
    with stop_check.stop_check("per_step"):
        assert utils.DeferredStopCheck is upstream


def test_auto_keeps_the_ids_of_existing_experiments_and_a_choice_changes_them() -> None:
    campaign = {
        "models": {"m": {"source": "builtin"}},
        "datasets": {"d": {"source": "bundled"}},
        "backends": ["pytorch"],
    }

    def ids(pytorch: dict) -> set[str]:
        return set(load_campaign({**campaign, "backend_settings": {"pytorch": pytorch}}).experiments)

    assert ids({}) == ids({"stop_check": "auto"})  # the committed trees keep their folders
    assert ids({"stop_check": "per_step"}).isdisjoint(ids({})) and ids({"stop_check": "per_step"}) != ids(
        {"stop_check": "deferred"}
    )
