"""Versioned artifacts: the envelope, JSON Schema validation and atomic writes.

Every file a rule writes is an artifact. JSON artifacts are
    {"schema": "llm_energy/<name>", "schema_version": N, "provenance": {...}, "data": {...}}
and Parquet artifacts (tables, timelines) carry the same envelope, minus `data`, in the Parquet
key-value metadata under `llm_energy`. The JSON Schema of each artifact type lives in
`workflow/schemas/<name>.schema.json` and describes `data` (for tables: one row). Writes go to a
temporary file in the same folder, are fsynced and renamed, so a killed job never leaves a
half-written artifact behind.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from llm_energy.errors import ArtifactError

# Installed (wheel): the schemas ship as llm_energy/schemas/; in the source tree (and an editable
# install) they are workflow/schemas/, beside the package folder. pyproject.toml maps one to the other.
_PACKAGE_DIR = Path(__file__).resolve().parent
SCHEMA_DIR = _PACKAGE_DIR / "schemas" if (_PACKAGE_DIR / "schemas").is_dir() else _PACKAGE_DIR.parent / "schemas"
SCHEMA_PREFIX = "llm_energy/"
PARQUET_METADATA_KEY = b"llm_energy"

# Current version of each artifact type. Bump it when the data layout changes and register a
# migration from the old version in MIGRATIONS.
SCHEMA_VERSIONS: dict[str, int] = {
    "dataset_manifest": 1,
    "model_manifest": 1,
    "run_result": 2,
    "run_set": 1,
    "requests_table": 1,
    "timeline_table": 1,
    "flops_model": 1,
    "experiment_result": 2,
    "summary_table": 2,  # v2: narrow (headline metrics with CIs); every statistic moved to metrics_table
    "metrics_table": 1,
    "idle_baseline": 1,
}

# (schema name, from version) -> function turning data of that version into data of version+1.
MIGRATIONS: dict[tuple[str, int], Callable[[dict], dict]] = {
    # v2 added optional fields only (memory, engine_path, repeats, warm-up record, both baselines).
    ("run_result", 1): lambda data: data,
    # v2: FLOPs per cycle, from the model's cost model applied to each cycle's own requests; v1 had
    # cycle 1's total only, which is what its flops.total_flops still says.
    ("experiment_result", 1): lambda data: (
        data if data.get("flops") is None else {**data, "flops": {**data["flops"], "cycles": None}}
    ),
}


@cache
def load_schema(name: str) -> dict:
    path = SCHEMA_DIR / f"{name}.schema.json"
    if not path.is_file():
        raise ArtifactError(f"no JSON Schema for artifact type '{name}' (expected {path})")
    return json.loads(path.read_text())


def _json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON: store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _json_safe(value.item())
    return value


@cache
def _validator(name: str):
    """One checked validator per schema (jsonschema.validate would check the schema and build a
    validator on every call: most of the time of reading a run result, which figures of 1,000
    experiments do 1,000 times)."""
    schema = load_schema(name)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate_data(name: str, data: Any, where: str = "") -> None:
    """Validate `data` against the schema of artifact type `name`; raise ArtifactError if it fails."""
    error = jsonschema.exceptions.best_match(_validator(name).iter_errors(data))
    if error is not None:
        path = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ArtifactError(
            f"{where or name}: data does not match schema '{name}' at '{path}': {error.message}"
        ) from None


def envelope(name: str, provenance: Mapping[str, Any]) -> dict:
    if name not in SCHEMA_VERSIONS:
        raise ArtifactError(f"unknown artifact type '{name}'; known: {sorted(SCHEMA_VERSIONS)}")
    return {
        "schema": SCHEMA_PREFIX + name,
        "schema_version": SCHEMA_VERSIONS[name],
        "provenance": _json_safe(dict(provenance)),
    }


def atomic_write_bytes(path: Path | str, payload: bytes) -> None:
    """Write `payload` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json_artifact(path: Path | str, name: str, data: Mapping[str, Any], provenance: Mapping[str, Any]) -> dict:
    """Validate `data`, wrap it in the envelope and write it atomically. Returns the document."""
    data = _json_safe(dict(data))
    validate_data(name, data, where=str(path))
    document = {**envelope(name, provenance), "data": data}
    atomic_write_bytes(path, (json.dumps(document, indent=2, sort_keys=False) + "\n").encode())
    return document


def _check_envelope(document: Any, name: str, where: str) -> int:
    if not isinstance(document, dict) or "schema" not in document:
        raise ArtifactError(f"{where}: not an llm_energy artifact (no 'schema' field)")
    if document["schema"] != SCHEMA_PREFIX + name:
        raise ArtifactError(f"{where}: is a '{document['schema']}' artifact, expected '{SCHEMA_PREFIX}{name}'")
    version = document.get("schema_version")
    current = SCHEMA_VERSIONS[name]
    if not isinstance(version, int):
        raise ArtifactError(f"{where}: 'schema_version' is missing or not an integer")
    if version > current:
        raise ArtifactError(
            f"{where}: schema_version {version} of '{name}' is newer than this llm_energy "
            f"understands (up to {current}); upgrade llm_energy to read it"
        )
    return version


def migrate(name: str, version: int, data: dict, where: str) -> dict:
    current = SCHEMA_VERSIONS[name]
    while version < current:
        step = MIGRATIONS.get((name, version))
        if step is None:
            raise ArtifactError(
                f"{where}: schema_version {version} of '{name}' cannot be migrated to {current}; "
                f"re-create it with this version of llm_energy or read it with an older one"
            )
        data = step(data)
        version += 1
    return data


