"""Unit tests of llm_energy.config: validation (with defaults), error messages and expansion."""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from llm_energy.config import (
    Campaign,
    backend_variants,
    expand_experiments,
    load_campaign,
    load_campaign_file,
    validate_config,
)
from llm_energy.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "config" / "config.yaml"
CAMPAIGN_FILES = sorted((REPO_ROOT / "config" / "campaigns").glob("*.yaml"))
# model.backend[-variant].dataset.label.hash8
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]+\.[a-z_]+(-[a-z0-9_]+)?\.[A-Za-z0-9_-]+\.[A-Za-z0-9_.-]+\.[0-9a-f]{8}$")


def default_raw() -> dict[str, Any]:
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


def minimal_raw() -> dict[str, Any]:
    return {
        "models": {"m": {"source": "builtin"}},
        "datasets": {"d": {"source": "bundled"}},
        "backends": ["pytorch"],
    }


def raises_config_error(raw: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_campaign(raw)
    return info.value


# ---------------------------------------------------------------------------------------------
# The shipped configs


def test_default_config_validates_and_expands_to_four_experiments() -> None:
    campaign = load_campaign_file(DEFAULT_CONFIG)
    # 2 models x 1 backend x 1 dataset x 2 batch sizes; every other grid axis has one value.
    assert len(campaign.experiments) == 4
    assert campaign.cycles == 2
    assert {(e.model, e.parameters["batch_size"]) for e in campaign.experiments.values()} == {
        ("tiny-llama", 1),
        ("tiny-llama", 4),
        ("tiny-gpt2", 1),
        ("tiny-gpt2", 4),
    }
    for eid, experiment in campaign.experiments.items():
        assert experiment.id == eid
        assert ID_PATTERN.match(eid), eid
        assert experiment.backend == "pytorch"
        assert experiment.dataset == "bundled"
        assert dataclasses.asdict(experiment.warmup) == {
            "min_batches": 2,
            "stable_batches": 2,
            "tolerance": 0.25,
            "max_s": 10,
        }
        assert experiment.min_window_s == 0.5 and experiment.cycle_isolation == "experiment"
        assert experiment.seed == 1234
        assert experiment.requests_per_cycle is None
        assert experiment.parameters == {
            "batch_size": experiment.parameters["batch_size"],
            "dtype": "float32",
            "max_input_tokens": 128,
            "max_output_tokens": 16,
            "output_length": "fixed",
            "batching": "fixed",
            "token_budget": None,
            "decoding_mode": "greedy",
            "temperature": 0.0,
            "top_p": 1.0,
            "top_k": 0,
        }


def test_default_config_readable_id_prefix() -> None:
    ids = list(load_campaign(default_raw()).experiments)
    prefix = "tiny-llama.pytorch.bundled.bs1-float32-in128-out16-greedy."
    matching = [i for i in ids if i.startswith(prefix)]
    assert len(matching) == 1
    assert re.fullmatch(r"[0-9a-f]{8}", matching[0][len(prefix) :])
    # Order is stable: models, then batch sizes, as written in the config.
    assert [i.rsplit(".", 1)[0] for i in ids] == [
        "tiny-llama.pytorch.bundled.bs1-float32-in128-out16-greedy",
        "tiny-llama.pytorch.bundled.bs4-float32-in128-out16-greedy",
        "tiny-gpt2.pytorch.bundled.bs1-float32-in128-out16-greedy",
        "tiny-gpt2.pytorch.bundled.bs4-float32-in128-out16-greedy",
    ]


@pytest.mark.parametrize("path", [DEFAULT_CONFIG, *CAMPAIGN_FILES], ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    campaign = load_campaign_file(path)
    assert isinstance(campaign, Campaign)
    assert campaign.experiments or campaign.config["figures_only"]
    for eid in campaign.experiments:
        assert ID_PATTERN.match(eid), eid


# ---------------------------------------------------------------------------------------------
# Stable ids


def test_ids_are_stable_across_loads_and_key_order() -> None:
    first = load_campaign(default_raw())
    second = load_campaign(default_raw())
    assert list(first.experiments) == list(second.experiments)
    assert first.sha256 == second.sha256
    # Reordering mapping keys (YAML formatting) changes nothing.
    raw = default_raw()
    reordered = {k: raw[k] for k in reversed(list(raw))}
    reordered["energy"] = {k: raw["energy"][k] for k in reversed(list(raw["energy"]))}
    reordered["models"] = {name: {k: spec[k] for k in reversed(list(spec))} for name, spec in raw["models"].items()}
    assert set(load_campaign(reordered).experiments) == set(first.experiments)


def _hash(eid: str) -> str:
    return eid.rsplit(".", 1)[1]


def _label(eid: str) -> str:
    return eid.rsplit(".", 1)[0]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda c: c["campaign"]["warmup"].update(tolerance=0.1), id="campaign.warmup"),
        pytest.param(lambda c: c["campaign"].update(min_window_s=2), id="campaign.min_window_s"),
        pytest.param(lambda c: c["campaign"].update(cycle_isolation="process"), id="campaign.cycle_isolation"),
        pytest.param(lambda c: c["energy"].update(phase_split="timeline"), id="energy.phase_split"),
        pytest.param(lambda c: c["campaign"].update(seed=99), id="campaign.seed"),
        pytest.param(lambda c: c["campaign"].update(requests_per_cycle=5), id="requests_per_cycle"),
        pytest.param(lambda c: c["datasets"]["bundled"].update(sample_size=9), id="dataset.sample_size"),
        pytest.param(lambda c: c["models"]["tiny-llama"].update(seed=1), id="model.seed"),
        pytest.param(
            lambda c: c["backend_settings"]["pytorch"].update(attn_implementation="eager"), id="backend_settings"
        ),
    ],
)
def test_changed_hidden_parameter_changes_hash_not_label(change: Callable[[dict], None]) -> None:
    before = list(load_campaign(default_raw()).experiments)
    raw = default_raw()
    change(raw)
    after = list(load_campaign(raw).experiments)
    # The readable label is the same, but the hash of the llama bs1 experiment differs.
    assert [_label(i) for i in after] == [_label(i) for i in before]
    assert _hash(after[0]) != _hash(before[0])


