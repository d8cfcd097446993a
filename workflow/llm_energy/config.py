"""The campaign: validation of the config and its expansion into experiments.

A campaign names models, datasets, backends and a parameter grid. `load_campaign` validates it against
workflow/schemas/config.schema.json (filling defaults, rejecting unknown keys) and expands it at parse
time into experiments with stable, readable ids. Every problem a user can cause raises ConfigError
naming the key and the fix, before any job runs.

A backend may have variants (`backend_settings.<backend>.variants.<name>`: settings overrides), so one
campaign compares several settings of the same backend: each variant is its own experiment, with the
backend's other settings and the variant's keys over them (`backend_variants`).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_energy.artifacts import sha256_json
from llm_energy.backends import BACKENDS, backend_class
from llm_energy.backends.base import LAUNCH_DATA_PARALLEL, LAUNCH_TENSOR_PARALLEL
from llm_energy.config_schema import config_schema, raise_first_error, validator_filling_defaults
from llm_energy.errors import ConfigError
from llm_energy.load import LoadSpec
from llm_energy.specs import build_spec, schema_spec, section_spec

GRID_KEYS = (
    "batch_size",
    "dtype",
    "max_input_tokens",
    "max_output_tokens",
    "decoding",
    "output_length",
    "batching",
    "token_budget",
    "request_rate",
    "max_concurrency",
)
OFFLINE_RATE = "inf"


def coerce_command_line_values(config: Mapping[str, Any]) -> dict:
    """`snakemake --config figures_only=true` passes the string "true": read top-level strings as
    YAML scalars where the schema expects a boolean or a number."""
    properties = config_schema()["properties"]
    coerced = dict(config)
    for key, value in config.items():
        expected = properties.get(key, {}).get("type")
        if isinstance(value, str) and expected in ("boolean", "integer", "number"):
            import yaml

            try:
                coerced[key] = yaml.safe_load(value)
            except yaml.YAMLError:
                pass  # left as is: validation names the key and the expected type
    return coerced


def validate_config(raw: Mapping[str, Any]) -> dict:
    """Validate a config mapping and return a copy with every default filled in."""
    if not isinstance(raw, Mapping):
        raise ConfigError("(top level)", "the config is not a mapping", "Write the config as YAML keys.")
    config = copy.deepcopy(coerce_command_line_values(raw))
    schema = config_schema()
    variant_overrides = _variant_overrides(config)
    raise_first_error(validator_filling_defaults()(schema), config, schema)
    # A variant is validated with its backend's settings schema, which filled that schema's defaults
    # into it: put back what the user wrote, so a variant overrides only the keys it names.
    for backend, overrides in variant_overrides.items():
        config["backend_settings"][backend]["variants"] = overrides
    _check_semantics(config)
    canonical = _canonical(config)
    # The campaign's own order of models and datasets is kept: it orders experiments and tables.
    for section in ("models", "datasets"):
        canonical[section] = {name: canonical[section][name] for name in config[section]}
    for backend, overrides in variant_overrides.items():  # and so is the order of each backend's variants
        settings = canonical["backend_settings"][backend]
        settings["variants"] = {name: settings["variants"][name] for name in overrides}
    return canonical


def _variant_overrides(config: Mapping[str, Any]) -> dict[str, Any]:
    """backend -> a copy of its `variants` as written (before defaults are filled in)."""
    settings = config.get("backend_settings")
    if not isinstance(settings, Mapping):
        return {}
    return {
        backend: copy.deepcopy(value["variants"])
        for backend, value in settings.items()
        if isinstance(value, Mapping) and "variants" in value
    }


def backend_variants(settings: Mapping[str, Any] | None) -> dict[str | None, dict[str, Any]]:
    """variant name -> the settings that variant runs with: the backend's settings without `variants`,
    with the variant's keys replacing theirs. {None: settings} for a backend without variants."""
    base = {k: v for k, v in (settings or {}).items() if k != "variants"}
    variants = (settings or {}).get("variants")
    if not variants:
        return {None: base}
    return {name: {**base, **copy.deepcopy(dict(overrides))} for name, overrides in variants.items()}


