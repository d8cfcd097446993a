"""The datasets stage: load one configured source, select, write `prompts.jsonl` + `manifest.json`."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from llm_energy.artifacts import (
    atomic_write_bytes,
    read_json_artifact,
    sha256_file,
    validate_data,
    write_json_artifact,
)
from llm_energy.datasets.hub_source import _load_hub
from llm_energy.datasets.lengths import _load_synthetic
from llm_energy.datasets.records import LoadedSource, PromptRecord, validated_spec
from llm_energy.datasets.selection import length_stats, select_records
from llm_energy.datasets.sources import _load_bundled, _load_file
from llm_energy.errors import ArtifactError

logger = logging.getLogger(__name__)


PROMPTS_FILENAME = "prompts.jsonl"
MANIFEST_FILENAME = "manifest.json"
MANIFEST_ARTIFACT = "dataset_manifest"

SOURCES = ("bundled", "synthetic", "file", "hub")


# Categories histogram key for prompts without a category.
UNCATEGORIZED = "uncategorized"


_LOADERS: dict[str, Callable[[str, Mapping[str, Any], Any], LoadedSource]] = {
    "bundled": _load_bundled,
    "synthetic": _load_synthetic,
    "file": _load_file,
    "hub": _load_hub,
}


def load_tokenizer(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as exc:  # transformers raises OSError, ValueError, ... for unusable folders
        raise ArtifactError(
            f"{tokenizer_dir}: cannot load a tokenizer with transformers.AutoTokenizer ({type(exc).__name__}: {exc})"
        ) from None


def _token_counts(tokenizer: Any, prompts: Sequence[str], batch_size: int = 512) -> list[int]:
    counts: list[int] = []
    for begin in range(0, len(prompts), batch_size):
        encoded = tokenizer(list(prompts[begin : begin + batch_size]), add_special_tokens=False)
        counts.extend(len(ids) for ids in encoded["input_ids"])
    return counts


def _prompt_lines(records: Sequence[PromptRecord]) -> Iterator[str]:
    for index, record in enumerate(records):
        line: dict[str, Any] = {
            "index": index,
            "prompt": record.prompt,
            "source_id": record.source_id,
            "category": record.category,
        }
        if record.target_tokens is not None:
            line["target_tokens"] = record.target_tokens
        yield json.dumps(line, ensure_ascii=False)


def prepare_dataset(
    name: str,
    spec: dict,
    out_dir: Path,
    tokenizer_dir: Path | None = None,
    provenance: dict | None = None,
) -> dict:
    """Load the data set `datasets.<name>` described by `spec`, select its prompts and write
    `out_dir/prompts.jsonl` and `out_dir/manifest.json`. Returns the manifest data."""
    out_dir = Path(out_dir)
    spec = validated_spec(name, spec)
    source = spec["source"]
    tokenizer = load_tokenizer(Path(tokenizer_dir)) if tokenizer_dir is not None else None

    logger.info("datasets.%s: loading %s source", name, source)
    loaded = _LOADERS[source](name, spec, tokenizer)
    records, dropped = select_records(name, spec, loaded.records)

    payload = ("\n".join(_prompt_lines(records)) + "\n").encode("utf-8")
    prompts_path = out_dir / PROMPTS_FILENAME

    prompts = [record.prompt for record in records]
    if tokenizer is not None:
        token_length = length_stats(_token_counts(tokenizer, prompts))
        tokenizer_info = {
            "path": str(tokenizer_dir),
            "name": str(getattr(tokenizer, "name_or_path", "") or tokenizer_dir),
            "class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer),
            "add_special_tokens": False,
        }
        unavailable_reason = None
    else:
        token_length, tokenizer_info = None, None
        unavailable_reason = "no tokenizer_dir was given to prepare_dataset"

    categories = Counter(record.category if record.category is not None else UNCATEGORIZED for record in records)
    resolved_spec = {**spec, **loaded.resolved_spec}
    manifest = {
        "name": name,
        "source": source,
        "spec": resolved_spec,
        "count": len(records),
        "prompts_sha256": hashlib.sha256(payload).hexdigest(),
        "source_sha256": sha256_file(loaded.source_path) if loaded.source_path else None,
        "char_length": length_stats([len(prompt) for prompt in prompts]),
        "token_length": token_length,
        "tokenizer": tokenizer_info,
        "token_length_unavailable_reason": unavailable_reason,
        "categories": dict(sorted(categories.items())),
        "dropped": dropped,
        "hub_revision": loaded.hub_revision,
    }
    if provenance is None:
        from llm_energy import provenance as provenance_module

        inputs = [p for p in (loaded.source_path, tokenizer_dir) if p is not None]
        provenance = provenance_module.collect(inputs=inputs, include_gpus=False)
    # Validate before replacing anything, so a failure never leaves new prompts beside an old manifest.
    validate_data(MANIFEST_ARTIFACT, manifest, where=str(out_dir / MANIFEST_FILENAME))
    atomic_write_bytes(prompts_path, payload)
    write_json_artifact(out_dir / MANIFEST_FILENAME, MANIFEST_ARTIFACT, manifest, provenance)
    logger.info("datasets.%s: wrote %d prompts to %s", name, len(records), prompts_path)
    return manifest


def load_prompts(dataset_dir: Path) -> list[dict]:
    """Read `prompts.jsonl` of a prepared data set, after checking it against its manifest."""
    dataset_dir = Path(dataset_dir)
    manifest = read_json_artifact(dataset_dir / MANIFEST_FILENAME, MANIFEST_ARTIFACT)["data"]
    prompts_path = dataset_dir / PROMPTS_FILENAME
    if not prompts_path.is_file():
        raise ArtifactError(f"{prompts_path}: not found (its manifest exists); rerun prepare_dataset")
    actual = sha256_file(prompts_path)
    if actual != manifest["prompts_sha256"]:
        raise ArtifactError(
            f"{prompts_path}: sha256 {actual} differs from {manifest['prompts_sha256']} recorded in "
            f"{dataset_dir / MANIFEST_FILENAME}; the file changed after it was prepared. Rerun "
            "prepare_dataset (delete the folder) rather than editing prompts by hand"
        )
    prompts = [json.loads(line) for line in prompts_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(prompts) != manifest["count"]:
        raise ArtifactError(f"{prompts_path}: {len(prompts)} prompts, manifest says {manifest['count']}")
    return prompts
