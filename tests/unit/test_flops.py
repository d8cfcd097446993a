"""FLOPs estimation: analytic counts against FlopCounterMode and calflops on tiny real models.

The analytic counts are compared with FlopCounterMode EXACTLY (integer equality): both count matmul
FLOPs only (2 per multiply-add, bias adds excluded: FlopCounterMode counts addmm as its mm part),
the models run with eager attention so Q K^T and A V are visible as bmm/matmul, and the one matmul
the formula leaves out - the rotary frequency outer product - has an inner dimension of 1 and is
dispatched by torch as a broadcast multiply, which FlopCounterMode does not count.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from llm_energy import artifacts, flops
from llm_energy.errors import ArtifactError, ConfigError
from llm_energy.flops import ArchitectureSpec, counted
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        for key, value in OFFLINE_ENV.items():
            patch.setenv(key, value)
        patch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        yield


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=3,
        intermediate_size=688,
        vocab_size=512,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def gpt2_config() -> GPT2Config:
    return GPT2Config(
        n_embd=256,
        n_head=4,
        n_layer=3,
        vocab_size=512,
        n_positions=512,
        n_inner=None,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def _save(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, offline_env) -> Path:
    torch.manual_seed(0)
    return _save(LlamaForCausalLM(llama_config()), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, offline_env) -> Path:
    torch.manual_seed(0)
    return _save(GPT2LMHeadModel(gpt2_config()), tmp_path_factory.mktemp("tiny-gpt2"))


MODEL_DIRS = {"llama": "llama_dir", "gpt2": "gpt2_dir"}


def _count(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------
# ArchitectureSpec


def test_spec_from_llama_config_has_gqa_and_gated_mlp():
    spec = ArchitectureSpec.from_hf_config(llama_config())
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (256, 3, 4, 2, 64)
    assert spec.gated_mlp and not spec.tied_embeddings
    assert spec.kv_dim == 128  # K and V projections are half the size of Q


def test_spec_from_gpt2_config_defaults_inner_to_four_times_hidden():
    spec = ArchitectureSpec.from_hf_config(gpt2_config())
    assert spec.intermediate_size == 4 * 256
    assert not spec.gated_mlp and spec.tied_embeddings
    assert spec.position_embeddings == 512


def test_spec_is_none_for_unsupported_model_type():
    config = OPTConfig(
        hidden_size=64, num_attention_heads=2, num_hidden_layers=1, ffn_dim=128, vocab_size=128, word_embed_proj_dim=64
    )
    assert ArchitectureSpec.from_hf_config(config) is None


ALL_FAMILIES = {
    "llama": (llama_config, LlamaForCausalLM),
    "gpt2": (gpt2_config, GPT2LMHeadModel),
    "llama_biases": (
        lambda: LlamaConfig(
            hidden_size=128,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_hidden_layers=2,
            intermediate_size=200,
            vocab_size=300,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
        ),
        LlamaForCausalLM,
    ),
    "mistral": (
        lambda: MistralConfig(
            hidden_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            intermediate_size=256,
            vocab_size=300,
            head_dim=48,
        ),
        MistralForCausalLM,
    ),
    "qwen2": (
        lambda: Qwen2Config(
            hidden_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            intermediate_size=256,
            vocab_size=300,
        ),
        Qwen2ForCausalLM,
    ),
    "qwen3": (
        lambda: Qwen3Config(
            hidden_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            intermediate_size=256,
            vocab_size=300,
            head_dim=64,
        ),
        Qwen3ForCausalLM,
    ),
}


@pytest.mark.parametrize("family", sorted(ALL_FAMILIES))
def test_parameter_count_and_forward_flops_match_transformers(family, offline_env):
    make_config, model_class = ALL_FAMILIES[family]
    torch.manual_seed(0)
    config = make_config()
    config._attn_implementation = "eager"
    model = model_class(config).eval()
    spec = ArchitectureSpec.from_hf_config(model.config)
    assert spec.parameter_count() == sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (2, 9))
    measured = _count(lambda: model(input_ids=ids, use_cache=False))
    assert flops.analytic_forward_flops(spec, 2, 9) == measured


# ---------------------------------------------------------------------------------------------
# Analytic vs FlopCounterMode on saved models (the real cross-check path)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("batch,seq_len", [(1, 7), (3, 40)])
def test_analytic_prefill_equals_flop_counter_exactly(family, batch, seq_len, request):
    model_dir = request.getfixturevalue(MODEL_DIRS[family])
    spec = ArchitectureSpec.from_hf_config(flops.load_model_config(model_dir))
    measured = flops.measured_forward_flops(model_dir, batch, seq_len, "eager")
    assert flops.analytic_forward_flops(spec, batch, seq_len, logits="all") == measured


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fake_mode_counts_like_real_weights(family, request):
    model_dir = request.getfixturevalue(MODEL_DIRS[family])
    real = flops.measured_forward_flops(model_dir, 2, 11, mode="weights")
    fake = flops.measured_forward_flops(model_dir, 2, 11, mode="fake")
    assert real == fake


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decode_step_formula_against_real_kv_cache(family, request):
    model_dir = request.getfixturevalue(MODEL_DIRS[family])
    spec = ArchitectureSpec.from_hf_config(flops.load_model_config(model_dir))
    model = counted.build_model(model_dir, "weights", "eager")[0]
    past_len, batch = 13, 2
    ids = torch.randint(0, spec.vocab_size, (batch, past_len))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    assert cache.get_seq_length() == past_len
    step_ids = torch.randint(0, spec.vocab_size, (batch, 1))
    measured = _count(lambda: model(input_ids=step_ids, past_key_values=cache, use_cache=True))
    # The new token attends over the cached positions and itself.
    assert flops.analytic_decode_step_flops(spec, batch, past_len + 1) == measured
    assert flops.measured_decode_step_flops(model_dir, batch, past_len + 1) == measured


def test_analytic_request_equals_flop_counter_over_hf_generate(llama_dir):
    """The whole per-request model (prefill with last-position logits + decode steps) against
    what transformers' generate really executes, counted end to end."""
    model = counted.build_model(llama_dir, "weights", "eager")[0]
    input_tokens, output_tokens = 12, 6
    ids = torch.randint(3, 512, (1, input_tokens))
    measured = _count(
        lambda: model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=output_tokens,
            min_new_tokens=output_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    )
    spec = ArchitectureSpec.from_hf_config(model.config)
    result = flops.analytic_flops(spec, input_tokens, output_tokens, bytes_per_param=4)
    assert result["total_flops"] == measured
    assert result["prefill_tokens"] == input_tokens and result["decode_tokens"] == output_tokens - 1
    # Counting logits for every prompt position instead would overshoot by 11 lm_head rows.
    all_logits = flops.analytic_flops(spec, input_tokens, output_tokens, prefill_logits="all")
    assert all_logits["total_flops"] - measured == 11 * 2 * 256 * 512


