"""The pytorch backend's engine paths (static cache, compiled decoding step), its compilation counter,
padding of partial batches, per-request finish times and memory figures, on the built-in tiny models (CPU).

The compiled tests use torch.compile for real: one with inductor (it generates and builds C++ kernels
with gcc; about 30 s cold on a 2-core machine), the counter tests with the "eager" compile backend
(dynamo traces and guards exactly as with inductor, and the counter is dynamo's, but no kernels are
generated, so each compilation takes seconds).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch
from llm_energy.backends import require_installed
from llm_energy.backends.base import DecodingSettings, Request, RequestRecord
from llm_energy.backends.pytorch import (
    EnginePath,
    PytorchBackend,
    compilation_counter,
    resolve_engine_path,
)
from llm_energy.backends.quantization import stored_bytes, weight_bytes
from llm_energy.config import load_campaign
from llm_energy.errors import BackendError, ConfigError

from tests.unit.test_backend_pytorch import eos_token, prompts, weights_of

MAX_INPUT_TOKENS = 16
N = 8
BATCH = 3  # five requests: batches of 3 and 2, so the last batch gets one dummy row on the static path
MAX_MODEL_LEN = 64


def loaded(model_folder: Path, settings: dict) -> PytorchBackend:
    backend = PytorchBackend({"device": "cpu", **settings})
    backend.load(weights_of(model_folder), "float32", max_model_len=MAX_MODEL_LEN, batch_size=BATCH)
    return backend


def tokens(records: list[RequestRecord]) -> list[list[int]]:
    return [r.output_token_ids for r in records]


@pytest.fixture(scope="module")
def dynamic(tiny_llama: Path):
    backend = loaded(tiny_llama, {})
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def static(tiny_llama: Path):
    backend = loaded(tiny_llama, {"cache_implementation": "static"})
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def requests_(dynamic: PytorchBackend) -> list[Request]:
    return dynamic.tokenize(prompts(), MAX_INPUT_TOKENS)


@pytest.fixture(scope="module")
def dynamic_records(dynamic: PytorchBackend, requests_) -> list[RequestRecord]:
    return dynamic.generate(requests_, BATCH, DecodingSettings(max_output_tokens=N))


# ---------------------------------------------------------------------------------------------
# Settings: engine paths and the checks made before any job


def test_auto_is_fast_on_cuda_and_eager_on_cpu() -> None:
    assert resolve_engine_path({}, "cuda") == EnginePath("static", "reduce-overhead", "inductor", "deferred")
    assert resolve_engine_path({}, "cuda").label == "fast"
    assert resolve_engine_path({"compile": "auto", "cache_implementation": "auto"}, "cpu") == EnginePath(
        "dynamic", None, "inductor"
    )
    assert resolve_engine_path({}, "cpu").label == "eager"
    # Eager dynamic is one setting away on CUDA; a static cache without compiling is its own label.
    assert resolve_engine_path({"cache_implementation": "dynamic", "compile": False}, "cuda").label == "eager"
    assert resolve_engine_path({"compile": False}, "cuda").label == "static"
    # An explicit compile mode implies the static cache on CPU too.
    assert resolve_engine_path(
        {"compile": "max-autotune-no-cudagraphs", "compile_backend": "eager"}, "cpu"
    ) == EnginePath("static", "max-autotune-no-cudagraphs", "eager")


def test_load_report_records_the_engine(dynamic: PytorchBackend, tiny_llama: Path) -> None:
    assert dynamic.engine_path == "eager"
    backend = PytorchBackend(
        {"device": "cpu", "compile": "default", "compile_backend": "eager", "attn_implementation": "eager"}
    )
    details = backend.load(weights_of(tiny_llama), "float32", max_model_len=48, batch_size=2).details
    backend.close()
    assert backend.engine_path == "fast"
    assert {
        k: details[k]
        for k in (
            "engine_path",
            "cache_implementation",
            "compile_mode",
            "compile_backend",
            "static_cache_len",
            "attn_implementation",
        )
    } == {
        "engine_path": "fast",
        "cache_implementation": "static",
        "compile_mode": "default",
        "compile_backend": "eager",
        "static_cache_len": 48,
        "attn_implementation": "eager",
    }


def _campaign(pytorch_settings: dict) -> dict:
    return {
        "models": {"m": {"source": "builtin"}},
        "datasets": {"d": {"source": "bundled"}},
        "backends": ["pytorch"],
        "backend_settings": {"pytorch": pytorch_settings},
    }


def test_schema_defaults_and_enums() -> None:
    settings = load_campaign(_campaign({})).config["backend_settings"]["pytorch"]
    assert (settings["cache_implementation"], settings["compile"], settings["attn_implementation"]) == (
        "auto",
        "auto",
        "sdpa",
    )
    for good in (
        {"compile": False},
        {"compile": "reduce-overhead"},
        {"cache_implementation": "static"},
        {"compile": "max-autotune-no-cudagraphs", "compile_backend": "aot_eager"},
    ):
        load_campaign(_campaign(good))
    for bad in (
        {"compile": "fast"},
        {"compile": True},
        {"cache_implementation": "paged"},
        {"attn_implementation": "flash_attention_3"},
    ):
        with pytest.raises(ConfigError) as info:
            load_campaign(_campaign(bad))
        assert f"backend_settings.pytorch.{next(iter(bad))}" in str(info.value)


def test_flash_attention_2_needs_flash_attn_before_any_job(monkeypatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "flash_attn" else real_find_spec(name, *a, **k),
    )
    with pytest.raises(ConfigError) as info:
        require_installed(["pytorch"], {"pytorch": {"attn_implementation": "flash_attention_2"}})
    message = str(info.value)
    assert "backend_settings.pytorch.attn_implementation" in message and "pip install flash-attn" in message
    require_installed(["pytorch"], {"pytorch": {"attn_implementation": "sdpa"}})


def test_compiling_needs_a_static_cache(tiny_llama: Path) -> None:
    settings = {"cache_implementation": "dynamic", "compile": "reduce-overhead"}
    with pytest.raises(ConfigError, match=r"backend_settings\.pytorch\.compile.*static"):
        require_installed(["pytorch"], {"pytorch": settings})
    with pytest.raises(ConfigError):  # the job re-checks, for runs whose environment is built per job
        PytorchBackend({"device": "cpu", **settings}).load(weights_of(tiny_llama), "float32", 64, 1)


def test_compile_cache_dirs_follow_the_setting_unless_exported(tiny_llama: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))  # the user's own: kept
    backend = PytorchBackend(
        {
            "device": "cpu",
            "compile": "default",
            "compile_backend": "eager",
            "compile_cache_dir": str(tmp_path / "resources"),
        }
    )
    details = backend.load(weights_of(tiny_llama), "float32", max_model_len=MAX_MODEL_LEN, batch_size=1).details
    backend.close()
    assert details["compile_cache_dirs"] == {
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "resources" / "inductor"),
        "TRITON_CACHE_DIR": str(tmp_path / "mine"),
    }


# ---------------------------------------------------------------------------------------------
# The static cache path (not compiled): same tokens, padding, finish times


def test_static_cache_gives_the_dynamic_greedy_tokens(static: PytorchBackend, requests_, dynamic_records) -> None:
    assert static.engine_path == "static"
    records = static.generate(requests_, BATCH, DecodingSettings(max_output_tokens=N))
    assert tokens(records) == tokens(dynamic_records)
    assert all(len(t) == N for t in tokens(records))


def test_partial_batch_is_padded_with_dummy_rows_that_are_dropped(static: PytorchBackend, requests_) -> None:
    last = requests_[3:]  # the partial last batch of 2
    rows = static._rows(last, BATCH)
    assert len(rows) == BATCH and rows[:2] == last and rows[2] == last[0]
    shapes = []
    real_generate = static.model.generate

    def spy(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return real_generate(*args, **kwargs)

    static.model.generate = spy
    try:
        records = static.generate(requests_, BATCH, DecodingSettings(max_output_tokens=N))
    finally:
        del static.model.generate
    assert [s[0] for s in shapes] == [BATCH, BATCH]  # the partial batch ran at the full batch size
    assert [r.index for r in records] == [0, 1, 2, 3, 4]  # no record of a dummy row
    assert [r.batch_index for r in records] == [0, 0, 0, 1, 1]
    assert sum(r.output_tokens for r in records) == 5 * N
    assert sum(r.input_tokens for r in records) == sum(r.input_tokens for r in requests_)
    # The eager path does not pad: its batch shapes are free.
    assert PytorchBackend()._rows(last, BATCH) == last


def test_static_cache_too_short_is_a_clear_error(tiny_llama: Path, requests_) -> None:
    backend = PytorchBackend({"device": "cpu", "cache_implementation": "static"})
    backend.load(weights_of(tiny_llama), "float32", max_model_len=MAX_INPUT_TOKENS + 2, batch_size=1)
    try:
        with pytest.raises(BackendError, match="static cache of 18 tokens"):
            backend.generate(requests_[1:2], 1, DecodingSettings(max_output_tokens=N))
    finally:
        backend.close()


def test_fixed_length_finish_is_the_last_token(dynamic_records) -> None:
    for record in dynamic_records:
        assert record.finished_s == record.token_times_s[-1]
        assert record.first_token_s == record.token_times_s[0]


@pytest.mark.parametrize("path", ["dynamic", "static"])
def test_eos_rows_finish_at_their_own_last_token(path: str, request, requests_) -> None:
    backend: PytorchBackend = request.getfixturevalue(path)
    eos_mode = DecodingSettings(max_output_tokens=12, output_length="eos")
    free = backend.generate(requests_, BATCH, eos_mode)
    # A token that appears late in one sequence of batch 0 but not in the others: declared EOS, that
    # row stops early while the others run on.
    batch0 = [r for r in free if r.batch_index == 0]
    target = next(
        tok
        for r in batch0
        for pos, tok in enumerate(r.output_token_ids[1:8], start=1)
        if all(tok not in other.output_token_ids for other in batch0 if other is not r)
        and tok not in r.output_token_ids[:pos]
    )
    with eos_token(backend, target):
        records = backend.generate(requests_, BATCH, eos_mode)
    for record in records:
        assert len(record.token_times_s) == record.output_tokens
        assert record.finished_s == record.token_times_s[-1]
    stopped = [r for r in records if r.batch_index == 0 and r.output_token_ids[-1] == target]
    ran_on = [r for r in records if r.batch_index == 0 and r.output_tokens == 12]
    assert stopped and ran_on
    assert max(r.finished_s for r in stopped) < min(r.finished_s for r in ran_on)
    assert stopped[0].submitted_s == ran_on[0].submitted_s


# ---------------------------------------------------------------------------------------------
# Compiled: inductor for real, and the compilation counter


def test_inductor_compiled_static_path(
    tiny_llama: Path, requests_, dynamic_records, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    backend = loaded(tiny_llama, {"compile": "default", "compile_cache_dir": str(tmp_path)})
    try:
        decoding = DecodingSettings(max_output_tokens=N)
        started = time.perf_counter()
        facts = backend.compile(backend.plan_batches(requests_, BATCH, decoding), decoding)
        print(f"inductor compile() on CPU: {time.perf_counter() - started:.1f} s, facts {facts}")
        assert backend.engine_path == "fast" and facts["compiled"]
        assert facts["compilations"] >= 1 and facts["recompilations"] == 0
        [shape] = facts["shapes_compiled"]
        assert (shape["batch_size"], shape["static_cache_len"]) == (BATCH, MAX_MODEL_LEN)
        assert max(shape["prompt_widths_run"]) == MAX_INPUT_TOKENS  # the widest batch was among them
        assert any((tmp_path / "inductor").iterdir())  # compiled code went where the harness said
        before = backend.compilation_count()
        records = backend.generate(requests_, BATCH, decoding)
        assert backend.compilation_count() == before  # the window sees only compiled shapes
        assert tokens(records) == tokens(dynamic_records)
    finally:
        backend.close()


@pytest.fixture(scope="module")
def traced(tiny_llama: Path):
    backend = loaded(tiny_llama, {"compile": "default", "compile_backend": "eager"})
    yield backend
    backend.close()


def test_counter_is_stable_without_new_shapes_and_grows_with_a_recompile(
    traced: PytorchBackend, requests_, dynamic_records
) -> None:
    from torch._dynamo.utils import counters

    decoding = DecodingSettings(max_output_tokens=N)
    facts = traced.compile(traced.plan_batches(requests_, BATCH, decoding), decoding)
    assert facts["compilations"] >= 1 and facts["recompilations"] == 0
    compiled = traced.compilation_count()
    assert compiled == compilation_counter() and compiled >= facts["compilations"]

    first = traced.generate(requests_, BATCH, decoding)
    second = traced.generate(requests_, BATCH, decoding)
    # Other prompt widths: the decoding step's shapes do not depend on them (the prefill is eager).
    shorter = traced.generate(traced.tokenize(prompts(), 6), BATCH, decoding)
    assert traced.compilation_count() == compiled
    assert tokens(first) == tokens(second) == tokens(dynamic_records)
    assert all(r.output_tokens == N for r in shorter)

    # Forced: another batch size is another cache shape, so dynamo recompiles and the counter moves
    # (with unique_graphs, which counts the graphs that come out of it).
    graphs = counters["stats"]["unique_graphs"]
    traced.generate(requests_, 2, decoding)
    assert traced.compilation_count() > compiled
    assert counters["stats"]["unique_graphs"] > graphs


def test_compile_on_the_eager_path_does_nothing(dynamic: PytorchBackend, requests_) -> None:
    before = compilation_counter()
    assert dynamic.compile([requests_], DecodingSettings(max_output_tokens=N)) == {
        "engine_path": "eager",
        "compiled": False,
    }
    assert compilation_counter() == before


# ---------------------------------------------------------------------------------------------
# Memory


MEMORY_KEYS = {"peak_allocated_bytes", "peak_reserved_bytes", "weight_bytes", "kv_cache_bytes", "peak_rss_bytes"}


@pytest.mark.parametrize("path", ["dynamic", "static"])
def test_memory_report_on_cpu(path: str, request, requests_) -> None:
    backend: PytorchBackend = request.getfixturevalue(path)
    backend.reset_peak_memory()
    backend.generate(requests_, BATCH, DecodingSettings(max_output_tokens=N))
    report = backend.memory_report()
    assert MEMORY_KEYS <= set(report)
    assert report["peak_allocated_bytes"] is None and report["peak_reserved_bytes"] is None
    assert "peak_allocated_bytes" in report["unavailable"]
    config = backend.model.config
    parameters = sum(p.numel() for p in backend.model.parameters())
    assert report["weight_bytes"] >= parameters * 4  # float32, plus the rotary buffers
    # K and V per layer: rows x kv heads x positions x head_dim x 4 bytes.
    per_position = config.num_hidden_layers * 2 * BATCH * config.num_key_value_heads * config.head_dim * 4
    if path == "static":
        assert report["kv_cache_bytes"] == per_position * MAX_MODEL_LEN  # the whole allocation
    else:
        # The largest batch's cache at its end: the prompt and every generated token but the last.
        assert report["kv_cache_bytes"] == per_position * (MAX_INPUT_TOKENS + N - 1)
    assert report["peak_rss_bytes"] > report["weight_bytes"]


def test_peak_rss_restarts_at_the_reset(dynamic: PytorchBackend) -> None:
    big = bytearray(300 * 2**20)
    big[::4096] = b"x" * len(big[::4096])  # touch every page
    held = dynamic.memory_report()["peak_rss_bytes"]
    del big
    dynamic.reset_peak_memory()
    report = dynamic.memory_report()
    assert report["peak_rss_scope"] == "since_reset"
    assert report["peak_rss_bytes"] < held - 200 * 2**20


def test_weight_bytes_count_what_is_stored() -> None:
    from torch.testing._internal.two_tensor import TwoTensor

    a, b = torch.ones(10, dtype=torch.float32), torch.ones(10, dtype=torch.float32)
    wrapped = TwoTensor(a, b)  # a tensor subclass with two inner tensors, like a quantized weight
    assert stored_bytes(wrapped) == 80 and wrapped.numel() * wrapped.element_size() == 40
    assert stored_bytes(torch.zeros(3, dtype=torch.uint8)) == 3
    model = torch.nn.Linear(4, 2)
    model.register_buffer("scale", torch.zeros(5, dtype=torch.float16))
    assert weight_bytes(model)["weight_bytes"] == (8 + 2) * 4 + 5 * 2
