"""The slide table: one row per whole slide, nothing tiled, for methods that read whole slides.

Layout::

    <dir>/slides.parquet     one row per slide (``SLIDE_SCHEMA``)
    <dir>/_manifest.json     {"kind": "slides", "schema_version", "source", "classes", "params",
                              "counts": {split: {size class or "unknown": n}}, "failures", "created"}

Every slide is opened once when the table is written, so its level-0 size, µm/px and level count are
facts of the file, not of the slide list. A slide that does not open, or a row with a bad value, is
listed in the manifest's ``failures`` by slide id, path and problem while the other slides are written.
The table is staged beside ``<dir>`` and renamed into place whole, so a reader never sees half of one.
A tile table's manifest has no ``kind``: ``is_slide_table`` tells the two apart.
"""

from __future__ import annotations

import csv
import json
import numbers
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from histoweak import _storage

__all__ = ["SIZE_CLASSES", "SLIDE_COLUMNS", "SLIDE_SCHEMA", "SLIDE_SCHEMA_VERSION", "SPLITS", "SlideTableReport",
           "is_slide_table", "read_slide_table", "slide_table_from_csv", "write_slide_table"]

SLIDE_SCHEMA_VERSION = 1
#: metastasis size classes (Camelyon's pN staging): no tumour, isolated tumour cells, micro-, macro-metastasis
SIZE_CLASSES = ("negative", "itc", "micro", "macro")
SPLITS = ("train", "val", "test")
TABLE = "slides.parquet"
MANIFEST = "_manifest.json"

SLIDE_SCHEMA = pa.schema(
    [
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # dataset name
        pa.field("split", pa.string(), nullable=False),  # train / val / test
        pa.field("path", pa.string(), nullable=False),  # absolute path (or URI) of the slide file
        pa.field("label", pa.int64(), nullable=False),  # slide label: 0 normal, 1 tumour
        pa.field("size_class", pa.string()),  # one of SIZE_CLASSES; null when unknown
        pa.field("center", pa.string()),  # hospital / site; null when unknown
        pa.field("mpp", pa.float64()),  # µm per level-0 pixel; null when the file does not say
        pa.field("width", pa.int64(), nullable=False),  # level-0 pixels
        pa.field("height", pa.int64(), nullable=False),
        pa.field("levels", pa.int64(), nullable=False),  # pyramid levels
    ],
    metadata={b"histoweak.slide_schema_version": str(SLIDE_SCHEMA_VERSION).encode()},
)

#: what a whole-slide method reads in training and evaluation
SLIDE_COLUMNS = ("slide_id", "path", "label", "size_class")


@dataclass
class SlideTableReport:
    """What ``write_slide_table`` wrote: the table's directory, its row count, and the rows it left out."""

    out_dir: Path
    written: int
    failures: list[dict] = field(default_factory=list)  # {"slide_id", "path", "problem"}


def _optional_str(value) -> str | None:
    return None if value is None or (isinstance(value, str) and not value.strip()) else str(value).strip()


def _label(value) -> int:
    """0 or 1 from an integer or its text; ``ValueError`` naming the value otherwise."""
    if isinstance(value, numbers.Integral) or (isinstance(value, str) and value.strip() in ("0", "1")):
        if int(value) in (0, 1):
            return int(value)
    raise ValueError(f"label must be 0 (normal) or 1 (tumour), got {value!r}")


def _check_row(row: dict, seen: set[str]) -> dict:
    """The row's table values but the slide's geometry; ``ValueError`` with the first problem."""
    missing = [k for k in ("slide_id", "path", "label", "split") if _optional_str(row.get(k)) is None]
    if missing:
        raise ValueError(f"missing value(s) for {missing}")
    slide_id = str(row["slide_id"]).strip()
    if slide_id in seen:
        raise ValueError(f"duplicate slide_id {slide_id!r}")
    split = str(row["split"]).strip()
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)}")
    label = _label(row["label"])
    size_class = _optional_str(row.get("size_class"))
    if size_class is not None:
        if size_class not in SIZE_CLASSES:
            raise ValueError(f"unknown size_class {size_class!r}; valid: {list(SIZE_CLASSES)} or empty")
        if (size_class == "negative") == bool(label):
            raise ValueError(f"size_class {size_class!r} contradicts label {label}")
    return dict(slide_id=slide_id, split=split, label=label, size_class=size_class,
                center=_optional_str(row.get("center")))


