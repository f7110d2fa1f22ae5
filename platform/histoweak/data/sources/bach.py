"""ICIAR 2018 BACH (Aresta et al., Medical Image Analysis 56, 2019) as slides for ``histoweak tile``.

Layout of the challenge's training archive, ``ICIAR2018_BACH_Challenge/``
(``root`` is that folder or its parent)::

    Photos/{Normal,Benign,InSitu,Invasive}/*.tif   part A: 2048x1536 RGB microscopy images, one label each
    WSI/A01.svs … A10.svs                          part B: whole-slide images
    WSI/A01.xml … A10.xml                          their outlines (Aperio ImageScope XML)

Classes (Ciga & Martel §3.1, after the challenge): 0 normal, 1 benign,
2 in situ carcinoma, 3 invasive carcinoma. Normal is class 0, the
background, as the paper's colour map treats it (white): in part B every
pixel outside an outline (normal tissue and glass) is 0.

Part A becomes classification rows: ``label`` = the folder's class index,
no mask, split train (the paper trains on all of part A). Folder names are
matched case-insensitively.

Part B becomes segmentation rows: each slide with an XML of the same stem
gets a class-index mask rasterised at ``MASK_DOWNSAMPLE`` = 8 level-0 pixels
per mask pixel (about 3.7 µm at BACH's 0.467 µm/px: finer than the
outlines are drawn, and a 40,000 x 60,000 slide needs a 5,000 x 7,500 mask)
and written as a pyramidal TIFF. A mask is ceil(W / 8) x ceil(H / 8), so the
tiler's size-derived downsample can differ from 8 by less than one mask pixel
across the slide. Slides without an XML (unannotated) are skipped and listed
in ``source.json``. Slides may be ``.svs``, ``.tif`` or ``.tiff`` (OpenSlide
recognises a file by its content, not its name).

The XMLs are Aperio ImageScope files, not ASAP: a Region's label is free
text, taken as the organisers' reader (``readXML`` in their starter code)
takes it: the first Attribute's Value, else the Region's Text
(``annotations.read_imagescope_xml``), and mapped by ``bach_class``: text
containing "benign" is 1, "in situ" 2, "invasive" 3 (the organisers' rule,
in that order), "normal" 0. ASAP XML with these names is accepted too.
Outlines are painted in file order, later over earlier, as the organisers'
reader fills them.

Part B splits follow §3.3: 3 slides train, 1 slide that holds all four
classes val, the rest test (``wsi_splits``; deterministic).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np

from histoweak.data.sources._patches import SourceError
from histoweak.data.sources._slides import (
    SlideRow, SlideSource, dataset_root, files, image_size, register_slide_source, split_counts,
    write_prepared,
)
from histoweak.slides.annotations import rasterize, read_annotations, write_mask
from histoweak.slides.reader import SlideError, SlideReader

__all__ = ["BACH", "CLASSES", "MASK_DOWNSAMPLE", "PHOTO_FOLDERS", "bach_class", "prepare", "wsi_splits"]

CLASSES = ("normal", "benign", "in situ", "invasive")
PHOTO_FOLDERS = {"Normal": 0, "Benign": 1, "InSitu": 2, "Invasive": 3}  # part A folder -> class index
MASK_DOWNSAMPLE = 8.0
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff")
PHOTO_SUFFIXES = (".tif", ".tiff")
_LABEL_WORDS = (("benign", 1), ("in situ", 2), ("invasive", 3), ("normal", 0))  # checked in this order


def bach_class(label: str | None) -> int | None:
    """The class index of a BACH outline's free-text label, or None when it names no class.

    "Benign" -> 1, "Carcinoma in situ" -> 2, "Invasive carcinoma" -> 3,
    "Normal" -> 0: the first of "benign", "in situ", "invasive", "normal"
    found in the lower-cased text.
    """
    text = (label or "").lower()
    return next((cls for word, cls in _LABEL_WORDS if word in text), None)


def wsi_splits(classes: Mapping[str, set[int]]) -> dict[str, str]:
    """Part B splits as Ciga & Martel §3.3: 3 slides train, 1 holding all four classes val, the rest test.

    Parameters
    ----------
    classes : slide id -> class indices its mask holds.

    Returns
    -------
    dict
        slide id -> split. Val is the first slide by id holding the most of
        the foreground classes 1-3 (all of them, when a slide does); train is
        the first three of the others by id, test the rest. With fewer than 5
        slides: 1 val (from 2 slides), 1 test (from 3), the rest train.
    """
    ids = sorted(classes)
    if len(ids) < 2:
        return dict.fromkeys(ids, "train")
    val = min(ids, key=lambda s: (-len(set(classes[s]) & {1, 2, 3}), s))
    rest = [s for s in ids if s != val]
    n_train = 3 if len(ids) >= 5 else len(rest) - (len(ids) >= 3)
    return {val: "val", **dict.fromkeys(rest[:n_train], "train"), **dict.fromkeys(rest[n_train:], "test")}


def _scan_photos(photos: Path, problems: list[str]) -> list[tuple[Path, int]]:
    folders = {p.name.lower(): p for p in photos.iterdir() if p.is_dir()}
    out = []
    for name, cls in PHOTO_FOLDERS.items():
        folder = folders.get(name.lower())
        if folder is None:
            problems.append(f"{photos}: missing {name}/ (part A images of class {CLASSES[cls]!r})")
            continue
        images = files(folder, PHOTO_SUFFIXES)
        if not images:
            problems.append(f"{folder}: no .tif images")
        for image in images:
            if image_size(image, problems):
                out.append((image, cls))
    return out


def _scan_wsis(wsi_dir: Path, problems: list[str]) -> tuple[list[tuple], list[str]]:
    """(slide, xml, annotations, level-0 (width, height), mpp) of each annotated slide; and the unannotated slides."""
    slides = {p.stem: p for p in files(wsi_dir, SLIDE_SUFFIXES)}
    xmls = {p.stem: p for p in files(wsi_dir, (".xml",))}
    out, unannotated = [], []
    for stem, xml in sorted(xmls.items()):
        if stem not in slides:
            problems.append(f"{xml}: outlines without a slide ({stem} with one of {', '.join(SLIDE_SUFFIXES)})")
    for stem, slide in sorted(slides.items()):
        xml = xmls.get(stem)
        if xml is None:
            unannotated.append(slide.name)
            continue
        try:
            with SlideReader(slide) as reader:
                dims, mpp = reader.dimensions, reader.mpp
        except SlideError as exc:
            problems.append(str(exc))
            continue
        try:
            anns = read_annotations(xml)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        unknown = sorted({a.class_name for a in anns if bach_class(a.class_name) is None}, key=str)
        if unknown:
            problems.append(f"{xml}: outline label(s) {unknown} name no BACH class (expected text containing "
                            "'benign', 'in situ', 'invasive' or 'normal')")
            continue
        out.append((slide, xml, anns, dims, mpp))
    return out, unannotated


def prepare(root: str | Path, out_dir: str | Path, mask_downsample: float = MASK_DOWNSAMPLE) -> Path:
    """Write ``slides.csv``, ``classes.json``, part B masks and ``source.json`` for BACH into ``out_dir``.

    Returns
    -------
    Path
        ``<out_dir>/slides.csv``.

    Raises
    ------
    SourceError
        Listing every problem (a missing class folder, an unreadable image or
        slide, an XML without its slide or unreadable, an outline label naming
        no class), before anything is written.
    ValueError
        ``out_dir`` exists and is not empty.
    """
    root = dataset_root(Path(root), BACH.name, "ICIAR2018_BACH_Challenge", ("Photos", "WSI"))
    problems: list[str] = []
    photos_dir, wsi_dir = root / "Photos", root / "WSI"
    if not photos_dir.is_dir() and not wsi_dir.is_dir():
        problems.append(f"{root}: missing Photos/ (part A) and WSI/ (part B); at least one is needed")
    photos = _scan_photos(photos_dir, problems) if photos_dir.is_dir() else []
    wsis, unannotated = _scan_wsis(wsi_dir, problems) if wsi_dir.is_dir() else ([], [])
    ids = [p.stem for p, _ in photos] + [s.stem for s, *_ in wsis]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        problems.append(f"{root}: image names used twice {dup}; slide ids must be unique")
    if problems:
        raise SourceError(root, BACH.name, problems)
    class_map = {a.class_name: bach_class(a.class_name) for *_, anns, _, _ in wsis for a in anns}

    def convert(stage: Path, problems: list[str]) -> tuple[list[SlideRow], dict]:
        rows = [SlideRow(p.stem, p.resolve(), None, cls, "train") for p, cls in photos]
        present: dict[str, set[int]] = {}
        for slide, xml, anns, (w, h), mpp in wsis:
            shape = (math.ceil(h / mask_downsample), math.ceil(w / mask_downsample))
            mask = rasterize(anns, shape, class_map, mask_downsample, source=xml)
            write_mask(stage / "masks" / f"{slide.stem}.tiff", mask, mpp=mpp * mask_downsample if mpp else None)
            present[slide.stem] = {int(v) for v in np.unique(mask)}
        splits = wsi_splits(present)
        rows += [SlideRow(s.stem, s.resolve(), f"masks/{s.stem}.tiff", None, splits[s.stem]) for s, *_ in wsis]
        info = {
            "params": {"mask_downsample": mask_downsample, "photo_folders": PHOTO_FOLDERS,
                       "label_words": dict(_LABEL_WORDS)},
            "part_a_images": len(photos),
            "part_b_slides": {"splits": splits, "classes_present": {k: sorted(v) for k, v in present.items()},
                              "by_split": split_counts(splits)},
            "skipped": {"unannotated_slides": unannotated},
        }
        return rows, info

    return write_prepared(BACH, root, Path(out_dir), convert)


BACH = register_slide_source(SlideSource(
    name="bach",
    classes=CLASSES,
    prepare=prepare,
    reference="https://iciar2018-challenge.grand-challenge.org/Dataset/ (Aresta et al., MedIA 56, 2019)",
))
