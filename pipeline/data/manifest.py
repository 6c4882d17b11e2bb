"""The prepared dataset's on-disk contract: Parquet schemas, writing and reading.

See pipeline/data/SCHEMA.md for the documented layout. Bump SCHEMA_VERSION on any
incompatible change; readers refuse other versions with a clear message.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DataError

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
IMAGES_FILE = "images.parquet"
PAIRED_FILE = "paired.parquet"
CLASSES_FILE = "classes.json"
STATS_FILE = "stats.json"
PREVIEW_FILE = "preview.png"

_META = {b"schema_version": str(SCHEMA_VERSION).encode()}

IMAGES_SCHEMA = pa.schema([
    pa.field("schema_version", pa.int32(), nullable=False),
    pa.field("id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=False),
    pa.field("label_idx", pa.int64(), nullable=False),
    pa.field("image_png", pa.binary(), nullable=False),
    pa.field("mask_png", pa.binary(), nullable=True),
    pa.field("has_mask", pa.bool_(), nullable=False),
    pa.field("unpaired_pool", pa.bool_(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("channels", pa.int32(), nullable=False),
    pa.field("source_path", pa.string(), nullable=False),
    pa.field("source_id", pa.string(), nullable=False),
    pa.field("content_hash", pa.string(), nullable=False),
], metadata=_META)

PAIRED_SCHEMA = pa.schema([
    pa.field("schema_version", pa.int32(), nullable=False),
    pa.field("id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=False),
    pa.field("label_idx", pa.int64(), nullable=False),
    pa.field("a_png", pa.binary(), nullable=False),
    pa.field("b_png", pa.binary(), nullable=False),
    pa.field("mask_png", pa.binary(), nullable=True),
    pa.field("has_mask", pa.bool_(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("channels", pa.int32(), nullable=False),
    pa.field("source_path", pa.string(), nullable=False),
    pa.field("source_id", pa.string(), nullable=False),
    pa.field("content_hash", pa.string(), nullable=False),
], metadata=_META)

_BINARY = {"image_png", "mask_png", "a_png", "b_png"}


def sha256(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


def write_table(rows: Sequence[dict[str, Any]], schema: pa.Schema, path: Path, row_group_size: int = 256) -> None:
    """Write rows (dicts keyed by column) with `schema`; an empty list writes an empty table."""
    columns = {name: [row[name] for row in rows] for name in schema.names}
    table = pa.Table.from_pydict(columns, schema=schema)
    stats_cols = [n for n in schema.names if n not in _BINARY]
    pq.write_table(table, path, row_group_size=row_group_size, compression="zstd",
                   write_statistics=stats_cols)


def _check_dir(prepared_dir: Path) -> Path:
    prepared_dir = Path(prepared_dir)
    hint = f"Run `pipeline prepare --out {prepared_dir}` (or `dvc repro prepare`) first."
    if not prepared_dir.is_dir():
        raise DataError(f"{prepared_dir} is not a prepared dataset: the folder does not exist. {hint}")
    missing = [n for n in (CLASSES_FILE, IMAGES_FILE) if not (prepared_dir / n).is_file()]
    if missing:
        raise DataError(f"{prepared_dir} is not a prepared dataset: {', '.join(missing)} missing. {hint}")
    return prepared_dir


def read_classes(prepared_dir: Path) -> dict:
    """classes.json contents: {"classes": [...], "resolution": R, "channels": C, "schema_version": 1}."""
    prepared_dir = _check_dir(prepared_dir)
    try:
        info = json.loads((prepared_dir / CLASSES_FILE).read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{prepared_dir / CLASSES_FILE} is unreadable ({err}). Re-run `pipeline prepare`.") from None
    version = info.get("schema_version") if isinstance(info, dict) else None
    if version != SCHEMA_VERSION:
        raise DataError(f"{prepared_dir} has schema_version {version!r}; this code reads version "
                        f"{SCHEMA_VERSION}. Re-run `pipeline prepare --out {prepared_dir}`.")
    return info


def read_table(prepared_dir: Path, name: str = IMAGES_FILE, split: Optional[str] = None,
               columns: Optional[Iterable[str]] = None) -> pa.Table:
    """One table of a prepared dataset, optionally filtered to one split."""
    prepared_dir = _check_dir(prepared_dir)
    if split is not None and split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)} or None for all.")
    path = prepared_dir / name
    if not path.is_file():
        raise DataError(f"{path} is missing. Re-run `pipeline prepare --out {prepared_dir}`.")
    try:
        meta = pq.read_schema(path).metadata or {}
        if meta.get(b"schema_version") != str(SCHEMA_VERSION).encode():
            raise DataError(f"{path} has schema_version {meta.get(b'schema_version')!r}, expected "
                            f"{SCHEMA_VERSION}. Re-run `pipeline prepare --out {prepared_dir}`.")
        filters = [("split", "=", split)] if split is not None else None
        return pq.read_table(path, columns=list(columns) if columns else None, filters=filters)
    except DataError:
        raise
    except Exception as err:  # corrupt parquet
        raise DataError(f"{path} cannot be read ({err}). Re-run `pipeline prepare --out {prepared_dir}`.") from None


def write_json(path: Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