def _geometry(path: str) -> dict:
    """Level-0 size, µm/px and levels of the slide at ``path``, read by ``SlideReader``."""
    from histoweak.slides.reader import SlideReader

    if _storage.is_remote(path):
        raise ValueError("the slide must be a local file (OpenSlide reads only local files)")
    with SlideReader(path) as slide:
        (width, height), mpp, levels = slide.dimensions, slide.mpp, slide.level_count
    return dict(width=int(width), height=int(height), mpp=mpp, levels=int(levels))


def write_slide_table(rows: Iterable[dict], out_dir: str | Path, *, source: str,
                      classes: tuple[str, ...] | list[str] = ("normal", "tumor"), params: dict | None = None,
                      overwrite: bool = False) -> SlideTableReport:
    """Write a slide table at ``out_dir`` from slide rows, opening every slide for its geometry.

    Parameters
    ----------
    rows : dicts with ``slide_id``, ``path`` (relative paths are taken from the working directory),
        ``label`` (0/1), ``split`` (train/val/test), and optionally ``size_class`` (``SIZE_CLASSES``,
        consistent with the label) and ``center``.
    out_dir : local directory to create.
    source : dataset name, stored in every row and in the manifest.
    classes : names of the slide labels, by label.
    params : how the rows were made (kept in the manifest).
    overwrite : replace a slide table already at ``out_dir``.

    Returns
    -------
    SlideTableReport
        Rows written, and each row left out with its problem (also in the manifest's ``failures``).

    Raises
    ------
    ValueError
        If ``out_dir`` already holds a slide table (and not ``overwrite``), holds anything else, is a URI,
        or if no row is usable (naming the first problems).
    """
    from histoweak.slides.reader import SlideError

    if _storage.is_remote(out_dir):
        raise ValueError(f"{out_dir}: slide tables are written to a local directory")
    out = Path(out_dir).absolute()
    if out.exists():
        if is_slide_table(out):
            if not overwrite:
                raise ValueError(f"{out}: already holds a slide table; pass overwrite=True to replace it")
        elif not out.is_dir() or any(out.iterdir()):
            raise ValueError(f"{out}: exists and is not a slide table; write the slide table to a new directory")
    good, failures, seen = [], [], set()
    for row in rows:
        path = _optional_str(row.get("path"))
        if path is not None and not _storage.is_remote(path):
            path = str(Path(path).absolute())
        try:
            values = _check_row(row, seen)
            values.update(_geometry(path))
        except (SlideError, ValueError, OSError) as exc:  # reported by row, the other rows are written
            problem = exc.problem if isinstance(exc, SlideError) else str(exc)  # a SlideError's without the path
            failures.append({"slide_id": row.get("slide_id"), "path": path, "problem": problem})
            continue
        seen.add(values["slide_id"])
        good.append({**values, "path": path, "source": source})
    if not good:
        shown = "; ".join(f"{f['slide_id']} ({f['path']}): {f['problem']}" for f in failures[:3])
        raise ValueError(f"{out}: no usable slide among {len(failures)} row(s): {shown}")
    counts: dict[str, dict[str, int]] = {}
    for r in good:
        by_class = counts.setdefault(r["split"], {})
        key = r["size_class"] or "unknown"
        by_class[key] = by_class.get(key, 0) + 1
    manifest = {"kind": "slides", "schema_version": SLIDE_SCHEMA_VERSION, "source": source, "classes": list(classes),
                "params": params or {}, "counts": counts, "failures": failures,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    table = pa.Table.from_pylist(good, schema=SLIDE_SCHEMA)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.writing-{uuid.uuid4().hex[:8]}"
    old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
    try:
        stage.mkdir()
        pq.write_table(table, stage / TABLE)
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        if out.exists():  # an empty directory, or the slide table being overwritten
            os.replace(out, old)
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return SlideTableReport(out, len(good), failures)


def slide_table_from_csv(slides_csv: str | Path, out_dir: str | Path, source: str = "csv", *,
                         params: dict | None = None, overwrite: bool = False) -> SlideTableReport:
    """Write a slide table from a ``slides.csv`` (as ``synthetic.synthesize`` writes it).

    Columns ``slide_id,path,label,split`` and optionally ``size_class,center`` (others are ignored);
    relative paths are relative to the CSV's directory. A bad row is reported like a slide that does not
    open (see ``write_slide_table``); ``params`` are kept in the manifest beside the CSV's path.

    Raises
    ------
    ValueError
        If the CSV does not exist or lacks a required column (naming the file), or as ``write_slide_table``.
    """
    csv_path = Path(slides_csv).absolute()
    if not csv_path.is_file():
        raise ValueError(f"{csv_path}: slide list does not exist")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"slide_id", "path", "label", "split"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {sorted(missing)}; have {reader.fieldnames}")
        rows = list(reader)
    for row in rows:
        path = _optional_str(row.get("path"))
        if path is not None and not _storage.is_remote(path) and not os.path.isabs(path):
            row["path"] = str(csv_path.parent / path)
    return write_slide_table(rows, out_dir, source=source, params={"slides_csv": str(csv_path), **(params or {})},
                             overwrite=overwrite)


def _manifest(path: str | Path) -> dict | None:
    """The manifest at ``path``, or None when there is none."""
    where = _storage.join(path, MANIFEST)
    if not _storage.exists(where):
        return None
    try:
        return json.loads(_storage.read_text(where))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: unreadable manifest ({exc})") from None


def is_slide_table(path: str | Path) -> bool:
    """Whether ``path`` holds a slide table (its manifest's kind is ``"slides"``)."""
    try:
        manifest = _manifest(path)
    except ValueError:
        return False
    return isinstance(manifest, dict) and manifest.get("kind") == "slides"


def read_slide_table(path: str | Path) -> list[dict]:
    """The rows of the slide table at ``path`` (a local directory or a URI), as dicts of ``SLIDE_SCHEMA``.

    Raises
    ------
    ValueError
        Naming ``path``, if it holds no slide table (nothing there, a tile table, or a table of an
        unknown schema version).
    """
    manifest = _manifest(path)
    if manifest is None:
        raise ValueError(f"{path}: not a slide table (no {MANIFEST}; write one with `slide_table_from_csv`)")
    kind = manifest.get("kind")
    if kind != "slides":
        what = "a tile table" if kind is None else f"a table of kind {kind!r}"
        raise ValueError(f"{path}: {what}, not a slide table (its {MANIFEST} has kind {kind!r}, expected 'slides')")
    if manifest.get("schema_version") != SLIDE_SCHEMA_VERSION:
        raise ValueError(f"{path}: slide table schema version {manifest.get('schema_version')!r}, "
                         f"this histoweak reads {SLIDE_SCHEMA_VERSION}")
    fs, root = _storage.filesystem(_storage.join(path, TABLE))
    try:
        table = pq.read_table(root, filesystem=fs)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValueError(f"{path}: unreadable {TABLE} ({exc})") from None
    missing = [f.name for f in SLIDE_SCHEMA if f.name not in table.schema.names]
    if missing:
        raise ValueError(f"{path}: {TABLE} lacks column(s) {missing}")
    return table.select(SLIDE_SCHEMA.names).to_pylist()
