"""The config entry `models.<name>` as a typed spec per source (builtin, hub, local).

The config schema (`$defs/model`) checks each entry's shape: types, ranges, enums, required keys,
unknown keys. `parse_spec` validates an entry against it (so `prepare_model`, a public function,
reports a bad value exactly as the campaign's validation does) and adds only the checks a schema
cannot express: one dimension against another.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llm_energy.config_schema import schema_node, validate_section
from llm_energy.errors import ConfigError

log = logging.getLogger(__name__)

MODEL_SCHEMA = "#/$defs/model"
SOURCES = ("builtin", "hub", "local")
BUILTIN_ARCHITECTURES = ("llama", "gpt2")
SAVE_DTYPES = ("float32", "bfloat16", "float16")

# Special tokens of the builtin tokenizer; their ids are fixed by this order (the BPE trainer puts
# special tokens first), so pad=0, bos=1, eos=2, unk=3 for every builtin model.
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)

# What a hub download fetches when allow_patterns is null: weights in safetensors, every JSON
# (config, generation config, tokenizer config, safetensors index) and the usual tokenizer vocabularies.
DEFAULT_HUB_ALLOW_PATTERNS = (
    "*.safetensors",
    "*.json",
    "tokenizer.model",
    "*.tiktoken",
    "vocab.txt",
    "merges.txt",
)


@dataclass(frozen=True)
class BuiltinSpec:
    """A random-weight model built locally. Every field is a key of the schema's builtin branch; the
    dimensions a campaign leaves out take that branch's `x-default` (see `builtin_defaults`)."""

    architecture: str
    seed: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None  # llama only (GQA)
    intermediate_size: int
    vocab_size: int | None  # None: the tokenizer's size
    max_position_embeddings: int
    tokenizer_vocab_size: int
    save_dtype: str
    # None: the architecture's habit (GPT-2 ties, Llama-3.1-8B does not; Llama-3.2-1B/3B do).
    tie_word_embeddings: bool | None
    trust_remote_code: bool


@dataclass(frozen=True)
class HubSpec:
    id: str
    revision: str
    allow_patterns: tuple[str, ...]
    trust_remote_code: bool


@dataclass(frozen=True)
class LocalSpec:
    path: str
    trust_remote_code: bool


SPEC_CLASSES = {"builtin": BuiltinSpec, "hub": HubSpec, "local": LocalSpec}


def _key(name: str, field_name: str) -> str:
    return f"models.{name}.{field_name}"


def source_branch(source: str) -> dict:
    """The schema's `then` branch of one model source (its own keys and their meanings)."""
    for branch in schema_node(MODEL_SCHEMA)["allOf"]:
        if branch["if"]["properties"]["source"]["const"] == source:
            return branch["then"]
    raise KeyError(f"the config schema has no model source {source!r}")


def builtin_defaults(architecture: str) -> dict[str, Any]:
    """The dimensions of a builtin model that a campaign leaves out, from the schema's `x-default`
    (per architecture where it is a mapping). They are filled when the model is built rather than as
    schema `default`s: a default is written into the validated config, which every experiment id
    hashes, so it would change the ids of every campaign that leaves the dimension out."""
    defaults = {}
    for key, node in source_branch("builtin")["properties"].items():
        if isinstance(node, Mapping) and "x-default" in node:
            value = node["x-default"]
            defaults[key] = value.get(architecture) if isinstance(value, Mapping) else value
    return defaults


def parse_spec(name: str, spec: Mapping[str, Any]) -> BuiltinSpec | HubSpec | LocalSpec:
    """Check the config entry `models.<name>` and fill defaults. Raises ConfigError naming the key."""
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"models.{name}", f"expected a mapping, got {spec!r}", "Give the model a mapping with at least 'source'."
        )
    values = validate_section(MODEL_SCHEMA, spec, prefix=("models", name))
    values.pop("max_model_len")  # the harness's, not the model folder's
    source = values.pop("source")
    if source == "builtin":
        return _parse_builtin(name, values)
    if source == "hub":
        patterns = values["allow_patterns"]
        patterns = DEFAULT_HUB_ALLOW_PATTERNS if patterns is None else tuple(patterns)
        if values["trust_remote_code"] and values["allow_patterns"] is None:
            patterns += ("*.py",)  # remote code lives in the repository's .py files
        return HubSpec(
            id=values["id"],
            revision=values["revision"].strip(),
            allow_patterns=patterns,
            trust_remote_code=values["trust_remote_code"],
        )
    return LocalSpec(**values)


def _parse_builtin(name: str, values: dict[str, Any]) -> BuiltinSpec:
    architecture = values["architecture"]
    if architecture == "gpt2" and values.get("num_kv_heads") is not None:
        raise ConfigError(
            _key(name, "num_kv_heads"),
            "GPT-2 has no grouped-query attention",
            "Remove it, or use architecture 'llama'.",
        )
    spec = BuiltinSpec(**{**builtin_defaults(architecture), **values})
    if spec.hidden_size % spec.num_heads:
        raise ConfigError(
            _key(name, "num_heads"),
            f"hidden_size {spec.hidden_size} is not divisible by num_heads {spec.num_heads}",
            "Pick num_heads dividing hidden_size (head_dim 64 suits every backend).",
        )
    if spec.num_kv_heads is not None and spec.num_heads % spec.num_kv_heads:
        raise ConfigError(
            _key(name, "num_kv_heads"),
            f"num_heads {spec.num_heads} is not a multiple of num_kv_heads {spec.num_kv_heads}",
            "Pick num_kv_heads dividing num_heads.",
        )
    head_dim = spec.hidden_size // spec.num_heads
    if head_dim % 32:
        log.warning("models.%s: head_dim %d; vLLM's CPU attention needs a multiple of 32 (64 is safe)", name, head_dim)
    return spec