def test_decode_bytes_min_by_hand():
    spec = ArchitectureSpec.from_hf_config(llama_config())
    result = flops.analytic_flops(spec, 10, 4, bytes_per_param=2)
    # 3 decode steps with KV lengths 11, 12, 13; untied: the input embedding table is only gathered.
    weights = spec.parameter_count() - 512 * 256
    kv_per_token = 2 * 3 * 2 * 64  # K and V, 3 layers, 2 kv heads of 64
    assert result["decode_weight_bytes_min"] == 3 * weights * 2
    assert result["decode_kv_bytes_min"] == kv_per_token * (11 + 12 + 13) * 2
    assert result["decode_bytes_min"] == (result["decode_weight_bytes_min"] + result["decode_kv_bytes_min"])


def test_single_output_token_has_no_decode_step():
    spec = ArchitectureSpec.from_hf_config(gpt2_config())
    result = flops.analytic_flops(spec, 5, 1)
    assert result["decode_flops"] == 0 and result["decode_bytes_min"] == 0
    assert result["total_flops"] == flops.analytic_forward_flops(spec, 1, 5, logits="last")


def test_parameter_estimate_is_two_n_t():
    assert flops.parameter_estimate_flops(1_000_000, 30) == 60_000_000


# ---------------------------------------------------------------------------------------------
# calflops (slow to import: one test, run in its own subprocess by design)


