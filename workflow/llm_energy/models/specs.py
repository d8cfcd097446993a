"""The config entry `models.<name>` as a typed spec per source (builtin, hub, local), defaults filled."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llm_energy.errors import ConfigError


log = logging.getLogger(__name__)


SOURCES = ("builtin", "hub", "local")
BUILTIN_ARCHITECTURES = ("llama", "gpt2")
SAVE_DTYPES = ("float32", "bfloat16", "float16")


# Special tokens of the builtin tokenizer; their ids are fixed by this order (the BPE trainer puts
# special tokens first), so pad=0, bos=1, eos=2, unk=3 for every builtin model.
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)

# What a hub download fetches by default: weights in safetensors, every JSON (config, generation
# config, tokenizer config, safetensors index) and the usual tokenizer vocabularies.
DEFAULT_HUB_ALLOW_PATTERNS = (
    "*.safetensors",
    "*.json",
    "tokenizer.model",
    "*.tiktoken",
    "vocab.txt",
    "merges.txt",
)


# ---------------------------------------------------------------------------------------------
# Specs (the config entry models.<name>, defaults filled)


@dataclass(frozen=True)
class BuiltinSpec:
    """A random-weight model built locally. Dims left None take the tiny defaults."""

    architecture: str = "llama"
    seed: int = 0
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # llama only (GQA); default 2
    intermediate_size: int | None = None  # default 688 (llama) / 1024 (gpt2)
    vocab_size: int | None = None  # default: the tokenizer's size
    max_position_embeddings: int = 2048
    tokenizer_vocab_size: int = 2048
    save_dtype: str = "float32"
    # None: the architecture's habit (GPT-2 ties, Llama-3.1-8B does not; Llama-3.2-1B/3B do).
    tie_word_embeddings: bool | None = None
    trust_remote_code: bool = False


@dataclass(frozen=True)
class HubSpec:
    id: str
    revision: str
    allow_patterns: tuple[str, ...] = DEFAULT_HUB_ALLOW_PATTERNS
    trust_remote_code: bool = False


@dataclass(frozen=True)
class LocalSpec:
    path: str
    trust_remote_code: bool = False


_SPEC_CLASSES = {"builtin": BuiltinSpec, "hub": HubSpec, "local": LocalSpec}
# Keys every source accepts besides its own (the config schema may carry them for other stages).
_COMMON_KEYS = {"source"}


def _key(name: str, field_name: str) -> str:
    return f"models.{name}.{field_name}"


def _require_type(name: str, field_name: str, value: Any, types: type | tuple[type, ...], what: str):
    # bool is an int subclass: a `true` where a number belongs is a typo, not 1.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ConfigError(_key(name, field_name), f"expected {what}, got {value!r}", f"Set it to {what}.")
    if not isinstance(value, types):
        raise ConfigError(_key(name, field_name), f"expected {what}, got {value!r}", f"Set it to {what}.")
    return value


def parse_spec(name: str, spec: Mapping[str, Any]) -> BuiltinSpec | HubSpec | LocalSpec:
    """Check the config entry `models.<name>` and fill defaults. Raises ConfigError naming the key."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"models.{name}", f"expected a mapping, got {spec!r}",
                          "Give the model a mapping with at least 'source'.")
    source = spec.get("source")
    if source not in SOURCES:
        raise ConfigError(_key(name, "source"), f"unknown source {source!r}",
                          f"Use one of {list(SOURCES)}.")
    cls = _SPEC_CLASSES[source]
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(spec) - known - _COMMON_KEYS)
    if unknown:
        # Other stages may read extra keys; a typo of ours is the likelier cause, so say it loudly.
        log.warning("models.%s: keys %s are not used by source '%s' (known: %s)",
                    name, unknown, source, sorted(known))
    values = {k: spec[k] for k in known if k in spec and spec[k] is not None}
    if "trust_remote_code" in values:
        _require_type(name, "trust_remote_code", values["trust_remote_code"], bool, "true or false")

    if source == "builtin":
        return _parse_builtin(name, values)
    if source == "hub":
        return _parse_hub(name, values)
    path = values.get("path")
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ConfigError(_key(name, "path"), "missing for source 'local'",
                          "Set it to a folder that holds config.json and the weights.")
    return LocalSpec(path=str(path), trust_remote_code=values.get("trust_remote_code", False))