def test_changed_model_seed_keeps_other_model_ids() -> None:
    before = load_campaign(default_raw()).experiments
    raw = default_raw()
    raw["models"]["tiny-llama"]["seed"] = 1
    after = load_campaign(raw).experiments
    gpt2_before = {i for i in before if i.startswith("tiny-gpt2.")}
    gpt2_after = {i for i in after if i.startswith("tiny-gpt2.")}
    assert gpt2_before == gpt2_after
    assert not {i for i in before if i.startswith("tiny-llama.")} & set(after)


def test_changed_grid_parameter_changes_label_and_hash() -> None:
    raw = default_raw()
    raw["grid"]["max_output_tokens"] = [32]
    ids = list(load_campaign(raw).experiments)
    assert ids[0].startswith("tiny-llama.pytorch.bundled.bs1-float32-in128-out32-greedy.")
    original = list(load_campaign(default_raw()).experiments)[0]
    assert _hash(ids[0]) != _hash(original)


def test_experiment_round_trips_through_dict() -> None:
    experiment = next(iter(load_campaign(default_raw()).experiments.values()))
    assert experiment.model_spec["architecture"] == "llama"


# ---------------------------------------------------------------------------------------------
# Defaults


def test_defaults_are_filled_and_input_untouched() -> None:
    raw = minimal_raw()
    snapshot = copy.deepcopy(raw)
    config = validate_config(raw)
    assert raw == snapshot  # validation works on a copy
    assert config["campaign"] == {
        "name": "campaign",
        "cycles": 3,
        "warmup": {"min_batches": 3, "stable_batches": 3, "tolerance": 0.05, "max_s": 300},
        "min_window_s": 10,
        "cycle_isolation": "experiment",
        "requests_per_cycle": None,
        "seed": 1234,
        "gpus": {"devices": None, "jobs": "parallel", "wait_s": 600, "lock_dir": "/tmp/llm-energy-gpu-locks"},
    }
    assert config["grid"] == {
        "batch_size": [1],
        "dtype": ["float32"],
        "max_input_tokens": [512],
        "max_output_tokens": [64],
        "decoding": [{"mode": "greedy", "temperature": 1.0, "top_p": 1.0, "top_k": 0}],
        "output_length": ["fixed"],
        "batching": ["fixed"],
        "token_budget": [None],
        "request_rate": ["inf"],
        "max_concurrency": [None],
    }
    assert config["exclude"] == []
    assert config["results_dir"] == "results"
    assert config["figures_only"] is False
    assert config["backend_settings"]["pytorch"]["device"] == "auto"
    assert config["backend_settings"]["pytorch"]["attn_implementation"] == "sdpa"
    assert config["backend_settings"]["vllm"]["gpu_memory_utilization"] == 0.9
    assert config["energy"]["baseline"] == {"duration_s": 10, "max_age_s": 3600}
    assert config["energy"]["country_iso_code"] == "FRA"
    # Source-specific defaults come from the matching if/then branch only.
    assert config["models"]["m"] == {
        "source": "builtin",
        "architecture": "llama",
        "seed": 0,
        "save_dtype": "float32",
        "trust_remote_code": False,
        "max_model_len": None,
    }
    assert config["datasets"]["d"] == {
        "source": "bundled",
        "sample_size": None,
        "seed": 0,
        "shuffle": True,
        "min_chars": None,
        "max_chars": None,
        "categories": None,
    }
    experiments = expand_experiments(config)
    assert list(experiments) and list(experiments)[0].startswith("m.pytorch.d.bs1-float32-in512-out64-greedy.")