def test_calflops_agrees_within_one_percent(llama_dir):
    """Through the model estimate, as the pipeline runs it (calflops in its own subprocess)."""
    data = flops.estimate_model_flops(llama_dir, model="llama", dtype="bf16", parameter_count=_n_params(llama_dir))
    (check,) = [c for c in data["cross_checks"] if c["tool"] == "calflops"]
    assert check["measured_flops"] is not None, data["notes"]
    # calflops also counts element-wise ops (norms, activations), so it reads slightly higher.
    assert 0 < -check["relative_error"] < 0.01
    assert (check["batch"], check["seq_len"]) == counted.CROSS_CHECK_SHAPE
    assert data["confidence"] == "high"


def test_calflops_failure_returns_reason(tmp_path):
    result = flops.calflops_forward_flops(tmp_path / "missing-model", 1, 4)
    assert result.flops is None and "calflops failed" in result.reason


# ---------------------------------------------------------------------------------------------
# The cost model per model and dtype, applied per cycle


REQUESTS = pd.DataFrame({"input_tokens": [12, 30, 7, 21], "output_tokens": [8, 1, 16, 5]})


def _n_params(model_dir: Path) -> int:
    """The parameter count a model manifest records for the folder (models.count_parameters)."""
    from llm_energy import models

    return models.count_parameters(flops.load_model_config(model_dir), model_dir).total


def _model_flops(model_dir: Path, dtype: str, **options) -> dict:
    return flops.estimate_model_flops(
        model_dir, model=model_dir.name, dtype=dtype, parameter_count=_n_params(model_dir), **options
    )


def _provenance() -> dict:
    return {"experiment": None, "config_sha256": None, "inputs": {}}


def test_model_estimate_with_cross_checks_applied_to_a_cycle(llama_dir, tmp_path):
    model = _model_flops(llama_dir, "float32", use_calflops=False)
    spec = ArchitectureSpec.from_hf_config(flops.load_model_config(llama_dir))
    assert model["method"] == "analytic" and model["confidence"] == "high"
    assert model["cost_model"] == dataclasses.asdict(spec.cost_model())
    assert model["parameter_count"] == spec.parameter_count()  # the manifest's count, here equal
    checks = {(c["tool"], c["phase"]): c for c in model["cross_checks"]}
    assert checks["flop_counter", "prefill"]["relative_error"] == 0.0
    assert checks["flop_counter", "decode"]["relative_error"] == 0.0
    assert checks["flop_counter", "prefill"]["mode"] == "weights"
    path = tmp_path / "flops-float32.json"
    document = artifacts.write_json_artifact(path, "flops_model", model, _provenance())
    assert artifacts.read_json_artifact(path, "flops_model")["data"] == document["data"]

    cycle = flops.cycle_flops(model, REQUESTS, batch_size=2)
    per_request = [flops.analytic_flops(spec, i, o, bytes_per_param=4) for i, o in REQUESTS.itertuples(index=False)]
    assert cycle["method"] == "analytic" and cycle["confidence"] == "high"
    assert cycle["total_flops"] == sum(r["total_flops"] for r in per_request)
    assert cycle["per_request_mean_flops"] == cycle["total_flops"] / 4
    assert cycle["tokens"] == {
        "requests": 4,
        "input_tokens": 70,
        "output_tokens": 30,
        "prefill_tokens": 70,
        "decode_tokens": 26,
    }
    # batch 2: at least max(15, ceil(26 / 2)) = 15 weight reads
    assert cycle["decode_bytes_breakdown"]["decode_steps_min"] == 15
    kv = sum(r["decode_kv_bytes_min"] for r in per_request)
    assert cycle["decode_bytes_min"] == 15 * (spec.parameter_count() - 512 * 256) * 4 + kv
    assert any("padding" in note for note in cycle["notes"])


