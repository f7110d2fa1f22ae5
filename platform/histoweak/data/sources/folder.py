"""Patch datasets with one label per image, as histoweak tile tables: class folders, or a CSV list.

Two layouts, two registered sources (``FOLDER_SOURCES``; ``histoweak import folder|csv ROOT OUT``)::

    folder   <root>/<class>/…/<image>                     every image of a class folder (sub-folders too)
             <root>/{train,val,test}/<class>/…/<image>    the same, split by the folders above the classes
    csv      <file>.csv with a header ``path,label[,split]``; paths relative to the CSV's folder

The colorectal (BN/WD/MD/PD) and prostate (BN/G3/G4/G5) grading sets of USegMix §3.1 come this way. Split
folders are matched case-insensitively (``train``/``training``, ``val``/``valid``/``validation``,
``test``/``testing``).

Classes are the folder names (or the CSV's label values), sorted — numerically when every one is an integer —
unless ``classes`` gives the order. **Give ordinal grades in their order** (``classes=["BN", "WD", "MD",
"PD"]``; sorted would be BN, MD, PD, WD): quadratic-weighted kappa measures disagreement by class index.
There is no background class: class i is the i-th name, and a table is trained with target ``"multiclass"``.

Splits: from the split folders, or from the CSV's ``split`` column, or else a seeded split stratified by class
(``stratified_splits``: each class's images cut ``val_fraction`` / ``test_fraction`` / rest, with
``_slides.seeded_splits``; a class of fewer than 3 images stays in train). When the splits are given but val
or test holds no image (e.g. only ``train/`` and ``test/`` folders), that split is carved from train the same
way (``val_fraction=0`` keeps it empty). The automatic split is per image: when images of
one patient or slide must stay together, give the splits (folders or the CSV's column).

Each image becomes one row of the tile table (``histoweak.data.schema``): ``label`` = class index, ``labels``
= its one-hot vector, ``mask`` and ``class_ratios`` null, ``x = y = 0``, level 0, downsample 1, ``size`` = the
image's side, ``tissue_ratio`` = 1 - the share of near-white background (``slides.tissue.background_seed``,
as the other patch sources), ``slide_id`` = the file stem, or its path relative to the root (CSV: to the CSV's
folder) for stems used more than once. Images must be square and all of one size (histoweak batches them
as they are). PNG files that are 8-bit RGB and RGB JPEG files are stored as they are; every other image
(TIFF, BMP, RGBA or palette PNG: transparency dropped, 16-bit PNG: PIL's 8-bit reduction) is re-encoded as
PNG. Greyscale, CMYK and other modes fail.

Conversion checks every file's header first and raises ``SourceError`` listing every problem (a missing or
unreadable file, a wrong mode, a non-square image, mixed sizes, a class without training images, a bad CSV
row) before anything is written; then writes into a hidden directory renamed into place when every image
converted, so a corrupt image found while decoding leaves nothing either.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from histoweak.data.schema import ROW_GROUP_SIZE, SCHEMA_VERSION
from histoweak.data.sources._patches import (
    NEAR_WHITE_GREY, NEAR_WHITE_MIN_SIZE, ROWS_PER_FILE, SOURCES, SPLITS, ConversionReport, SourceError, _write_rows,
)
from histoweak.data.sources._slides import SLIDE_SOURCES, seeded_splits
from histoweak.slides.tiling import decode_image, encode_image
from histoweak.slides.tissue import background_seed

__all__ = ["FOLDER_SOURCES", "IMAGE_SUFFIXES", "SPLIT_DIRS", "FolderSource", "class_order", "convert_csv",
           "convert_folder", "get_folder_source", "register_folder_source", "stratified_splits"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: split -> folder names accepted for it (compared lower-cased)
SPLIT_DIRS = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}
CONVERTED_MODES = ("RGBA", "P")  # converted to RGB (alpha dropped, palette expanded); other non-RGB modes fail
CSV_COLUMNS = ("path", "label", "split")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class FolderSource:
    """A layout of images with one label each, converted by ``convert(root, out_dir, **options)``."""

    name: str
    convert: Callable[..., ConversionReport] = field(repr=False)
    layout: str
    reference: str = "histoweak.data.sources.folder"


FOLDER_SOURCES: dict[str, FolderSource] = {}


def register_folder_source(source: FolderSource) -> FolderSource:
    """Add ``source`` to ``FOLDER_SOURCES``; a name taken by any source fails."""
    if source.name in FOLDER_SOURCES or source.name in SOURCES or source.name in SLIDE_SOURCES:
        raise ValueError(f"source {source.name!r} is already registered")
    FOLDER_SOURCES[source.name] = source
    return source


def get_folder_source(name: str) -> FolderSource:
    try:
        return FOLDER_SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown folder source {name!r}; valid: {sorted(FOLDER_SOURCES)}") from None


# -- pure helpers ---------------------------------------------------------------------------


def class_order(found: Sequence[str], classes: Sequence[str] | None = None) -> list[str]:
    """Class names by index: ``classes`` when given (it must name exactly the classes ``found``), else the found
    names sorted — as integers when every one is an integer (``"2" < "10"``), else as strings.

    Raises
    ------
    ValueError
        ``classes`` repeats a name, or differs from ``found`` (naming the names missing on either side).
    """
    found = sorted(set(found))
    if classes is None:
        return sorted(found, key=int) if all(re.fullmatch(r"-?\d+", c) for c in found) else found
    classes = list(classes)
    repeated = sorted(c for c, n in Counter(classes).items() if n > 1)
    if repeated:
        raise ValueError(f"classes {classes}: repeated {repeated}")
    extra, missing = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
    if extra or missing:
        raise ValueError(f"classes {classes} do not match the dataset's {found}"
                         + (f"; without images: {extra}" if extra else "")
                         + (f"; not listed: {missing}" if missing else ""))
    return classes


def stratified_splits(labels: Mapping[str, int], val_fraction: float, test_fraction: float,
                      seed: int = 0) -> dict[str, str]:
    """A seeded train/val/test split stratified by class: each class's ids cut by ``_slides.seeded_splits``.

    Parameters
    ----------
    labels : id -> class index
    val_fraction, test_fraction : shares of each class for val and test (each >= 0, together < 1); a split of
        fraction > 0 gets at least one id of every class with 3 or more ids, rounded halves up
    seed : the draw; the result depends only on the ids, their classes and the seed

    Returns
    -------
    id -> "train" | "val" | "test"
    """
    _check_fractions(val_fraction, test_fraction)
    out: dict[str, str] = {}
    for c in sorted(set(labels.values())):
        ids = [i for i, lab in labels.items() if lab == c]
        out.update(seeded_splits(ids, (1.0 - val_fraction - test_fraction, val_fraction, test_fraction), seed=seed))
    return out


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction}: each must be in [0, 1) "
                         "and together < 1")


# -- scanning -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Image:
    path: Path
    rel: str  # path relative to the root (or the CSV's folder), POSIX
    cls: str
    split: str | None  # None: assigned by the seeded split
    slide_id: str = ""


def _visible_images(folder: Path, skipped: list[Path]) -> list[Path]:
    """Image files under ``folder`` (sub-folders too), sorted; other visible files go to ``skipped``."""
    out = []
    for p in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in p.relative_to(folder).parts) or not p.is_file():
            continue
        (out if p.suffix.lower() in IMAGE_SUFFIXES else skipped).append(p)
    return out


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_dirs(root: Path, problems: list[str]) -> dict[str, Path]:
    """Split -> folder for the split folders under ``root`` (empty: a flat layout of class folders)."""
    alias = {a: split for split, names in SPLIT_DIRS.items() for a in names}
    found: dict[str, list[Path]] = {}
    others = []
    for d in _subdirs(root):
        (found.setdefault(alias[d.name.lower()], []) if d.name.lower() in alias else others).append(d)
    if found and others:
        problems.append(f"{root}: holds split folders ({', '.join(d.name + '/' for ds in found.values() for d in ds)})"
                        f" and other folders ({', '.join(d.name + '/' for d in others)}); put every class folder "
                        "under a split folder, or use no split folders")
    for split, dirs in found.items():
        if len(dirs) > 1:
            problems.append(f"{root}: {' and '.join(d.name + '/' for d in dirs)} both name the {split} split; keep one")
    if found and "train" not in found:
        problems.append(f"{root}: split folders without train/ (accepted: {', '.join(SPLIT_DIRS['train'])})")
    return {split: dirs[0] for split, dirs in found.items()}


def _scan_folder(root: Path, problems: list[str], skipped: list[Path]) -> tuple[list[_Image], dict]:
    splits = _split_dirs(root, problems)
    parents = splits.items() if splits else [(None, root)]
    images = []
    for split, parent in parents:
        for f in sorted(p for p in parent.iterdir() if p.is_file() and not p.name.startswith(".")):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                problems.append(f"{f}: image outside a class folder (expected {parent}/<class>/<image>)")
            else:
                skipped.append(f)
        class_dirs = _subdirs(parent)
        if not class_dirs:
            problems.append(f"{parent}: no class folders")
        for d in class_dirs:
            found = _visible_images(d, skipped)
            if not found and split is None:
                problems.append(f"{d}: no images ({', '.join(IMAGE_SUFFIXES)})")
            images += [_Image(p, p.relative_to(root).as_posix(), d.name, split) for p in found]
    return images, {"from": "folders" if splits else "seeded", "folders": {s: d.name for s, d in splits.items()}}


def _scan_csv(path: Path, problems: list[str], skipped: list[Path]) -> tuple[list[_Image], dict]:
    base = path.parent
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        problems.append(f"{path}: unreadable CSV ({exc})")
        return [], {}
    missing = [c for c in CSV_COLUMNS[:2] if c not in header]
    unknown = [c for c in header if c not in CSV_COLUMNS]
    if missing or unknown:
        problems.append(f"{path}: header {header}: " + "; ".join(
            ([f"missing {missing}"] if missing else []) + ([f"unknown {unknown}"] if unknown else []))
            + f"; expected {','.join(CSV_COLUMNS)} (split optional)")
        return [], {}
    has_split = "split" in header
    images, seen = [], {}
    for line, raw in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        where = f"{path}, line {line}"
        if not row["path"] or not row["label"]:
            problems.append(f"{where}: empty path or label")
            continue
        split = row.get("split", "").lower() if has_split else None
        if has_split and split not in SPLITS:
            problems.append(f"{where}: split {row.get('split')!r}; expected one of {list(SPLITS)}")
            continue
        file = base / row["path"]
        if row["path"] in seen:
            problems.append(f"{where}: {row['path']} listed again (first on line {seen[row['path']]})")
            continue
        seen[row["path"]] = line
        if not file.is_file():
            problems.append(f"{file}: no such file (line {line} of {path})")
            continue
        images.append(_Image(file, Path(row["path"]).as_posix(), row["label"], split))
    if not rows:
        problems.append(f"{path}: no rows")
    return images, {"from": "csv" if has_split else "seeded"}


def _check_image(image: _Image, problems: list[str]) -> int | None:
    """The image's side from its header, or None after adding a problem (unreadable, wrong mode, not square)."""
    try:
        with Image.open(image.path) as im:
            mode, (w, h) = im.mode, im.size
    except (OSError, ValueError, SyntaxError) as exc:  # PIL reports bad files as any of these
        problems.append(f"{image.path}: unreadable image ({exc})")
        return None
    if mode != "RGB" and mode not in CONVERTED_MODES:
        problems.append(f"{image.path}: image mode {mode!r}; expected RGB colour ({', '.join(['RGB', *CONVERTED_MODES])})")
        return None
    if w != h or w == 0:
        problems.append(f"{image.path}: image is {w}x{h}, expected a square patch")
        return None
    return w


