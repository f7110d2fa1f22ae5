"""Slide-layout datasets (images or WSIs plus masks) turned into a directory ``histoweak tile`` reads.

Each registered ``SlideSource`` reads one public dataset's documented layout
and writes::

    <out>/slides.csv     slide_id,path,mask_path,label,split  (``discover_slides``)
    <out>/classes.json   {"0": <background class>, "1": ..., ...}  (``load_classes``)
    <out>/masks/         class-index masks: PNG at the image's size, or pyramidal TIFF (``annotations.write_mask``)
    <out>/source.json    adapter, dataset root, parameters, skipped files, slides per split

Image paths in ``slides.csv`` are absolute (the dataset is read in place,
not copied); mask paths are relative to the CSV. Then::

    histoweak tile <out>/slides.csv <tiles> --tissue-source detector

An adapter checks the whole dataset (folders, pairs, image headers, sizes)
before anything is written and raises ``SourceError`` listing every problem;
it then writes into a hidden directory beside ``<out>`` and renames it into
place only when every mask converted, so a failure (a mask with an unknown
class value, found while converting) leaves nothing behind either.

Class 0 is background as everywhere in histoweak, but in these datasets it
also covers tissue (BACH's normal tissue, DigestPath's benign tissue), so
they are tiled with tissue found by a detector, not by the mask
(``SlideSource.tissue_source``); with ``--tissue-source mask`` only tiles of
lesions would be kept.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from histoweak.data.sources._patches import SOURCES, SourceError
# Imported for its side effect too: it lifts PIL's decompression-bomb limit, as for every image histoweak opens.
import histoweak.slides.reader  # noqa: F401

__all__ = [
    "SLIDE_SOURCES",
    "SlideRow",
    "SlideSource",
    "dataset_root",
    "files",
    "find_dir",
    "get_slide_source",
    "image_size",
    "prepare_slide_source",
    "register_slide_source",
    "seeded_splits",
    "split_counts",
    "write_png_mask",
    "write_prepared",
]

CSV_COLUMNS = ("slide_id", "path", "mask_path", "label", "split")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SlideRow:
    """One line of ``slides.csv``: an image (absolute path), its mask (relative to the CSV) or label, its split."""

    slide_id: str
    path: Path
    mask_path: str | None
    label: int | None
    split: str


@dataclass(frozen=True)
class SlideSource:
    """One dataset adapter.

    Attributes
    ----------
    name : registry name; also the tile table's ``source`` when ``histoweak import`` tiles it.
    classes : class names by index, 0 = background.
    prepare : ``prepare(root, out_dir) -> Path`` of the written ``slides.csv``.
    reference : where the layout is documented.
    tissue_source : what ``histoweak import`` tiles with unless told otherwise (see the module docstring).
    """

    name: str
    classes: tuple[str, ...]
    prepare: Callable[[Path, Path], Path] = field(repr=False)
    reference: str
    tissue_source: str = "detector"


SLIDE_SOURCES: dict[str, SlideSource] = {}


def register_slide_source(source: SlideSource) -> SlideSource:
    """Add ``source`` to ``SLIDE_SOURCES``; a name taken by a slide or patch source fails."""
    if source.name in SLIDE_SOURCES or source.name in SOURCES:
        raise ValueError(f"source {source.name!r} is already registered")
    SLIDE_SOURCES[source.name] = source
    return source


def get_slide_source(name: str) -> SlideSource:
    try:
        return SLIDE_SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown slide source {name!r}; valid: {sorted(SLIDE_SOURCES)}") from None


def prepare_slide_source(name: str, root: str | Path, out_dir: str | Path) -> Path:
    """Turn the dataset ``name`` found at ``root`` into a directory for ``histoweak tile``; returns its ``slides.csv``.

    Raises
    ------
    ValueError
        Unknown ``name`` (listing the valid ones), or ``out_dir`` exists and is not empty.
    SourceError
        The dataset does not match its layout; nothing is written.
    """
    return get_slide_source(name).prepare(Path(root), Path(out_dir))


# -- pure helpers ---------------------------------------------------------------------


def seeded_splits(ids: Sequence[str], fractions: tuple[float, float, float] = (0.5, 0.25, 0.25),
                  seed: int = 0) -> dict[str, str]:
    """Assign ``ids`` to train/val/test in the given proportions, reproducibly.

    The ids are sorted, shuffled by ``numpy.random.default_rng(seed)``, then
    cut: ``round(fractions[1] * n)`` to val and ``round(fractions[2] * n)``
    to test (halves rounded up), each at least 1 once n >= 3, the rest to
    train; with fewer than 3 ids every one is train. The result depends only
    on the set of ids and the seed, not on their order.

    Returns
    -------
    dict
        id -> "train" | "val" | "test".
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    ordered = sorted(set(ids))
    if len(ordered) != len(ids):
        raise ValueError("split ids must be distinct")
    n = len(ordered)
    if n < 3:
        return dict.fromkeys(ordered, "train")
    n_val, n_test = (max(1, int(np.floor(f * n + 0.5))) if f > 0 else 0 for f in fractions[1:])
    shuffled = [ordered[i] for i in np.random.default_rng(seed).permutation(n)]
    return {i: "val" if k < n_val else "test" if k < n_val + n_test else "train" for k, i in enumerate(shuffled)}