def test_decode_steps_from_static_batches_and_repeated_passes(gpt2_dir):
    model = _model_flops(gpt2_dir, "fp16", cross_check=False)
    static = REQUESTS.assign(batch_index=[0, 0, 1, 1])
    # steps per request 7, 0, 15, 4: batch 0 runs 7 steps, batch 1 runs 15
    assert flops.cycle_flops(model, static, 1)["decode_bytes_breakdown"]["decode_steps_min"] == 22
    engine = REQUESTS.assign(batch_index=-1)
    data = flops.cycle_flops(model, engine, batch_size=4)
    assert data["decode_bytes_breakdown"]["decode_steps_min"] == 15  # longest request bounds it
    assert data["total_flops"] == flops.cycle_flops(model, REQUESTS, 1)["total_flops"]
    # Two passes of a repeated window run one after the other: their steps and FLOPs add up.
    twice = pd.concat([static.assign(repeat=0), static.assign(repeat=1)], ignore_index=True)
    repeated = flops.cycle_flops(model, twice, 1)
    assert repeated["decode_bytes_breakdown"]["decode_steps_min"] == 44
    assert repeated["total_flops"] == 2 * flops.cycle_flops(model, static, 1)["total_flops"]


def test_model_estimate_fake_mode_and_no_cross_check(gpt2_dir):
    fake = _model_flops(gpt2_dir, "bf16", cross_check_mode="fake")
    assert fake["confidence"] == "high"
    assert {c["mode"] for c in fake["cross_checks"]} == {"fake"}
    assert any("calflops cross-check skipped" in note for note in fake["notes"])
    plain = _model_flops(gpt2_dir, "bf16", cross_check=False)
    assert plain["confidence"] == "medium" and plain["cross_checks"] == []
    assert plain["cost_model"] == fake["cost_model"]
    artifacts.validate_data("flops_model", plain)


def test_fitted_cost_model_equals_analytic(llama_dir):
    cost, checks = flops.fit_cost_model(llama_dir, _n_params(llama_dir), mode="fake")
    spec = ArchitectureSpec.from_hf_config(flops.load_model_config(llama_dir))
    assert cost == spec.cost_model()
    assert all(c["relative_error"] == 0.0 for c in checks)


def test_unknown_to_formula_uses_flop_counter_fit(tmp_path, offline_env):
    torch.manual_seed(0)
    config = OPTConfig(
        hidden_size=128,
        num_attention_heads=2,
        num_hidden_layers=2,
        ffn_dim=256,
        vocab_size=300,
        word_embed_proj_dim=128,
        max_position_embeddings=128,
    )
    model = OPTForCausalLM(config)
    model_dir = _save(model, tmp_path / "tiny-opt")
    data = _model_flops(model_dir, "fp16")
    assert data["method"] == "flop_counter" and data["confidence"] == "medium"
    assert data["architecture"] is None
    # The fit against a generate() of one request, counted end to end.
    model.config._attn_implementation = "eager"
    model.eval()
    ids = torch.randint(3, 300, (1, 12))
    measured = _count(
        lambda: model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=False,
            pad_token_id=1,
        )
    )
    single = flops.cycle_flops(data, pd.DataFrame({"input_tokens": [12], "output_tokens": [8]}), 1)
    assert single["total_flops"] == measured
    artifacts.validate_data("flops_model", data)