def _unique_ids(images: list[_Image]) -> list[_Image]:
    stems = Counter(i.path.stem for i in images)
    return [replace(i, slide_id=i.path.stem if stems[i.path.stem] == 1 else i.rel) for i in images]


# -- converting -----------------------------------------------------------------------------


def _encoded(path: Path) -> tuple[bytes, np.ndarray]:
    """(bytes to store, (H, W, 3) uint8 pixels they decode to): 8-bit RGB PNG and RGB JPEG files as they are,
    anything else re-encoded as PNG."""
    data = path.read_bytes()
    try:
        with Image.open(path) as im:
            im.load()
            fmt, mode = im.format, im.mode
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"{path}: unreadable image ({exc})") from None
    keep = (fmt == "PNG" and data[:8] == _PNG_SIGNATURE and data[24] == 8 and data[25] == 2) or \
           (fmt == "JPEG" and mode == "RGB")
    if keep:
        try:
            decoded = decode_image(data)  # what training will decode
        except Exception:  # noqa: BLE001 — a codec imagecodecs lacks (e.g. a lossless JPEG): store PNG instead
            decoded = None
        if decoded is not None and decoded.shape == rgb.shape:
            return data, decoded
    return encode_image(np.ascontiguousarray(rgb), "png"), rgb


def _row(image: _Image, source: str, index: int, n_classes: int, size: int) -> dict:
    data, rgb = _encoded(image.path)
    white = background_seed(rgb, NEAR_WHITE_GREY, NEAR_WHITE_MIN_SIZE)
    labels = np.zeros(n_classes, np.uint8)
    labels[index] = 1
    return {"slide_id": image.slide_id, "source": source, "split": image.split, "x": 0, "y": 0, "level": 0,
            "downsample": 1.0, "size": size, "image": data, "mask": None, "labels": labels, "label": index,
            "tissue_ratio": float(1.0 - white.mean()), "class_ratios": None, "group": None, "mpp": None}


