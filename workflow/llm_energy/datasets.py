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
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import random
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_energy import hub
from llm_energy.artifacts import (
    atomic_write_bytes,
    read_json_artifact,
    sha256_file,
    sha256_json,
    validate_data,
    write_json_artifact,
)
from llm_energy.errors import ArtifactError, ConfigError, SourceUnavailableError

logger = logging.getLogger(__name__)

BUNDLED_PROMPTS_PATH: Path = Path(__file__).resolve().parent / "data" / "bundled_prompts.jsonl"
PROMPTS_FILENAME = "prompts.jsonl"
MANIFEST_FILENAME = "manifest.json"
MANIFEST_ARTIFACT = "dataset_manifest"

SOURCES = ("bundled", "synthetic", "file", "hub")
# Auto-detection order for the prompt column of files and hub data sets (case-insensitive).
PROMPT_COLUMN_CANDIDATES = ("text", "prompt", "question", "instruction", "input", "content")
FILE_FORMATS_BY_SUFFIX = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
                          ".parquet": "parquet"}
FILE_FORMATS = ("txt", "jsonl", "csv", "parquet")
TOKEN_LENGTH_DISTRIBUTIONS = ("fixed", "uniform", "normal", "lognormal")
# Categories histogram key for prompts without a category.
UNCATEGORIZED = "uncategorized"
# Seconds to wait for the hub before falling back to the local cache. Short on purpose: a pipeline
# without network must fail (or use its cache) in seconds, not after minutes of retries.
HUB_TIMEOUT_S = 10.0


# ---------------------------------------------------------------------------------------------
# Records and sources


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
        repo_id="tatsu-lab/alpaca", config_name=None, split="train",
        extract_prompt=_alpaca_prompt,
        description="instruction, followed by its input when there is one",
    ),
    "sharegpt": HubAlias(
        repo_id="anon8231489123/ShareGPT_Vicuna_unfiltered", config_name=None, split="train",
        extract_prompt=_first_human_turn,
        # The repository holds several JSON files; this is the one inference benchmarks use.
        data_files="ShareGPT_V3_unfiltered_cleaned_split.json",
        description="first human turn of `conversations`",
    ),
    "gsm8k": HubAlias(
        repo_id="openai/gsm8k", config_name="main", split="test",
        extract_prompt=_column("question"), description="column `question`",
    ),
    "mmlu": HubAlias(
        repo_id="cais/mmlu", config_name="all", split="test",
        extract_prompt=_column("question"), extract_category=_column("subject"),
        description="column `question`, category from `subject`",
    ),
}


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


# ---------------------------------------------------------------------------------------------
# Table-shaped sources (files and hub data sets)


def resolve_prompt_column(
    columns: Sequence[str], requested: str | None, key: str, where: str
) -> str:
    """Pick the prompt column: the requested one (exact, else case-insensitive) or the first of
    PROMPT_COLUMN_CANDIDATES present. Raise ConfigError listing the columns otherwise."""
    by_lower: dict[str, list[str]] = {}
    for column in columns:
        by_lower.setdefault(column.lower(), []).append(column)
    if requested is not None:
        if requested in columns:
            return requested
        matches = by_lower.get(requested.lower(), [])
        if len(matches) == 1:
            return matches[0]
        raise ConfigError(
            key, f"column '{requested}' not found in {where}; columns found: {list(columns)}",
            "set it to one of the columns found",
        )
    for candidate in PROMPT_COLUMN_CANDIDATES:
        matches = by_lower.get(candidate, [])
        if matches:
            return matches[0]
    raise ConfigError(
        key,
        f"no prompt column found in {where}: none of {list(PROMPT_COLUMN_CANDIDATES)} is among its "
        f"columns {list(columns)}",
        "set it to the name of the column that holds the prompts",
    )


def _optional_column(columns: Sequence[str], wanted: str, exclude: str | None) -> str | None:
    for column in columns:
        if column.lower() == wanted and column != exclude:
            return column
    return None