def test_hub_model_defaults_and_valid_revision() -> None:
    raw = minimal_raw()
    raw["models"]["h"] = {"source": "hub", "id": "org/model", "revision": "a" * 40}
    config = validate_config(raw)
    assert config["models"]["h"]["allow_patterns"] is None
    assert "architecture" not in config["models"]["h"]


# ---------------------------------------------------------------------------------------------
# Errors: each names the key


def test_unknown_top_level_key_did_you_mean() -> None:
    raw = minimal_raw()
    raw["gird"] = {"batch_size": [1]}
    error = raises_config_error(raw)
    assert error.key == "gird"
    assert error.problem == "unknown key"
    assert "did you mean 'grid'?" in str(error)
    assert "'gird'" in str(error)


def test_misspelt_required_top_level_key() -> None:
    raw = minimal_raw()
    raw["modles"] = raw.pop("models")
    error = raises_config_error(raw)
    assert error.key == "modles"
    assert "did you mean 'models'?" in str(error)


@pytest.mark.parametrize(
    ("mutate", "key", "suggestion"),
    [
        pytest.param(lambda c: c["grid"].update(batchsize=[2]), "grid.batchsize", "batch_size", id="grid"),
        pytest.param(lambda c: c["campaign"].update(cycels=2), "campaign.cycels", "cycles", id="campaign"),
        pytest.param(
            lambda c: c["backend_settings"]["pytorch"].update(devce="cpu"),
            "backend_settings.pytorch.devce",
            "device",
            id="backend_settings",
        ),
        pytest.param(
            lambda c: c["energy"]["baseline"].update(duration=3),
            "energy.baseline.duration",
            "duration_s",
            id="energy.baseline",
        ),
        pytest.param(
            lambda c: c["models"]["tiny-llama"].update(archtecture="llama"),
            "models.tiny-llama.archtecture",
            "architecture",
            id="model",
        ),
        pytest.param(
            lambda c: c["datasets"]["bundled"].update(sampel_size=3),
            "datasets.bundled.sampel_size",
            "sample_size",
            id="dataset",
        ),
    ],
)
def test_unknown_nested_key_names_full_path(mutate, key: str, suggestion: str) -> None:
    raw = default_raw()
    mutate(raw)
    error = raises_config_error(raw)
    assert error.key == key
    assert error.problem == "unknown key"
    assert f"did you mean '{suggestion}'?" in str(error)


def test_unknown_key_inside_list_item_suggests_the_right_key() -> None:
    # A typo inside grid.decoding[0] must be as helpful as anywhere else: name the item and suggest.
    raw = default_raw()
    raw["grid"]["decoding"] = [{"mode": "sampling", "temprature": 0.7}]
    error = raises_config_error(raw)
    assert error.key == "grid.decoding[0].temprature"
    assert "did you mean 'temperature'?" in str(error)
    assert "mode" in error.fix and "top_p" in error.fix


@pytest.mark.parametrize(
    ("batch_size", "key"),
    [([1, "x"], "grid.batch_size[1]"), (["1"], "grid.batch_size[0]"), (4, "grid.batch_size")],
)
def test_wrong_type_names_index(batch_size, key: str) -> None:
    raw = default_raw()
    raw["grid"]["batch_size"] = batch_size
    error = raises_config_error(raw)
    assert error.key == key
    assert "must be of type" in error.fix


