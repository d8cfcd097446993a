"""Prompt records, what a source loader returns, and access to one `datasets.<name>` spec."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_energy.config_schema import validate_section


@dataclass(frozen=True)
class PromptRecord:
    """One prompt as loaded from a source, before selection and indexing."""

    prompt: str
    source_id: str
    category: str | None = None
    # Synthetic prompts only: the exact token count (without special tokens) the prompt was built for.
    target_tokens: int | None = None


@dataclass
class LoadedSource:
    """What a source loader returns: records plus what it resolved on the way."""

    records: list[PromptRecord]
    # Values that the loader filled in for null spec keys (e.g. the detected prompt column).
    resolved_spec: dict[str, Any] = field(default_factory=dict)
    hub_revision: str | None = None
    source_path: Path | None = None


# ---------------------------------------------------------------------------------------------
# Spec access: prepare_dataset validates the entry against the config schema ($defs/dataset) first,
# so the loaders read keys whose shape is known and check only what needs the data itself.

DATASET_SCHEMA = "#/$defs/dataset"


def _key(name: str, *parts: str) -> str:
    return ".".join(("datasets", name, *parts))


def validated_spec(name: str, spec: Any) -> dict[str, Any]:
    """The entry `datasets.<name>` checked against the config schema, its defaults filled in."""
    return validate_section(DATASET_SCHEMA, spec, prefix=("datasets", name))
