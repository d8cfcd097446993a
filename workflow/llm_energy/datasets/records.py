"""Prompt records, what a source loader returns, and access to one `datasets.<name>` spec."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_energy.errors import ConfigError


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
# Spec access: the config schema validated the entry already, but prepare_dataset is also a public
# function, so every value a user can get wrong is checked again with a message naming its key.


def _key(name: str, *parts: str) -> str:
    return ".".join(("datasets", name, *parts))


def _optional_int(spec: Mapping[str, Any], name: str, item: str, minimum: int) -> int | None:
    value = spec.get(item)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(_key(name, item), f"must be an integer >= {minimum} or null, got {value!r}",
                          f"set it to a whole number of at least {minimum}, or null for no limit")
    return value


def _required(spec: Mapping[str, Any], name: str, item: str, hint: str) -> Any:
    value = spec.get(item)
    if value is None:
        raise ConfigError(_key(name, item), "is missing", hint)
    return value
