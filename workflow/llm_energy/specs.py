"""Typed, frozen specs of config sections, built from the config schema.

A spec is a frozen dataclass whose fields are exactly the properties of one node of
workflow/schemas/config.schema.json, with no defaults of its own. `section_spec` validates a
(possibly partial) mapping against that node, which fills in the schema's defaults and raises the
same ConfigError as the validation of a whole campaign, then builds the dataclass. So the schema is
the one place for each key's type, default and meaning, and the code that reads a spec needs no
second check of its shape. `SPEC_NODES` lists every spec with its node; tests/unit/test_specs.py
fails when a field and a schema property drift apart.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from llm_energy.config_schema import validate_section

T = TypeVar("T")

# spec class -> (JSON pointer of its schema node, schema properties that are not fields of the spec)
SPEC_NODES: dict[type, tuple[str, frozenset[str]]] = {}


def schema_spec(pointer: str, not_fields: tuple[str, ...] = ()) -> Callable[[type[T]], type[T]]:
    """Register a frozen dataclass as the spec of the schema node at `pointer`. `not_fields` names the
    node's properties the spec leaves to others (e.g. a backend's `variants`, expanded by the config)."""

    def register(cls: type[T]) -> type[T]:
        if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):
            raise TypeError(f"{cls.__name__} must be a frozen dataclass to be a spec")
        SPEC_NODES[cls] = (pointer, frozenset(not_fields))
        return cls

    return register


def build_spec(cls: type[T], values: Mapping[str, Any]) -> T:
    """The spec `cls` from a mapping the schema validated (defaults filled); nested specs recursively.
    Keys that are not fields are left out. A missing field means the schema and the spec drifted."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name not in values:
            raise KeyError(
                f"{cls.__name__}.{field.name}: the validated section has no such key; "
                "the config schema and the spec disagree"
            )
        value = values[field.name]
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            value = build_spec(hint, value)
        elif hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # YAML reads `pue: 1` as an int; the spec's type is float
        kwargs[field.name] = value
    return cls(**kwargs)


def section_spec(cls: type[T], values: Mapping[str, Any] | None) -> T:
    """Validate `values` against the schema node of spec `cls` (defaults filled) and build the spec."""
    pointer, _ = SPEC_NODES[cls]
    return build_spec(cls, validate_section(pointer, values))
