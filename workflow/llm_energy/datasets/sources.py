"""Table-shaped prompt sources (local .txt/.jsonl/.csv/.parquet files) and the bundled prompts."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from llm_energy.datasets.records import LoadedSource, PromptRecord, _key
from llm_energy.errors import ConfigError

logger = logging.getLogger(__name__)


BUNDLED_PROMPTS_PATH: Path = Path(__file__).resolve().parent.parent / "data" / "bundled_prompts.jsonl"


# Auto-detection order for the prompt column of files and hub data sets (case-insensitive).
PROMPT_COLUMN_CANDIDATES = ("text", "prompt", "question", "instruction", "input", "content")
FILE_FORMATS_BY_SUFFIX = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
FILE_FORMATS = ("txt", "jsonl", "csv", "parquet")


# ---------------------------------------------------------------------------------------------
# Table-shaped sources (files and hub data sets)


def resolve_prompt_column(columns: Sequence[str], requested: str | None, key: str, where: str) -> str:
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
            key,
            f"column '{requested}' not found in {where}; columns found: {list(columns)}",
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
        key,
        f"{location}: column '{column}' holds a {type(value).__name__}, not text",
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
        records.append(
            PromptRecord(
                prompt=prompt,
                source_id=str(source_id) if source_id not in (None, "") else location,
                category=None if category in (None, "") else str(category),
            )
        )
    return records, prompt_column


def _line_of_offset(raw: bytes, offset: int) -> int:
    return raw.count(b"\n", 0, offset) + 1


def _read_text(path: Path, key: str) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            key,
            f"{path} line {_line_of_offset(raw, exc.start)} is not valid UTF-8 ({exc.reason})",
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
            raise ConfigError(
                key, f"{path} line {line_no} is not valid JSON ({exc.msg})", "write one JSON object per line"
            ) from None
        if not isinstance(row, dict):
            raise ConfigError(
                key,
                f"{path} line {line_no} is a JSON {type(row).__name__}, not an object",
                'write one JSON object per line, e.g. {"prompt": "..."}',
            )
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
                raise ConfigError(
                    key,
                    f"{path} line {start_line} has more fields than the header ({len(columns)} columns)",
                    "quote fields that contain commas",
                )
            rows.append((f"{path.name}:{start_line}", row))
    except csv.Error as exc:
        raise ConfigError(
            key, f"{path} line {reader.line_num} is not valid CSV ({exc})", "fix the quoting on that line"
        ) from None
    return rows, columns


def _parquet_rows(path: Path, key: str) -> tuple[list[tuple[str, dict]], list[str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several error types for corrupt files
        raise ConfigError(
            key, f"{path} is not a readable Parquet file ({exc})", "check the file, or set format to match its content"
        ) from None
    rows = [(f"{path.name}:row{i}", row) for i, row in enumerate(table.to_pylist())]
    return rows, list(table.column_names)


_FILE_READERS: dict[str, Callable[[Path, str], tuple[list[tuple[str, dict]], list[str]]]] = {
    "txt": _txt_rows,
    "jsonl": _jsonl_rows,
    "csv": _csv_rows,
    "parquet": _parquet_rows,
}


def _load_file(name: str, spec: Mapping[str, Any], tokenizer: Any) -> LoadedSource:
    path = Path(spec["path"])
    if not path.is_file():
        raise ConfigError(
            _key(name, "path"),
            f"file {path} does not exist (resolved to {path.resolve()})",
            "fix the path; relative paths are relative to the working directory",
        )
    file_format = spec.get("format")
    if file_format is None:
        file_format = FILE_FORMATS_BY_SUFFIX.get(path.suffix.lower())
        if file_format is None:
            raise ConfigError(
                _key(name, "format"),
                f"cannot tell the format of {path} from its extension '{path.suffix}'",
                f"set format to one of {list(FILE_FORMATS)}",
            )
    requested = spec.get("prompt_column")
    if file_format == "txt" and requested is not None:
        logger.warning("datasets.%s: prompt_column=%r is ignored for .txt files (one prompt per line)", name, requested)
        requested = None
    rows, columns = _FILE_READERS[file_format](path, _key(name, "path"))
    records, prompt_column = _records_from_rows(
        rows,
        columns,
        requested_column=requested,
        key=_key(name, "prompt_column"),
        where=str(path),
    )
    return LoadedSource(
        records=records,
        resolved_spec={"format": file_format, "prompt_column": prompt_column if file_format != "txt" else None},
        source_path=path,
    )


# ---------------------------------------------------------------------------------------------
# Bundled prompts


def _load_bundled(name: str, spec: Mapping[str, Any], tokenizer: Any) -> LoadedSource:
    rows = [json.loads(line) for line in BUNDLED_PROMPTS_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]
    categories = spec.get("categories")
    available = sorted({row["category"] for row in rows})
    if categories is not None:
        unknown = sorted(set(categories) - set(available))
        if unknown:
            raise ConfigError(
                _key(name, "categories"), f"unknown categories {unknown}", f"use some of {available}, or null for all"
            )
        rows = [row for row in rows if row["category"] in set(categories)]
    records = [PromptRecord(prompt=row["prompt"], source_id=row["id"], category=row["category"]) for row in rows]
    return LoadedSource(records=records, source_path=BUNDLED_PROMPTS_PATH)