def _convert(source: str, root: Path, out_dir: str | Path, scan: Callable, val_fraction: float, test_fraction: float,
             seed: int, classes: Sequence[str] | None, rows_per_file: int, progress: bool) -> ConversionReport:
    from tqdm.auto import tqdm

    _check_fractions(val_fraction, test_fraction)
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not empty; convert into a new directory")
    problems: list[str] = []
    skipped: list[Path] = []
    images, split_info = scan(root, problems, skipped)  # (images, how they are split) and every problem
    if not images and not problems:
        problems.append(f"{root}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    sides = {}
    for image in images:
        side = _check_image(image, problems)
        if side is not None:
            sides[image.path] = side
    by_size = Counter(sides.values())
    if len(by_size) > 1:
        usual = by_size.most_common(1)[0][0]
        problems += [f"{p}: image is {s}x{s} but most are {usual}x{usual}; histoweak batches images of one size"
                     for p, s in sides.items() if s != usual]
    try:
        names = class_order([i.cls for i in images], classes) if images else []
    except ValueError as exc:
        problems.append(f"{root}: {exc}")
        names = []
    if problems:
        raise SourceError(root, source, problems)
    images = _unique_ids(images)
    index = {c: k for k, c in enumerate(names)}
    present = {s for i in images for s in [i.split] if s}
    carve = [s for s in ("val", "test") if s not in present] if present else ["val", "test"]
    if carve:  # a seeded split of the training images, stratified by class, for the splits not given
        fractions = {"val": val_fraction if "val" in carve else 0.0, "test": test_fraction if "test" in carve else 0.0}
        pool = {i.slide_id: index[i.cls] for i in images if i.split in (None, "train")}
        assigned = stratified_splits(pool, fractions["val"], fractions["test"], seed)
        images = [replace(i, split=assigned[i.slide_id]) if i.split in (None, "train") else i for i in images]
        split_info.update(carved=carve, val_fraction=fractions["val"], test_fraction=fractions["test"], seed=seed)
    without_train = sorted(set(names) - {i.cls for i in images if i.split == "train"})
    if without_train:
        raise SourceError(root, source, [f"{root}: class(es) {without_train} have no training images"])
    images.sort(key=lambda i: (SPLITS.index(i.split), index[i.cls], i.rel))
    (size,) = by_size  # one size, checked above
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.converting-{uuid.uuid4().hex[:8]}"
    counts = dict.fromkeys(SPLITS, 0)
    by_class = {s: dict.fromkeys(names, 0) for s in SPLITS}
    bar = tqdm(total=len(images), unit="image", desc=source, disable=not progress, dynamic_ncols=True)
    try:
        for split in SPLITS:
            rows, files = [], 0
            for image in (i for i in images if i.split == split):
                try:
                    rows.append(_row(image, source, index[image.cls], len(names), size))
                except ValueError as exc:  # corrupt pixel data: the header check could not see it
                    raise SourceError(root, source, [str(exc)]) from None
                bar.update(1)
                counts[split] += 1
                by_class[split][image.cls] += 1
                if len(rows) == rows_per_file:
                    _write_rows(rows, stage / split / f"part-{files:05d}.parquet")
                    rows, files = [], files + 1
            if rows:
                _write_rows(rows, stage / split / f"part-{files:05d}.parquet")
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "source": source,
            "classes": names,
            "root": str(root.resolve()),
            "reference": FOLDER_SOURCES[source].reference,
            "params": {"adapter": f"{source}-labels", "rows_per_file": rows_per_file, "row_group_size": ROW_GROUP_SIZE,
                       "size": size, "splits": split_info, "target": "multiclass",
                       "tissue": {"near_white_grey": NEAR_WHITE_GREY, "near_white_min_size": NEAR_WHITE_MIN_SIZE}},
            "skipped": {"non_image_files": len(skipped), "examples": [str(p) for p in skipped[:10]]},
            "started": started,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "counts": {"tiles": sum(counts.values()), "pending": 0, "failed": 0, "by_split": counts,
                       "by_class": by_class},
        }
        stage.mkdir(parents=True, exist_ok=True)
        (stage / "_manifest.json").write_text(json.dumps(manifest, indent=2))
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(stage, out)
    finally:
        bar.close()
        shutil.rmtree(stage, ignore_errors=True)
    return ConversionReport(source, out, counts)


