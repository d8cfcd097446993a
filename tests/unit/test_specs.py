"""The config schema and the typed specs built from it cannot drift apart: every property of a spec's
schema node is a field of the spec with the schema's default and a description, and every field is
a property. Defaults live in the schema only."""

import dataclasses
import typing

# The modules that define specs; importing them registers their specs in SPEC_NODES.
import llm_energy.backends.pytorch  # noqa: F401
import llm_energy.backends.vllm  # noqa: F401
import llm_energy.config  # noqa: F401
import llm_energy.energy  # noqa: F401
import llm_energy.placement  # noqa: F401
import pytest
from llm_energy.config_schema import config_schema, schema_node
from llm_energy.errors import ConfigError
from llm_energy.specs import SPEC_NODES, schema_spec, section_spec

SPECS = sorted(SPEC_NODES, key=lambda cls: cls.__name__)


def test_the_expected_specs_are_registered():
    names = {cls.__name__ for cls in SPECS}
    assert {"EnergySettings", "BaselineSettings", "VllmSettings", "PytorchSettings", "WarmupSpec"} <= names


@pytest.mark.parametrize("spec", SPECS, ids=lambda cls: cls.__name__)
def test_fields_are_exactly_the_schema_properties(spec):
    pointer, not_fields = SPEC_NODES[spec]
    properties = set(schema_node(pointer)["properties"]) - not_fields
    fields = {f.name for f in dataclasses.fields(spec)}
    assert fields - properties == set(), f"{spec.__name__} fields missing from the schema at {pointer}"
    assert properties - fields == set(), f"schema properties at {pointer} missing from {spec.__name__}"


@pytest.mark.parametrize("spec", SPECS, ids=lambda cls: cls.__name__)
def test_every_property_has_a_default_and_a_description_in_the_schema(spec):
    pointer, not_fields = SPEC_NODES[spec]
    for name, node in schema_node(pointer)["properties"].items():
        if name in not_fields:
            continue
        assert "default" in node, f"{pointer}/properties/{name} has no default"
        assert node.get("description"), f"{pointer}/properties/{name} has no description"


@pytest.mark.parametrize("spec", SPECS, ids=lambda cls: cls.__name__)
def test_defaults_live_in_the_schema_only(spec):
    pointer, _ = SPEC_NODES[spec]
    for field in dataclasses.fields(spec):
        assert field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING, (
            f"{spec.__name__}.{field.name} has a default of its own; put it in the schema at {pointer}"
        )
    built = section_spec(spec, {})
    hints = typing.get_type_hints(spec)
    for name, node in schema_node(pointer)["properties"].items():
        if name in SPEC_NODES[spec][1]:
            continue
        value = getattr(built, name)
        if dataclasses.is_dataclass(hints[name]):
            value = dataclasses.asdict(value)
        assert value == node["default"] or (node["default"] == {} and dataclasses.is_dataclass(hints[name])), name


def test_a_spec_that_drifts_from_its_node_fails_to_build():
    @schema_spec("#/properties/energy/properties/baseline")
    @dataclasses.dataclass(frozen=True)
    class Drifted:
        duration_s: float
        window_s: float  # no such property

    with pytest.raises(KeyError, match="Drifted.window_s"):
        section_spec(Drifted, {})
    del SPEC_NODES[Drifted]


def test_section_errors_name_the_key_from_the_config_root():
    from llm_energy.energy import EnergySettings

    with pytest.raises(ConfigError) as info:
        EnergySettings.from_config({"baseline": {"max_age_s": -1}})
    assert info.value.key == "energy.baseline.max_age_s" and ">= 0" in info.value.fix


def test_ints_become_floats_where_the_spec_says_float():
    from llm_energy.energy import EnergySettings

    settings = EnergySettings.from_config({"pue": 1, "baseline": {"duration_s": 5}})
    assert type(settings.pue) is float and type(settings.baseline.duration_s) is float


# -- models.<name>: one spec class per source, against the source's branch of $defs/model --------


@pytest.mark.parametrize("source", ["builtin", "hub", "local"])
def test_model_specs_match_their_source_branch(source):
    from llm_energy.models.specs import SPEC_CLASSES, source_branch

    branch = source_branch(source)["properties"]
    # source selects the branch; max_model_len is the harness's (measure.max_model_len), not the model's.
    properties = set(branch) - {"source", "max_model_len"}
    fields = {f.name for f in dataclasses.fields(SPEC_CLASSES[source])}
    assert fields == properties
    for name in properties:
        node = branch[name]
        if node is True:  # a key of the common part of $defs/model
            node = schema_node("#/$defs/model")["properties"][name]
        assert node.get("description"), f"{source}.{name} has no description"
        required = name in source_branch(source).get("required", [])
        assert required or "default" in node or "x-default" in node, f"{source}.{name} has no default"
    for field in dataclasses.fields(SPEC_CLASSES[source]):
        assert field.default is dataclasses.MISSING, f"{SPEC_CLASSES[source].__name__}.{field.name}"


def test_builtin_defaults_come_from_the_schema():
    from llm_energy.models import parse_spec

    llama, gpt2 = parse_spec("l", {"source": "builtin"}), parse_spec("g", {"source": "builtin", "architecture": "gpt2"})
    assert (llama.hidden_size, llama.num_kv_heads, llama.intermediate_size) == (256, 2, 688)
    assert (gpt2.num_kv_heads, gpt2.intermediate_size) == (None, 1024)


def test_model_errors_name_the_key_and_the_fix():
    from llm_energy.models import parse_spec

    with pytest.raises(ConfigError) as info:
        parse_spec("h", {"source": "hub", "id": "org/model"})
    assert info.value.key == "models.h.revision" and "Pin a commit sha" in info.value.fix
    with pytest.raises(ConfigError) as info:
        parse_spec("b", {"source": "builtin", "hiden_size": 64})
    assert info.value.key == "models.b.hiden_size" and "did you mean 'hidden_size'" in info.value.fix


def test_grid_keys_and_exclude_keys_are_the_schemas():
    # The expansion walks GRID_KEYS in this order (it orders the experiments); an exclude rule may name
    # any of them besides model, backend, variant and dataset.
    from llm_energy.config import GRID_KEYS

    assert GRID_KEYS == tuple(schema_node("#/properties/grid")["properties"])
    exclude_keys = set(schema_node("#/properties/exclude")["items"]["properties"])
    assert exclude_keys == {"model", "backend", "variant", "dataset", *GRID_KEYS}


def test_every_key_of_the_config_schema_is_described():
    """The schema is the file users read to learn the config: no key without a description. A key a
    branch only refines (lognormal's mean > 0) is described where it is declared."""
    missing = []

    def walk(node, path, declared=frozenset()):
        if not isinstance(node, dict):
            return
        properties = node.get("properties") or {}
        for key, sub in properties.items():
            if isinstance(sub, dict) and not sub.get("description") and key not in declared:
                missing.append(f"{path}.{key}")
            walk(sub, f"{path}.{key}")
        for branch in node.get("allOf", []):
            walk(branch.get("then"), path, frozenset(properties))
        for key in ("items", "additionalProperties"):
            walk(node.get(key), f"{path}[]" if key == "items" else f"{path}.*")
        for key, sub in (node.get("$defs") or {}).items():
            walk(sub, f"$defs.{key}")

    walk(config_schema(), "")
    assert missing == []