def test_wrong_type_of_nested_scalar() -> None:
    raw = default_raw()
    raw["campaign"]["cycles"] = "two"
    error = raises_config_error(raw)
    assert error.key == "campaign.cycles"
    assert "integer" in str(error)


def test_missing_models() -> None:
    raw = minimal_raw()
    del raw["models"]
    error = raises_config_error(raw)
    assert error.key == "models"
    assert error.problem == "is required but missing"


def test_empty_models_mapping() -> None:
    raw = minimal_raw()
    raw["models"] = {}
    error = raises_config_error(raw)
    assert error.key == "models"


def test_hub_model_without_revision() -> None:
    raw = minimal_raw()
    raw["models"]["h"] = {"source": "hub", "id": "org/model"}
    error = raises_config_error(raw)
    assert error.key == "models.h.revision"
    assert "required" in error.problem


def test_unknown_backend() -> None:
    raw = minimal_raw()
    raw["backends"] = ["pytorch", "tensorrt"]
    error = raises_config_error(raw)
    assert error.key == "backends[1]"
    assert "'tensorrt'" in error.problem
    assert "pytorch" in error.fix and "vllm" in error.fix


def test_synthetic_dataset_with_missing_tokenizer_model() -> None:
    raw = minimal_raw()
    raw["datasets"]["s"] = {
        "source": "synthetic",
        "count": 4,
        "tokenizer_model": "nope",
        "input_tokens": {"distribution": "fixed", "value": 8},
    }
    error = raises_config_error(raw)
    assert error.key == "datasets.s.tokenizer_model"
    assert "'nope'" in error.problem
    assert "m" in error.fix


def test_synthetic_dataset_distribution_parameter_missing() -> None:
    raw = minimal_raw()
    raw["datasets"]["s"] = {
        "source": "synthetic",
        "count": 4,
        "tokenizer_model": "m",
        "input_tokens": {"distribution": "uniform", "min": 8},
    }
    error = raises_config_error(raw)
    assert error.key == "datasets.s.input_tokens.max"


def test_token_budget_batching_without_budget() -> None:
    raw = minimal_raw()
    raw["grid"] = {"batching": ["fixed", "token_budget"]}
    error = raises_config_error(raw)
    assert error.key == "grid.token_budget"
    assert "token budget" in error.problem


def test_exclude_with_unknown_key() -> None:
    raw = default_raw()
    raw["exclude"] = [{"model": "tiny-gpt2"}, {"batchsize": 4}]
    error = raises_config_error(raw)
    assert error.key == "exclude[1].batchsize"
    assert "batch_size" in error.fix


def test_everything_excluded() -> None:
    raw = default_raw()
    raw["exclude"] = [{"backend": "pytorch"}]
    error = raises_config_error(raw)
    assert error.key == "exclude"
    assert "excluded" in error.problem


def test_everything_excluded_is_fine_for_figures_only() -> None:
    raw = default_raw()
    raw["exclude"] = [{"backend": "pytorch"}]
    raw["figures_only"] = True
    assert load_campaign(raw).experiments == {}


def test_config_not_a_mapping() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(["models"])  # type: ignore[arg-type]
    assert info.value.key == "(top level)"