def _canonical(value: Any) -> Any:
    """Mappings with sorted keys, recursively. Rule params are compared by their text, so the order of
    keys in a YAML file must not decide whether Snakemake reruns a finished measurement."""
    if isinstance(value, Mapping):
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def _check_semantics(config: dict) -> None:
    models = config["models"]
    for name, spec in config["datasets"].items():
        if spec["source"] == "synthetic" and spec["tokenizer_model"] not in models:
            raise ConfigError(
                f"datasets.{name}.tokenizer_model",
                f"names model '{spec['tokenizer_model']}', which is not in 'models'",
                f"Use one of: {', '.join(models)}.",
            )
    for index, backend in enumerate(config["backends"]):
        if backend not in BACKENDS:
            raise ConfigError(
                f"backends[{index}]",
                f"'{backend}' is not an implemented backend",
                f"Use one of: {', '.join(sorted(BACKENDS))}.",
            )
    grid = config["grid"]
    if "token_budget" in grid["batching"] and not any(b for b in grid["token_budget"]):
        raise ConfigError(
            "grid.token_budget",
            "batching 'token_budget' needs a token budget",
            "Give grid.token_budget a list of integers, e.g. [4096].",
        )
    variant_names = set()
    for backend, settings in config["backend_settings"].items():
        for name, overrides in (settings.get("variants") or {}).items():
            variant_names.add(name)
            if "variants" in overrides:
                raise ConfigError(
                    f"backend_settings.{backend}.variants.{name}.variants",
                    "a variant cannot have variants of its own",
                    f"Give each variant its own name under backend_settings.{backend}.variants.",
                )
    for index, rule in enumerate(config["exclude"]):  # its keys are the schema's to check
        if rule.get("variant") is not None and rule["variant"] not in variant_names:
            raise ConfigError(
                f"exclude[{index}].variant",
                f"'{rule['variant']}' is not a variant of any backend",
                f"Use one of: {', '.join(sorted(variant_names)) or '(no backend has variants)'}.",
            )


# ---------------------------------------------------------------------------------------------
# Expansion


@schema_spec("#/properties/campaign/properties/warmup")
@dataclass(frozen=True)
class WarmupSpec:
    """campaign.warmup, typed; types, defaults and meanings are the config schema's."""

    min_batches: int
    stable_batches: int
    tolerance: float
    max_s: float

    @classmethod
    def of(cls, settings: WarmupSpec | Mapping[str, Any]) -> WarmupSpec:
        return settings if isinstance(settings, cls) else section_spec(cls, settings)


@dataclass(frozen=True)
class Experiment:
    """One fully resolved point of the campaign. Every field comes from the validated config (the
    schema's defaults filled in), so none has a default of its own."""

    id: str
    model: str
    backend: str
    dataset: str
    parameters: dict[str, Any]
    model_spec: dict[str, Any] = field(repr=False)
    dataset_spec: dict[str, Any] = field(repr=False)
    backend_settings: dict[str, Any] = field(repr=False)
    warmup: WarmupSpec
    requests_per_cycle: int | dict[str, int] | None
    seed: int
    min_window_s: float
    cycle_isolation: str
    variant: str | None  # backend_settings.<backend>.variants name; None: the backend has none
    load: LoadSpec | None  # open-loop arrivals (grid.request_rate, load.*); None: static batches
    slo: dict[str, float | None]  # slo.ttft_s, slo.tpot_s (None: no objective)

    def request_count(self, setting: int | Mapping[str, int] | None) -> int | None:
        """A request count from a config setting: n, {batches: n} (n full batches) or None (all)."""
        if isinstance(setting, Mapping):
            return setting["batches"] * self.parameters["batch_size"]
        return setting


def _decoding_label(decoding: Mapping[str, Any]) -> str:
    if decoding["mode"] == "greedy":
        return "greedy"
    # Dots separate the id's parts, so numbers use '_' as decimal mark: t0_7-p0_9-k50.
    label = f"t{decoding['temperature']:g}-p{decoding['top_p']:g}".replace(".", "_")
    return label + (f"-k{decoding['top_k']}" if decoding["top_k"] else "")


def experiment_id(
    model: str, backend: str, dataset: str, parameters: Mapping[str, Any], identity: Any, variant: str | None = None
) -> str:
    """`model.backend.dataset.bs8-float32-in512-out64-greedy.<hash8>`, the backend part reading
    `backend-variant` (pytorch-int8) for a variant: neither a backend nor a variant name holds '-' or
    '.', so the part splits back at its first '-'. The hash covers everything that changes the
    measurement, so a changed parameter never reuses an old folder."""
    p = parameters
    label = f"bs{p['batch_size']}-{p['dtype']}-in{p['max_input_tokens']}-out{p['max_output_tokens']}"
    label += "-" + _decoding_label(
        {"mode": p["decoding_mode"], "temperature": p["temperature"], "top_p": p["top_p"], "top_k": p["top_k"]}
    )
    if p["output_length"] != "fixed":
        label += f"-{p['output_length']}"
    if p["batching"] != "fixed":
        label += f"-{p['batching']}" + (f"{p['token_budget']}" if p["batching"] == "token_budget" else "")
    if "request_rate" in p:
        label += f"-rate{p['request_rate']:g}" if p["request_rate"] != OFFLINE_RATE else "-rateinf"
        if p["max_concurrency"] is not None:
            label += f"-conc{p['max_concurrency']}"
    backend_part = backend if variant is None else f"{backend}-{variant}"
    return f"{model}.{backend_part}.{dataset}.{label}.{sha256_json(identity)[:8]}"


