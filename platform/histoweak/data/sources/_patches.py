"""Han et al.'s patch layout for weakly-supervised segmentation, converted to a histoweak tile table.

LUAD-HistoSeg and BCSS-WSSS (Han et al., "Multi-Layer Pseudo-Supervision for
Histopathology Tissue Semantic Segmentation using Patch-level Classification
Labels", Medical Image Analysis 80, 2022) share one on-disk layout::

    <root>/train/<name>[a b c d].png     RGB patches; class presence in the file name
    <root>/val/img/<name>.png            RGB patches with ...
    <root>/val/mask/<name>.png           ... a palette mask of the same name and size
    <root>/test/img/, <root>/test/mask/  the same

``training/`` is accepted in place of ``train/``. A training patch's label is
the bracket group that ends its file name, one 0/1 digit per class in the
dataset's order, spaced (LUAD-HistoSeg, ``1031280-2300-27920-[1 0 0 1].png``)
or not (BCSS-WSSS, ``…MPP-0.2500+0[1101].png``).

Masks are palette ("P") PNGs whose indices 0..3 are the dataset's four
classes and 4 is "white background or exclude" (both datasets' readmes; the
authors' scorer leaves index-4 pixels out of the IoU). Histoweak reserves
class 0 for background, so mask index i < 4 becomes class i + 1 and index 4
becomes class 0 (``MASK_INDEX_TO_CLASS``). In BCSS-WSSS index 4 also covers
tissue outside the four classes (fat, vessels, …), which is therefore
counted as background too. To score as the authors do, evaluate with
``ignore_index=0``.

A training patch has no mask: its background presence (``labels[0]``) and
``tissue_ratio`` both come from ``slides.tissue.background_seed`` (Han et al.'s background
seed), so ``labels[0] == 1`` exactly when ``tissue_ratio < 1``.

Conversion checks the whole dataset (names, labels, pairs, PNG headers,
sizes) before writing anything, then writes into a hidden directory beside
the output that is renamed into place only when every patch converted; a
failure leaves no output.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image


from histoweak.data.schema import ROW_GROUP_SIZE, SCHEMA, SCHEMA_VERSION, validate_table, write_table_atomic
from histoweak.slides.tiling import encode_image, tile_labels
from histoweak.slides.tissue import background_seed

__all__ = [
    "MASK_INDEX_TO_CLASS",
    "NEAR_WHITE_GREY",
    "NEAR_WHITE_MIN_SIZE",
    "ROWS_PER_FILE",
    "SOURCES",
    "SPLITS",
    "ConversionReport",
    "PatchDataset",
    "SourceError",
    "convert_patch_dataset",
    "get_source",
    "mask_to_classes",
    "parse_label",
    "register_source",
    "scan_patch_dataset",
]

SPLITS = ("train", "val", "test")
TRAIN_DIRS = ("train", "training")
ROWS_PER_FILE = 512
MASK_INDEX_TO_CLASS = {0: 1, 1: 2, 2: 3, 3: 4, 4: 0}  # dataset palette index -> histoweak class
NEAR_WHITE_GREY = 200  # Han et al.'s background seed: grey level above 200 ...
NEAR_WHITE_MIN_SIZE = 50  # ... in 4-connected regions of at least 50 pixels
MAX_LISTED_PROBLEMS = 20

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPES = {0: "greyscale", 2: "RGB", 3: "palette", 4: "greyscale+alpha", 6: "RGBA"}
_LABEL_AT_END = re.compile(r"\[([^\[\]]*)\]$")


class SourceError(ValueError):
    """A dataset that does not match its documented layout; ``problems`` lists ``"<file>: <what>"``."""

    def __init__(self, root: Path, source: str, problems: list[str]):
        self.problems = problems
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(shown)
        lines = "\n".join(f"  {p}" for p in shown) + (f"\n  … and {more} more" if more else "")
        super().__init__(f"{root}: {len(problems)} problem(s) in the {source} dataset, nothing written:\n{lines}")


@dataclass(frozen=True)
class PatchDataset:
    """One dataset in Han et al.'s patch layout.

    Attributes
    ----------
    name : registry name, also the tile table's ``source``.
    classes : class names in file-name label order (= mask palette order); histoweak classes 1..
    codes : the dataset's abbreviations of ``classes`` (TE, NEC, …), for reports.
    reference : where the layout is documented.
    """

    name: str
    classes: tuple[str, ...]
    codes: tuple[str, ...]
    reference: str

    def __post_init__(self):
        if len(self.classes) != len(self.codes):
            raise ValueError(f"source {self.name!r}: {len(self.classes)} classes but {len(self.codes)} codes")
        if len(self.classes) + 1 != len(MASK_INDEX_TO_CLASS):
            raise ValueError(f"source {self.name!r}: the patch layout has {len(MASK_INDEX_TO_CLASS) - 1} classes,"
                             f" got {len(self.classes)}")

    @property
    def class_names(self) -> list[str]:
        """Histoweak's class list: 0 = background, then the dataset's classes."""
        return ["background", *self.classes]

    @property
    def n_classes(self) -> int:
        return len(self.classes) + 1


SOURCES: dict[str, PatchDataset] = {}


def register_source(source: PatchDataset) -> PatchDataset:
    if source.name in SOURCES:
        raise ValueError(f"source {source.name!r} is already registered")
    SOURCES[source.name] = source
    return source


def get_source(name: str) -> PatchDataset:
    try:
        return SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown source {name!r}; valid: {sorted(SOURCES)}") from None


@dataclass(frozen=True)
class ConversionReport:
    source: str
    out_dir: Path
    tiles: dict[str, int]  # rows per split

    @property
    def n_tiles(self) -> int:
        return sum(self.tiles.values())


# -- pure helpers -------------------------------------------------------------


def parse_label(stem: str, n_classes: int) -> tuple[int, ...]:
    """Class presence from a training patch's file stem: its final ``[a b c d]`` or ``[abcd]`` group.

    Parameters
    ----------
    stem : file name without ``.png``
    n_classes : number of digits expected (the dataset's classes, without background)

    Returns
    -------
    tuple of ``n_classes`` ints in {0, 1}

    Raises
    ------
    ValueError
        Naming what is wrong, not the file (the caller knows it).
    """
    m = _LABEL_AT_END.search(stem)
    if m is None:
        raise ValueError("file name does not end with a class label like '[1 0 0 1]'")
    body = m.group(1)
    if not (re.fullmatch(rf"[01]{{{n_classes}}}", body) or re.fullmatch(rf"[01]( [01]){{{n_classes - 1}}}", body)):
        raise ValueError(f"class label '[{body}]' is not {n_classes} digits 0/1")
    return tuple(int(c) for c in body if c != " ")


def mask_to_classes(indices: np.ndarray) -> np.ndarray:
    """Map a mask's palette indices to histoweak classes by ``MASK_INDEX_TO_CLASS``.

    Parameters
    ----------
    indices : (h, w) uint8 palette indices (0..3 classes, 4 background/exclude)

    Returns
    -------
    (h, w) uint8
        0 background, 1..4 the dataset's classes in palette order.

    Raises
    ------
    ValueError
        When a pixel holds an index outside the palette.
    """
    lut = np.full(256, 255, np.uint8)
    for index, cls in MASK_INDEX_TO_CLASS.items():
        lut[index] = cls
    out = lut[indices]
    if (out == 255).any():
        bad = sorted(set(np.unique(indices[out == 255]).tolist()))
        raise ValueError(f"mask holds palette index {bad}; expected {sorted(MASK_INDEX_TO_CLASS)}")
    return out


def _png_header(head: bytes) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from a PNG's first 33 bytes."""
    if not head:
        raise ValueError("unreadable PNG: empty file")
    if head[:8] != _PNG_SIGNATURE:
        raise ValueError("unreadable PNG: no PNG signature")
    if len(head) < 33 or head[12:16] != b"IHDR":
        raise ValueError("unreadable PNG: truncated or missing IHDR header")
    width, height = struct.unpack(">II", head[16:24])
    return width, height, head[24], head[25]


# -- scanning -----------------------------------------------------------------


@dataclass(frozen=True)
class _Patch:
    split: str
    image: Path
    mask: Path | None
    labels: tuple[int, ...] | None  # from the file name (training patches)
    size: int


def _pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png" and not p.name.startswith("."))


def _header(path: Path, problems: list[str]) -> tuple[int, int, int, int] | None:
    try:
        with open(path, "rb") as f:
            return _png_header(f.read(33))
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: {exc}")
        return None


def _square_side(path: Path, header, problems: list[str]) -> int | None:
    width, height = header[0], header[1]
    if width != height or width == 0:
        problems.append(f"{path}: patch is {width}x{height}, expected a square patch")
        return None
    return width


def _split_dirs(root: Path, problems: list[str]) -> dict[str, tuple[Path, Path | None]]:
    """(image folder, mask folder or None) per split, as found under ``root``."""
    dirs: dict[str, tuple[Path, Path | None]] = {}
    train = [root / d for d in TRAIN_DIRS if (root / d).is_dir()]
    if len(train) == 1:
        dirs["train"] = (train[0], None)
    elif train:
        problems.append(f"{root}: both {' and '.join(d.name + '/' for d in train)} exist; keep one")
    else:
        problems.append(f"{root}: missing train/ (training patches)")
    for split in SPLITS[1:]:
        img, mask = root / split / "img", root / split / "mask"
        missing = [str(d.relative_to(root)) + "/" for d in (img, mask) if not d.is_dir()]
        if missing:
            problems.append(f"{root}: missing {' and '.join(missing)}")
        else:
            dirs[split] = (img, mask)
    return dirs


def scan_patch_dataset(source: PatchDataset, root: str | Path) -> list[_Patch]:
    """Every patch of the dataset at ``root``, checked without decoding pixels.

    Raises
    ------
    SourceError
        Listing every problem found: a missing folder, a training file name
        without a parsable label, an image without a mask (or a mask without
        an image), an unreadable PNG header, a mask that is not a palette or
        8-bit greyscale index image, a mask whose size differs from its
        image's, a non-square patch, an empty split.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(root, source.name, [f"{root}: dataset root is not a directory"])
    problems: list[str] = []
    patches: list[_Patch] = []
    for split, (img_dir, mask_dir) in _split_dirs(root, problems).items():
        images = _pngs(img_dir)
        if not images:
            problems.append(f"{img_dir}: no .png patches")
        masks = {p.stem: p for p in _pngs(mask_dir)} if mask_dir else {}
        for image in images:
            header = _header(image, problems)
            side = _square_side(image, header, problems) if header else None
            if mask_dir is None:
                try:
                    labels = parse_label(image.stem, len(source.classes))
                except ValueError as exc:
                    problems.append(f"{image}: {exc} ({' '.join(source.codes)})")
                    continue
                if side:
                    patches.append(_Patch(split, image, None, labels, side))
                continue
            mask = masks.pop(image.stem, None)
            if mask is None:
                problems.append(f"{image}: no mask {mask_dir / image.name}")
                continue
            mask_header = _header(mask, problems)
            if mask_header is None or header is None:
                continue
            mw, mh, depth, colour = mask_header
            if not (colour == 3 or (colour == 0 and depth == 8)):
                problems.append(f"{mask}: mask is a {depth}-bit {_COLOUR_TYPES.get(colour, f'type-{colour}')} PNG;"
                                " expected palette ('P') or 8-bit greyscale class indices")
            elif (mw, mh) != header[:2]:
                problems.append(f"{mask}: mask is {mw}x{mh} but its image is {header[0]}x{header[1]}")
            elif side:
                patches.append(_Patch(split, image, mask, None, side))
        problems.extend(f"{m}: mask without an image in {img_dir}" for m in masks.values())
    if problems:
        raise SourceError(root, source.name, problems)
    return patches


# -- converting ---------------------------------------------------------------


def _open_png(path: Path, data: bytes) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, ValueError, SyntaxError) as exc:  # PIL reports corrupt data as any of these
        raise ValueError(f"{path}: unreadable PNG ({exc})") from None
    return img


def _image_png(path: Path) -> tuple[bytes, np.ndarray]:
    """The patch as RGB PNG bytes (the file itself when it already is 8-bit RGB) and its pixels."""
    data = path.read_bytes()
    img = _open_png(path, data)
    _, _, depth, colour = _png_header(data[:33])
    rgb = np.asarray(img.convert("RGB"))
    if depth == 8 and colour == 2:
        return data, rgb
    return encode_image(rgb, "png"), rgb


def _patch_row(source: PatchDataset, patch: _Patch) -> dict:
    image, rgb = _image_png(patch.image)
    if patch.mask is None:
        white = background_seed(rgb, NEAR_WHITE_GREY, NEAR_WHITE_MIN_SIZE)
        labels = np.array([int(white.any()), *patch.labels], np.uint8)
        mask, ratios, tissue = None, None, float(1.0 - white.mean())
    else:
        img = _open_png(patch.mask, patch.mask.read_bytes())
        try:
            classes = mask_to_classes(np.asarray(img, dtype=np.uint8))
        except ValueError as exc:
            raise ValueError(f"{patch.mask}: {exc}") from None
        labels, ratios, tissue = tile_labels(classes, source.n_classes)
        mask = encode_image(classes, "png")
    return {
        "slide_id": patch.image.stem, "source": source.name, "split": patch.split, "x": 0, "y": 0, "level": 0,
        "downsample": 1.0, "size": patch.size, "image": image, "mask": mask, "labels": labels, "label": None,
        "tissue_ratio": tissue, "class_ratios": ratios, "group": None, "mpp": None,
    }


def _write_rows(rows: list[dict], path: Path) -> None:
    table = pa.table({f.name: pa.array([r.get(f.name) for r in rows], type=f.type) for f in SCHEMA}, schema=SCHEMA)
    validate_table(table, str(path))
    write_table_atomic(table, path)


def convert_patch_dataset(source: PatchDataset, root: str | Path, out_dir: str | Path,
                          rows_per_file: int = ROWS_PER_FILE, progress: bool = False) -> ConversionReport:
    """Convert the dataset at ``root`` into a tile table at ``out_dir``.

    Writes ``<out_dir>/<split>/part-NNNNN.parquet`` (≤ ``rows_per_file`` rows
    each, patches in file-name order) and ``_manifest.json`` (``classes``,
    index 0 = background; ``counts`` with ``by_split``).

    Raises
    ------
    SourceError
        When the dataset does not match its layout (before anything is
        written) or a patch fails to decode (nothing is left behind).
    ValueError
        When ``out_dir`` exists and is not empty, or ``rows_per_file < 1``.
    """
    from tqdm.auto import tqdm

    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
    root, out = Path(root), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not empty; convert into a new directory")
    patches = scan_patch_dataset(source, root)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.converting-{uuid.uuid4().hex[:8]}"
    counts = dict.fromkeys(SPLITS, 0)
    bar = tqdm(total=len(patches), unit="patch", desc=source.name, disable=not progress, dynamic_ncols=True)
    try:
        for split in SPLITS:
            rows: list[dict] = []
            files = 0
            for patch in (p for p in patches if p.split == split):
                try:
                    rows.append(_patch_row(source, patch))
                except ValueError as exc:  # corrupt pixel data: the header check could not see it
                    raise SourceError(root, source.name, [str(exc)]) from None
                bar.update(1)
                if len(rows) == rows_per_file:
                    _write_rows(rows, stage / split / f"part-{files:05d}.parquet")
                    files, rows = files + 1, []
                counts[split] += 1
            if rows:
                _write_rows(rows, stage / split / f"part-{files:05d}.parquet")
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "source": source.name,
            "classes": source.class_names,
            "class_codes": ["BG", *source.codes],
            "root": str(root.resolve()),
            "reference": source.reference,
            "params": {
                "adapter": "han-patch-layout",
                "rows_per_file": rows_per_file,
                "row_group_size": ROW_GROUP_SIZE,
                "mask_index_to_class": {str(k): v for k, v in MASK_INDEX_TO_CLASS.items()},
                "train_background": {"near_white_grey": NEAR_WHITE_GREY, "near_white_min_size": NEAR_WHITE_MIN_SIZE},
            },
            "started": started,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "counts": {"tiles": sum(counts.values()), "pending": 0, "failed": 0, "by_split": counts},
        }
        (stage / "_manifest.json").write_text(json.dumps(manifest, indent=2))
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(stage, out)
    finally:
        bar.close()
        shutil.rmtree(stage, ignore_errors=True)
    return ConversionReport(source.name, out, counts)
