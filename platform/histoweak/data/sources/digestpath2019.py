"""DigestPath2019 task 2, colonoscopy tissue segmentation (Li et al. 2019), as slides for ``histoweak tile``.

Layout of the challenge's ``Colonoscopy_tissue_segment_dataset/`` (``root``
is that folder or its parent)::

    tissue-train-pos-v1/<name>.jpg        malignant images (a few thousand pixels a side) ...
    tissue-train-pos-v1/<name>_mask.jpg   ... with a binary lesion mask of the same size, JPEG-compressed
    tissue-train-neg/<name>.jpg           benign images: no lesion, every pixel background

``tissue-train-pos/`` is accepted for ``tissue-train-pos-v1/``. Classes: 0
benign (background: benign tissue and glass), 1 malignant. A mask pixel is
malignant when its grey level is at least ``THRESHOLD`` = 128: the masks
are 0/255 images whose JPEG compression leaves values near both. Any
``*_mask.jpg`` in the negative folder (some preparation scripts write
all-zero ones there) is ignored: negative images are background by
definition. Masks are written as PNG at the image's size, all-zero ones for
negative images.

Splits: 50 % train, 25 % val, 25 % test, seeded (``seeded_splits``, seed
``SEED``), drawn separately for positive and negative images so that every
split holds both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from histoweak.data.sources._patches import SourceError
from histoweak.data.sources._slides import (
    SlideRow, SlideSource, dataset_root, files, find_dir, image_size, register_slide_source, seeded_splits,
    write_png_mask, write_prepared,
)

__all__ = ["CLASSES", "DIGESTPATH2019", "SEED", "THRESHOLD", "prepare", "threshold_mask"]

CLASSES = ("benign", "malignant")
THRESHOLD = 128
SEED = 0
POS_DIRS = ("tissue-train-pos-v1", "tissue-train-pos")
NEG_DIRS = ("tissue-train-neg",)
MASK_SUFFIX = "_mask"


def threshold_mask(grey: np.ndarray) -> np.ndarray:
    """(H, W) uint8 grey levels of a JPEG lesion mask -> (H, W) uint8 classes: 1 where >= ``THRESHOLD``, else 0."""
    return (np.asarray(grey) >= THRESHOLD).astype(np.uint8)


def prepare(root: str | Path, out_dir: str | Path, seed: int = SEED) -> Path:
    """Write ``slides.csv``, ``classes.json``, masks and ``source.json`` for DigestPath2019 into ``out_dir``.

    Returns
    -------
    Path
        ``<out_dir>/slides.csv``.

    Raises
    ------
    SourceError
        Listing every problem (a missing folder, a positive image without a
        mask or a mask without an image, an unreadable image or mask, a mask
        of another size than its image) before anything is written.
    ValueError
        ``out_dir`` exists and is not empty.
    """
    root = dataset_root(Path(root), DIGESTPATH2019.name, "Colonoscopy_tissue_segment_dataset", (*POS_DIRS, *NEG_DIRS))
    problems: list[str] = []
    pos_dir = find_dir(root, POS_DIRS, problems, "malignant images and masks")
    neg_dir = find_dir(root, NEG_DIRS, problems, "benign images")
    positives: list[tuple[Path, Path]] = []
    negatives: list[tuple[Path, tuple[int, int]]] = []
    if pos_dir:
        jpgs = files(pos_dir, (".jpg", ".jpeg"))
        masks = {p.stem[:-len(MASK_SUFFIX)]: p for p in jpgs if p.stem.endswith(MASK_SUFFIX)}
        images = [p for p in jpgs if not p.stem.endswith(MASK_SUFFIX)]
        if not images:
            problems.append(f"{pos_dir}: no .jpg images")
        for image in images:
            mask = masks.pop(image.stem, None)
            if mask is None:
                problems.append(f"{image}: no mask {pos_dir / (image.stem + MASK_SUFFIX + image.suffix)}")
                continue
            size, mask_size = image_size(image, problems), image_size(mask, problems, "mask")
            if size and mask_size and size != mask_size:
                problems.append(f"{mask}: mask is {mask_size[0]}x{mask_size[1]} but its image is {size[0]}x{size[1]}")
            elif size and mask_size:
                positives.append((image, mask))
        problems.extend(f"{m}: mask without an image {pos_dir / (stem + m.suffix)}"
                        for stem, m in sorted(masks.items()))
    if neg_dir:
        images = [p for p in files(neg_dir, (".jpg", ".jpeg")) if not p.stem.endswith(MASK_SUFFIX)]
        if not images:
            problems.append(f"{neg_dir}: no .jpg images")
        sizes = [(p, image_size(p, problems)) for p in images]
        negatives = [(p, size) for p, size in sizes if size]
    ids = [p.stem for p, _ in positives] + [p.stem for p, _ in negatives]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        problems.append(f"{root}: image names in both folders {dup}; slide ids must be unique")
    if problems:
        raise SourceError(root, DIGESTPATH2019.name, problems)

    def convert(stage: Path, problems: list[str]) -> tuple[list[SlideRow], dict]:
        splits = {**seeded_splits([p.stem for p, _ in positives], seed=seed),
                  **seeded_splits([p.stem for p, _ in negatives], seed=seed)}
        rows = []
        for image, mask in positives:
            try:
                with Image.open(mask) as im:
                    classes = threshold_mask(np.asarray(im.convert("L")))
            except (OSError, ValueError, SyntaxError) as exc:
                problems.append(f"{mask}: unreadable mask ({exc})")
                continue
            write_png_mask(stage / "masks" / f"{image.stem}.png", classes)
            rows.append(SlideRow(image.stem, image.resolve(), f"masks/{image.stem}.png", None, splits[image.stem]))
        for image, (w, h) in negatives:
            write_png_mask(stage / "masks" / f"{image.stem}.png", np.zeros((h, w), np.uint8))
            rows.append(SlideRow(image.stem, image.resolve(), f"masks/{image.stem}.png", None, splits[image.stem]))
        info = {"params": {"threshold": THRESHOLD, "split_seed": seed, "split_fractions": [0.5, 0.25, 0.25],
                           "split_strata": ["positive", "negative"]},
                "positives": len(positives), "negatives": len(negatives)}
        return rows, info

    return write_prepared(DIGESTPATH2019, root, Path(out_dir), convert)


DIGESTPATH2019 = register_slide_source(SlideSource(
    name="digestpath2019",
    classes=CLASSES,
    prepare=prepare,
    reference="https://digestpath2019.grand-challenge.org/ (task 2, Colonoscopy_tissue_segment_dataset)",
))