def test_config_file_missing_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_campaign_file(tmp_path / "absent.yaml")
    assert "absent.yaml" in str(info.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_campaign_file(bad)
    assert "bad.yaml" in str(info.value) and "YAML" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Expansion


def test_exclude_drops_matching_experiments() -> None:
    raw = default_raw()
    raw["exclude"] = [{"model": "tiny-gpt2", "batch_size": 4}]
    experiments = load_campaign(raw).experiments.values()
    assert sorted((e.model, e.parameters["batch_size"]) for e in experiments) == [
        ("tiny-gpt2", 1),
        ("tiny-llama", 1),
        ("tiny-llama", 4),
    ]
    raw["exclude"] = [{"batch_size": 1}]
    assert {e.parameters["batch_size"] for e in load_campaign(raw).experiments.values()} == {4}


def test_exclude_rule_with_partial_decoding() -> None:
    # exclude rules are "partial experiment descriptions": {decoding: {mode: sampling}} must match a
    # sampling entry whose temperature/top_p/top_k were filled with defaults.
    raw = default_raw()
    raw["grid"]["decoding"] = [{"mode": "greedy"}, {"mode": "sampling", "temperature": 0.7}]
    assert len(load_campaign(raw).experiments) == 8
    raw["exclude"] = [{"decoding": {"mode": "sampling"}}]
    remaining = load_campaign(raw).experiments.values()
    assert {e.parameters["decoding_mode"] for e in remaining} == {"greedy"}
    assert len(remaining) == 4


def test_sampling_decoding_labels_and_parameters() -> None:
    raw = minimal_raw()
    raw["grid"] = {
        "decoding": [
            {"mode": "greedy"},
            {"mode": "sampling", "temperature": 0.7, "top_p": 0.9, "top_k": 50},
            {"mode": "sampling"},
        ]
    }
    experiments = list(load_campaign(raw).experiments.values())
    # The label itself contains '.' for 0.7/0.9: compare the id without model.backend.dataset. and hash.
    bodies = [e.id[len("m.pytorch.d.") :].rsplit(".", 1)[0] for e in experiments]
    assert bodies == [
        "bs1-float32-in512-out64-greedy",
        "bs1-float32-in512-out64-t0_7-p0_9-k50",
        "bs1-float32-in512-out64-t1-p1",
    ]
    greedy, tuned, plain = (e.parameters for e in experiments)
    assert (greedy["decoding_mode"], greedy["temperature"], greedy["top_p"], greedy["top_k"]) == ("greedy", 0.0, 1.0, 0)
    assert (tuned["decoding_mode"], tuned["temperature"], tuned["top_p"], tuned["top_k"]) == ("sampling", 0.7, 0.9, 50)
    assert (plain["decoding_mode"], plain["temperature"], plain["top_p"], plain["top_k"]) == ("sampling", 1.0, 1.0, 0)


def test_output_length_and_batching_labels() -> None:
    raw = minimal_raw()
    raw["grid"] = {
        "output_length": ["fixed", "eos"],
        "batching": ["fixed", "sorted", "token_budget"],
        "token_budget": [2048],
    }
    bodies = [e.id[len("m.pytorch.d.") :].rsplit(".", 1)[0] for e in load_campaign(raw).experiments.values()]
    assert bodies == [
        "bs1-float32-in512-out64-greedy",
        "bs1-float32-in512-out64-greedy-sorted",
        "bs1-float32-in512-out64-greedy-token_budget2048",
        "bs1-float32-in512-out64-greedy-eos",
        "bs1-float32-in512-out64-greedy-eos-sorted",
        "bs1-float32-in512-out64-greedy-eos-token_budget2048",
    ]


def test_token_budget_only_varies_token_budget_batching() -> None:
    raw = minimal_raw()
    raw["grid"] = {"batching": ["fixed", "sorted", "token_budget"], "token_budget": [256, 1024]}
    experiments = list(load_campaign(raw).experiments.values())
    combos = [(e.parameters["batching"], e.parameters["token_budget"]) for e in experiments]
    assert combos == [("fixed", None), ("sorted", None), ("token_budget", 256), ("token_budget", 1024)]
    assert len({e.id for e in experiments}) == len(experiments) == 4


def test_token_budget_null_entry_skipped_for_token_budget_batching() -> None:
    raw = minimal_raw()
    raw["grid"] = {"batching": ["fixed", "token_budget"], "token_budget": [None, 512]}
    combos = [(e.parameters["batching"], e.parameters["token_budget"]) for e in load_campaign(raw).experiments.values()]
    assert combos == [("fixed", None), ("token_budget", 512)]


def test_budget_without_token_budget_batching_is_ignored() -> None:
    raw = minimal_raw()
    raw["grid"] = {"batching": ["fixed"], "token_budget": [256, 1024]}
    experiments = list(load_campaign(raw).experiments.values())
    assert [(e.parameters["batching"], e.parameters["token_budget"]) for e in experiments] == [("fixed", None)]


def test_backend_settings_only_of_own_backend() -> None:
    raw = minimal_raw()
    raw["backends"] = ["pytorch", "vllm"]
    experiments = {e.backend: e for e in load_campaign(raw).experiments.values()}
    assert experiments["pytorch"].backend_settings["device"] == "auto"
    assert "device" not in experiments["vllm"].backend_settings
    assert experiments["vllm"].backend_settings["gpu_memory_utilization"] == 0.9


def test_command_line_strings_are_read_as_booleans_where_the_schema_wants_one() -> None:
    raw = minimal_raw()
    raw["figures_only"] = "true"
    assert load_campaign(raw).config["figures_only"] is True
    raw["figures_only"] = "maybe"
    error = raises_config_error(raw)
    assert error.key == "figures_only"


# ---------------------------------------------------------------------------------------------
# Backend variants


def variants_raw() -> dict[str, Any]:
    raw = minimal_raw()
    raw["grid"] = {"batch_size": [1, 4]}
    raw["backend_settings"] = {
        "pytorch": {
            "device": "cpu",
            "num_threads": 2,
            "variants": {
                "none": {},
                "int8": {"quantization": "torchao_int8_weight_only"},
                "eager_int8": {"quantization": "torchao_int8_weight_only", "attn_implementation": "eager"},
            },
        }
    }
    return raw


def test_each_variant_is_its_own_experiment_with_the_merged_settings() -> None:
    experiments = list(load_campaign(variants_raw()).experiments.values())
    # one per (variant, batch size), in the campaign's order of variants
    assert [(e.variant, e.parameters["batch_size"]) for e in experiments] == [
        ("none", 1),
        ("none", 4),
        ("int8", 1),
        ("int8", 4),
        ("eager_int8", 1),
        ("eager_int8", 4),
    ]
    settings = {e.variant: e.backend_settings for e in experiments}
    assert all("variants" not in s for s in settings.values())
    # shared keys apply to every variant; a variant's keys replace them; the rest keep their defaults
    assert {s["device"] for s in settings.values()} == {"cpu"} and {s["num_threads"] for s in settings.values()} == {2}
    assert settings["none"]["quantization"] == "none" and settings["none"]["attn_implementation"] == "sdpa"
    assert settings["int8"]["quantization"] == "torchao_int8_weight_only"
    assert settings["int8"]["attn_implementation"] == "sdpa"
    assert settings["eager_int8"]["attn_implementation"] == "eager"


def test_a_variant_overrides_a_shared_key_without_touching_the_other_variants() -> None:
    raw = variants_raw()
    raw["backend_settings"]["pytorch"]["quantization"] = "fp8"  # shared: every variant that does not set it
    settings = {e.variant: e.backend_settings for e in load_campaign(raw).experiments.values()}
    assert settings["none"]["quantization"] == "fp8"
    assert settings["int8"]["quantization"] == "torchao_int8_weight_only"


def test_variant_ids_read_backend_dash_variant_and_split_back() -> None:
    experiments = load_campaign(variants_raw()).experiments
    for eid, experiment in experiments.items():
        assert ID_PATTERN.match(eid), eid
        model, backend_part, dataset, _label_and_hash = eid.split(".", 3)
        assert (model, dataset) == ("m", "d")
        assert backend_part.split("-", 1) == ["pytorch", experiment.variant]
    assert {_label(i).split(".", 3)[3] for i in experiments} == {
        "bs1-float32-in512-out64-greedy",
        "bs4-float32-in512-out64-greedy",
    }


def test_variant_name_and_settings_are_in_the_hash() -> None:
    ids = {(e.variant, e.parameters["batch_size"]): e.id for e in load_campaign(variants_raw()).experiments.values()}
    # Same settings under another name: another experiment (its name is in its identity).
    raw = variants_raw()
    variants = raw["backend_settings"]["pytorch"]["variants"]
    variants["int8_again"] = dict(variants["int8"])
    renamed = {(e.variant, e.parameters["batch_size"]): e.id for e in load_campaign(raw).experiments.values()}
    assert _hash(renamed[("int8_again", 1)]) != _hash(ids[("int8", 1)])
    assert renamed[("int8", 1)] == ids[("int8", 1)]  # adding a variant changes no other id
    # A changed variant setting changes only that variant's hash.
    variants["none"]["num_threads"] = 1
    changed = {(e.variant, e.parameters["batch_size"]): e.id for e in load_campaign(raw).experiments.values()}
    assert _label(changed[("none", 1)]) == _label(ids[("none", 1)])
    assert _hash(changed[("none", 1)]) != _hash(ids[("none", 1)])
    assert changed[("int8", 1)] == ids[("int8", 1)]


def test_a_backend_without_variants_keeps_its_ids_and_has_variant_none() -> None:
    raw = minimal_raw()
    raw["backends"] = ["pytorch", "vllm"]
    before = load_campaign(raw).experiments
    raw["backend_settings"] = {"pytorch": {"variants": {"a": {}, "b": {"device": "cpu"}}}}
    after = load_campaign(raw).experiments.values()
    vllm = [e for e in after if e.backend == "vllm"]
    assert [e.variant for e in vllm] == [None] and vllm[0].id in before
    assert ".vllm." in vllm[0].id
    assert sorted(e.variant for e in after if e.backend == "pytorch") == ["a", "b"]


def test_backend_variants_merges_over_the_shared_settings() -> None:
    assert backend_variants({"device": "cpu"}) == {None: {"device": "cpu"}}
    assert backend_variants(None) == {None: {}}
    assert backend_variants({"device": "cpu", "quantization": "none", "variants": {"q": {"quantization": "fp8"}}}) == {
        "q": {"device": "cpu", "quantization": "fp8"}
    }


def test_exclude_by_variant() -> None:
    raw = variants_raw()
    raw["exclude"] = [{"variant": "eager_int8", "batch_size": 4}, {"variant": "none", "batch_size": 1}]
    remaining = {(e.variant, e.parameters["batch_size"]) for e in load_campaign(raw).experiments.values()}
    assert remaining == {("none", 4), ("int8", 1), ("int8", 4), ("eager_int8", 1)}


def test_exclude_naming_no_variant_is_refused() -> None:
    raw = variants_raw()
    raw["exclude"] = [{"variant": "int4"}]
    error = raises_config_error(raw)
    assert error.key == "exclude[0].variant" and "eager_int8, int8, none" in str(error)


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        pytest.param(
            {"quantisation": "fp8"},
            "backend_settings.pytorch.variants.bad.quantisation",
            "did you mean 'quantization'",
            id="typo",
        ),
        pytest.param(
            {"quantization": "int3"},
            "backend_settings.pytorch.variants.bad.quantization",
            '"torchao_int8_weight_only"',
            id="enum",
        ),
        pytest.param(
            {"num_threads": "two"}, "backend_settings.pytorch.variants.bad.num_threads", "must be of type", id="type"
        ),
        pytest.param(
            {"variants": {"x": {}}},
            "backend_settings.pytorch.variants.bad.variants",
            "cannot have variants",
            id="nested",
        ),
    ],
)
def test_a_variant_is_validated_by_its_backends_settings_schema(overrides, key: str, words: str) -> None:
    raw = variants_raw()
    raw["backend_settings"]["pytorch"]["variants"]["bad"] = overrides
    error = raises_config_error(raw)
    assert error.key == key and words in str(error), str(error)


