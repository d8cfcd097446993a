"""Selection of loaded prompts (empty, char filters, seeded shuffle, sample) and length statistics."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from llm_energy.artifacts import sha256_json
from llm_energy.datasets.records import PromptRecord, _key
from llm_energy.errors import ConfigError

logger = logging.getLogger(__name__)


def shuffle_key(seed: int, record: PromptRecord) -> str:
    """Sort key of a record for a seeded shuffle: a hash of seed, source id and text. Unlike a
    random permutation it is the same on every Python/numpy version, and a prompt keeps its relative
    position when other prompts are added to or removed from the source."""
    return sha256_json([seed, record.source_id, record.prompt])


def select_records(
    name: str, spec: Mapping[str, Any], records: Sequence[PromptRecord]
) -> tuple[list[PromptRecord], dict[str, int]]:
    """Drop empty prompts, apply the char filters, shuffle, sample. Returns (records, dropped counts)."""
    min_chars, max_chars, sample_size = spec.get("min_chars"), spec.get("max_chars"), spec.get("sample_size")
    if min_chars is not None and max_chars is not None and max_chars < min_chars:
        raise ConfigError(
            _key(name, "max_chars"), f"max_chars ({max_chars}) is below min_chars ({min_chars})", "fix the bounds"
        )
    dropped = {"empty": 0, "min_chars": 0, "max_chars": 0}
    kept = []
    for record in records:
        if not record.prompt.strip():
            dropped["empty"] += 1
        elif min_chars is not None and len(record.prompt) < min_chars:
            dropped["min_chars"] += 1
        elif max_chars is not None and len(record.prompt) > max_chars:
            dropped["max_chars"] += 1
        else:
            kept.append(record)
    if any(dropped.values()):
        logger.info("datasets.%s: dropped %s", name, dropped)
    if not kept:
        raise ConfigError(
            _key(name),
            f"no prompts left out of {len(records)} after dropping empty ones "
            f"and applying min_chars={min_chars}, max_chars={max_chars} ({dropped})",
            "loosen the filters or check the source",
        )
    if spec.get("shuffle"):
        seed = spec.get("seed") or 0
        kept = sorted(kept, key=lambda record: shuffle_key(seed, record))
    if sample_size is not None:
        if sample_size > len(kept):
            raise ConfigError(
                _key(name, "sample_size"),
                f"asks for {sample_size} prompts but only {len(kept)} are available after filtering",
                f"set it to at most {len(kept)}, or null for all of them",
            )
        kept = kept[:sample_size]
    return kept, dropped


def length_stats(values: Sequence[int]) -> dict[str, float]:
    """min, max, mean, p50, p90 (linear interpolation, as numpy's default percentile)."""
    import numpy as np

    array = np.asarray(values, dtype=float)
    return {
        "min": int(array.min()),
        "max": int(array.max()),
        "mean": float(array.mean()),
        "p50": float(np.percentile(array, 50)),
        "p90": float(np.percentile(array, 90)),
    }