def _matches(rule_value: Any, value: Any) -> bool:
    """A rule's mapping matches when its keys are a subset with equal values ({mode: sampling}
    matches every sampling decoding, whatever its filled-in defaults)."""
    if isinstance(rule_value, Mapping) and isinstance(value, Mapping):
        return all(k in value and _matches(v, value[k]) for k, v in rule_value.items())
    return rule_value == value


def _excluded(rules: list[Mapping[str, Any]], point: Mapping[str, Any]) -> bool:
    return any(all(_matches(v, point.get(k)) for k, v in rule.items()) for rule in rules)


def expand_experiments(config: Mapping[str, Any]) -> dict[str, Experiment]:
    """All experiments of a validated config, keyed by id, in a stable order."""
    grid = config["grid"]
    campaign = config["campaign"]
    experiments: dict[str, Experiment] = {}
    values = [grid[k] for k in GRID_KEYS]
    warmup = build_spec(WarmupSpec, campaign["warmup"])  # validated with the campaign already
    for model, backend, dataset in itertools.product(config["models"], config["backends"], config["datasets"]):
        for (variant, backend_settings), combo in itertools.product(
            backend_variants(config["backend_settings"].get(backend)).items(), itertools.product(*values)
        ):
            point = dict(zip(GRID_KEYS, combo))
            if point["batching"] != "token_budget":
                if point["token_budget"] is not None and point["token_budget"] != grid["token_budget"][0]:
                    continue  # the budget only varies token_budget batching: no duplicates
                point["token_budget"] = None
            elif point["token_budget"] is None:
                continue
            if _excluded(
                config["exclude"], {"model": model, "backend": backend, "variant": variant, "dataset": dataset, **point}
            ):
                continue
            decoding = point.pop("decoding")
            rate, cap = point.pop("request_rate"), point.pop("max_concurrency")
            parameters = {
                **{k: v for k, v in point.items()},
                "decoding_mode": decoding["mode"],
                "temperature": decoding["temperature"] if decoding["mode"] == "sampling" else 0.0,
                "top_p": decoding["top_p"] if decoding["mode"] == "sampling" else 1.0,
                "top_k": decoding["top_k"] if decoding["mode"] == "sampling" else 0,
            }
            identity = {
                "model": config["models"][model],
                "dataset": config["datasets"][dataset],
                "backend": backend,
                "backend_settings": backend_class(backend).identity_settings(backend_settings),
                "parameters": parameters,
                "warmup": campaign["warmup"],
                "min_window_s": campaign["min_window_s"],
                "cycle_isolation": campaign["cycle_isolation"],
                "phase_split": config["energy"]["phase_split"],
                "requests_per_cycle": campaign["requests_per_cycle"],
                "seed": campaign["seed"],
            }
            if variant is not None:  # only then: the ids of campaigns without variants stay as they were
                identity["variant"] = variant
            load = None
            if rate != OFFLINE_RATE or cap is not None:  # likewise: offline ids stay as they were
                parameters.update(request_rate=rate, max_concurrency=cap)
                identity["load"] = config["load"]
                try:
                    load = LoadSpec(
                        request_rate=float(rate),
                        arrival=config["load"]["arrival"],
                        burstiness=float(config["load"]["burstiness"]),
                        max_concurrency=cap,
                    )
                except ValueError as exc:  # across keys (burstiness without arrival: gamma): the schema cannot say
                    raise ConfigError(
                        "load", str(exc), "Set load.arrival: gamma, or leave load.burstiness out."
                    ) from None
                _check_backend_takes_arrivals(backend, variant, backend_settings)
            _check_backend_parallelism(backend, variant, backend_settings, under_load=load is not None)
            eid = experiment_id(model, backend, dataset, parameters, identity, variant)
            experiments[eid] = Experiment(
                id=eid,
                model=model,
                backend=backend,
                dataset=dataset,
                parameters=parameters,
                model_spec=dict(config["models"][model]),
                dataset_spec=dict(config["datasets"][dataset]),
                backend_settings=dict(backend_settings),
                warmup=warmup,
                requests_per_cycle=campaign["requests_per_cycle"],
                seed=campaign["seed"],
                variant=variant,
                min_window_s=float(campaign["min_window_s"]),
                cycle_isolation=campaign["cycle_isolation"],
                load=load,
                slo=dict(config["slo"]),
            )
    if not experiments and not config.get("figures_only"):
        raise ConfigError("exclude", "every experiment of the campaign is excluded", "Loosen the exclude rules.")
    return experiments