def test_vllm_variants_use_the_vllm_settings_schema() -> None:
    raw = minimal_raw()
    raw["backends"] = ["vllm"]
    raw["backend_settings"] = {"vllm": {"variants": {"eager": {"enforce_eager": True}, "big": {"max_num_seqs": 64}}}}
    settings = {e.variant: e.backend_settings for e in load_campaign(raw).experiments.values()}
    assert settings["eager"]["enforce_eager"] is True and settings["eager"]["max_num_seqs"] is None
    assert settings["big"]["enforce_eager"] is False and settings["big"]["max_num_seqs"] == 64
    raw["backend_settings"]["vllm"]["variants"]["eager"] = {"device": "cpu"}  # a pytorch key
    assert raises_config_error(raw).key == "backend_settings.vllm.variants.eager.device"


@pytest.mark.parametrize("name", ["Int8", "int-8", "int.8"])
def test_variant_names_are_lowercase_letters_digits_and_underscores(name: str) -> None:
    raw = variants_raw()
    raw["backend_settings"]["pytorch"]["variants"][name] = {}
    error = raises_config_error(raw)
    assert error.key == f"backend_settings.pytorch.variants.{name}" and "^[a-z0-9_]+$" in str(error)


def test_empty_variants_mapping_is_refused() -> None:
    raw = minimal_raw()
    raw["backend_settings"] = {"pytorch": {"variants": {}}}
    assert raises_config_error(raw).key == "backend_settings.pytorch.variants"