def _cell_to_text(value: Any, key: str, location: str, column: str) -> str:
    """A prompt cell as text: missing -> "" (dropped later as empty), numbers -> str, else error."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(
        key, f"{location}: column '{column}' holds a {type(value).__name__}, not text",
        "point prompt_column at a column of plain text",
    )


def _records_from_rows(
    rows: Iterable[tuple[str, Mapping[str, Any]]],
    columns: Sequence[str],
    *,
    requested_column: str | None,
    key: str,
    where: str,
    extract_prompt: Callable[[Mapping[str, Any]], Any] | None = None,
    extract_category: Callable[[Mapping[str, Any]], Any] | None = None,
) -> tuple[list[PromptRecord], str | None]:
    """Turn (location, row) pairs into records. Returns the records and the prompt column used
    (None when `extract_prompt` from a hub alias did the work)."""
    prompt_column: str | None = None
    if extract_prompt is None or requested_column is not None:
        prompt_column = resolve_prompt_column(columns, requested_column, key, where)
        extract_prompt = None
    id_column = _optional_column(columns, "id", prompt_column)
    category_column = None if extract_category else _optional_column(columns, "category", prompt_column)
    records = []
    for location, row in rows:
        if extract_prompt is not None:
            prompt = _cell_to_text(extract_prompt(row), key, location, "(alias extractor)")
        else:
            prompt = _cell_to_text(row.get(prompt_column), key, location, prompt_column)
        category = None
        if extract_category is not None:
            category = extract_category(row)
        elif category_column is not None:
            category = row.get(category_column)
        source_id = row.get(id_column) if id_column else None
        records.append(PromptRecord(
            prompt=prompt,
            source_id=str(source_id) if source_id not in (None, "") else location,
            category=None if category in (None, "") else str(category),
        ))
    return records, prompt_column


def _line_of_offset(raw: bytes, offset: int) -> int:
    return raw.count(b"\n", 0, offset) + 1


def _read_text(path: Path, key: str) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            key, f"{path} line {_line_of_offset(raw, exc.start)} is not valid UTF-8 ({exc.reason})",
            "save the file as UTF-8",
        ) from None


def _txt_rows(path: Path, key: str) -> tuple[list[tuple[str, dict]], list[str]]:
    rows = []
    for line_no, line in enumerate(_read_text(path, key).splitlines(), start=1):
        if line.strip():
            rows.append((f"{path.name}:{line_no}", {"text": line}))
    return rows, ["text"]


def _jsonl_rows(path: Path, key: str) -> tuple[list[tuple[str, dict]], list[str]]:
    rows, columns = [], {}
    for line_no, line in enumerate(_read_text(path, key).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(key, f"{path} line {line_no} is not valid JSON ({exc.msg})",
                              "write one JSON object per line") from None
        if not isinstance(row, dict):
            raise ConfigError(key, f"{path} line {line_no} is a JSON {type(row).__name__}, not an object",
                              'write one JSON object per line, e.g. {"prompt": "..."}')
        columns.update(dict.fromkeys(row))
        rows.append((f"{path.name}:{line_no}", row))
    return rows, list(columns)


def _csv_rows(path: Path, key: str) -> tuple[list[tuple[str, dict]], list[str]]:
    reader = csv.DictReader(_read_text(path, key).splitlines(keepends=True))
    rows = []
    try:
        columns = list(reader.fieldnames or [])
        last_line = reader.line_num
        for row in reader:
            start_line = last_line + 1  # a quoted field may span lines: report where the row starts
            last_line = reader.line_num
            if None in row:
                raise ConfigError(key, f"{path} line {start_line} has more fields than the header "
                                       f"({len(columns)} columns)", "quote fields that contain commas")
            rows.append((f"{path.name}:{start_line}", row))
    except csv.Error as exc:
        raise ConfigError(key, f"{path} line {reader.line_num} is not valid CSV ({exc})",
                          "fix the quoting on that line") from None
    return rows, columns


def _parquet_rows(path: Path, key: str) -> tuple[list[tuple[str, dict]], list[str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several error types for corrupt files
        raise ConfigError(key, f"{path} is not a readable Parquet file ({exc})",
                          "check the file, or set format to match its content") from None
    rows = [(f"{path.name}:row{i}", row) for i, row in enumerate(table.to_pylist())]
    return rows, list(table.column_names)


_FILE_READERS: dict[str, Callable[[Path, str], tuple[list[tuple[str, dict]], list[str]]]] = {
    "txt": _txt_rows, "jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows,
}


def _load_file(name: str, spec: Mapping[str, Any], tokenizer: Any) -> LoadedSource:
    path = Path(_required(spec, name, "path", "set it to the prompts file (.txt, .jsonl, .csv, .parquet)"))
    if not path.is_file():
        raise ConfigError(_key(name, "path"), f"file {path} does not exist (resolved to {path.resolve()})",
                          "fix the path; relative paths are relative to the working directory")
    file_format = spec.get("format")
    if file_format is None:
        file_format = FILE_FORMATS_BY_SUFFIX.get(path.suffix.lower())
        if file_format is None:
            raise ConfigError(_key(name, "format"),
                              f"cannot tell the format of {path} from its extension '{path.suffix}'",
                              f"set format to one of {list(FILE_FORMATS)}")
    elif file_format not in FILE_FORMATS:
        raise ConfigError(_key(name, "format"), f"unknown format {file_format!r}",
                          f"use one of {list(FILE_FORMATS)} or null to use the extension")
    requested = spec.get("prompt_column")
    if file_format == "txt" and requested is not None:
        logger.warning("datasets.%s: prompt_column=%r is ignored for .txt files (one prompt per line)",
                       name, requested)
        requested = None
    rows, columns = _FILE_READERS[file_format](path, _key(name, "path"))
    records, prompt_column = _records_from_rows(
        rows, columns, requested_column=requested, key=_key(name, "prompt_column"), where=str(path),
    )
    return LoadedSource(
        records=records,
        resolved_spec={"format": file_format,
                       "prompt_column": prompt_column if file_format != "txt" else None},
        source_path=path,
    )


# ---------------------------------------------------------------------------------------------
# Bundled prompts


def _load_bundled(name: str, spec: Mapping[str, Any], tokenizer: Any) -> LoadedSource:
    rows = [json.loads(line) for line in BUNDLED_PROMPTS_PATH.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    categories = spec.get("categories")
    available = sorted({row["category"] for row in rows})
    if categories is not None:
        if isinstance(categories, str) or not isinstance(categories, Sequence):
            raise ConfigError(_key(name, "categories"), f"must be a list or null, got {categories!r}",
                              f"list some of {available}")
        unknown = sorted(set(categories) - set(available))
        if unknown:
            raise ConfigError(_key(name, "categories"), f"unknown categories {unknown}",
                              f"use some of {available}, or null for all")
        rows = [row for row in rows if row["category"] in set(categories)]
    records = [PromptRecord(prompt=row["prompt"], source_id=row["id"], category=row["category"])
               for row in rows]
    return LoadedSource(records=records, source_path=BUNDLED_PROMPTS_PATH)


# ---------------------------------------------------------------------------------------------
# Synthetic prompts of exact token lengths


def _uniform_int(rng: random.Random, low: int, high: int) -> int:
    # Only Random.random() is guaranteed to give the same stream on every Python version, so
    # integers and distributions are derived from it (inverse transform) rather than from
    # randint/gauss or numpy, whose algorithms may change between releases.
    return low + min(int(rng.random() * (high - low + 1)), high - low)


def draw_token_lengths(
    input_tokens: Mapping[str, Any], count: int, rng: random.Random, key: str
) -> list[int]:
    """Draw `count` prompt lengths (tokens, >= 1) from the `input_tokens` distribution.

    - fixed: `value`;
    - uniform: integers in [`min`, `max`], both included;
    - normal: `mean`, `std`, truncated to [`min`, `max`] and rounded;
    - lognormal: `mean` is the mean token count (not the mean of the log), `sigma` the standard
      deviation of the log, truncated to [`min`, `max`] and rounded.
    Truncation is exact (inverse CDF over the truncated range), not clipping: no spikes at the bounds.
    `min` defaults to 1 and `max` to no limit for normal and lognormal.
    """
    if not isinstance(input_tokens, Mapping):
        raise ConfigError(key, f"must be a mapping with a 'distribution', got {input_tokens!r}",
                          "e.g. {distribution: fixed, value: 128}")
    distribution = input_tokens.get("distribution")

    def number(item: str, default: float | None = None, positive: bool = False) -> float:
        value = input_tokens.get(item, default)
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
                or (positive and value == 0)):
            raise ConfigError(f"{key}.{item}", f"must be a {'positive' if positive else 'non-negative'} number "
                                               f"for distribution '{distribution}', got {value!r}",
                              f"set {key}.{item}")
        return float(value)

    def integer(item: str, default: int | None = None) -> int:
        value = input_tokens.get(item, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}.{item}", f"must be an integer >= 1, got {value!r}",
                              "token lengths are whole numbers of at least 1")
        return value

    if distribution == "fixed":
        return [integer("value")] * count
    if distribution not in TOKEN_LENGTH_DISTRIBUTIONS:
        raise ConfigError(f"{key}.distribution", f"unknown distribution {distribution!r}",
                          f"use one of {list(TOKEN_LENGTH_DISTRIBUTIONS)}")
    if distribution == "uniform":
        low, high = integer("min"), integer("max")
    else:
        low = integer("min", 1)
        high = integer("max") if input_tokens.get("max") is not None else None
    if high is not None and high < low:
        raise ConfigError(f"{key}.max", f"max ({high}) is below min ({low})", "swap or fix the bounds")
    if distribution == "uniform":
        return [_uniform_int(rng, low, high) for _ in range(count)]

    spread_item = "std" if distribution == "normal" else "sigma"
    if number(spread_item) == 0:  # degenerate: every prompt gets the mean, kept inside the bounds
        mean = number("mean", positive=distribution == "lognormal")
        return [min(max(round(mean), low), high if high is not None else round(mean))] * count
    if distribution == "normal":
        normal = statistics.NormalDist(number("mean"), number("std", positive=True))
        to_length: Callable[[float], float] = lambda x: x  # noqa: E731
        from_length: Callable[[float], float] = lambda x: x  # noqa: E731
    else:
        mean, sigma = number("mean", positive=True), number("sigma", positive=True)
        # E[X] = exp(mu + sigma^2 / 2) for a lognormal X, so mu follows from the wanted mean.
        normal = statistics.NormalDist(math.log(mean) - sigma**2 / 2, sigma)
        to_length = math.exp
        from_length = lambda x: math.log(x) if x > 0 else -math.inf  # noqa: E731

    def cdf(x: float) -> float:
        z = from_length(x)
        return 0.0 if z == -math.inf else normal.cdf(z)

    # Continuous values in [low - 0.5, high + 0.5) round to integers in [low, high].
    lo_p = cdf(low - 0.5)
    hi_p = 1.0 if high is None else cdf(high + 0.5)
    lengths = []
    for _ in range(count):
        p = lo_p + rng.random() * (hi_p - lo_p)
        p = min(max(p, 1e-12), 1 - 1e-12)  # inv_cdf is undefined at 0 and 1
        length = round(to_length(normal.inv_cdf(p)))
        lengths.append(min(max(length, low), high if high is not None else length))
    return lengths


class ExactLengthPromptBuilder:
    """Builds text whose token count with one tokenizer is exactly a target.

    Text comes from a corpus of words (the bundled prompts), read from a start position: the longest
    word prefix that does not exceed the target is found by bisection, then the missing tokens are
    added by cutting the token ids of one more word to the target and decoding, or, when the tokenizer
    merges differently after decoding, by appending short pieces that each add one token. Every
    candidate is re-encoded and checked, so the result is exact for any tokenizer.
    """

    FILLER_PIECES = (" the", " a", " and", ".", ",", " of", " to", " is", " in", " it", "!", "?", " x",
                     " I", "a", "e", " ")

    def __init__(self, tokenizer: Any, words: Sequence[str]):
        if not words:
            raise ValueError("the word corpus is empty")
        self.tokenizer = tokenizer
        self.words = list(words)

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _text(self, start: int, n_words: int) -> str:
        size = len(self.words)
        return " ".join(self.words[(start + i) % size] for i in range(n_words))

    def build(self, target: int, start: int) -> str | None:
        """Text of exactly `target` tokens starting at word `start`, or None if none was found."""
        # 1. Grow the window until it reaches the target (doubling keeps the encodes few).
        n_words = max(1, target)
        while self.count(self._text(start, n_words)) < target:
            n_words *= 2
        if self.count(self._text(start, n_words)) == target:
            return self._text(start, n_words)
        # 2. Bisect: count(prefix(low)) <= target < count(prefix(high)).
        low, high = 0, n_words
        while high - low > 1:
            middle = (low + high) // 2
            if self.count(self._text(start, middle)) <= target:
                low = middle
            else:
                high = middle
        base = self._text(start, low)
        base_count = self.count(base) if low else 0
        if base_count == target:
            return base
        # 3. Cut the next word's tokens: natural text in the common case.
        ids = self.tokenizer.encode(self._text(start, high), add_special_tokens=False)[:target]
        cut = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if "\ufffd" not in cut and self.count(cut) == target:
            return cut
        # 4. Top up one token at a time with pieces verified to add exactly one token.
        text, current = base, base_count
        while current < target:
            for piece in self.FILLER_PIECES:
                if self.count(text + piece) == current + 1:
                    text, current = text + piece, current + 1
                    break
            else:
                return None
        return text


def _bundled_words() -> list[str]:
    words: list[str] = []
    for line in BUNDLED_PROMPTS_PATH.read_text(encoding="utf-8").splitlines():
        if line.strip():
            words.extend(json.loads(line)["prompt"].split())
    return words


def _load_synthetic(name: str, spec: Mapping[str, Any], tokenizer: Any) -> LoadedSource:
    key = _key(name, "input_tokens")
    if tokenizer is None:
        raise ConfigError(
            key, "a synthetic data set needs a tokenizer to build prompts of exact token lengths, "
                 "but prepare_dataset got no tokenizer_dir",
            "pass the tokenizer (folder of the model the prompts are meant for) as tokenizer_dir",
        )
    count = spec.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(_key(name, "count"), f"must be an integer >= 1, got {count!r}",
                          "set how many synthetic prompts to build")
    rng = random.Random(int(spec.get("seed") or 0))
    lengths = draw_token_lengths(_required(spec, name, "input_tokens", "e.g. {distribution: fixed, "
                                           "value: 128}"), count, rng, key)
    builder = ExactLengthPromptBuilder(tokenizer, _bundled_words())
    records = []
    from tqdm import tqdm

    for i, target in enumerate(tqdm(lengths, desc=f"synthetic prompts ({name})", mininterval=5,
                                    disable=count < 50)):
        start = _uniform_int(rng, 0, len(builder.words) - 1)
        text = builder.build(target, start)
        if text is None:
            raise ConfigError(key, f"cannot build a prompt of exactly {target} tokens with the tokenizer "
                                   f"'{getattr(tokenizer, 'name_or_path', tokenizer)}'",
                              "use other lengths (e.g. a larger min) or another tokenizer")
        records.append(PromptRecord(prompt=text, source_id=f"synthetic-{i:06d}", target_tokens=target))
    return LoadedSource(records=records)


# ---------------------------------------------------------------------------------------------
# Hugging Face Hub


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
    dataset_id = _required(spec, name, "id", f"set it to an alias ({sorted(HUB_ALIASES)}) or a repo "
                                              "id such as 'openai/gsm8k'")
    alias = HUB_ALIASES.get(str(dataset_id).lower())
    if alias is None and str(dataset_id).count("/") != 1:
        raise ConfigError(_key(name, "id"), f"{dataset_id!r} is neither a known alias nor a repo id",
                          f"use one of {sorted(HUB_ALIASES)} or 'owner/name'")
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
        return ConfigError(_key(name, "config_name"), f"{target.repo_id}: {message}",
                           "set config_name to one of the available configurations")
    return SourceUnavailableError(f"data set '{name}' ({target.repo_id}): load_dataset failed: {message}")


def _load_hub_dataset(name: str, target: HubTarget) -> tuple[Any, str | None]:
    """Return (datasets.Dataset, resolved commit). Online: ask the hub for the commit with a short
    timeout, then load that commit. Offline or unreachable: the snapshot in the hub cache (what
    `hf download` or an earlier online load_dataset left there), else datasets' own cache."""
    import datasets
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import errors as hub_errors
    from huggingface_hub.utils import httpx as hub_httpx

    load_kwargs: dict[str, Any] = {"name": target.config_name, "split": target.split,
                                   "cache_dir": str(_datasets_cache_dir())}
    if target.data_files:
        load_kwargs["data_files"] = target.data_files

    reason = "offline mode is on (HF_HUB_OFFLINE)"
    if not hub.offline("HF_DATASETS_OFFLINE"):
        try:
            info = HfApi().dataset_info(target.repo_id, revision=target.revision, timeout=HUB_TIMEOUT_S)
        except hub_errors.GatedRepoError:
            raise SourceUnavailableError(
                f"data set '{name}' ({target.repo_id}) is gated: accept its terms on the hub and set "
                f"HF_TOKEN in the environment") from None
        except hub_errors.RevisionNotFoundError:
            raise ConfigError(_key(name, "revision"), f"revision {target.revision!r} does not exist for "
                              f"{target.repo_id}", "use a branch, tag or commit of that repository") from None
        except hub_errors.RepositoryNotFoundError:
            raise ConfigError(_key(name, "id"), f"data set {target.repo_id!r} does not exist on the hub "
                              "(or is private)", "check the repo id; private sets need HF_TOKEN") from None
        except (hub_httpx.ConnectError, hub_httpx.TimeoutException, hub_errors.OfflineModeIsEnabled,
                OSError) as exc:
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
        snapshot = Path(snapshot_download(target.repo_id, repo_type="dataset", revision=target.revision,
                                          cache_dir=str(hub.cache_dir()), local_files_only=True))
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
        rows, columns, requested_column=spec.get("prompt_column"), key=_key(name, "prompt_column"),
        where=where, extract_prompt=alias.extract_prompt if alias else None,
        extract_category=alias.extract_category if alias else None,
    )
    resolved = {"repo_id": target.repo_id, "config_name": target.config_name, "split": target.split,
                "prompt_column": prompt_column}
    return LoadedSource(records=records, resolved_spec=resolved, hub_revision=revision)