def read_json_artifact(path: Path | str, name: str) -> dict:
    """Read, migrate and validate a JSON artifact. Returns the whole document (data migrated)."""
    path = Path(path)
    where = str(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{where}: artifact not found") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{where}: not valid JSON ({exc})") from None
    version = _check_envelope(document, name, where)
    document["data"] = migrate(name, version, document.get("data", {}), where)
    document["schema_version"] = SCHEMA_VERSIONS[name]
    validate_data(name, document["data"], where=where)
    return document


# ---------------------------------------------------------------------------------------------
# Tables (Parquet)

_JSON_TYPE_TO_KINDS = {
    "integer": set("iu"),
    "number": set("iuf"),
    "string": set("OSUT"),
    "boolean": set("b"),
}


def validate_table(name: str, frame, where: str = "", columns: Sequence[str] | None = None) -> None:
    """Check a DataFrame against the row schema of `name`: required columns and their types (with
    `columns`: the frame holds only those, each of which the schema must know)."""
    schema = load_schema(name)
    where = where or name
    required = schema.get("required", []) if columns is None else list(columns)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ArtifactError(f"{where}: table '{name}' lacks required columns {missing}")
    if schema.get("additionalProperties") is False:
        extra = [c for c in frame.columns if c not in schema.get("properties", {})]
        if extra:
            raise ArtifactError(f"{where}: table '{name}' has unexpected columns {extra}")
    for column, spec in schema.get("properties", {}).items():
        if column not in frame.columns:
            continue
        types = spec.get("type", [])
        types = [types] if isinstance(types, str) else list(types)
        kinds: set[str] = set()
        for json_type in types:
            kinds |= _JSON_TYPE_TO_KINDS.get(json_type, set())
        if "null" in types:
            kinds |= set("f")  # missing values in numeric columns are NaN
        dtype = frame[column].dtype
        kind = getattr(dtype, "kind", "O")
        if str(dtype).startswith("string"):
            kind = "O"
        if kinds and kind not in kinds and not (len(frame) == 0 and kind == "O"):
            raise ArtifactError(f"{where}: column '{column}' of table '{name}' has dtype {dtype}, expected {types}")


def write_table_artifact(
    path: Path | str, name: str, frame, provenance: Mapping[str, Any], extra: Mapping | None = None
) -> None:
    """Validate a DataFrame and write it as Parquet with the envelope in its metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    validate_table(name, frame, where=str(path))
    meta = envelope(name, provenance)
    if extra:
        meta["table"] = _json_safe(dict(extra))
    table = pa.Table.from_pandas(frame, preserve_index=False)
    metadata = dict(table.schema.metadata or {})
    metadata[PARQUET_METADATA_KEY] = json.dumps(meta).encode()
    table = table.replace_schema_metadata(metadata)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def _read_parquet(path: Path, name: str, columns: Sequence[str] | None):
    """(Arrow table, envelope) of one Parquet artifact, its envelope checked (not yet its rows)."""
    import pyarrow.parquet as pq

    where = str(path)
    if not path.is_file():
        raise ArtifactError(f"{where}: artifact not found")
    try:
        # ParquetFile.read: a third of pq.read_table's time per file (no dataset discovery), which counts
        # for figures that read thousands of small tables.
        with pq.ParquetFile(path) as handle:
            table = handle.read(columns=list(columns) if columns is not None else None, use_threads=False)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise ArtifactError(f"{where}: not a readable Parquet file ({exc})") from None
    raw = (table.schema.metadata or {}).get(PARQUET_METADATA_KEY)
    if raw is None:
        raise ArtifactError(f"{where}: Parquet file has no llm_energy envelope in its metadata")
    meta = json.loads(raw)
    _check_envelope(meta, name, where)
    return table, meta


def read_table_artifact(path: Path | str, name: str, columns: Sequence[str] | None = None):
    """Read a Parquet artifact (only `columns` where given: figures of 1,000 experiments read a few
    columns of each table). Returns (DataFrame, envelope dict without data)."""
    path = Path(path)
    table, meta = _read_parquet(path, name, columns)
    frame = table.to_pandas()
    validate_table(name, frame, where=str(path), columns=columns)
    return frame, meta


def read_table_artifacts(paths: Sequence[Path | str], name: str, columns: Sequence[str], key: str, keys: Sequence[Any]):
    """Many Parquet artifacts of one type as one DataFrame of `columns`, plus column `key` holding
    keys[i] on the rows of paths[i]. Each envelope is checked; the rows are joined as Arrow, then
    converted and validated once (a figure pooling 3,000 request tables spent most of its time
    converting each one to pandas)."""
    import pyarrow as pa

    tables = []
    for path, value in zip(paths, keys):
        table, _meta = _read_parquet(Path(path), name, columns)
        tables.append(table.replace_schema_metadata(None).append_column(key, pa.array([value] * table.num_rows)))
    if not tables:
        import pandas as pd

        return pd.DataFrame(columns=[*columns, key])
    frame = pa.concat_tables(tables, promote_options="default").to_pandas()
    validate_table(name, frame.drop(columns=[key]), where=f"{len(tables)} '{name}' tables", columns=columns)
    return frame


def sha256_file(path: Path | str, chunk_size: int = 1 << 20) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    """Stable hash of a JSON-able value (sorted keys, no whitespace)."""
    import hashlib

    text = json.dumps(_json_safe(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
