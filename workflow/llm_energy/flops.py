"""FLOPs and bytes moved by LLM inference, their cross-checks, and GPU peak figures for MFU/MBU.

Three ways to count, best first (the `method` of a `flops_estimate` artifact):

- ``analytic``: closed-form counts from the architecture (`ArchitectureSpec`), for the model types
  whose layer structure is written out below (llama, mistral, qwen2, qwen3, gpt2). Cross-checked
  against `torch.utils.flop_counter.FlopCounterMode` on a real forward of the same model and, where
  the model is small enough for a CPU forward, against calflops.
- ``flop_counter``: for causal LMs that transformers can build but whose structure is not written out
  here, a cost model fitted from FlopCounterMode counts of real forwards (see `fit_cost_model`).
- ``parameter_estimate``: 2 x parameters x tokens when nothing else works.

What is counted (the same for all three, so that the numbers compose):
- Matmul FLOPs only (2 per multiply-add): every weight matrix, including the lm_head, and the two
  attention matmuls (Q K^T and A V). Norms, activations, softmax, rotary embeddings and bias adds are
  left out; they are a fraction of a percent for real models and are not what GPU peak figures count.
- Prefill attention is the full seq x seq square, as eager and SDPA-math kernels compute it (the
  causal mask is applied after the matmul). Flash-style kernels skip the masked half, so they execute
  fewer attention FLOPs than counted here; this estimate is the model's dense work, not a kernel trace.
- Generation uses a KV cache: the prompt is one forward (prefill) that also yields the first output
  token; each later output token t = 1..output_tokens-1 is one single-token forward (decode step)
  whose attention spans input_tokens + t keys.
- The lm_head runs on the last prompt position only in prefill: transformers' `generate` sets
  `logits_to_keep=1` whenever the model's forward accepts it (generation/utils.py, checked in
  transformers 5.19) and vLLM computes logits only for the positions it samples from.
- Useful FLOPs: padding tokens are excluded, because the requests table holds unpadded counts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, NamedTuple

from llm_energy.errors import ArtifactError, ConfigError

logger = logging.getLogger(__name__)

# Model types whose layer structure ArchitectureSpec writes out. Others fall back to fit_cost_model.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")

# Bytes per weight / KV-cache element for the dtypes a campaign may name.
DTYPE_BYTES: dict[str, float] = {
    "float32": 4.0, "fp32": 4.0, "tf32": 4.0,
    "bfloat16": 2.0, "bf16": 2.0, "float16": 2.0, "fp16": 2.0, "half": 2.0,
    "float8": 1.0, "fp8": 1.0, "float8_e4m3fn": 1.0, "float8_e5m2": 1.0, "int8": 1.0,
    "int4": 0.5,
}

# A relative difference at or below this between analytic and FlopCounterMode counts makes the
# analytic estimate "high" confidence.
HIGH_CONFIDENCE_RELATIVE_ERROR = 0.02
# Models up to this many parameters are cross-checked with their real weights on the CPU (float32);
# larger ones with the same code on fake tensors (shapes only, no memory, no weights read).
DEFAULT_MAX_WEIGHTS_CROSS_CHECK_PARAMS = 200_000_000
# Cross-check forwards use at most this many prompt tokens (the counts are exact at any length).
DEFAULT_MAX_CROSS_CHECK_SEQ_LEN = 128

CrossCheckMode = Literal["weights", "fake"]


def bytes_per_param(dtype: str) -> float:
    """Bytes per weight (and KV-cache element) for a dtype name such as "bfloat16" or "fp32"."""
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPE_BYTES:
        raise ConfigError(
            "dtype", f"'{dtype}' is not a dtype the FLOPs estimate knows",
            f"use one of {sorted(DTYPE_BYTES)}",
        )
    return DTYPE_BYTES[key]


# ---------------------------------------------------------------------------------------------
# Cost model: the few coefficients every count below is made of


@dataclass(frozen=True)
class CostModel:
    """Per-token costs of one causal LM, whatever produced them (analytic or fitted).

    A forward of `seq_len` new tokens over `kv_len` keys costs, per sequence,
    linear_flops_per_token * seq_len + logits_flops_per_position * (positions with logits)
    + attention_flops_per_query_key * seq_len * kv_len.
    """

    linear_flops_per_token: int  # 2 x every matmul weight except the lm_head
    logits_flops_per_position: int  # 2 x lm_head weights (hidden x vocab)
    attention_flops_per_query_key: int  # Q K^T and A V over all layers: 4 x layers x heads x head_dim
    decode_weight_params: int  # parameters a decode step reads (all but gathered embedding rows)
    kv_elements_per_token: int | None  # K and V elements cached per token over all layers

    def forward_flops(self, batch: int, seq_len: int, logits: Literal["all", "last"] = "all") -> int:
        """One full forward without KV cache (attention over the full seq x seq square)."""
        positions = seq_len if logits == "all" else 1
        per_sequence = (
            self.linear_flops_per_token * seq_len
            + self.logits_flops_per_position * positions
            + self.attention_flops_per_query_key * seq_len * seq_len
        )
        return batch * per_sequence

    def decode_step_flops(self, batch: int, kv_len: int) -> int:
        """A single-token forward per sequence attending over `kv_len` keys (itself included)."""
        per_sequence = (
            self.linear_flops_per_token
            + self.logits_flops_per_position
            + self.attention_flops_per_query_key * kv_len
        )
        return batch * per_sequence


# ---------------------------------------------------------------------------------------------
# Architecture


@dataclass(frozen=True)
class ArchitectureSpec:
    """The shape of a decoder-only transformer, as far as matmul FLOPs and bytes are concerned."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool  # llama/mistral/qwen: gate, up and down projections; gpt2: fc and proj
    tied_embeddings: bool
    # Only for parameter counts and bytes (bias adds and norms are not counted as FLOPs).
    qkv_bias: bool = False
    out_proj_bias: bool = False
    mlp_bias: bool = False
    norm: Literal["rms", "layer"] = "rms"
    qk_norm: bool = False
    position_embeddings: int = 0  # rows of a learned absolute position table (gpt2), 0 for rotary
    sliding_window: int | None = None

    @classmethod
    def from_hf_config(cls, config: Any) -> ArchitectureSpec | None:
        """Spec from a transformers PretrainedConfig; None for model types not written out here."""
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            logger.info("model type %r has no analytic FLOPs formula; caller falls back", model_type)
            return None
        tied = bool(getattr(config, "tie_word_embeddings", False))
        if model_type == "gpt2":
            if getattr(config, "add_cross_attention", False):
                return None  # encoder-decoder use of gpt2 blocks: extra matmuls not written out
            hidden = int(config.n_embd)
            heads = int(config.n_head)
            inner = config.n_inner if config.n_inner is not None else 4 * hidden
            return cls(
                model_type=model_type, hidden_size=hidden, num_layers=int(config.n_layer),
                num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
                intermediate_size=int(inner), vocab_size=int(config.vocab_size), gated_mlp=False,
                tied_embeddings=tied, qkv_bias=True, out_proj_bias=True, mlp_bias=True,
                norm="layer", position_embeddings=int(config.n_positions),
            )
        heads = int(config.num_attention_heads)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = {"llama": attention_bias, "mistral": False, "qwen2": True,
                    "qwen3": attention_bias}[model_type]
        out_bias = {"llama": attention_bias, "mistral": False, "qwen2": False,
                    "qwen3": attention_bias}[model_type]
        mlp_bias = bool(getattr(config, "mlp_bias", False)) if model_type == "llama" else False
        sliding = getattr(config, "sliding_window", None)
        return cls(
            model_type=model_type, hidden_size=int(config.hidden_size),
            num_layers=int(config.num_hidden_layers), num_heads=heads, num_kv_heads=int(kv_heads),
            head_dim=int(head_dim), intermediate_size=int(config.intermediate_size),
            vocab_size=int(config.vocab_size), gated_mlp=True, tied_embeddings=tied,
            qkv_bias=qkv_bias, out_proj_bias=out_bias, mlp_bias=mlp_bias, norm="rms",
            qk_norm=model_type == "qwen3", sliding_window=int(sliding) if sliding else None,
        )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_matmul_params(self) -> int:
        """Weights of one block's matmuls: Q, K, V (GQA: K and V smaller), O and the MLP."""
        h = self.hidden_size
        attention = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate_size
        return attention + mlp

    def parameter_count(self) -> int:
        """All parameters as transformers allocates them (a tied lm_head counted once)."""
        h, inter = self.hidden_size, self.intermediate_size
        norm_size = h if self.norm == "rms" else 2 * h
        per_layer = self.layer_matmul_params() + 2 * norm_size
        if self.qkv_bias:
            per_layer += self.q_dim + 2 * self.kv_dim
        if self.out_proj_bias:
            per_layer += h
        if self.mlp_bias:
            per_layer += (2 * inter if self.gated_mlp else inter) + h
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        embeddings = self.vocab_size * h + self.position_embeddings * h
        lm_head = 0 if self.tied_embeddings else self.vocab_size * h
        return embeddings + self.num_layers * per_layer + norm_size + lm_head

    def cost_model(self) -> CostModel:
        h = self.hidden_size
        # A decode step gathers one row of each embedding table but reads every other parameter.
        # With tied embeddings the table is the lm_head, which is read whole.
        gathered = self.position_embeddings * h + (0 if self.tied_embeddings else self.vocab_size * h)
        return CostModel(
            linear_flops_per_token=2 * self.num_layers * self.layer_matmul_params(),
            logits_flops_per_position=2 * h * self.vocab_size,
            attention_flops_per_query_key=4 * self.num_layers * self.num_heads * self.head_dim,
            decode_weight_params=self.parameter_count() - gathered,
            kv_elements_per_token=2 * self.num_layers * self.kv_dim,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Analytic counts


def parameter_estimate_flops(n_params: int, tokens: int) -> int:
    """The rule of thumb 2 x N x T (one multiply-add per parameter per processed token)."""
    return 2 * int(n_params) * int(tokens)


def request_costs(
    model: CostModel,
    input_tokens: int,
    output_tokens: int,
    *,
    bytes_per_param: float = 2.0,
    prefill_logits: Literal["all", "last"] = "last",
) -> dict[str, Any]:
    """FLOPs and minimal decode bytes of one request generated with a KV cache (batch of one)."""
    s, o = int(input_tokens), int(output_tokens)
    if s < 1 or o < 0:
        raise ValueError(f"a request needs input_tokens >= 1 and output_tokens >= 0, got {s}, {o}")
    prefill = model.forward_flops(1, s, logits=prefill_logits)
    steps = max(o - 1, 0)  # the first output token comes out of the prefill
    kv_len_sum = steps * s + steps * (steps + 1) // 2  # sum of (s + t) for t = 1..steps
    decode = steps * (model.linear_flops_per_token + model.logits_flops_per_position) + (
        model.attention_flops_per_query_key * kv_len_sum
    )
    weight_bytes = steps * model.decode_weight_params * bytes_per_param
    kv_bytes = (
        model.kv_elements_per_token * kv_len_sum * bytes_per_param
        if model.kv_elements_per_token is not None else None
    )
    return {
        "prefill_flops": prefill,
        "decode_flops": decode,
        "total_flops": prefill + decode,
        "prefill_tokens": s,
        "decode_tokens": steps,
        "decode_weight_bytes_min": weight_bytes,
        "decode_kv_bytes_min": kv_bytes,
        "decode_bytes_min": weight_bytes + (kv_bytes or 0.0),
    }


def analytic_flops(
    arch: ArchitectureSpec,
    input_tokens: int,
    output_tokens: int,
    *,
    bytes_per_param: float = 2.0,
    prefill_logits: Literal["all", "last"] = "last",
) -> dict[str, Any]:
    """FLOPs of ONE request with KV cache, and the bytes its decode steps must read at least.

    decode_bytes_min = per decode step, every weight read once (batch of one) plus the K and V of
    all input_tokens + t cached positions, at `bytes_per_param` bytes per element.
    """
    return request_costs(
        arch.cost_model(), input_tokens, output_tokens,
        bytes_per_param=bytes_per_param, prefill_logits=prefill_logits,
    )


def analytic_forward_flops(
    arch: ArchitectureSpec, batch: int, seq_len: int, logits: Literal["all", "last"] = "all"
) -> int:
    """One full forward without KV cache; logits for every position, as a plain forward computes."""
    return arch.cost_model().forward_flops(batch, seq_len, logits=logits)


def analytic_decode_step_flops(arch: ArchitectureSpec, batch: int, kv_len: int) -> int:
    """One decode step: a single new token per sequence attending over `kv_len` keys."""
    return arch.cost_model().decode_step_flops(batch, kv_len)


# ---------------------------------------------------------------------------------------------
# Measured counts: FlopCounterMode on the real model code


def load_model_config(model_dir: Path | str) -> Any:
    """The transformers config of a local model folder (never the hub)."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ArtifactError(f"{model_dir}: no config.json; is this a downloaded model folder?")
    return AutoConfig.from_pretrained(model_dir, local_files_only=True)


def _build_model(model_dir: Path, mode: CrossCheckMode, attn_implementation: str):
    """The causal LM of `model_dir` in eval mode: real float32 weights, or fake tensors from the config.

    Fake mode runs the same transformers code on tensors that carry shapes only, so an 8B model
    costs about a second and no memory. The caller must run the forward inside the returned mode.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if mode == "weights":
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=attn_implementation,
            local_files_only=True,
        )
        return model.eval(), None
    if mode == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        config = load_model_config(model_dir)
        with fake_mode:
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
        # eval(): from_config returns a model in training mode, where e.g. OPT draws LayerDrop.
        return model.eval(), fake_mode
    raise ValueError(f"mode must be 'weights' or 'fake', got {mode!r}")