_LOADERS: dict[str, Callable[[str, Mapping[str, Any], Any], LoadedSource]] = {
    "bundled": _load_bundled, "synthetic": _load_synthetic, "file": _load_file, "hub": _load_hub,
}


# ---------------------------------------------------------------------------------------------
# Selection, statistics, writing


def shuffle_key(seed: int, record: PromptRecord) -> str:
    """Sort key of a record for a seeded shuffle: a hash of seed, source id and text. Unlike a
    random permutation it is the same on every Python/numpy version, and a prompt keeps its relative
    position when other prompts are added to or removed from the source."""
    return sha256_json([seed, record.source_id, record.prompt])


def select_records(
    name: str, spec: Mapping[str, Any], records: Sequence[PromptRecord]
) -> tuple[list[PromptRecord], dict[str, int]]:
    """Drop empty prompts, apply the char filters, shuffle, sample. Returns (records, dropped counts)."""
    min_chars = _optional_int(spec, name, "min_chars", 0)
    max_chars = _optional_int(spec, name, "max_chars", 0)
    sample_size = _optional_int(spec, name, "sample_size", 1)
    if min_chars is not None and max_chars is not None and max_chars < min_chars:
        raise ConfigError(_key(name, "max_chars"), f"max_chars ({max_chars}) is below min_chars "
                          f"({min_chars})", "fix the bounds")
    dropped = {"empty": 0, "min_chars": 0, "max_chars": 0}
    kept = []
    for record in records:
        if not record.prompt.strip():
            dropped["empty"] += 1
        elif min_chars is not None and len(record.prompt) < min_chars:
            dropped["min_chars"] += 1
        elif max_chars is not None and len(record.prompt) > max_chars:
            dropped["max_chars"] += 1
        else:
            kept.append(record)
    if any(dropped.values()):
        logger.info("datasets.%s: dropped %s", name, dropped)
    if not kept:
        raise ConfigError(_key(name), f"no prompts left out of {len(records)} after dropping empty ones "
                          f"and applying min_chars={min_chars}, max_chars={max_chars} ({dropped})",
                          "loosen the filters or check the source")
    if spec.get("shuffle"):
        seed = spec.get("seed") or 0
        kept = sorted(kept, key=lambda record: shuffle_key(seed, record))
    if sample_size is not None:
        if sample_size > len(kept):
            raise ConfigError(_key(name, "sample_size"), f"asks for {sample_size} prompts but only "
                              f"{len(kept)} are available after filtering",
                              f"set it to at most {len(kept)}, or null for all of them")
        kept = kept[:sample_size]
    return kept, dropped


