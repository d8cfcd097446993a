"""Describing a model folder without loading its weights: file hashes, safetensors headers, the
checkpoint dtype, parameter counts, key dimensions, the manifest data."""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llm_energy.artifacts import sha256_file
from llm_energy.errors import ArtifactError, ConfigError
from llm_energy.models.specs import BuiltinSpec, HubSpec, LocalSpec, _key

log = logging.getLogger(__name__)


# Weight file suffixes: a model folder without any of them cannot be measured.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Folders inside a model folder that are bookkeeping, not model inputs (huggingface_hub keeps its
# local_dir download metadata in .cache/huggingface).
IGNORED_DIRS = (".cache", ".git", "__pycache__")


_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def hash_model_files(folder: Path) -> dict[str, str]:
    """{path relative to folder: sha256} of every file, bookkeeping folders left out."""
    hashes: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part in IGNORED_DIRS for part in rel.parts[:-1]) or not path.is_file():
            continue
        hashes[rel.as_posix()] = sha256_file(path)
    return hashes


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes) without reading weights."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ArtifactError(f"{path}: not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * 1024 * 1024:
            raise ArtifactError(f"{path}: not a safetensors file (header length {length})")
        try:
            return json.loads(handle.read(length))
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{path}: unreadable safetensors header ({exc})") from None


def safetensors_tensors(folder: Path) -> dict[str, dict[str, Any]]:
    """Every tensor of the folder's safetensors files: {name: {"dtype", "shape"}}."""
    tensors: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        for tensor_name, info in read_safetensors_header(path).items():
            if tensor_name != "__metadata__":
                tensors[tensor_name] = info
    return tensors


def _numel(shape: Iterable[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def checkpoint_dtype(folder: Path, config) -> str | None:
    """The dtype holding most of the checkpoint's parameters; the config's dtype if no safetensors."""
    by_dtype: dict[str, int] = {}
    for info in safetensors_tensors(folder).values():
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"].lower())
        by_dtype[dtype] = by_dtype.get(dtype, 0) + _numel(info["shape"])
    if by_dtype:
        return max(sorted(by_dtype), key=by_dtype.__getitem__)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return None if dtype is None else str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class ParameterCount:
    total: int
    non_embedding: int
    method: str  # "meta_instantiation" or "safetensors_header"


def count_parameters(config, folder: Path | None = None, trust_remote_code: bool = False) -> ParameterCount:
    """Count parameters without loading weights.

    First choice: instantiate the architecture on the `meta` device (shapes only) and sum the unique
    parameters, so tied embeddings count once. Non-embedding parameters leave out every embedding
    table (token and position) and the output projection when it is not tied to the input one.
    Fallback (architecture not instantiable here): the safetensors headers, with embeddings told
    apart by tensor name.
    """
    import torch

    try:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # any architecture transformers cannot build here
        if folder is None:
            raise
        log.warning(
            "cannot instantiate %s on the meta device (%s); counting from safetensors headers",
            getattr(config, "model_type", "?"),
            exc,
        )
        return count_parameters_from_headers(folder)

    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    embedding_ids: set[int] = set()
    embedding = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            for param in module.parameters(recurse=False):
                if id(param) not in embedding_ids:
                    embedding_ids.add(id(param))
                    embedding += param.numel()
    output = model.get_output_embeddings()
    if output is not None and id(output.weight) not in embedding_ids:
        embedding += output.weight.numel()
    return ParameterCount(total=total, non_embedding=total - embedding, method="meta_instantiation")


def count_parameters_from_headers(folder: Path) -> ParameterCount:
    """Count from the safetensors headers; embeddings are told apart by tensor name.

    A checkpoint that stores a tied lm_head twice would count it twice here: this is the fallback.
    """
    tensors = safetensors_tensors(folder)
    if not tensors:
        raise ArtifactError(f"{folder}: no safetensors files to count parameters from")
    total = sum(_numel(t["shape"]) for t in tensors.values())
    embedding_markers = ("embed", "wte", "wpe", "lm_head")
    embedding = sum(_numel(t["shape"]) for n, t in tensors.items() if any(m in n.lower() for m in embedding_markers))
    return ParameterCount(total=total, non_embedding=total - embedding, method="safetensors_header")


def key_dims(config) -> dict[str, Any]:
    """The dimensions every later stage needs, under one naming whatever the architecture."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None)
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if hidden and heads else None)
    intermediate = getattr(text, "intermediate_size", None)
    if intermediate is None and getattr(text, "model_type", None) == "gpt2":
        intermediate = getattr(text, "n_inner", None) or (4 * hidden if hidden else None)
    tie = getattr(config, "tie_word_embeddings", getattr(text, "tie_word_embeddings", None))
    return {
        "hidden_size": hidden,
        "num_hidden_layers": getattr(text, "num_hidden_layers", None),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": intermediate,
        "vocab_size": getattr(text, "vocab_size", None),
        "max_position_embeddings": getattr(text, "max_position_embeddings", None),
        "tie_word_embeddings": bool(tie) if tie is not None else None,
    }


def load_config(name: str, folder: Path, trust_remote_code: bool, key: str):
    """AutoConfig of a model folder; errors name the config key to fix."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise ConfigError(
                _key(name, "trust_remote_code"),
                f"the model in {folder} needs its own code ({exc})",
                "Set it to true only if you trust that repository's code.",
            ) from None
        raise ConfigError(
            key,
            f"{folder}/config.json cannot be read by transformers ({exc})",
            "Point it at a transformers model folder.",
        ) from None
    except OSError as exc:
        raise ConfigError(
            key, f"{folder}/config.json cannot be read ({exc})", "Point it at a transformers model folder."
        ) from None


def describe_model(
    name: str,
    source: str,
    spec: BuiltinSpec | HubSpec | LocalSpec,
    folder: Path,
    model_path: str,
    revision: str | None,
    tokenizer: dict | None,
    key: str,
) -> dict[str, Any]:
    """Manifest data of the model in `folder`."""
    if not any(p.suffix in WEIGHT_SUFFIXES for p in folder.rglob("*") if p.is_file()):
        raise ConfigError(
            key,
            f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {folder}",
            "Point it at a folder with the weights (for hub models, widen allow_patterns, "
            "e.g. add '*.bin' for repositories without safetensors).",
        )
    config = load_config(name, folder, spec.trust_remote_code, key)
    params = count_parameters(config, folder, spec.trust_remote_code)
    spec_record = {"source": source, **asdict(spec)}
    if isinstance(spec, HubSpec):
        spec_record["allow_patterns"] = list(spec.allow_patterns)
    return {
        "name": name,
        "source": source,
        "spec": spec_record,
        "model_path": model_path,
        "architecture": {
            "model_type": config.model_type,
            "architectures": list(getattr(config, "architectures", None) or []),
        },
        "parameter_count": params.total,
        "non_embedding_parameter_count": params.non_embedding,
        "parameter_count_method": params.method,
        "config": key_dims(config),
        "torch_dtype": checkpoint_dtype(folder, config),
        "revision": revision,
        "files": hash_model_files(folder),
        "trust_remote_code": spec.trust_remote_code,
        "tokenizer": tokenizer,
    }
