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
@pytest.mark.parametrize(
    "method, weight_type", [("torchao_int8_weight_only", "Int8Tensor"), ("bnb_8bit", "Int8Params")]
)
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
        parameters = models.read_model_manifest(tiny_llama)["parameter_count"]
        assert 0 <= plain_details["weight_bytes"] - 4 * parameters < 4096
        requests = backend.tokenize(["energy of a token", "a longer prompt than the first one"], 16)
        records = backend.generate(requests, 2, DecodingSettings(max_output_tokens=N))
        assert [r.output_tokens for r in records] == [N, N]
    finally:
        backend.close()


def test_prejob_check_names_the_key_and_what_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real_find_spec(name, *a)
    )
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


def _campaign_settings(pytorch_settings: dict) -> dict:
    """backend_settings as common.smk passes them: validated, variants as written."""
    from llm_energy.config import load_campaign

    raw = {
        "models": {"m": {"source": "builtin"}},
        "datasets": {"d": {"source": "bundled"}},
        "backends": ["pytorch"],
        "backend_settings": {"pytorch": pytorch_settings},
    }
    return load_campaign(raw).config["backend_settings"]


def test_prejob_check_refuses_a_variant_that_cannot_run_here_naming_its_key():
    settings = _campaign_settings({"device": "cpu", "variants": {"none": {}, "nf4": {"quantization": "bnb_4bit"}}})
    with pytest.raises(ConfigError) as error:
        require_installed(["pytorch"], settings)
    assert error.value.key == "backend_settings.pytorch.variants.nf4.quantization"
    assert "variant 'nf4'" in str(error.value)


def test_prejob_check_names_the_shared_key_when_a_variant_inherits_the_method():
    # The variant changes only the device; the method that cannot run on CPU is the shared one.
    settings = _campaign_settings(
        {"quantization": "torchao_int4_weight_only", "variants": {"on_cpu": {"device": "cpu"}}}
    )
    with pytest.raises(ConfigError) as error:
        require_installed(["pytorch"], settings)
    assert error.value.key == quantization.SETTING_KEY and "variant 'on_cpu'" in str(error.value)


def test_prejob_check_passes_variants_that_run_here(monkeypatch):
    checked = []
    real = quantization.unsupported_reason
    monkeypatch.setattr(
        quantization,
        "unsupported_reason",
        lambda method, device=None: checked.append((method, device)) or real(method, device),
    )
    runnable = [
        m
        for m, spec in quantization.METHODS.items()
        if spec.runs_on_cpu and importlib.util.find_spec(spec.package) is not None
    ]
    settings = _campaign_settings(
        {"device": "cpu", "variants": {"none": {}, **{m: {"quantization": m} for m in runnable}}}
    )
    require_installed(["pytorch"], settings)
    assert checked == [("none", "cpu"), *((m, "cpu") for m in runnable)]  # every variant was checked
