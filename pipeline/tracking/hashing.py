"""The identity of a prepared dataset, the `dataset_hash` tag of every training run and model
version: two runs with the same hash trained on the same images."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.fsutil import hash_file


def dataset_hash(data_dir: Path) -> str:
    """sha256 of the prepared dataset's identity: classes.json and, per Parquet table, the
    (id, split, content_hash) columns in file order (the file bytes when those are missing)."""
    import pyarrow.parquet as pq

    data_dir = Path(data_dir)
    h = hashlib.sha256()
    for name in ("classes.json", "images.parquet", "paired.parquet"):
        path = data_dir / name
        if not path.exists():
            continue
        h.update(name.encode())
        if path.suffix == ".parquet":
            try:
                table = pq.read_table(path, columns=["id", "split", "content_hash"])
                for col in ("id", "split", "content_hash"):
                    h.update("\x1f".join(table.column(col).to_pylist()).encode())
                continue
            except Exception:  # other layout: hash the bytes
                pass
        hash_file(path, h)
    return h.hexdigest()
