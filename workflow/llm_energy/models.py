"""The models stage (`download_model`): build, download or point at a model and describe it.

`prepare_model(name, spec, out_dir)` turns the config entry `models.<name>` into a folder

    out_dir/manifest.json      artifact `model_manifest` (what the model is, its files and their hashes)
    out_dir/weights/           config, tokenizer and safetensors weights (builtin and hub sources)

Three sources:
- `builtin`: a random-weight Llama- or GPT-2-style model with a byte-level BPE tokenizer trained on
  the bundled prompts, built from a seed and a few dimensions. Same seed and dims => byte-identical
  files, so the embedded default campaign needs no network and is reproducible anywhere.
- `hub`: a Hugging Face Hub repository pinned to a revision, fetched with `snapshot_download` (or
  taken from a populated HF cache when offline). The access token comes from env HF_TOKEN only and is
  never recorded.
- `local`: an existing folder with config.json; nothing is copied, its files are hashed.

Parameter counts come from instantiating the architecture on the `meta` device (no memory, no
weights read), with the safetensors headers as a fallback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from llm_energy import hub
from llm_energy.artifacts import read_json_artifact, sha256_file, write_json_artifact
from llm_energy.errors import ArtifactError, ConfigError, SourceUnavailableError

log = logging.getLogger(__name__)

ARTIFACT_NAME = "model_manifest"
MANIFEST_FILENAME = "manifest.json"
WEIGHTS_DIRNAME = "weights"
SOURCES = ("builtin", "hub", "local")
BUILTIN_ARCHITECTURES = ("llama", "gpt2")
SAVE_DTYPES = ("float32", "bfloat16", "float16")

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_PROMPTS = PACKAGE_DIR / "data" / "bundled_prompts.jsonl"

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
# Weight file suffixes: a model folder without any of them cannot be measured.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Folders inside a model folder that are bookkeeping, not model inputs (huggingface_hub keeps its
# local_dir download metadata in .cache/huggingface).
IGNORED_DIRS = (".cache", ".git", "__pycache__")
HUB_PROBE_TIMEOUT_S = 5.0
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


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


# ---------------------------------------------------------------------------------------------
# Builtin models


def read_prompt_corpus(path: Path = BUNDLED_PROMPTS) -> list[str]:
    """The 'prompt' field of each JSON line of `path` (the tokenizer's training text)."""
    if not path.is_file():
        raise ArtifactError(f"{path}: the bundled prompt file is missing; reinstall llm_energy "
                            "(it ships in llm_energy/data)")
    prompts: list[str] = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{path}:{line_no}: expected a JSON object with a 'prompt' ({exc})") from None
        if isinstance(prompt, str) and prompt:
            prompts.append(prompt)
    if not prompts:
        raise ArtifactError(f"{path}: no prompts to train the builtin tokenizer on")
    return prompts


def train_tokenizer(corpus: Iterable[str], vocab_size: int, model_max_length: int | None = None):
    """A byte-level BPE trained on `corpus`, wrapped for transformers (left padding, BOS prepended).

    Byte-level means every text is encodable (no unknown tokens); the vocabulary may end up smaller
    than `vocab_size` when the corpus runs out of pairs to merge.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # Llama-style: every sequence starts with BOS, so prompts look the same in every backend.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, unk_token=UNK_TOKEN,
        padding_side="left",  # decoder-only batches generate from the right edge
        model_max_length=model_max_length,  # lets callers truncate to what the model can take
    )


def builtin_model_config(spec: BuiltinSpec, vocab_size: int, special_ids: Mapping[str, int]):
    """The transformers config of a builtin model (vocab_size already resolved)."""
    from transformers import GPT2Config, LlamaConfig

    ids = dict(pad_token_id=special_ids["pad"], bos_token_id=special_ids["bos"],
               eos_token_id=special_ids["eos"])
    if spec.architecture == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.max_position_embeddings,
            tie_word_embeddings=bool(spec.tie_word_embeddings), **ids,
        )
    else:
        config = GPT2Config(
            vocab_size=vocab_size, n_embd=spec.hidden_size, n_inner=spec.intermediate_size,
            n_layer=spec.num_layers, n_head=spec.num_heads, n_positions=spec.max_position_embeddings,
            tie_word_embeddings=spec.tie_word_embeddings is not False, **ids,
        )
    config.architectures = ["LlamaForCausalLM" if spec.architecture == "llama" else "GPT2LMHeadModel"]
    return config


def build_builtin_model(spec: BuiltinSpec, weights_dir: Path, corpus_path: Path = BUNDLED_PROMPTS) -> dict:
    """Train the tokenizer, initialise random weights from the seed and save both to `weights_dir`.

    Returns facts about the tokenizer for the manifest.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    corpus = read_prompt_corpus(corpus_path)
    tokenizer = train_tokenizer(corpus, spec.tokenizer_vocab_size, spec.max_position_embeddings)
    tokenizer_size = len(tokenizer)
    vocab_size = spec.vocab_size if spec.vocab_size is not None else tokenizer_size
    if vocab_size < tokenizer_size:
        raise ConfigError("vocab_size", f"{vocab_size} is smaller than the tokenizer's {tokenizer_size} "
                          "tokens", "Leave vocab_size out (it defaults to the tokenizer size) or raise it.")
    special_ids = {"pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id,
                   "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id}
    config = builtin_model_config(spec, vocab_size, special_ids)

    log.info("building builtin %s: hidden %d, %d layers, %d heads, vocab %d, seed %d",
             spec.architecture, spec.hidden_size, spec.num_layers, spec.num_heads, vocab_size, spec.seed)
    # fork_rng: seeding must not leak into the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        # Random init needs real memory (a meta tensor has no values): float32 on CPU, then cast.
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    if spec.save_dtype != "float32":
        model = model.to(getattr(torch, spec.save_dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=special_ids["bos"], eos_token_id=special_ids["eos"], pad_token_id=special_ids["pad"],
    )
    weights_dir.mkdir(parents=True, exist_ok=True)
    # One shard: the safetensors header then lists every tensor, and the hash covers the whole model.
    model.save_pretrained(weights_dir, safe_serialization=True, max_shard_size="1000GB")
    tokenizer.save_pretrained(weights_dir)
    del model
    return {
        "kind": "trained_byte_level_bpe",
        "corpus": str(corpus_path.relative_to(PACKAGE_DIR.parent)) if corpus_path.is_relative_to(
            PACKAGE_DIR.parent) else str(corpus_path),
        "corpus_sha256": sha256_file(corpus_path),
        "corpus_prompts": len(corpus),
        "vocab_size_tokens": tokenizer_size,
        "special_token_ids": special_ids,
    }


# ---------------------------------------------------------------------------------------------
# Hub models


def _hub_unreachable_reason(endpoint: str) -> str | None:
    """Why the hub cannot be reached, or None if a TCP connection opens.

    huggingface_hub retries a dead network for about 23 s; one short connect fails fast instead.
    Behind a proxy a direct connection says nothing, so the check is skipped there.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(endpoint)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"cannot connect to {host}:{port} ({exc})"


def _unavailable(name: str, spec: HubSpec, reason: str) -> SourceUnavailableError:
    return SourceUnavailableError(
        f"models.{name}: hub model '{spec.id}' at revision '{spec.revision}' is not available: {reason}. "
        f"Download it on a machine with network (e.g. `hf download {spec.id} --revision {spec.revision} "
        f"--local-dir DIR`) and set models.{name}.source: local with models.{name}.path: DIR, or "
        f"populate the Hugging Face cache (HF_HOME) with it and run again."
    )


def _link_or_copy_tree(src: Path, dst: Path) -> None:
    """Replicate a cache snapshot (symlinks into blobs) as plain files: hard links where possible."""
    for item in sorted(src.rglob("*")):
        target = dst / item.relative_to(src)
        if item.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        real = item.resolve()
        target.unlink(missing_ok=True)
        try:
            os.link(real, target)  # no second copy of multi-GB weights
        except OSError:
            shutil.copy2(real, target)


def _local_dir_commit(weights_dir: Path) -> str | None:
    """The commit huggingface_hub recorded for a local_dir download (first line of each .metadata)."""
    commits: set[str] = set()
    meta_root = weights_dir / ".cache" / "huggingface" / "download"
    for meta in meta_root.rglob("*.metadata"):
        first = meta.read_text(errors="replace").splitlines()[:1]
        if first and _COMMIT_RE.match(first[0].strip()):
            commits.add(first[0].strip())
    if len(commits) > 1:
        log.warning("%s holds files of several commits %s", weights_dir, sorted(commits))
        return None
    return commits.pop() if commits else None


def download_hub_model(name: str, spec: HubSpec, weights_dir: Path) -> str:
    """Fetch `spec` into `weights_dir`; returns the resolved commit sha.

    A populated HF cache is used first (no network needed); otherwise the files are downloaded with
    snapshot_download(local_dir=weights_dir). Offline or unreachable => SourceUnavailableError, fast.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, IncompleteSnapshotError, LocalEntryNotFoundError

    token = os.environ.get("HF_TOKEN") or False  # False: never fall back to a stored token file
    patterns = list(spec.allow_patterns)
    cache_dir = hub.cache_dir()

    cache_miss = f"the HF cache ({cache_dir}) does not hold it"
    try:
        cached = snapshot_download(spec.id, revision=spec.revision, cache_dir=cache_dir,
                                   allow_patterns=patterns, local_files_only=True, token=token)
    except IncompleteSnapshotError:
        cached, cache_miss = None, f"the HF cache ({cache_dir}) holds only part of it"
    except (LocalEntryNotFoundError, OSError, ValueError):
        cached = None
    if cached is not None and Path(cached).is_dir():
        commit = Path(cached).name  # .../snapshots/<commit>
        log.info("hub model %s@%s found in the HF cache (commit %s)", spec.id, spec.revision, commit)
        if weights_dir.exists():
            shutil.rmtree(weights_dir)  # files of another revision would pollute the hashes
        _link_or_copy_tree(Path(cached), weights_dir)
        return commit

    if hub.offline("TRANSFORMERS_OFFLINE"):
        raise _unavailable(name, spec, f"offline mode (HF_HUB_OFFLINE) is on and {cache_miss}")
    endpoint = hub.endpoint()
    reason = _hub_unreachable_reason(endpoint)
    if reason:
        raise _unavailable(name, spec, reason)

    previous = _local_dir_commit(weights_dir) if weights_dir.exists() else None
    if previous and _COMMIT_RE.match(spec.revision) and previous != spec.revision:
        shutil.rmtree(weights_dir)  # an interrupted download of the same commit resumes; another is wiped
    log.info("downloading %s@%s (%s) into %s", spec.id, spec.revision, patterns, weights_dir)
    try:
        snapshot_download(spec.id, revision=spec.revision, local_dir=weights_dir, cache_dir=cache_dir,
                          allow_patterns=patterns, token=token, endpoint=endpoint)
    except LocalEntryNotFoundError as exc:
        raise _unavailable(name, spec, f"download failed ({type(exc).__name__})") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        hint = " (gated or private: set env HF_TOKEN to a token with access)" if status in (401, 403) else ""
        # str(exc) carries the URL and server message, never the token.
        raise _unavailable(name, spec, f"the hub answered {status}{hint}: {exc}") from None

    if _COMMIT_RE.match(spec.revision):
        return spec.revision
    commit = _local_dir_commit(weights_dir)
    if commit is None:
        ref = cache_dir / f"models--{spec.id.replace('/', '--')}" / "refs" / spec.revision
        commit = ref.read_text().strip() if ref.is_file() else None
    if commit is None:
        raise ArtifactError(f"{weights_dir}: downloaded {spec.id}@{spec.revision} but could not tell "
                            f"which commit it resolved to; pin models.{name}.revision to a commit sha")
    return commit


# ---------------------------------------------------------------------------------------------
# Describing a model folder


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
        log.warning("cannot instantiate %s on the meta device (%s); counting from safetensors headers",
                    getattr(config, "model_type", "?"), exc)
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
    embedding = sum(_numel(t["shape"]) for n, t in tensors.items()
                    if any(m in n.lower() for m in embedding_markers))
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
            raise ConfigError(_key(name, "trust_remote_code"),
                              f"the model in {folder} needs its own code ({exc})",
                              "Set it to true only if you trust that repository's code.") from None
        raise ConfigError(key, f"{folder}/config.json cannot be read by transformers ({exc})",
                          "Point it at a transformers model folder.") from None
    except OSError as exc:
        raise ConfigError(key, f"{folder}/config.json cannot be read ({exc})",
                          "Point it at a transformers model folder.") from None


def describe_model(
    name: str, source: str, spec: BuiltinSpec | HubSpec | LocalSpec, folder: Path, model_path: str,
    revision: str | None, tokenizer: dict | None, key: str,
) -> dict[str, Any]:
    """Manifest data of the model in `folder`."""
    if not any(p.suffix in WEIGHT_SUFFIXES for p in folder.rglob("*") if p.is_file()):
        raise ConfigError(key, f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {folder}",
                          "Point it at a folder with the weights (for hub models, widen allow_patterns, "
                          "e.g. add '*.bin' for repositories without safetensors).")
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


# ---------------------------------------------------------------------------------------------
# The stage


def _default_provenance(inputs: list[Path]) -> dict:
    from llm_energy import provenance as provenance_module

    # A model folder does not depend on the GPU; leaving GPUs out keeps the stage GPU-free.
    return provenance_module.collect(inputs=[p for p in inputs if p.exists()], include_gpus=False)


def _fresh_dir(parent: Path, prefix: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=parent, prefix=prefix))


def prepare_model(name: str, spec: dict, out_dir: Path, provenance: dict | None = None) -> dict:
    """Build, download or locate model `name` and write `out_dir/manifest.json`; returns its data.

    builtin and hub models land in `out_dir/weights/`; a local model stays where it is.
    """
    out_dir = Path(out_dir)
    parsed = parse_spec(name, spec)
    source = spec["source"]
    weights_dir = out_dir / WEIGHTS_DIRNAME
    inputs: list[Path] = []

    if isinstance(parsed, BuiltinSpec):
        # Build beside the final folder and swap it in: a killed build never leaves half a model.
        staging = _fresh_dir(out_dir, ".weights-build-")
        try:
            try:
                tokenizer_facts = build_builtin_model(parsed, staging)
            except ConfigError as exc:
                raise ConfigError(_key(name, exc.key), exc.problem, exc.fix) from None
            if weights_dir.exists():
                shutil.rmtree(weights_dir)
            staging.rename(weights_dir)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        inputs.append(BUNDLED_PROMPTS)
        data = describe_model(name, source, parsed, weights_dir, WEIGHTS_DIRNAME, None, tokenizer_facts,
                              key=f"models.{name}")
    elif isinstance(parsed, HubSpec):
        commit = download_hub_model(name, parsed, weights_dir)
        if not (weights_dir / "config.json").is_file():
            raise ConfigError(_key(name, "allow_patterns"),
                              f"{parsed.id}@{parsed.revision} has no config.json among the fetched files",
                              "Include '*.json' in allow_patterns (and check that the repository is a "
                              "transformers model).")
        data = describe_model(name, source, parsed, weights_dir, WEIGHTS_DIRNAME, commit, None,
                              key=_key(name, "allow_patterns"))
    else:
        folder = Path(parsed.path).expanduser()
        key = _key(name, "path")
        if not folder.is_dir():
            raise ConfigError(key, f"folder '{folder}' does not exist",
                              "Point it at a model folder (with config.json) on this machine.")
        if not (folder / "config.json").is_file():
            raise ConfigError(key, f"folder '{folder}' has no config.json",
                              "Point it at the folder of a transformers model (the one holding config.json).")
        folder = folder.resolve()
        data = describe_model(name, source, parsed, folder, str(folder), None, None, key=key)

    if provenance is None:
        provenance = _default_provenance(inputs)
    write_json_artifact(out_dir / MANIFEST_FILENAME, ARTIFACT_NAME, data, provenance)
    log.info("model %s: %s, %d parameters (%d non-embedding), dtype %s -> %s", name,
             data["architecture"]["model_type"], data["parameter_count"],
             data["non_embedding_parameter_count"], data["torch_dtype"], out_dir / MANIFEST_FILENAME)
    return data


def _manifest_file(path: Path | str) -> Path:
    path = Path(path)
    return path / MANIFEST_FILENAME if path.is_dir() else path


def read_model_manifest(path: Path | str) -> dict:
    """The data of a model manifest (path to manifest.json or to its folder), validated."""
    return read_json_artifact(_manifest_file(path), ARTIFACT_NAME)["data"]


def resolve_model_path(manifest_path: Path | str) -> Path:
    """The folder to load weights and tokenizer from (model_path, relative to the manifest's folder)."""
    manifest_path = _manifest_file(manifest_path)
    data = read_model_manifest(manifest_path)
    model_path = Path(data["model_path"])
    if not model_path.is_absolute():
        model_path = manifest_path.resolve().parent / model_path
    if not (model_path / "config.json").is_file():
        raise ArtifactError(f"{manifest_path}: model folder {model_path} is missing or has no config.json; "
                            "run the download_model rule again")
    return model_path
