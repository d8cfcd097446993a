"""Weight quantization on the real built-in tiny Llama (CPU): the weights are really quantized, their
stored bytes drop, generate still produces every token; unsupported methods are refused before any job."""

from __future__ import annotations

import importlib.util

import pytest

from llm_energy import models
from llm_energy.backends import quantization, require_installed
from llm_energy.backends.base import DecodingSettings
from llm_energy.backends.pytorch import PytorchBackend
from llm_energy.errors import ConfigError

N = 6  # output tokens per request


def _load(tiny_llama, method: str) -> tuple[PytorchBackend, dict]:
    backend = PytorchBackend({"device": "cpu", "quantization": method, "num_threads": 1})
    report = backend.load(models.resolve_model_path(tiny_llama / "manifest.json"), "float32", 64, 2)
    return backend, report.details


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")
@pytest.mark.parametrize("method, weight_type", [("torchao_int8_weight_only", "Int8Tensor"),
                                                  ("bnb_8bit", "Int8Params")])
def test_quantized_generate_on_cpu_stores_int8_weights(tiny_llama, method, weight_type):
    if importlib.util.find_spec(quantization.METHODS[method].package) is None:
        pytest.skip(f"{quantization.METHODS[method].package} not installed")
    plain, plain_details = _load(tiny_llama, "none")
    plain.close()
    backend, details = _load(tiny_llama, method)
    try:
        assert details["quantization"] == method
        assert details["quantized_weight_type"].startswith(weight_type)
        # float32 matmul weights are 4 bytes each; int8 ones 1 byte plus per-row scales. transformers
        # keeps lm_head unquantized (2048 x 256 here): 2.9 M int8 + 0.5 M float32 weights.
        assert details["matmul_weight_bytes"] < 0.4 * plain_details["matmul_weight_bytes"]
        assert details["weight_bytes"] < plain_details["weight_bytes"]
        # unquantized: 4 bytes per parameter plus the small buffers (rotary frequencies)
        assert 0 <= plain_details["weight_bytes"] - 4 * plain_details["parameters"] < 4096
        requests = backend.tokenize(["energy of a token", "a longer prompt than the first one"], 16)
        records = backend.generate(requests, 2, DecodingSettings(max_output_tokens=N))
        assert [r.output_tokens for r in records] == [N, N]
    finally:
        backend.close()


def test_prejob_check_names_the_key_and_what_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchao" else real_find_spec(name, *a))
    with pytest.raises(ConfigError) as error:
        require_installed(["pytorch"], {"pytorch": {"quantization": "torchao_int8_weight_only", "device": "cpu"}})
    assert error.value.key == "backend_settings.pytorch.quantization"
    assert f"pip install {quantization.TORCHAO_PIN}" in str(error.value)
    require_installed(["pytorch"], {"pytorch": {"quantization": "none"}})  # none needs nothing


def test_cuda_only_methods_are_refused_on_cpu_before_load(tiny_llama):
    reason = quantization.unsupported_reason("torchao_int4_weight_only", "cpu")
    assert reason and "CUDA" in reason
    with pytest.raises(ConfigError, match="backend_settings.pytorch.quantization"):
        _load(tiny_llama, "bnb_4bit")
