"""The models stage (`download_model`): build, download or point at a model and describe it.

`prepare_model(name, spec, out_dir)` turns the config entry `models.<name>` into a folder

    out_dir/manifest.json      artifact `model_manifest` (what the model is, its files and their hashes)
    out_dir/weights/           config, tokenizer and safetensors weights (builtin and hub sources)

Three sources:
- `builtin`: a random-weight Llama- or GPT-2-style model with a byte-level BPE tokenizer trained on
  the bundled prompts, built from a seed and a few dimensions. Same seed and dims => byte-identical
  files, so the embedded default campaign needs no network and is reproducible anywhere.
- `hub`: a Hugging Face Hub repository pinned to a revision, fetched with `snapshot_download` (or
  taken from a populated HF cache when offline). The access token comes from env HF_TOKEN only and is
  never recorded.
- `local`: an existing folder with config.json; nothing is copied, its files are hashed.

Parameter counts come from instantiating the architecture on the `meta` device (no memory, no
weights read), with the safetensors headers as a fallback.

One module per concept: `specs` (the config entry as a typed spec), `builtin` (random-weight models
and their tokenizer), `hub_download` (hub repositories), `inspection` (describing a folder: hashes,
safetensors headers, parameter counts, dimensions), `stage` (prepare_model, reading the manifest).
The names other stages and the tests use are re-exported here.
"""

from llm_energy.models.builtin import (
    BUNDLED_PROMPTS,
    build_builtin_model,
    builtin_model_config,
    read_prompt_corpus,
)
from llm_energy.models.hub_download import download_hub_model
from llm_energy.models.inspection import (
    ParameterCount,
    count_parameters,
    count_parameters_from_headers,
    describe_model,
    key_dims,
)
from llm_energy.models.specs import (
    BUILTIN_ARCHITECTURES,
    DEFAULT_HUB_ALLOW_PATTERNS,
    SAVE_DTYPES,
    SOURCES,
    BuiltinSpec,
    HubSpec,
    LocalSpec,
    parse_spec,
)
from llm_energy.models.stage import (
    ARTIFACT_NAME,
    MANIFEST_FILENAME,
    WEIGHTS_DIRNAME,
    prepare_model,
    read_model_manifest,
    resolve_model_path,
)

__all__ = [
    "ARTIFACT_NAME",
    "BUILTIN_ARCHITECTURES",
    "BUNDLED_PROMPTS",
    "DEFAULT_HUB_ALLOW_PATTERNS",
    "MANIFEST_FILENAME",
    "SAVE_DTYPES",
    "SOURCES",
    "WEIGHTS_DIRNAME",
    "BuiltinSpec",
    "HubSpec",
    "LocalSpec",
    "ParameterCount",
    "build_builtin_model",
    "builtin_model_config",
    "count_parameters",
    "count_parameters_from_headers",
    "describe_model",
    "download_hub_model",
    "key_dims",
    "parse_spec",
    "prepare_model",
    "read_model_manifest",
    "read_prompt_corpus",
    "resolve_model_path",
]
