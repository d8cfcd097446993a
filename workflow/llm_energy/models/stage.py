"""The models stage: build, download or locate a model and write its manifest; read it back."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from llm_energy.artifacts import read_json_artifact, write_json_artifact
from llm_energy.errors import ArtifactError, ConfigError
from llm_energy.models.builtin import BUNDLED_PROMPTS, build_builtin_model
from llm_energy.models.hub_download import download_hub_model
from llm_energy.models.inspection import describe_model
from llm_energy.models.specs import BuiltinSpec, HubSpec, _key, parse_spec

log = logging.getLogger(__name__)


ARTIFACT_NAME = "model_manifest"
MANIFEST_FILENAME = "manifest.json"
WEIGHTS_DIRNAME = "weights"


def _default_provenance(inputs: list[Path]) -> dict:
    from llm_energy import provenance as provenance_module

    # A model folder does not depend on the GPU; leaving GPUs out keeps the stage GPU-free.
    return provenance_module.collect(inputs=[p for p in inputs if p.exists()], include_gpus=False)


def _fresh_dir(parent: Path, prefix: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=parent, prefix=prefix))


def prepare_model(name: str, spec: dict, out_dir: Path, provenance: dict | None = None) -> dict:
    """Build, download or locate model `name` and write `out_dir/manifest.json`; returns its data.

    builtin and hub models land in `out_dir/weights/`; a local model stays where it is.
    """
    out_dir = Path(out_dir)
    parsed = parse_spec(name, spec)
    source = spec["source"]
    weights_dir = out_dir / WEIGHTS_DIRNAME
    inputs: list[Path] = []

    if isinstance(parsed, BuiltinSpec):
        # Build beside the final folder and swap it in: a killed build never leaves half a model.
        staging = _fresh_dir(out_dir, ".weights-build-")
        try:
            try:
                tokenizer_facts = build_builtin_model(parsed, staging)
            except ConfigError as exc:
                raise ConfigError(_key(name, exc.key), exc.problem, exc.fix) from None
            if weights_dir.exists():
                shutil.rmtree(weights_dir)
            staging.rename(weights_dir)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        inputs.append(BUNDLED_PROMPTS)
        data = describe_model(
            name, source, parsed, weights_dir, WEIGHTS_DIRNAME, None, tokenizer_facts, key=f"models.{name}"
        )
    elif isinstance(parsed, HubSpec):
        commit = download_hub_model(name, parsed, weights_dir)
        if not (weights_dir / "config.json").is_file():
            raise ConfigError(
                _key(name, "allow_patterns"),
                f"{parsed.id}@{parsed.revision} has no config.json among the fetched files",
                "Include '*.json' in allow_patterns (and check that the repository is a transformers model).",
            )
        data = describe_model(
            name, source, parsed, weights_dir, WEIGHTS_DIRNAME, commit, None, key=_key(name, "allow_patterns")
        )
    else:
        folder = Path(parsed.path).expanduser()
        key = _key(name, "path")
        if not folder.is_dir():
            raise ConfigError(
                key,
                f"folder '{folder}' does not exist",
                "Point it at a model folder (with config.json) on this machine.",
            )
        if not (folder / "config.json").is_file():
            raise ConfigError(
                key,
                f"folder '{folder}' has no config.json",
                "Point it at the folder of a transformers model (the one holding config.json).",
            )
        folder = folder.resolve()
        data = describe_model(name, source, parsed, folder, str(folder), None, None, key=key)

    if provenance is None:
        provenance = _default_provenance(inputs)
    write_json_artifact(out_dir / MANIFEST_FILENAME, ARTIFACT_NAME, data, provenance)
    log.info(
        "model %s: %s, %d parameters (%d non-embedding), dtype %s -> %s",
        name,
        data["architecture"]["model_type"],
        data["parameter_count"],
        data["non_embedding_parameter_count"],
        data["torch_dtype"],
        out_dir / MANIFEST_FILENAME,
    )
    return data


def _manifest_file(path: Path | str) -> Path:
    path = Path(path)
    return path / MANIFEST_FILENAME if path.is_dir() else path


def read_model_manifest(path: Path | str) -> dict:
    """The data of a model manifest (path to manifest.json or to its folder), validated."""
    return read_json_artifact(_manifest_file(path), ARTIFACT_NAME)["data"]


def resolve_model_path(manifest_path: Path | str) -> Path:
    """The folder to load weights and tokenizer from (model_path, relative to the manifest's folder)."""
    manifest_path = _manifest_file(manifest_path)
    data = read_model_manifest(manifest_path)
    model_path = Path(data["model_path"])
    if not model_path.is_absolute():
        model_path = manifest_path.resolve().parent / model_path
    if not (model_path / "config.json").is_file():
        raise ArtifactError(
            f"{manifest_path}: model folder {model_path} is missing or has no config.json; "
            "run the download_model rule again"
        )
    return model_path