def _parse_builtin(name: str, values: dict[str, Any]) -> BuiltinSpec:
    architecture = values.get("architecture", "llama")
    if architecture not in BUILTIN_ARCHITECTURES:
        raise ConfigError(_key(name, "architecture"), f"unknown builtin architecture {architecture!r}",
                          f"Use one of {list(BUILTIN_ARCHITECTURES)}.")
    ints = ("seed", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
            "vocab_size", "max_position_embeddings", "tokenizer_vocab_size")
    for field_name in ints:
        if field_name in values:
            _require_type(name, field_name, values[field_name], int, "an integer")
            if field_name != "seed" and values[field_name] <= 0:
                raise ConfigError(_key(name, field_name), f"must be positive, got {values[field_name]}",
                                  "Set a positive integer.")
    if architecture == "gpt2" and "num_kv_heads" in values:
        raise ConfigError(_key(name, "num_kv_heads"), "GPT-2 has no grouped-query attention",
                          "Remove it, or use architecture 'llama'.")
    if "tie_word_embeddings" in values:
        _require_type(name, "tie_word_embeddings", values["tie_word_embeddings"], bool, "true or false")
    save_dtype = values.get("save_dtype", "float32")
    if save_dtype not in SAVE_DTYPES:
        raise ConfigError(_key(name, "save_dtype"), f"unknown dtype {save_dtype!r}",
                          f"Use one of {list(SAVE_DTYPES)}.")
    if architecture == "llama":
        values.setdefault("num_kv_heads", 2)
        values.setdefault("intermediate_size", 688)
    else:
        values.setdefault("intermediate_size", 1024)
    spec = BuiltinSpec(**values)
    if spec.hidden_size % spec.num_heads:
        raise ConfigError(_key(name, "num_heads"),
                          f"hidden_size {spec.hidden_size} is not divisible by num_heads {spec.num_heads}",
                          "Pick num_heads dividing hidden_size (head_dim 64 suits every backend).")
    if spec.num_kv_heads is not None and spec.num_heads % spec.num_kv_heads:
        raise ConfigError(_key(name, "num_kv_heads"),
                          f"num_heads {spec.num_heads} is not a multiple of num_kv_heads {spec.num_kv_heads}",
                          "Pick num_kv_heads dividing num_heads.")
    if spec.tokenizer_vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(_key(name, "tokenizer_vocab_size"),
                          f"{spec.tokenizer_vocab_size} is below the 256 byte symbols plus "
                          f"{len(SPECIAL_TOKENS)} special tokens",
                          f"Set at least {256 + len(SPECIAL_TOKENS)}.")
    head_dim = spec.hidden_size // spec.num_heads
    if head_dim % 32:
        log.warning("models.%s: head_dim %d; vLLM's CPU attention needs a multiple of 32 (64 is safe)",
                    name, head_dim)
    return spec


def _parse_hub(name: str, values: dict[str, Any]) -> HubSpec:
    repo_id = values.get("id")
    if not isinstance(repo_id, str) or not repo_id:
        raise ConfigError(_key(name, "id"), "missing for source 'hub'",
                          "Set it to the repository id, e.g. 'meta-llama/Llama-3.2-1B'.")
    revision = values.get("revision")
    if not isinstance(revision, str) or not revision.strip():
        raise ConfigError(_key(name, "revision"), f"missing for hub model '{repo_id}'",
                          "Pin a commit sha (40 hex digits) or a tag, so that every run measures the "
                          "same weights; find the sha on the repository's 'Files and versions' page.")
    patterns = values.get("allow_patterns", DEFAULT_HUB_ALLOW_PATTERNS)
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError(_key(name, "allow_patterns"), f"expected a list of glob patterns, got {patterns!r}",
                          "List the files to fetch, e.g. ['*.safetensors', '*.json'].")
    trust_remote_code = values.get("trust_remote_code", False)
    patterns = tuple(patterns)
    if trust_remote_code and "*.py" not in patterns and "allow_patterns" not in values:
        patterns += ("*.py",)  # remote code lives in the repository's .py files
    return HubSpec(id=repo_id, revision=revision.strip(), allow_patterns=patterns,
                   trust_remote_code=trust_remote_code)