def test_unknown_architecture_falls_back_to_parameter_estimate(llama_dir, tmp_path):
    model_dir = tmp_path / "mystery"
    shutil.copytree(llama_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "mystery-lm"
    config["architectures"] = ["MysteryForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(config))
    n_params = ArchitectureSpec.from_hf_config(llama_config()).parameter_count()
    data = flops.estimate_model_flops(model_dir, model="mystery", dtype="bfloat16", parameter_count=n_params)
    assert data["method"] == "parameter_estimate" and data["confidence"] == "low"
    assert data["parameter_count"] == n_params and data["cost_model"] is None
    artifacts.validate_data("flops_model", data)
    cycle = flops.cycle_flops(data, REQUESTS, 1)
    assert cycle["total_flops"] == 2 * n_params * (70 + 26)
    assert cycle["decode_bytes_breakdown"]["kv_cache_bytes"] is None
    # Weights only (bf16), read once per decode step: batch 1 needs all 26 steps.
    assert cycle["decode_bytes_min"] == n_params * 2 * 26


def test_sliding_window_exceeded_lowers_the_cycles_confidence(tmp_path, offline_env):
    torch.manual_seed(0)
    config = MistralConfig(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=256,
        vocab_size=300,
        sliding_window=16,
    )
    model_dir = _save(MistralForCausalLM(config), tmp_path / "tiny-mistral")
    model = _model_flops(model_dir, "fp32", use_calflops=False)
    assert model["method"] == "analytic"
    short = flops.cycle_flops(model, pd.DataFrame({"input_tokens": [4], "output_tokens": [3]}), 1)
    assert short["confidence"] == model["confidence"]
    data = flops.cycle_flops(model, REQUESTS, 1)
    assert data["confidence"] == "medium"
    assert any("sliding window of 16" in note for note in data["notes"])


def test_bad_inputs_name_what_to_fix(llama_dir):
    with pytest.raises(ConfigError, match="dtype"):
        flops.estimate_model_flops(llama_dir, model="m", dtype="float13", parameter_count=1)
    with pytest.raises(ArtifactError, match="parameter_count.*download_model"):
        flops.estimate_model_flops(llama_dir, model="m", dtype="fp32", parameter_count=None)
    model = _model_flops(llama_dir, "fp32", cross_check=False)
    with pytest.raises(ArtifactError, match="output_tokens"):
        flops.cycle_flops(model, REQUESTS[["input_tokens"]], 1)
    with pytest.raises(ArtifactError, match="input_tokens < 1"):
        flops.cycle_flops(model, pd.DataFrame({"input_tokens": [0], "output_tokens": [3]}), 1)


def test_schema_rejects_unknown_top_level_key(gpt2_dir):
    data = _model_flops(gpt2_dir, "fp32", cross_check=False)
    with pytest.raises(ArtifactError, match="Additional properties"):
        artifacts.validate_data("flops_model", {**data, "mfu": 0.5})
    with pytest.raises(ArtifactError, match="method"):
        artifacts.validate_data("flops_model", {**data, "method": "guess"})


# ---------------------------------------------------------------------------------------------
# Peak figures, MFU, MBU


@pytest.mark.parametrize(
    "name,dtype,model,flops_per_s,bandwidth",
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", "H100 SXM", 989.4e12, 3.35e12),
        ("NVIDIA H100 80GB HBM3", "float32", "H100 SXM", 66.9e12, 3.35e12),
        ("NVIDIA H100 80GB HBM3", "tf32", "H100 SXM", 494.7e12, 3.35e12),
        ("NVIDIA H100 PCIe", "fp16", "H100 PCIe", 756e12, 2.0e12),
        ("NVIDIA H200", "bf16", "H200", 989.4e12, 4.8e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", "A100 SXM", 312e12, 2.039e12),
        ("NVIDIA L40S", "float16", "L40S", 362e12, 0.864e12),
    ],
)
def test_peak_figures(name, dtype, model, flops_per_s, bandwidth):
    peak = flops.peak_figures(name, dtype)
    assert peak["gpu_model"] == model
    assert peak["flops_per_s"] == flops_per_s and peak["memory_bytes_per_s"] == bandwidth
    assert peak["source"] == "vendor datasheet, dense"


def test_peak_figures_unknown_gpu_or_dtype_is_none():
    assert flops.peak_figures("NVIDIA GeForce RTX 4090", "bf16") is None
    assert flops.peak_figures(None, "bf16") is None
    assert flops.peak_figures("NVIDIA A100-SXM4-80GB", "fp8") is None  # Ampere has no FP8


def test_mfu_and_mbu():
    peak = flops.peak_figures("NVIDIA H100 80GB HBM3", "bf16")
    assert flops.mfu(989.4e12, 2.0, peak) == pytest.approx(0.5)
    assert flops.mbu(3.35e12, 4.0, peak) == pytest.approx(0.25)
    assert flops.mfu(1e12, 1.0, 4e12) == pytest.approx(0.25)
    assert flops.mfu(1e12, 0.0, peak) is None
    assert flops.mbu(None, 1.0, peak) is None
    assert flops.mfu(1e12, 1.0, None) is None