def length_stats(values: Sequence[int]) -> dict[str, float]:
    """min, max, mean, p50, p90 (linear interpolation, as numpy's default percentile)."""
    import numpy as np

    array = np.asarray(values, dtype=float)
    return {
        "min": int(array.min()), "max": int(array.max()), "mean": float(array.mean()),
        "p50": float(np.percentile(array, 50)), "p90": float(np.percentile(array, 90)),
    }


def load_tokenizer(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as exc:  # transformers raises OSError, ValueError, ... for unusable folders
        raise ArtifactError(f"{tokenizer_dir}: cannot load a tokenizer with transformers.AutoTokenizer "
                            f"({type(exc).__name__}: {exc})") from None


def _token_counts(tokenizer: Any, prompts: Sequence[str], batch_size: int = 512) -> list[int]:
    counts: list[int] = []
    for begin in range(0, len(prompts), batch_size):
        encoded = tokenizer(list(prompts[begin:begin + batch_size]), add_special_tokens=False)
        counts.extend(len(ids) for ids in encoded["input_ids"])
    return counts


def _prompt_lines(records: Sequence[PromptRecord]) -> Iterator[str]:
    for index, record in enumerate(records):
        line: dict[str, Any] = {"index": index, "prompt": record.prompt, "source_id": record.source_id,
                                "category": record.category}
        if record.target_tokens is not None:
            line["target_tokens"] = record.target_tokens
        yield json.dumps(line, ensure_ascii=False)


def prepare_dataset(
    name: str,
    spec: dict,
    out_dir: Path,
    tokenizer_dir: Path | None = None,
    provenance: dict | None = None,
) -> dict:
    """Load the data set `datasets.<name>` described by `spec`, select its prompts and write
    `out_dir/prompts.jsonl` and `out_dir/manifest.json`. Returns the manifest data."""
    out_dir = Path(out_dir)
    source = spec.get("source")
    if source not in _LOADERS:
        raise ConfigError(_key(name, "source"), f"unknown source {source!r}", f"use one of {list(SOURCES)}")
    tokenizer = load_tokenizer(Path(tokenizer_dir)) if tokenizer_dir is not None else None

    logger.info("datasets.%s: loading %s source", name, source)
    loaded = _LOADERS[source](name, spec, tokenizer)
    records, dropped = select_records(name, spec, loaded.records)

    payload = ("\n".join(_prompt_lines(records)) + "\n").encode("utf-8")
    prompts_path = out_dir / PROMPTS_FILENAME

    prompts = [record.prompt for record in records]
    if tokenizer is not None:
        token_length = length_stats(_token_counts(tokenizer, prompts))
        tokenizer_info = {"path": str(tokenizer_dir),
                          "name": str(getattr(tokenizer, "name_or_path", "") or tokenizer_dir),
                          "class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
                          "add_special_tokens": False}
        unavailable_reason = None
    else:
        token_length, tokenizer_info = None, None
        unavailable_reason = "no tokenizer_dir was given to prepare_dataset"

    categories = Counter(record.category if record.category is not None else UNCATEGORIZED
                         for record in records)
    resolved_spec = {**spec, **loaded.resolved_spec}
    manifest = {
        "name": name,
        "source": source,
        "spec": resolved_spec,
        "count": len(records),
        "prompts_sha256": hashlib.sha256(payload).hexdigest(),
        "source_sha256": sha256_file(loaded.source_path) if loaded.source_path else None,
        "char_length": length_stats([len(prompt) for prompt in prompts]),
        "token_length": token_length,
        "tokenizer": tokenizer_info,
        "token_length_unavailable_reason": unavailable_reason,
        "categories": dict(sorted(categories.items())),
        "dropped": dropped,
        "hub_revision": loaded.hub_revision,
    }
    if provenance is None:
        from llm_energy import provenance as provenance_module

        inputs = [p for p in (loaded.source_path, tokenizer_dir) if p is not None]
        provenance = provenance_module.collect(inputs=inputs, include_gpus=False)
    # Validate before replacing anything, so a failure never leaves new prompts beside an old manifest.
    validate_data(MANIFEST_ARTIFACT, manifest, where=str(out_dir / MANIFEST_FILENAME))
    atomic_write_bytes(prompts_path, payload)
    write_json_artifact(out_dir / MANIFEST_FILENAME, MANIFEST_ARTIFACT, manifest, provenance)
    logger.info("datasets.%s: wrote %d prompts to %s", name, len(records), prompts_path)
    return manifest


def load_prompts(dataset_dir: Path) -> list[dict]:
    """Read `prompts.jsonl` of a prepared data set, after checking it against its manifest."""
    dataset_dir = Path(dataset_dir)
    manifest = read_json_artifact(dataset_dir / MANIFEST_FILENAME, MANIFEST_ARTIFACT)["data"]
    prompts_path = dataset_dir / PROMPTS_FILENAME
    if not prompts_path.is_file():
        raise ArtifactError(f"{prompts_path}: not found (its manifest exists); rerun prepare_dataset")
    actual = sha256_file(prompts_path)
    if actual != manifest["prompts_sha256"]:
        raise ArtifactError(
            f"{prompts_path}: sha256 {actual} differs from {manifest['prompts_sha256']} recorded in "
            f"{dataset_dir / MANIFEST_FILENAME}; the file changed after it was prepared. Rerun "
            "prepare_dataset (delete the folder) rather than editing prompts by hand"
        )
    prompts = [json.loads(line) for line in prompts_path.read_text(encoding="utf-8").splitlines()
               if line.strip()]
    if len(prompts) != manifest["count"]:
        raise ArtifactError(f"{prompts_path}: {len(prompts)} prompts, manifest says {manifest['count']}")
    return prompts
