"""Gleason2019 (MICCAI 2019 Gleason grading challenge, Nir et al.) as slides for ``histoweak tile``.

Layout of the unzipped training archives (``Train Imgs.zip``, ``Maps1_T.zip``, …)::

    Train Imgs/slide001_core003.jpg                       tissue-microarray core images (about 5,000 px square)
    Maps1_T/slide001_core003_classimg_nonconvex.png       pathologist 1's map of the same size

Accepted variants, seen in public code that reads this dataset: the image
folder as ``Train Imgs``, ``Train_Imgs`` or ``Train_imgs``; the maps under
``Maps1_T/`` or ``Maps/Maps1_T/``; a map named ``<image stem>.png``
instead of ``<image stem>_classimg_nonconvex.png``. Only the first map is
read: Ciga & Martel (§3.1) use pathologist 1 as the ground truth. Every
image must have one.

Map pixel values are the challenge's labels and are mapped by
``PIXEL_TO_CLASS`` to histoweak classes:

    ======  =========================  ==============
    pixel   meaning                    class
    ======  =========================  ==============
    0       not annotated (no tissue)  0 background
    1       benign                     1 benign
    3       Gleason grade 3            2 gleason 3
    4       Gleason grade 4            3 gleason 4
    5       Gleason grade 5            4 gleason 5
    6       benign (see below)         1 benign
    ======  =========================  ==============

Value 6 is not described by the challenge pages we could read; public
preparation code treats it as benign (no cancer), which we follow, giving
the paper's five classes. Any other value is an error naming the map.
Masks are written as PNG at the image's size.

Splits: 50 % train, 25 % val, 25 % test by core, seeded (``seeded_splits``,
seed ``SEED``), as the paper's §3.3.
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

__all__ = ["CLASSES", "GLEASON2019", "PIXEL_TO_CLASS", "SEED", "map_to_classes", "prepare"]

CLASSES = ("background", "benign", "gleason 3", "gleason 4", "gleason 5")
PIXEL_TO_CLASS = {0: 0, 1: 1, 3: 2, 4: 3, 5: 4, 6: 1}
SEED = 0
IMAGE_DIRS = ("Train Imgs", "Train_Imgs", "Train_imgs")
MAP_DIRS = ("Maps1_T", "Maps/Maps1_T")
MAP_SUFFIXES = ("_classimg_nonconvex.png", ".png")


def map_to_classes(values: np.ndarray) -> np.ndarray:
    """Map a Gleason2019 map's pixel values to histoweak classes by ``PIXEL_TO_CLASS``.

    Parameters
    ----------
    values : (H, W) uint8

    Returns
    -------
    (H, W) uint8

    Raises
    ------
    ValueError
        Naming the values outside ``PIXEL_TO_CLASS``.
    """
    lut = np.full(256, 255, np.uint8)
    for value, cls in PIXEL_TO_CLASS.items():
        lut[value] = cls
    out = lut[values]
    if (out == 255).any():
        bad = sorted(int(v) for v in np.unique(values[out == 255]))
        raise ValueError(f"map holds value(s) {bad}; expected {sorted(PIXEL_TO_CLASS)}")
    return out


def _read_map(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode in ("L", "P"):
            return np.asarray(im, dtype=np.uint8)
        rgb = np.asarray(im.convert("RGB"))
    if not ((rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])).all():
        raise ValueError("map is a colour image; expected one class value per pixel")
    return rgb[..., 0]


def _find_map(maps: Path, stem: str) -> Path | None:
    return next((maps / f"{stem}{s}" for s in MAP_SUFFIXES if (maps / f"{stem}{s}").is_file()), None)


def prepare(root: str | Path, out_dir: str | Path, seed: int = SEED) -> Path:
    """Write ``slides.csv``, ``classes.json``, masks and ``source.json`` for Gleason2019 into ``out_dir``.

    Returns
    -------
    Path
        ``<out_dir>/slides.csv``.

    Raises
    ------
    SourceError
        Listing every problem: a missing folder, an image without a map, an
        unreadable image or map, a map of another size than its image (all
        found before writing), a map value outside ``PIXEL_TO_CLASS`` (found
        while converting; nothing is left behind).
    ValueError
        ``out_dir`` exists and is not empty.
    """
    root = dataset_root(Path(root), GLEASON2019.name, "Gleason2019", (*IMAGE_DIRS, "Maps1_T", "Maps"))
    problems: list[str] = []
    image_dir = find_dir(root, IMAGE_DIRS, problems, "core images")
    map_dir = find_dir(root, MAP_DIRS, problems, "pathologist 1's maps")
    pairs: list[tuple[Path, Path]] = []
    if image_dir and map_dir:
        images = files(image_dir, (".jpg", ".jpeg"))
        if not images:
            problems.append(f"{image_dir}: no .jpg images")
        for image in images:
            mapped = _find_map(map_dir, image.stem)
            if mapped is None:
                problems.append(f"{image}: no map {map_dir / (image.stem + MAP_SUFFIXES[0])}")
                continue
            size, map_size = image_size(image, problems), image_size(mapped, problems, "map")
            if size and map_size and size != map_size:
                problems.append(f"{mapped}: map is {map_size[0]}x{map_size[1]} but its image is {size[0]}x{size[1]}")
            elif size and map_size:
                pairs.append((image, mapped))
    if problems:
        raise SourceError(root, GLEASON2019.name, problems)

    def convert(stage: Path, problems: list[str]) -> tuple[list[SlideRow], dict]:
        splits = seeded_splits([image.stem for image, _ in pairs], seed=seed)
        rows = []
        for image, mapped in pairs:
            try:
                classes = map_to_classes(_read_map(mapped))
            except (OSError, ValueError, SyntaxError) as exc:
                problems.append(f"{mapped}: {exc}")
                continue
            write_png_mask(stage / "masks" / f"{image.stem}.png", classes)
            rows.append(SlideRow(image.stem, image.resolve(), f"masks/{image.stem}.png", None, splits[image.stem]))
        info = {"params": {"map_dir": str(map_dir.relative_to(root)), "pixel_to_class": PIXEL_TO_CLASS,
                           "split_seed": seed, "split_fractions": [0.5, 0.25, 0.25]}}
        return rows, info

    return write_prepared(GLEASON2019, root, Path(out_dir), convert)


GLEASON2019 = register_slide_source(SlideSource(
    name="gleason2019",
    classes=CLASSES,
    prepare=prepare,
    reference="https://gleason2019.grand-challenge.org/ (training images and Maps1_T..Maps6_T)",
))