def test_validated_config_keeps_variant_overrides_as_written() -> None:
    config = load_campaign(variants_raw()).config
    variants = config["backend_settings"]["pytorch"]["variants"]
    assert list(variants) == ["none", "int8", "eager_int8"]
    assert variants["int8"] == {"quantization": "torchao_int8_weight_only"}  # no defaults filled in
    assert config["backend_settings"]["pytorch"]["attn_implementation"] == "sdpa"


# ---------------------------------------------------------------------------------------------
# Load: grid.request_rate, grid.max_concurrency, load.*, slo


def serving_raw(**grid: Any) -> dict[str, Any]:
    return {
        "models": {"m": {"source": "builtin"}},
        "datasets": {"d": {"source": "bundled"}},
        "backends": ["openai_server"],
        "grid": grid,
        "backend_settings": {"openai_server": {"server": {"url": "http://127.0.0.1:8000"}}},
    }


def test_static_batch_ids_are_unchanged_by_the_load_keys() -> None:
    plain = set(load_campaign(minimal_raw()).experiments)
    explicit = set(
        load_campaign(
            {
                **minimal_raw(),
                "grid": {"request_rate": ["inf"], "max_concurrency": [None]},
                "load": {"arrival": "gamma", "burstiness": 2.0},
            }
        ).experiments
    )
    assert plain == explicit