# What a backend that takes arrivals needs for it, in the refusal's advice.
_ARRIVAL_CONDITIONS = {
    "vllm": "vllm with streaming: true",
    "pytorch": "pytorch through transformers' continuous batching, uncompiled, on one device",
}


def _check_backend_takes_arrivals(backend: str, variant: str | None, settings: Mapping[str, Any]) -> None:
    """A request rate needs a backend that submits requests at their arrival times: refused before any job."""
    reason = backend_class(backend).schedule_unsupported_reason(dict(settings))
    if reason is None:
        return
    able = [name for name in sorted(BACKENDS) if backend_class(name).supports_schedule]
    conditions = "; ".join(condition for name, condition in _ARRIVAL_CONDITIONS.items() if name in able)
    can = ", ".join(able) + (f" ({conditions})" if conditions else "")
    where = backend if variant is None else f"{backend} (variant {variant})"
    raise ConfigError(
        "grid.request_rate",
        f"backend '{where}' cannot take requests at a rate: {reason}",
        f"Backends that can: {can}; or exclude {{backend: {backend}}} from the rates, or use grid.request_rate: [inf].",
    )


def _check_backend_parallelism(
    backend: str, variant: str | None, settings: Mapping[str, Any], under_load: bool
) -> None:
    """A parallelism the backend does not declare support for (Backend.execution) is refused before any
    job, naming the key that asked for it."""
    cls = backend_class(backend)
    execution = cls.execution(dict(settings))
    where = backend if variant is None else f"{backend} (variant {variant})"
    prefix = f"backend_settings.{backend}" + (f".variants.{variant}" if variant else "")
    # parallelism -> the declaration that allows it (pipeline stages split a model as tensor parallel does)
    support = {
        "data_parallel": "supports_data_parallel",
        "tensor_parallel": "supports_tensor_parallel",
        "pipeline_parallel": "supports_tensor_parallel",
    }
    for name, attribute in support.items():
        size = getattr(execution, name)
        if size > 1 and not getattr(cls, attribute):
            able = [b for b in sorted(BACKENDS) if getattr(backend_class(b), attribute)]
            raise ConfigError(
                f"{prefix}.{execution.keys.get(name, name)}",
                f"asks backend '{where}' for {name.replace('_', ' ')} of {size}, which it does not support",
                f"Set it to 1; backends with {name.replace('_', ' ')}: {', '.join(able) or 'none'}.",
            )
    # Worker processes launched by the harness (llm_energy.data_parallel) take static batches only.
    if under_load and execution.launch in (LAUNCH_DATA_PARALLEL, LAUNCH_TENSOR_PARALLEL):
        name = "data_parallel" if execution.launch == LAUNCH_DATA_PARALLEL else "tensor_parallel"
        raise ConfigError(
            f"{prefix}.{execution.keys.get(name, name)}",
            f"{name.replace('_', ' ')} of {getattr(execution, name)} runs static batches only (the "
            "harness's worker processes), but the campaign has a request rate",
            f"Use grid.request_rate: [inf] for this backend, or {name.replace('_', ' ')} 1.",
        )


@dataclass
class Campaign:
    config: dict[str, Any]
    experiments: dict[str, Experiment]

    @property
    def sha256(self) -> str:
        return sha256_json(self.config)

    @property
    def cycles(self) -> int:
        return self.config["campaign"]["cycles"]


def load_campaign(raw: Mapping[str, Any]) -> Campaign:
    config = validate_config(raw)
    return Campaign(config=config, experiments=expand_experiments(config))


def load_campaign_file(path: Path | str) -> Campaign:
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError("(file)", f"config file {path} does not exist", "Pass an existing --configfile.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(
            "(file)", f"{path} is not valid YAML: {exc}", "Fix the YAML syntax at the line shown."
        ) from None
    return load_campaign(raw or {})
