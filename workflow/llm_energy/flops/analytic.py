"""Analytic FLOPs: the cost model (a few coefficients every count is made of), the architecture, and
closed-form counts per request, forward and decode step."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Literal

from llm_energy.errors import ConfigError

logger = logging.getLogger(__name__)


# Model types whose layer structure ArchitectureSpec writes out. Others fall back to fit_cost_model.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")

# Bytes per weight / KV-cache element for the dtypes a campaign may name.
DTYPE_BYTES: dict[str, float] = {
    "float32": 4.0,
    "fp32": 4.0,
    "tf32": 4.0,
    "bfloat16": 2.0,
    "bf16": 2.0,
    "float16": 2.0,
    "fp16": 2.0,
    "half": 2.0,
    "float8": 1.0,
    "fp8": 1.0,
    "float8_e4m3fn": 1.0,
    "float8_e5m2": 1.0,
    "int8": 1.0,
    "int4": 0.5,
}


def bytes_per_param(dtype: str) -> float:
    """Bytes per weight (and KV-cache element) for a dtype name such as "bfloat16" or "fp32"."""
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPE_BYTES:
        raise ConfigError(
            "dtype",
            f"'{dtype}' is not a dtype the FLOPs estimate knows",
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
            self.linear_flops_per_token + self.logits_flops_per_position + self.attention_flops_per_query_key * kv_len
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
                model_type=model_type,
                hidden_size=hidden,
                num_layers=int(config.n_layer),
                num_heads=heads,
                num_kv_heads=heads,
                head_dim=hidden // heads,
                intermediate_size=int(inner),
                vocab_size=int(config.vocab_size),
                gated_mlp=False,
                tied_embeddings=tied,
                qkv_bias=True,
                out_proj_bias=True,
                mlp_bias=True,
                norm="layer",
                position_embeddings=int(config.n_positions),
            )
        heads = int(config.num_attention_heads)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = {"llama": attention_bias, "mistral": False, "qwen2": True, "qwen3": attention_bias}[model_type]
        out_bias = {"llama": attention_bias, "mistral": False, "qwen2": False, "qwen3": attention_bias}[model_type]
        mlp_bias = bool(getattr(config, "mlp_bias", False)) if model_type == "llama" else False
        sliding = getattr(config, "sliding_window", None)
        return cls(
            model_type=model_type,
            hidden_size=int(config.hidden_size),
            num_layers=int(config.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            intermediate_size=int(config.intermediate_size),
            vocab_size=int(config.vocab_size),
            gated_mlp=True,
            tied_embeddings=tied,
            qkv_bias=qkv_bias,
            out_proj_bias=out_bias,
            mlp_bias=mlp_bias,
            norm="rms",
            qk_norm=model_type == "qwen3",
            sliding_window=int(sliding) if sliding else None,
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
        model.kv_elements_per_token * kv_len_sum * bytes_per_param if model.kv_elements_per_token is not None else None
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
        arch.cost_model(),
        input_tokens,
        output_tokens,
        bytes_per_param=bytes_per_param,
        prefill_logits=prefill_logits,
    )


def analytic_forward_flops(
    arch: ArchitectureSpec, batch: int, seq_len: int, logits: Literal["all", "last"] = "all"
) -> int:
    """One full forward without KV cache; logits for every position, as a plain forward computes."""
    return arch.cost_model().forward_flops(batch, seq_len, logits=logits)


def analytic_decode_step_flops(arch: ArchitectureSpec, batch: int, kv_len: int) -> int:
    """One decode step: a single new token per sequence attending over `kv_len` keys."""
    return arch.cost_model().decode_step_flops(batch, kv_len)