# -- checks and writers shared by the adapters -----------------------------------------------


def image_size(path: Path, problems: list[str], what: str = "image") -> tuple[int, int] | None:
    """(width, height) from the file's header, or None after adding ``"<path>: unreadable …"`` to ``problems``."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, SyntaxError) as exc:  # PIL reports bad files as any of these
        problems.append(f"{path}: unreadable {what} ({exc})")
        return None


def write_png_mask(path: Path, mask: np.ndarray) -> str:
    """Write (H, W) uint8 class indices as an 8-bit greyscale PNG, which ``MaskReader`` reads; returns its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L").save(path, compress_level=6)
    return path.name


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not empty; prepare into a new directory")


def write_prepared(source: SlideSource, root: Path, out_dir: Path,
                   convert: Callable[[Path, list[str]], tuple[list[SlideRow], dict]]) -> Path:
    """Write a prepared dataset atomically: ``convert`` fills a staging directory, then it is renamed to ``out_dir``.

    Parameters
    ----------
    convert : ``convert(stage, problems) -> (rows, info)``
        Writes masks under ``stage/masks/``, appends ``"<file>: <what>"`` for
        every file that fails (and goes on with the others), and returns the
        rows of ``slides.csv`` and extra facts for ``source.json``
        (parameters, skipped files).

    Raises
    ------
    SourceError
        When ``convert`` reported problems; nothing is left behind.
    """
    _check_out_dir(out_dir)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.parent / f".{out_dir.name}.preparing-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        problems: list[str] = []
        rows, info = convert(stage, problems)
        if problems:
            raise SourceError(root, source.name, problems)
        if not rows:
            raise SourceError(root, source.name, [f"{root}: no images found"])
        with open(stage / "slides.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            for r in rows:
                label = "" if r.label is None else r.label
                writer.writerow([r.slide_id, str(r.path), r.mask_path or "", label, r.split])
        (stage / "classes.json").write_text(json.dumps({str(i): c for i, c in enumerate(source.classes)}, indent=2))
        by_split = {s: sum(r.split == s for r in rows) for s in SPLITS}
        manifest = {
            "source": source.name,
            "root": str(root.resolve()),
            "reference": source.reference,
            "classes": list(source.classes),
            "tissue_source": source.tissue_source,
            **info,
            "started": started,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "counts": {"slides": len(rows), "with_mask": sum(r.mask_path is not None for r in rows),
                       "by_split": by_split},
        }
        (stage / "source.json").write_text(json.dumps(manifest, indent=2))
        if out_dir.exists():
            out_dir.rmdir()  # checked empty above
        os.replace(stage, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out_dir / "slides.csv"


def find_dir(root: Path, candidates: Sequence[str], problems: list[str], what: str) -> Path | None:
    """The one folder of ``candidates`` (relative paths) present under ``root``; a problem when none or several are."""
    found = [root / c for c in candidates if (root / c).is_dir()]
    if len(found) == 1:
        return found[0]
    if found:
        problems.append(f"{root}: both {' and '.join(str(p.relative_to(root)) + '/' for p in found)} exist ({what}); "
                        "keep one")
    else:
        problems.append(f"{root}: missing {candidates[0]}/ ({what}"
                        + (f"; also accepted: {', '.join(c + '/' for c in candidates[1:])})" if len(candidates) > 1
                           else ")"))
    return None


def files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    """Visible files of ``folder`` whose suffix (lower-cased) is one of ``suffixes``, sorted by name."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes)


def dataset_root(root: Path, name: str, inner: str, markers: Sequence[str]) -> Path:
    """The dataset folder: ``root`` when it holds one of ``markers``, else ``root/inner`` (the archive's top folder)
    when that does, else ``root`` (whose adapter then reports what is missing).

    Raises
    ------
    SourceError
        ``root`` is not a directory.
    """
    if not root.is_dir():
        raise SourceError(root, name, [f"{root}: dataset root is not a directory"])
    for cand in (root, root / inner):
        if any((cand / m).is_dir() for m in markers):
            return cand
    return root


def split_counts(splits: Mapping[str, str]) -> dict[str, int]:
    return {s: sum(v == s for v in splits.values()) for s in SPLITS}


# The adapters register themselves on import; importing them here fills SLIDE_SOURCES whoever imports this first.
from histoweak.data.sources import bach, digestpath2019, gleason2019  # noqa: E402,F401