def convert_folder(root: str | Path, out_dir: str | Path, *, val_fraction: float = 0.15, test_fraction: float = 0.15,
                   seed: int = 0, classes: Sequence[str] | None = None, rows_per_file: int = ROWS_PER_FILE,
                   progress: bool = False) -> ConversionReport:
    """Convert class folders at ``root`` (optionally under ``train/ val/ test/``) into a tile table at ``out_dir``.

    Parameters
    ----------
    val_fraction, test_fraction : shares of each class's images for the seeded split, used when ``root`` has no
        split folders (or for the ``val/`` / ``test/`` it lacks)
    seed : the seeded split's draw
    classes : class names in index order (default: sorted; give ordinal grades in their order)

    Raises
    ------
    SourceError
        The folder does not match the layout or an image is bad (every problem named); nothing is written.
    ValueError
        ``out_dir`` exists and is not empty, bad fractions, ``rows_per_file < 1``.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(root, "folder", [f"{root}: dataset root is not a directory"])

    return _convert("folder", root, out_dir, _scan_folder, val_fraction, test_fraction, seed, classes, rows_per_file, progress)


def convert_csv(csv_file: str | Path, out_dir: str | Path, *, val_fraction: float = 0.15, test_fraction: float = 0.15,
                seed: int = 0, classes: Sequence[str] | None = None, rows_per_file: int = ROWS_PER_FILE,
                progress: bool = False) -> ConversionReport:
    """Convert the images a CSV lists (``path,label[,split]``, paths relative to its folder) into a tile table.

    Without a ``split`` column the images are split as ``convert_folder`` splits a layout without split folders.
    Parameters and errors as ``convert_folder``.
    """
    path = Path(csv_file)
    if not path.is_file():
        raise SourceError(path, "csv", [f"{path}: no such CSV file"])

    return _convert("csv", path, out_dir, _scan_csv, val_fraction, test_fraction, seed, classes, rows_per_file, progress)


register_folder_source(FolderSource(
    "folder", convert_folder, "ROOT/<class>/<image>, optionally ROOT/{train,val,test}/<class>/<image>"))
register_folder_source(FolderSource("csv", convert_csv, "a CSV of path,label[,split], paths relative to its folder"))
