"""Hugging Face Hub data sets: short aliases, resolving a spec, loading online or from the local cache."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_energy import hub
from llm_energy.datasets.records import LoadedSource, _key
from llm_energy.datasets.sources import _records_from_rows
from llm_energy.errors import ConfigError, SourceUnavailableError

logger = logging.getLogger(__name__)


# Seconds to wait for the hub before falling back to the local cache. Short on purpose: a pipeline
# without network must fail (or use its cache) in seconds, not after minutes of retries.
HUB_TIMEOUT_S = 10.0


def _first_human_turn(row: Mapping[str, Any]) -> str | None:
    """ShareGPT rows hold `conversations`: [{"from": "human"|"gpt", "value": ...}, ...]."""
    for turn in row.get("conversations") or []:
        if isinstance(turn, Mapping) and str(turn.get("from", "")).lower() in {"human", "user"}:
            value = turn.get("value")
            return value if isinstance(value, str) else None
    return None


def _alpaca_prompt(row: Mapping[str, Any]) -> str | None:
    """Alpaca rows split the request into `instruction` and an optional `input` (context)."""
    instruction = row.get("instruction") or ""
    extra = row.get("input") or ""
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _column(name: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda row: row.get(name)


@dataclass(frozen=True)
class HubAlias:
    """A well-known hub data set: where it lives and how to get one prompt out of a row."""

    repo_id: str
    config_name: str | None
    split: str
    extract_prompt: Callable[[Mapping[str, Any]], Any]
    extract_category: Callable[[Mapping[str, Any]], Any] | None = None
    # Some repositories hold several files of different shapes; load only this one.
    data_files: str | None = None
    description: str = ""


HUB_ALIASES: dict[str, HubAlias] = {
    "alpaca": HubAlias(
        repo_id="tatsu-lab/alpaca",
        config_name=None,
        split="train",
        extract_prompt=_alpaca_prompt,
        description="instruction, followed by its input when there is one",
    ),
    "sharegpt": HubAlias(
        repo_id="anon8231489123/ShareGPT_Vicuna_unfiltered",
        config_name=None,
        split="train",
        extract_prompt=_first_human_turn,
        # The repository holds several JSON files; this is the one inference benchmarks use.
        data_files="ShareGPT_V3_unfiltered_cleaned_split.json",
        description="first human turn of `conversations`",
    ),
    "gsm8k": HubAlias(
        repo_id="openai/gsm8k",
        config_name="main",
        split="test",
        extract_prompt=_column("question"),
        description="column `question`",
    ),
    "mmlu": HubAlias(
        repo_id="cais/mmlu",
        config_name="all",
        split="test",
        extract_prompt=_column("question"),
        extract_category=_column("subject"),
        description="column `question`, category from `subject`",
    ),
}


def _datasets_cache_dir() -> Path:
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "datasets"
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE)


@dataclass(frozen=True)
class HubTarget:
    """A hub data set resolved from a spec: alias defaults filled, user values winning."""

    repo_id: str
    config_name: str | None
    split: str
    revision: str | None
    data_files: str | None
    alias: HubAlias | None


def resolve_hub_target(name: str, spec: Mapping[str, Any]) -> HubTarget:
    """Resolve `id` (alias or repo id) and the null keys of a hub spec."""
    dataset_id = spec["id"]
    alias = HUB_ALIASES.get(str(dataset_id).lower())
    if alias is None and str(dataset_id).count("/") != 1:
        raise ConfigError(
            _key(name, "id"),
            f"{dataset_id!r} is neither a known alias nor a repo id",
            f"use one of {sorted(HUB_ALIASES)} or 'owner/name'",
        )
    return HubTarget(
        repo_id=alias.repo_id if alias else str(dataset_id),
        config_name=spec.get("config_name") or (alias.config_name if alias else None),
        split=spec.get("split") or (alias.split if alias else "train"),
        revision=spec.get("revision"),
        data_files=alias.data_files if alias else None,
        alias=alias,
    )


def _unavailable(name: str, target: HubTarget, reason: str) -> SourceUnavailableError:
    revision = f" at revision {target.revision}" if target.revision else ""
    return SourceUnavailableError(
        f"data set '{name}' (datasets.{name}.id -> {target.repo_id}{revision}): the Hugging Face Hub "
        f"cannot be reached ({reason}) and the data set is not in the local cache "
        f"({hub.cache_dir()}). Download it once on a machine with network "
        f"(`hf download --repo-type dataset {target.repo_id}`, or `huggingface-cli download "
        f"--repo-type dataset {target.repo_id}` with older huggingface_hub) and set HF_HOME to that "
        f"cache, or export it to a local file and use `source: file`."
    )


def _hub_load_error(name: str, target: HubTarget, exc: Exception) -> Exception:
    """Map the ValueErrors of load_dataset to the config key the user must change."""
    message = str(exc)
    if "Unknown split" in message:
        return ConfigError(_key(name, "split"), f"{target.repo_id}: {message}", "set split to one of them")
    if "BuilderConfig" in message or "Config name is missing" in message:
        return ConfigError(
            _key(name, "config_name"),
            f"{target.repo_id}: {message}",
            "set config_name to one of the available configurations",
        )
    return SourceUnavailableError(f"data set '{name}' ({target.repo_id}): load_dataset failed: {message}")


def _load_hub_dataset(name: str, target: HubTarget) -> tuple[Any, str | None]:
    """Return (datasets.Dataset, resolved commit). Online: ask the hub for the commit with a short
    timeout, then load that commit. Offline or unreachable: the snapshot in the hub cache (what
    `hf download` or an earlier online load_dataset left there), else datasets' own cache."""
    import datasets
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import errors as hub_errors
    from huggingface_hub.utils import httpx as hub_httpx

    load_kwargs: dict[str, Any] = {
        "name": target.config_name,
        "split": target.split,
        "cache_dir": str(_datasets_cache_dir()),
    }
    if target.data_files:
        load_kwargs["data_files"] = target.data_files

    reason = "offline mode is on (HF_HUB_OFFLINE)"
    if not hub.offline("HF_DATASETS_OFFLINE"):
        try:
            info = HfApi().dataset_info(target.repo_id, revision=target.revision, timeout=HUB_TIMEOUT_S)
        except hub_errors.GatedRepoError:
            raise SourceUnavailableError(
                f"data set '{name}' ({target.repo_id}) is gated: accept its terms on the hub and set "
                f"HF_TOKEN in the environment"
            ) from None
        except hub_errors.RevisionNotFoundError:
            raise ConfigError(
                _key(name, "revision"),
                f"revision {target.revision!r} does not exist for {target.repo_id}",
                "use a branch, tag or commit of that repository",
            ) from None
        except hub_errors.RepositoryNotFoundError:
            raise ConfigError(
                _key(name, "id"),
                f"data set {target.repo_id!r} does not exist on the hub (or is private)",
                "check the repo id; private sets need HF_TOKEN",
            ) from None
        except (hub_httpx.ConnectError, hub_httpx.TimeoutException, hub_errors.OfflineModeIsEnabled, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            logger.warning("hub unreachable for %s (%s); trying the local cache", target.repo_id, reason)
        else:
            try:
                dataset = datasets.load_dataset(target.repo_id, revision=info.sha, **load_kwargs)
            except ValueError as exc:
                raise _hub_load_error(name, target, exc) from None
            return dataset, info.sha

    # Offline: the hub cache snapshot first. It holds the repository files, README included, so
    # load_dataset on the folder sees the same configurations as on the hub.
    try:
        snapshot = Path(
            snapshot_download(
                target.repo_id,
                repo_type="dataset",
                revision=target.revision,
                cache_dir=str(hub.cache_dir()),
                local_files_only=True,
            )
        )
    except (hub_errors.LocalEntryNotFoundError, FileNotFoundError, OSError) as exc:
        logger.info("no hub cache snapshot of %s (%s)", target.repo_id, exc)
    else:
        logger.info("loading %s from the local hub cache %s", target.repo_id, snapshot)
        try:
            dataset = datasets.load_dataset(str(snapshot), **load_kwargs)
        except ValueError as exc:
            raise _hub_load_error(name, target, exc) from None
        return dataset, snapshot.name

    # datasets' prepared-arrow cache: load_dataset only consults it without network calls when its
    # own offline flag (read at import) is on; with the hub merely unreachable it would retry.
    if datasets.config.HF_HUB_OFFLINE:
        try:
            dataset = datasets.load_dataset(target.repo_id, **load_kwargs)
        except (ConnectionError, FileNotFoundError, ValueError) as exc:
            logger.info("not in the datasets cache either: %s", exc)
        else:
            return dataset, _revision_from_cache_files(dataset)
    raise _unavailable(name, target, reason)


def _revision_from_cache_files(dataset: Any) -> str | None:
    """datasets caches hub sets under <ns>___<name>/<config>/<version>/<commit>/<file>.arrow."""
    for cache_file in getattr(dataset, "cache_files", None) or []:
        folder = Path(cache_file["filename"]).parent.name
        if len(folder) == 40 and all(c in "0123456789abcdef" for c in folder):
            return folder
    return None


def _load_hub(name: str, spec: Mapping[str, Any], tokenizer: Any) -> LoadedSource:
    target = resolve_hub_target(name, spec)
    dataset, revision = _load_hub_dataset(name, target)
    columns = list(dataset.column_names)
    where = f"hub data set {target.repo_id} (config {target.config_name}, split {target.split})"
    rows = ((f"{target.repo_id}:{target.split}:{i}", row) for i, row in enumerate(dataset))
    alias = target.alias
    records, prompt_column = _records_from_rows(
        rows,
        columns,
        requested_column=spec.get("prompt_column"),
        key=_key(name, "prompt_column"),
        where=where,
        extract_prompt=alias.extract_prompt if alias else None,
        extract_category=alias.extract_category if alias else None,
    )
    resolved = {
        "repo_id": target.repo_id,
        "config_name": target.config_name,
        "split": target.split,
        "prompt_column": prompt_column,
    }
    return LoadedSource(records=records, resolved_spec=resolved, hub_revision=revision)
