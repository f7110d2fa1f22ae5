"""The Parquet tile table: one pyarrow schema, versioned, defined here only.

Columns are extended, never renamed; a change bumps ``SCHEMA_VERSION``.
Coordinates are level-0 pixels (OpenSlide's convention); ``size`` is the
tile side in tile pixels; ``downsample`` is level-0 pixels per tile pixel, so
a tile covers ``size * downsample`` level-0 pixels. ``level`` is the pyramid
level read and ``scale`` the tile pixels per pixel of it (1 when tiled by
level; below 1 when a level was shrunk to a requested mpp).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["tile_keys", "ROW_GROUP_SIZE", "SCHEMA", "SCHEMA_VERSION", "empty_table", "validate_table", "write_table_atomic"]

SCHEMA_VERSION = 2  # 2: `scale` (tiles at a physical resolution)
ROW_GROUP_SIZE = 128  # small row groups: cheap random access and fine-grained streaming

SCHEMA = pa.schema(
    [
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # dataset name
        pa.field("split", pa.string(), nullable=False),  # train / val / test
        pa.field("x", pa.int64(), nullable=False),  # level-0 pixels
        pa.field("y", pa.int64(), nullable=False),
        pa.field("level", pa.int16(), nullable=False),
        pa.field("downsample", pa.float64(), nullable=False),
        pa.field("size", pa.int32(), nullable=False),  # tile side, pixels of `level`
        pa.field("image", pa.binary(), nullable=False),  # encoded PNG or JPEG, RGB
        pa.field("mask", pa.binary()),  # encoded PNG of the class-index map
        pa.field("labels", pa.list_(pa.uint8())),  # multi-hot class presence (GERNE eq. 2)
        pa.field("label", pa.int32()),  # the slide's label, when the slide list gives one
        pa.field("tissue_ratio", pa.float32(), nullable=False),
        pa.field("class_ratios", pa.list_(pa.float32())),  # fraction of pixels per class
        pa.field("group", pa.int32()),  # set by the method that defines groups
        pa.field("mpp", pa.float64()),  # µm per tile pixel (achieved), when the slide says or one is assumed
        pa.field("scale", pa.float64()),  # tile pixels per pixel of `level` (1: read as is; < 1: shrunk to an mpp)
    ],
    metadata={b"histoweak.schema_version": str(SCHEMA_VERSION).encode()},
)


def empty_table() -> pa.Table:
    return SCHEMA.empty_table()


def validate_table(table: pa.Table, where: str = "table") -> None:
    """Raise ``ValueError`` naming ``where`` and the first column that disagrees with ``SCHEMA``."""
    for field in SCHEMA:
        if field.name not in table.schema.names:
            raise ValueError(f"{where}: missing column {field.name!r}")
        got = table.schema.field(field.name).type
        if got != field.type:
            raise ValueError(f"{where}: column {field.name!r} has type {got}, expected {field.type}")


def write_table_atomic(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` as Parquet to a temporary name beside ``path``, then rename.

    A reader (or a resumed job) never sees a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table.cast(SCHEMA), tmp, row_group_size=ROW_GROUP_SIZE, compression="none")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def tile_keys(slide_ids, xs, ys) -> list[str]:
    """One string per tile, ``"<slide_id>:<x:09d>:<y:09d>"``: unique in a tile table, and sorting by it sorts
    by slide, then x, then y (level-0 pixels)."""
    return [f"{s}:{int(x):09d}:{int(y):09d}" for s, x, y in zip(slide_ids, xs, ys)]
