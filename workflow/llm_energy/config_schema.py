"""The config schema (workflow/schemas/config.schema.json): loading it, a validator that fills each
property's `default`, and the translation of a schema error into a ConfigError naming the key and
the fix. `config` validates the whole campaign with it and `specs` one section at a time, so both
report a bad value the same way."""

from __future__ import annotations

import copy
import difflib
import json
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import jsonschema

from llm_energy.artifacts import SCHEMA_DIR
from llm_energy.errors import ConfigError

CONFIG_SCHEMA_PATH = SCHEMA_DIR / "config.schema.json"
_BOUNDS = {
    "minimum": "below the minimum of",
    "maximum": "above the maximum of",
    "exclusiveMinimum": "not above",
    "exclusiveMaximum": "not below",
}
_FIX_BOUNDS = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}


@lru_cache(maxsize=1)
def config_schema() -> dict:
    return json.loads(CONFIG_SCHEMA_PATH.read_text())


@lru_cache(maxsize=1)
def validator_filling_defaults():
    """A Draft 2020-12 validator that also writes each property's `default` into the instance."""
    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def properties_with_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if isinstance(subschema, dict) and "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": properties_with_defaults})


def _dotted(path) -> str:
    """['grid', 'batch_size', 0] -> 'grid.batch_size[0]'"""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _resolve_ref(schema: Mapping, ref: str) -> Any:
    """The subschema a local `$ref` ("#/$defs/model", "#/properties/backend_settings/properties/vllm") names."""
    node: Any = schema
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def _allowed_keys(schema: Mapping, instance_path: list) -> list[str]:
    """The keys a mapping at `instance_path` may hold (for 'did you mean' hints)."""
    node: Any = schema
    for part in instance_path:
        if not isinstance(node, Mapping):
            return []
        if isinstance(part, int):
            node = node.get("items", {})
        elif part in node.get("properties", {}):
            node = node["properties"][part]
        elif isinstance(node.get("additionalProperties"), Mapping):
            node = node["additionalProperties"]
        else:
            return []
        if "$ref" in node:
            node = _resolve_ref(schema, node["$ref"])
    keys = set(node.get("properties", {}))
    for branch in node.get("allOf", []):
        keys |= set(branch.get("then", {}).get("properties", {}))
    return sorted(keys)


def error_to_config_error(error: jsonschema.ValidationError, schema: dict, prefix: tuple = ()) -> ConfigError:
    """The ConfigError of one schema error; `prefix` is where the validated instance sits in the config."""
    path = [*prefix, *error.absolute_path]
    key = _dotted(path)
    if error.validator == "additionalProperties":
        unexpected = re.findall(r"'([^']+)'", error.message.split("(")[-1])
        bad = unexpected[0] if unexpected else "?"
        allowed = _allowed_keys(schema, path)
        close = difflib.get_close_matches(bad, allowed, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return ConfigError(
            _dotted(path + [bad]),
            "unknown key",
            f"{hint}Remove it or use one of: {', '.join(allowed)}.",
        )
    # A schema node may say how to fix what it rejects: "x-fix" (its value), "x-fix-required" (per
    # required key). jsonschema ignores these keywords; they keep each hint beside its key.
    node = error.schema if isinstance(error.schema, Mapping) else {}
    if error.validator == "required":
        missing = re.findall(r"'([^']+)'", error.message)
        name = missing[0] if missing else "?"
        fix = node.get("x-fix-required", {}).get(name, f"Add '{name}' under '{key}'.")
        return ConfigError(_dotted(path + [name]), "is required but missing", fix)
    if error.validator == "enum":
        options = ", ".join(json.dumps(v) for v in error.validator_value)
        return ConfigError(key, f"{json.dumps(error.instance)} is not allowed", f"Use one of: {options}.")
    if error.validator == "pattern":
        if "propertyNames" in error.schema_path:  # a name chosen by the user (a model, a variant)
            return ConfigError(
                _dotted(path + [str(error.instance)]),
                f"the name does not match the pattern {error.validator_value}",
                "Rename it with the characters the pattern allows.",
            )
        return ConfigError(
            key,
            f"{json.dumps(error.instance)} does not match the pattern {error.validator_value}",
            node.get("x-fix", "Change it to match the pattern."),
        )
    if error.validator in _BOUNDS:
        bound = error.validator_value
        return ConfigError(
            key,
            f"{json.dumps(error.instance)} is {_BOUNDS[error.validator]} {bound}",
            node.get("x-fix", f"Use a value {_FIX_BOUNDS[error.validator]} {bound}."),
        )
    if error.validator == "type":
        expected = error.validator_value
        return ConfigError(
            key,
            f"has type {type(error.instance).__name__} ({json.dumps(error.instance)})",
            f"It must be of type {expected}.",
        )
    return ConfigError(
        key, error.message, node.get("x-fix", "See workflow/schemas/config.schema.json for what it accepts.")
    )


def raise_first_error(validator: Any, instance: Any, schema: dict, prefix: tuple = ()) -> None:
    """Validate `instance`; raise the ConfigError of its most useful error, if any."""
    errors = list(validator.iter_errors(instance))
    if not errors:
        return
    # The deepest, most specific error is the most useful one to show.
    best = max(errors, key=lambda e: (len(e.absolute_path), e.validator != "if"))
    nested = list(best.context or [])
    if nested:
        best = jsonschema.exceptions.best_match(nested)
    raise error_to_config_error(best, schema, prefix)


def schema_node(pointer: str) -> dict:
    """The node of the config schema at a JSON pointer such as "#/properties/energy"."""
    return _resolve_ref(config_schema(), pointer)


def validate_section(pointer: str, values: Any, prefix: tuple[str, ...] | None = None) -> dict:
    """A copy of one config section (the mapping at `pointer`, e.g. "#/properties/energy"), validated
    against its schema node with the defaults filled in. Errors name the key from the config's root,
    as whole-config validation does (energy.pue, backend_settings.vllm.streaming); `prefix` says where
    the section sits where the pointer does not (a `$defs` node: ("models", name))."""
    schema = config_schema()
    if prefix is None:
        prefix = tuple(part for part in pointer.removeprefix("#/").split("/")[1::2])
    # A mapping is copied (defaults are filled into the copy); anything else is the schema's to reject.
    if values is None:
        values = {}
    instance = copy.deepcopy(dict(values) if isinstance(values, Mapping) else values)
    # evolve keeps the root's reference resolver, so $refs inside the node still resolve.
    validator = validator_filling_defaults()(schema).evolve(schema=schema_node(pointer))
    raise_first_error(validator, instance, schema, prefix)
    return instance