class _ForwardCount(NamedTuple):
    total_flops: int
    by_module: dict[str, int]


def _count_forward(
    model, fake_mode, batch: int, seq_len: int, *, use_cache: bool, past_key_values: Any = None
) -> tuple[_ForwardCount, Any]:
    """FlopCounterMode count of one forward of `seq_len` random new tokens per sequence."""
    import contextlib

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    vocab = int(model.config.get_text_config().vocab_size)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
    # An explicit all-ones mask: without one, transformers inspects the ids for padding, a
    # data-dependent check that fake tensors cannot answer.
    mask = torch.ones((batch, past_len + seq_len), dtype=torch.long)
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            output = model(input_ids=ids, attention_mask=mask, use_cache=use_cache,
                           past_key_values=past_key_values)
    by_module = {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    return _ForwardCount(int(counter.get_total_flops()), by_module), output


def measured_forward_flops(
    model_dir: Path | str,
    batch: int,
    seq_len: int,
    attn_implementation: str = "eager",
    *,
    mode: CrossCheckMode = "weights",
) -> int:
    """FlopCounterMode count of one forward of the model (no KV cache, logits for all positions).

    mode "weights" loads the real weights on the CPU in float32 and feeds random ids; "fake" runs the
    same code on fake tensors (for models too large for a CPU forward). Use eager attention: with
    SDPA, FlopCounterMode does not see the attention matmuls on CPU.
    """
    model, fake_mode = _build_model(Path(model_dir), mode, attn_implementation)
    count, _ = _count_forward(model, fake_mode, batch, seq_len, use_cache=False)
    return count.total_flops


def measured_decode_step_flops(
    model_dir: Path | str,
    batch: int,
    kv_len: int,
    attn_implementation: str = "eager",
    *,
    mode: CrossCheckMode = "weights",
) -> int:
    """FlopCounterMode count of one decode step over a real KV cache of kv_len - 1 prior positions."""
    if kv_len < 2:
        raise ValueError("kv_len must be >= 2 (at least one cached position plus the new token)")
    model, fake_mode = _build_model(Path(model_dir), mode, attn_implementation)
    return _decode_step_count(model, fake_mode, batch, kv_len)


def _decode_step_count(model, fake_mode, batch: int, kv_len: int) -> int:
    _, prefill_output = _count_forward(model, fake_mode, batch, kv_len - 1, use_cache=True)
    step, _ = _count_forward(
        model, fake_mode, batch, 1, use_cache=True, past_key_values=prefill_output.past_key_values
    )
    return step.total_flops


class CalflopsResult(NamedTuple):
    flops: int | None
    reason: str | None  # why flops is None


_CALFLOPS_MARKER = "LLM_ENERGY_CALFLOPS_RESULT="
# Runs in a fresh interpreter: after one failed calculate_flops call calflops leaves its patches in
# place and every later call in that process counts twice.
_CALFLOPS_SCRIPT = """
import json, sys
args = json.loads(sys.argv[1])
try:
    import torch
    from calflops import calculate_flops
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(
        args["model_dir"], dtype=torch.float32, attn_implementation=args["attn_implementation"],
        local_files_only=True).eval()
    generator = torch.Generator().manual_seed(0)
    vocab = int(model.config.get_text_config().vocab_size)
    ids = torch.randint(0, vocab, (args["batch"], args["seq_len"]), generator=generator)
    # The kwargs path: calflops' input_shape + tokenizer path fails on transformers 5 (encode_plus).
    # Tensors only: calflops calls .to(device) on every kwarg, so use_cache=False cannot be passed
    # (filling the KV cache adds no matmul FLOPs anyway).
    flops, _macs, _params = calculate_flops(
        model=model, kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        output_as_string=False, print_results=False)
    result = {"flops": int(flops)}
except Exception as exc:
    result = {"error": f"{type(exc).__name__}: {exc}"}
print(%r + json.dumps(result), flush=True)
""" % _CALFLOPS_MARKER


def calflops_forward_flops(
    model_dir: Path | str,
    batch: int,
    seq_len: int,
    attn_implementation: str = "eager",
    *,
    timeout_s: float = 600.0,
) -> CalflopsResult:
    """calflops' count of one forward (real weights, CPU, float32), run in a fresh subprocess."""
    args = {"model_dir": str(model_dir), "batch": int(batch), "seq_len": int(seq_len),
            "attn_implementation": attn_implementation}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        completed = subprocess.run(
            [sys.executable, "-c", _CALFLOPS_SCRIPT, json.dumps(args)],
            capture_output=True, text=True, timeout=timeout_s, env=env,
        )
    except subprocess.TimeoutExpired:
        return CalflopsResult(None, f"calflops did not finish within {timeout_s:.0f} s")
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(_CALFLOPS_MARKER):
            result = json.loads(line[len(_CALFLOPS_MARKER):])
            if "flops" in result:
                return CalflopsResult(result["flops"], None)
            return CalflopsResult(None, f"calflops failed: {result['error']}")
    tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
    return CalflopsResult(None, f"calflops subprocess exited {completed.returncode}: {' | '.join(tail)}")


# ---------------------------------------------------------------------------------------------
# Fitted cost model for architectures without a formula


def _module_key(model, module) -> str | None:
    """FlopCounterMode's name for `module`: '<ModelClass>.<dotted path>'."""
    for name, candidate in model.named_modules():
        if candidate is module and name:
            return f"{type(model).__name__}.{name}"
    return None


def _kv_elements_per_token(cache: Any, batch: int, seq_len: int) -> int | None:
    """K and V elements a transformers cache holds per token, summed over layers (None if unreadable)."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    total = 0
    for layer in layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None or keys.shape[-2] != seq_len:
            return None  # a sliding or compressed cache: per-token size is not constant
        total += keys.numel() + values.numel()
    return total // (batch * seq_len)


def fit_cost_model(
    model_dir: Path | str, *, mode: CrossCheckMode = "fake", attn_implementation: str = "eager",
    seq_lens: tuple[int, int, int] = (8, 16, 24),
) -> tuple[CostModel, list[dict[str, Any]]]:
    """Fit a CostModel to FlopCounterMode counts of real forwards of the model's own code.

    A full forward of s tokens costs a*s + b*s^2 without the lm_head (linear layers, then attention
    over the s x s square) plus c*s for the lm_head, whose share FlopCounterMode reports per module.
    Two lengths give a and b exactly; a third length and a real decode step must then match exactly,
    or the model is not of this form (sliding windows, mixture of experts) and ValueError is raised.
    Returns the model and the validation points (cross_check records).
    """
    model_dir = Path(model_dir)
    model, fake_mode = _build_model(model_dir, mode, attn_implementation)
    output_embeddings = model.get_output_embeddings()
    lm_head_key = _module_key(model, output_embeddings) if output_embeddings is not None else None
    if lm_head_key is None:
        raise ValueError("the model has no output embedding (lm_head) module")

    bodies: list[int] = []
    logits_per_position: set[Fraction] = set()
    cache_elements: int | None = None
    for seq_len in seq_lens:
        count, output = _count_forward(model, fake_mode, 1, seq_len, use_cache=True)
        lm_head = count.by_module.get(lm_head_key, 0)
        bodies.append(count.total_flops - lm_head)
        logits_per_position.add(Fraction(lm_head, seq_len))
        if cache_elements is None:
            cache_elements = _kv_elements_per_token(getattr(output, "past_key_values", None), 1, seq_len)
    if len(logits_per_position) != 1:
        raise ValueError(f"lm_head FLOPs are not proportional to length: {sorted(logits_per_position)}")
    s1, s2, s3 = seq_lens
    b = (Fraction(bodies[1], s2) - Fraction(bodies[0], s1)) / (s2 - s1)
    a = Fraction(bodies[0], s1) - b * s1
    c = logits_per_position.pop()
    if any(x.denominator != 1 or x < 0 for x in (a, b, c)):
        raise ValueError(f"counts do not fit linear + quadratic attention terms (a={a}, b={b}, c={c})")
    predicted_third = int(a * s3 + b * s3 * s3)
    checks = [_cross_check_record("flop_counter_fit", "prefill", 1, s3, predicted_third + int(c) * s3,
                                  bodies[2] + int(c) * s3, mode)]
    if predicted_third != bodies[2]:
        raise ValueError(
            f"forward FLOPs at {s3} tokens ({bodies[2]}) differ from the fit ({predicted_third}): "
            "the attention cost is not quadratic in length"
        )

    n_params = sum(int(p.numel()) for p in model.parameters())
    input_embeddings = model.get_input_embeddings()
    gathered = 0
    if input_embeddings is not None and output_embeddings is not None and (
        input_embeddings.weight is not output_embeddings.weight
    ):
        gathered = int(input_embeddings.weight.numel())
    cost = CostModel(
        linear_flops_per_token=int(a), logits_flops_per_position=int(c),
        attention_flops_per_query_key=int(b), decode_weight_params=n_params - gathered,
        kv_elements_per_token=cache_elements,
    )
    kv_len = s2 + 1
    measured_step = _decode_step_count(model, fake_mode, 1, kv_len)
    predicted_step = cost.decode_step_flops(1, kv_len)
    checks.append(_cross_check_record("flop_counter_fit", "decode", 1, kv_len, predicted_step,
                                      measured_step, mode))
    if measured_step != predicted_step:
        raise ValueError(f"a decode step costs {measured_step} FLOPs, the fit predicts {predicted_step}")
    return cost, checks


# ---------------------------------------------------------------------------------------------
# Parameter count (for the last-resort estimate)


def count_parameters(model_dir: Path | str) -> int | None:
    """Parameters of a model folder: from safetensors headers (no weights read), else the config."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        total = 0
        for path in files:
            with open(path, "rb") as handle:
                header_len = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(header_len))
            for name, entry in header.items():
                if name != "__metadata__":
                    total += math.prod(entry["shape"])
        return total
    try:
        model, _ = _build_model(model_dir, "fake", "eager")
    except Exception as exc:  # any failure means: unknown; the caller reports it
        logger.warning("cannot count the parameters of %s: %s", model_dir, exc)
        return None
    return sum(int(p.numel()) for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Experiment-level estimate (the estimate_flops rule)


def _cross_check_record(
    tool: str, phase: str, batch: int, seq_len: int, analytic: int, measured: int | None, mode: str,
) -> dict[str, Any]:
    relative_error = None
    if measured:
        relative_error = (analytic - measured) / measured
    return {"tool": tool, "phase": phase, "mode": mode, "batch": int(batch), "seq_len": int(seq_len),
            "analytic_flops": int(analytic), "measured_flops": measured,
            "relative_error": relative_error}


def _validated_requests(requests: Any, notes: list[str]) -> list[tuple[int, int]]:
    missing = [c for c in ("input_tokens", "output_tokens") if c not in requests.columns]
    if missing:
        raise ArtifactError(
            f"requests table lacks columns {missing}; estimate_flops needs one row per request with "
            "input_tokens and output_tokens (the run's requests.parquet)"
        )
    frame = requests[["input_tokens", "output_tokens"]]
    complete = frame.dropna()
    if len(complete) < len(frame):
        notes.append(f"{len(frame) - len(complete)} request(s) without token counts were left out.")
    pairs = [(int(i), int(o)) for i, o in complete.itertuples(index=False)]
    bad = [(i, o) for i, o in pairs if i < 1 or o < 0]
    if bad:
        raise ArtifactError(
            f"requests table has {len(bad)} row(s) with input_tokens < 1 or output_tokens < 0, "
            f"e.g. {bad[0]}; re-run the inference that wrote it"
        )
    return pairs


def _decode_steps_min(requests: Any, batch_size: int) -> tuple[int, str]:
    """Fewest decode steps (forwards that each read all weights once) the run can have made.

    With static batches (requests table's batch_index >= 0) a batch decodes until its longest
    request is done: the steps are known. Where the engine schedules requests itself
    (batch_index -1, e.g. vLLM), at most `batch_size` sequences share a step.
    """
    frame = requests.dropna(subset=["input_tokens", "output_tokens"])
    steps = (frame["output_tokens"].astype("int64") - 1).clip(lower=0)
    if len(frame) == 0:
        return 0, "no requests"
    if "batch_index" in frame.columns and bool((frame["batch_index"] >= 0).all()):
        per_batch = steps.groupby(frame["batch_index"].to_numpy()).max()
        return int(per_batch.sum()), f"{len(per_batch)} static batches, each until its longest request"
    total = int(steps.sum())
    return max(int(steps.max()), math.ceil(total / batch_size)), f"at most {batch_size} sequences per step"


def _cross_check_shape(pairs: list[tuple[int, int]], max_seq_len: int) -> tuple[int, int]:
    """A batch and prompt length like the experiment's, capped so a CPU forward stays cheap."""
    lengths = sorted(i for i, _ in pairs) or [max_seq_len]
    median = lengths[len(lengths) // 2]
    return min(2, max(len(pairs), 1)), max(2, min(median, max_seq_len))


_COUNTING_NOTES = (
    "Matmul FLOPs only (2 per multiply-add): all weight matrices incl. lm_head, plus Q K^T and A V.",
    "Prefill attention counted as the full seq x seq square, as eager/SDPA-math kernels compute it; "
    "flash-style causal kernels execute about half of it.",
    "KV cache: the first output token comes from the prefill; decode step t = 1..output_tokens-1 "
    "attends over input_tokens + t keys.",
    "lm_head on the last prompt position only in prefill (transformers generate passes "
    "logits_to_keep=1; vLLM computes logits only where it samples).",
)


@dataclass
class _CostChoice:
    method: str = "parameter_estimate"
    confidence: str = "low"
    cost: CostModel | None = None
    architecture: ArchitectureSpec | None = None
    model_type: str | None = None


def _choose_cost_model(
    model_dir: Path, weights_ok: bool, cross_checks: list[dict[str, Any]], notes: list[str]
) -> _CostChoice:
    """analytic if the architecture is written out, else a FlopCounterMode fit, else nothing."""
    choice = _CostChoice()
    try:
        config = load_model_config(model_dir)
    except ArtifactError:
        raise
    except Exception as exc:  # unknown model type, broken config: fall back and say why
        notes.append(f"transformers cannot read the model config ({type(exc).__name__}: {exc}).")
        return choice
    choice.model_type = getattr(config, "model_type", None)
    choice.architecture = ArchitectureSpec.from_hf_config(config)
    if choice.architecture is not None:
        choice.method, choice.confidence = "analytic", "medium"  # "high" once cross-checked
        choice.cost = choice.architecture.cost_model()
        return choice
    # Fake tensors first (cheap at any size); real weights if the model code needs real values
    # and the model is small enough for a CPU forward.
    for fit_mode in ("fake", "weights") if weights_ok else ("fake",):
        try:
            choice.cost, fit_checks = fit_cost_model(model_dir, mode=fit_mode)
        except Exception as exc:  # data-dependent code, MoE routing, ...: next mode or 2*N*T
            notes.append(f"FlopCounterMode fit ({fit_mode}) failed ({type(exc).__name__}: {exc}).")
            continue
        choice.method, choice.confidence = "flop_counter", "medium"
        cross_checks.extend(fit_checks)
        notes.append(
            f"Model type '{choice.model_type}' has no analytic formula: cost model fitted to "
            f"FlopCounterMode counts of its own forward code ({fit_mode} mode, eager attention)."
        )
        break
    return choice


def estimate_experiment_flops(
    model_dir: Path | str,
    requests: Any,
    *,
    dtype: str,
    cross_check: bool = True,
    batch_size: int = 1,
    cross_check_mode: Literal["auto", "weights", "fake"] = "auto",
    use_calflops: bool = True,
    max_weights_cross_check_params: int = DEFAULT_MAX_WEIGHTS_CROSS_CHECK_PARAMS,
    max_cross_check_seq_len: int = DEFAULT_MAX_CROSS_CHECK_SEQ_LEN,
) -> dict[str, Any]:
    """FLOPs of every request of a run, summed, with cross-checks: data of artifact `flops_estimate`.

    `requests` is the run's requests table (columns input_tokens, output_tokens; one row per
    request; an optional batch_index column, >= 0 for static batches, tells which requests were
    decoded together). `dtype` sets the bytes per weight and KV element. `batch_size` is the most
    sequences the engine decoded together where it scheduled requests itself (batch_index -1);
    both only bound how often the weights must be read (decode_bytes_min), never the FLOPs. Cross-checks run on the real weights (CPU, float32) for
    models up to `max_weights_cross_check_params` parameters and on fake tensors above that
    (`cross_check_mode` forces one); calflops runs only with real weights.
    """
    model_dir = Path(model_dir)
    bpp = bytes_per_param(dtype)
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {batch_size}", "set a positive batch size")
    notes = ["Useful FLOPs: padding tokens are excluded (token counts come from the requests table)."]
    pairs = _validated_requests(requests, notes)
    n_params = count_parameters(model_dir)
    if cross_check_mode == "auto":
        weights_ok = n_params is not None and n_params <= max_weights_cross_check_params
        mode: CrossCheckMode = "weights" if weights_ok else "fake"
    else:
        mode = cross_check_mode
    cross_checks: list[dict[str, Any]] = []
    choice = _choose_cost_model(model_dir, mode == "weights", cross_checks, notes)

    n = len(pairs)
    prefill_tokens = sum(i for i, _ in pairs)
    output_tokens = sum(o for _, o in pairs)
    decode_tokens = sum(max(o - 1, 0) for _, o in pairs)
    decode_steps_min, steps_basis = _decode_steps_min(requests, batch_size)

    kv_bytes: float | None = None
    if choice.cost is not None:
        notes.extend(_COUNTING_NOTES)
        per_request = [request_costs(choice.cost, i, o, bytes_per_param=bpp) for i, o in pairs]
        prefill_flops = sum(r["prefill_flops"] for r in per_request)
        decode_flops = sum(r["decode_flops"] for r in per_request)
        weight_params = choice.cost.decode_weight_params
        if choice.cost.kv_elements_per_token is not None:
            kv_bytes = float(sum(r["decode_kv_bytes_min"] for r in per_request))
    else:
        if n_params is None:
            raise ArtifactError(
                f"{model_dir}: cannot estimate FLOPs: the architecture is unknown and the parameter "
                "count cannot be read (no *.safetensors and no buildable config); re-download the model"
            )
        prefill_flops = parameter_estimate_flops(n_params, prefill_tokens)
        decode_flops = parameter_estimate_flops(n_params, decode_tokens)
        weight_params = n_params
        notes.append(
            f"Parameter estimate 2 x N x T with N = {n_params} (all parameters, embeddings included) "
            "and T = prompt tokens + decode steps; attention over the context is not counted."
        )
    if kv_bytes is None:
        notes.append("KV-cache size per token unknown: decode_bytes_min counts weights only.")
    weight_bytes = float(weight_params) * bpp * decode_steps_min
    notes.append(
        f"decode_bytes_min: weights read once per decode step, {decode_steps_min} steps at least "
        f"({steps_basis}), plus each request's cached K and V read at every step of it; "
        "a lower bound on bytes moved, so MBU computed from it is a lower bound too."
    )

    window_exceeded = False
    arch = choice.architecture
    if arch is not None and arch.sliding_window is not None:
        longest = max((i + o for i, o in pairs), default=0)
        if longest > arch.sliding_window:
            window_exceeded = True
            notes.append(
                f"Requests reach {longest} tokens, beyond the sliding window of {arch.sliding_window}: "
                "attention counted over the full context (an upper bound)."
            )

    confidence = choice.confidence
    if choice.method == "analytic":
        if cross_check and pairs:
            cross_checks.extend(_analytic_cross_checks(
                model_dir, arch, pairs, mode, use_calflops, max_cross_check_seq_len, notes))
            counter = [c["relative_error"] for c in cross_checks if c["tool"] == "flop_counter"]
            if counter and all(
                e is not None and abs(e) <= HIGH_CONFIDENCE_RELATIVE_ERROR for e in counter
            ) and not window_exceeded:
                confidence = "high"
        else:
            notes.append("No cross-check was run: confidence stays medium.")

    total = prefill_flops + decode_flops
    return {
        "method": choice.method,
        "confidence": confidence,
        "total_flops": total,
        "prefill_flops": prefill_flops,
        "decode_flops": decode_flops,
        "per_request_mean_flops": (total / n) if n else None,
        "tokens": {"requests": n, "input_tokens": prefill_tokens, "output_tokens": output_tokens,
                   "prefill_tokens": prefill_tokens, "decode_tokens": decode_tokens},
        "decode_bytes_min": weight_bytes + (kv_bytes or 0.0),
        "decode_bytes_breakdown": {
            "weight_bytes": weight_bytes, "kv_cache_bytes": kv_bytes,
            "decode_steps_min": decode_steps_min, "batch_size": int(batch_size),
            "decode_weight_params": int(weight_params),
        },
        "dtype": str(dtype),
        "bytes_per_param": bpp,
        "parameter_count": n_params,
        "cross_checks": cross_checks,
        "architecture": arch.to_dict() if arch is not None else None,
        "notes": notes,
    }


def _analytic_cross_checks(
    model_dir: Path, arch: ArchitectureSpec, pairs: list[tuple[int, int]], mode: CrossCheckMode,
    use_calflops: bool, max_seq_len: int, notes: list[str],
) -> list[dict[str, Any]]:
    """Analytic counts of one prefill forward and one decode step against the model's real code."""
    batch, seq_len = _cross_check_shape(pairs, max_seq_len)
    checks: list[dict[str, Any]] = []
    # Match what a plain forward computes: no KV cache, logits for all positions, eager attention.
    forward = analytic_forward_flops(arch, batch, seq_len, logits="all")
    kv_len = seq_len + 1
    step = analytic_decode_step_flops(arch, batch, kv_len)
    measured: int | None = None
    measured_step: int | None = None
    try:
        model, fake_mode = _build_model(model_dir, mode, "eager")
        measured = _count_forward(model, fake_mode, batch, seq_len, use_cache=False)[0].total_flops
        measured_step = _decode_step_count(model, fake_mode, batch, kv_len)
    except Exception as exc:  # a cross-check that cannot run lowers confidence, not the rule
        logger.warning("FlopCounterMode cross-check failed: %s", exc)
        notes.append(f"FlopCounterMode cross-check failed ({type(exc).__name__}: {exc}).")
    checks.append(
        _cross_check_record("flop_counter", "prefill", batch, seq_len, forward, measured, mode))
    checks.append(
        _cross_check_record("flop_counter", "decode", batch, kv_len, step, measured_step, mode))
    if use_calflops:
        if mode != "weights":
            notes.append("calflops cross-check skipped: the model is too large for a CPU forward.")
        else:
            result = calflops_forward_flops(model_dir, batch, seq_len, "eager")
            if result.flops is None:
                notes.append(f"calflops cross-check unavailable: {result.reason}")
            checks.append(_cross_check_record("calflops", "prefill", batch, seq_len, forward,
                                              result.flops, mode))
    return checks


# ---------------------------------------------------------------------------------------------
# Peak figures, MFU and MBU

_DATASHEET = "vendor datasheet, dense"

# Matched against NVML's device name in this order (most specific first), case-insensitively.
# flops_per_s per precision class; dense tensor-core figures (sparsity halves the datasheet numbers),
# "fp32" is the non-tensor-core FP32 rate a float32 matmul gets without TF32.
PEAK_FIGURES: dict[str, dict[str, Any]] = {
    "H100 NVL": {
        "match": ("H100 NVL",),
        "flops_per_s": {
            "bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12,
            "fp32": 60e12, "fp8": 1670.5e12,
        },
        "memory_bytes_per_s": 3.9e12, "source": _DATASHEET,
    },
    "H100 PCIe": {
        "match": ("H100 PCIE",),
        "flops_per_s": {
            "bf16": 756e12, "fp16": 756e12, "tf32": 378e12,
            "fp32": 51.2e12, "fp8": 1513e12,
        },
        "memory_bytes_per_s": 2.0e12, "source": _DATASHEET,
    },
    "H100 SXM": {
        "match": ("H100 SXM", "H100 80GB HBM3", "H100 HBM3"),
        "flops_per_s": {
            "bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12,
            "fp32": 66.9e12, "fp8": 1978.9e12,
        },
        "memory_bytes_per_s": 3.35e12, "source": _DATASHEET,
    },
    "H200 NVL": {
        "match": ("H200 NVL",),
        "flops_per_s": {
            "bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12,
            "fp32": 60e12, "fp8": 1670.5e12,
        },
        "memory_bytes_per_s": 4.8e12, "source": _DATASHEET,
    },
    "H200": {
        "match": ("H200",),
        "flops_per_s": {
            "bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12,
            "fp32": 66.9e12, "fp8": 1978.9e12,
        },
        "memory_bytes_per_s": 4.8e12, "source": _DATASHEET,
    },
    "A100 SXM 40GB": {
        "match": ("A100-SXM4-40GB", "A100 SXM4 40GB"),
        "flops_per_s": {
            "bf16": 312e12, "fp16": 312e12, "tf32": 156e12,
            "fp32": 19.5e12,
        },
        "memory_bytes_per_s": 1.555e12, "source": _DATASHEET,
    },
    "A100 SXM": {
        "match": ("A100-SXM", "A100 SXM"),
        "flops_per_s": {
            "bf16": 312e12, "fp16": 312e12, "tf32": 156e12,
            "fp32": 19.5e12,
        },
        "memory_bytes_per_s": 2.039e12, "source": _DATASHEET,
    },
    "L40S": {
        "match": ("L40S",),
        "flops_per_s": {
            "bf16": 362e12, "fp16": 362e12, "tf32": 183e12,
            "fp32": 91.6e12, "fp8": 733e12,
        },
        "memory_bytes_per_s": 0.864e12, "source": _DATASHEET,
    },
}

_PRECISION_CLASS = {
    "bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16",
    "float32": "fp32", "fp32": "fp32", "tf32": "tf32",
    "float8": "fp8", "fp8": "fp8", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8",
}


def peak_figures(gpu_name: str | None, dtype: str) -> dict[str, Any] | None:
    """Peak dense FLOP/s for `dtype` and memory bandwidth of a GPU named as NVML names it.

    None when the GPU or the precision is not in PEAK_FIGURES (MFU/MBU are then unavailable).
    """
    if not gpu_name:
        return None
    precision = _PRECISION_CLASS.get(str(dtype).lower().removeprefix("torch."))
    normalized = re.sub(r"[\s_]+", " ", gpu_name.upper())
    for model, entry in PEAK_FIGURES.items():
        if any(pattern.upper() in normalized for pattern in entry["match"]):
            flops = entry["flops_per_s"].get(precision) if precision else None
            if flops is None:
                return None
            return {"gpu_model": model, "dtype": precision, "flops_per_s": flops,
                    "memory_bytes_per_s": entry["memory_bytes_per_s"], "source": entry["source"]}
    return None


def _peak_value(peak: float | Mapping[str, Any] | None, key: str) -> float | None:
    if isinstance(peak, Mapping):
        peak = peak.get(key)
    return float(peak) if peak is not None else None


def mfu(
    flops: float | None, seconds: float | None, peak: float | Mapping[str, Any] | None
) -> float | None:
    """Model FLOPs utilization: achieved FLOP/s over peak FLOP/s (a peak_figures dict or a number)."""
    peak_flops = _peak_value(peak, "flops_per_s")
    if flops is None or not seconds or seconds <= 0 or not peak_flops or peak_flops <= 0:
        return None
    return float(flops) / float(seconds) / peak_flops


def mbu(bytes_moved: float | None, seconds: float | None,
        peak: float | Mapping[str, Any] | None) -> float | None:
    """Memory bandwidth utilization: bytes moved per second over peak memory bandwidth."""
    peak_bandwidth = _peak_value(peak, "memory_bytes_per_s")
    if bytes_moved is None or not seconds or seconds <= 0 or not peak_bandwidth or peak_bandwidth <= 0:
        return None
    return float(bytes_moved) / float(seconds) / peak_bandwidth
