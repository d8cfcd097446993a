"""The datasets stage: turn one configured prompt source into `prompts.jsonl` + `manifest.json`.

A data set entry of the campaign (`datasets.<name>`) names a source:
- `bundled`: the prompts shipped with the package (`data/bundled_prompts.jsonl`), optionally by category;
- `synthetic`: prompts of exact token lengths drawn from a distribution, built with a real tokenizer;
- `file`: a local .txt / .jsonl / .csv / .parquet file;
- `hub`: a Hugging Face Hub data set (a short alias such as `gsm8k`, or any repo id), loaded with
  `datasets.load_dataset`, from the local cache when the hub cannot be reached.

Every source goes through the same selection: drop empty prompts, apply the `min_chars`/`max_chars`
filters, shuffle with `seed` if asked, take `sample_size`. The result is written atomically, and the
manifest (artifact type `dataset_manifest`) records the resolved spec, the sha256 of `prompts.jsonl`,
length statistics and, for hub sources, the commit that was actually loaded.

Token counts here never include special tokens (BOS/EOS): they describe the prompt text itself.

One module per concept: `records` (records, spec access), `sources` (files, bundled prompts),
`lengths` (synthetic prompts of exact token lengths), `hub_source` (hub data sets), `selection`
(filters, shuffle, sample, statistics), `stage` (prepare_dataset, load_prompts). The public names are
re-exported here, so `llm_energy.datasets.prepare_dataset` keeps working.
"""

from llm_energy.datasets.hub_source import (
    HUB_ALIASES,
    HUB_TIMEOUT_S,
    HubAlias,
    HubTarget,
    resolve_hub_target,
)
from llm_energy.datasets.lengths import (
    TOKEN_LENGTH_DISTRIBUTIONS,
    ExactLengthPromptBuilder,
    draw_token_lengths,
)
from llm_energy.datasets.records import LoadedSource, PromptRecord
from llm_energy.datasets.selection import length_stats, select_records, shuffle_key
from llm_energy.datasets.sources import (
    BUNDLED_PROMPTS_PATH,
    FILE_FORMATS,
    FILE_FORMATS_BY_SUFFIX,
    PROMPT_COLUMN_CANDIDATES,
    resolve_prompt_column,
)
from llm_energy.datasets.stage import (
    MANIFEST_ARTIFACT,
    MANIFEST_FILENAME,
    PROMPTS_FILENAME,
    SOURCES,
    UNCATEGORIZED,
    load_prompts,
    load_tokenizer,
    prepare_dataset,
)

__all__ = [
    "BUNDLED_PROMPTS_PATH",
    "FILE_FORMATS",
    "FILE_FORMATS_BY_SUFFIX",
    "HUB_ALIASES",
    "HUB_TIMEOUT_S",
    "MANIFEST_ARTIFACT",
    "MANIFEST_FILENAME",
    "PROMPTS_FILENAME",
    "PROMPT_COLUMN_CANDIDATES",
    "SOURCES",
    "TOKEN_LENGTH_DISTRIBUTIONS",
    "UNCATEGORIZED",
    "ExactLengthPromptBuilder",
    "HubAlias",
    "HubTarget",
    "LoadedSource",
    "PromptRecord",
    "draw_token_lengths",
    "length_stats",
    "load_prompts",
    "load_tokenizer",
    "prepare_dataset",
    "resolve_hub_target",
    "resolve_prompt_column",
    "select_records",
    "shuffle_key",
]
