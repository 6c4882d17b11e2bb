"""The prepared dataset's on-disk contract: Parquet schemas, writing and reading.

See pipeline/data/SCHEMA.md for the documented layout. Version 1: whole images; version 2:
patches (version 1 + PATCH_COLUMNS). Bump on any incompatible change; readers refuse versions
outside READABLE_VERSIONS with a clear message.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DataError

SCHEMA_VERSION = 1          # whole-image datasets (prepare.resize crop / stretch): unchanged since version 1
PATCH_SCHEMA_VERSION = 2    # patch datasets (prepare.resize: patches): version 1 + the PATCH_COLUMNS
READABLE_VERSIONS = (SCHEMA_VERSION, PATCH_SCHEMA_VERSION)
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

# A patch's link to its source image (patch datasets only; SCHEMA.md "Patch columns").
PATCH_COLUMNS = [
    pa.field("source_image", pa.string(), nullable=False),
    pa.field("patch_x", pa.int32(), nullable=False),
    pa.field("patch_y", pa.int32(), nullable=False),
    pa.field("scale", pa.float64(), nullable=False),
]


def _versioned(schema: pa.Schema, version: int) -> pa.Schema:
    return schema.with_metadata({b"schema_version": str(version).encode()})


PATCH_IMAGES_SCHEMA = _versioned(pa.schema(list(IMAGES_SCHEMA) + PATCH_COLUMNS), PATCH_SCHEMA_VERSION)
PATCH_PAIRED_SCHEMA = _versioned(PAIRED_SCHEMA, PATCH_SCHEMA_VERSION)

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
    """classes.json contents: {"classes": [...], "resolution": R, "channels": C, "schema_version": 1 or 2}
    (2: a patch dataset, whose images.parquet has the PATCH_COLUMNS too)."""
    prepared_dir = _check_dir(prepared_dir)
    try:
        info = json.loads((prepared_dir / CLASSES_FILE).read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{prepared_dir / CLASSES_FILE} is unreadable ({err}). Re-run `pipeline prepare`.") from None
    version = info.get("schema_version") if isinstance(info, dict) else None
    if version not in READABLE_VERSIONS:
        raise DataError(f"{prepared_dir} has schema_version {version!r}; this code reads versions "
                        f"{', '.join(map(str, READABLE_VERSIONS))}. Re-run `pipeline prepare --out {prepared_dir}`.")
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
        if meta.get(b"schema_version") not in {str(v).encode() for v in READABLE_VERSIONS}:
            raise DataError(f"{path} has schema_version {meta.get(b'schema_version')!r}, expected one of "
                            f"{', '.join(map(str, READABLE_VERSIONS))}. "
                            f"Re-run `pipeline prepare --out {prepared_dir}`.")
        filters = [("split", "=", split)] if split is not None else None
        return pq.read_table(path, columns=list(columns) if columns else None, filters=filters)
    except DataError:
        raise
    except Exception as err:  # corrupt parquet
        raise DataError(f"{path} cannot be read ({err}). Re-run `pipeline prepare --out {prepared_dir}`.") from None


def write_json(path: Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