def test_a_request_rate_is_an_experiment_of_its_own_with_its_load() -> None:
    experiments = load_campaign(
        {
            **serving_raw(request_rate=[2, "inf"], max_concurrency=[None, 4]),
            "load": {"arrival": "gamma", "burstiness": 0.5},
            "slo": {"ttft_s": 0.5},
        }
    ).experiments.values()
    by_label = {e.id.split(".")[3]: e for e in experiments}
    assert set(by_label) == {
        "bs1-float32-in512-out64-greedy-rate2",
        "bs1-float32-in512-out64-greedy-rate2-conc4",
        "bs1-float32-in512-out64-greedy",
        "bs1-float32-in512-out64-greedy-rateinf-conc4",
    }
    loaded = by_label["bs1-float32-in512-out64-greedy-rate2-conc4"]
    assert (loaded.load.request_rate, loaded.load.arrival, loaded.load.burstiness, loaded.load.max_concurrency) == (
        2.0,
        "gamma",
        0.5,
        4,
    )
    assert loaded.slo == {"ttft_s": 0.5, "tpot_s": None}
    assert by_label["bs1-float32-in512-out64-greedy"].load is None


@pytest.mark.parametrize(
    "backend,settings,fix",
    [
        ("vllm", {}, "streaming: true"),
        # pytorch takes a rate through transformers' continuous batching, but not with what it cannot honour
        ("pytorch", {"compile": "reduce-overhead"}, "backend_settings.pytorch.compile is 'reduce-overhead'"),
        ("pytorch", {"cache_implementation": "static"}, "backend_settings.pytorch.cache_implementation is 'static'"),
        ("pytorch", {"device_map": "auto"}, "backend_settings.pytorch.device_map is 'auto'"),
    ],
)
def test_a_rate_for_a_backend_that_cannot_take_arrivals_is_refused_before_any_job(backend, settings, fix) -> None:
    raw = {
        **minimal_raw(),
        "backends": [backend],
        "grid": {"request_rate": [4]},
        "backend_settings": {backend: settings} if settings else {},
    }
    error = raises_config_error(raw)
    assert error.key == "grid.request_rate" and fix in str(error)
    assert "openai_server" in str(error) and "pytorch" in error.fix  # says which backends can


def test_pytorch_takes_a_rate_where_the_installed_transformers_has_continuous_batching() -> None:
    from llm_energy.backends import continuous_batching
    from llm_energy.backends.pytorch import PytorchBackend

    assert continuous_batching.unavailable_reason() is None  # transformers 5.19 here (5.17 on the GPU machine)
    assert PytorchBackend.supports_schedule
    experiments = load_campaign({**minimal_raw(), "grid": {"request_rate": [4, "inf"]}}).experiments.values()
    assert sorted(str(e.load.request_rate) if e.load else "offline" for e in experiments) == ["4.0", "offline"]


def test_pytorch_at_a_rate_is_refused_where_transformers_lacks_continuous_batching(monkeypatch) -> None:
    from llm_energy.backends import continuous_batching

    # An older transformers, as the feature detection words it: the refusal keeps its words and the
    # list of backends that can no longer names pytorch.
    missing = "transformers 4.40.0 has no continuous batching (No module named 'x'); install one that has"
    monkeypatch.setattr(continuous_batching, "unavailable_reason", lambda: missing)
    error = raises_config_error({**minimal_raw(), "grid": {"request_rate": [4]}})
    assert error.key == "grid.request_rate" and missing in error.problem and "continuous batching" in error.problem
    assert error.fix.startswith("Backends that can: openai_server, vllm (vllm with streaming: true);")


def test_a_rate_must_be_positive_or_inf() -> None:
    error = raises_config_error(serving_raw(request_rate=[0]))
    assert "grid.request_rate" in str(error)
