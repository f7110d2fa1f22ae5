"""Public datasets as histoweak tile tables: patch datasets converted directly (``convert_source``), slide and
image datasets with masks or annotations prepared for the tiler (``prepare_slide_source``: BACH, Gleason2019,
DigestPath2019), and any patch dataset with one label per image, from class folders or a CSV
(``convert_source("folder" | "csv", ...)``, ``folder``).

Each registered source reads one dataset's documented on-disk layout and
writes the tile table the rest of histoweak trains on::

    from histoweak.data.sources import convert_source
    convert_source("luad-histoseg", "/data/LUAD-HistoSeg", "tiles/luad-histoseg")

A dataset that does not match its layout fails (``SourceError``, naming
every bad file) before anything is written.
"""

from __future__ import annotations

from pathlib import Path

from histoweak.data.sources import bcss_wsss, luad_histoseg  # noqa: F401 — importing registers them
from histoweak.data.sources._slides import SLIDE_SOURCES, prepare_slide_source
from histoweak.data.sources._patches import (
    MASK_INDEX_TO_CLASS, ROWS_PER_FILE, SOURCES, ConversionReport, PatchDataset, SourceError, convert_patch_dataset,
    get_source, mask_to_classes, parse_label,
)
from histoweak.data.sources.folder import FOLDER_SOURCES  # importing registers "folder" and "csv"

__all__ = [
    "FOLDER_SOURCES",
    "MASK_INDEX_TO_CLASS",
    "ROWS_PER_FILE",
    "SLIDE_SOURCES",
    "SOURCES",
    "ConversionReport",
    "PatchDataset",
    "SourceError",
    "convert_source",
    "get_source",
    "mask_to_classes",
    "parse_label",
    "prepare_slide_source",
]


def convert_source(name: str, root: str | Path, out_dir: str | Path, rows_per_file: int = ROWS_PER_FILE,
                   progress: bool = False, **options) -> ConversionReport:
    """Convert the dataset ``name`` (a key of ``SOURCES`` or ``FOLDER_SOURCES``) found at ``root`` into a tile
    table at ``out_dir``. ``options`` go to a folder source's converter (``folder.convert_folder``: split
    fractions, seed, class order); the fixed layouts take none.

    Writes ``<out_dir>/<split>/part-NNNNN.parquet`` and ``_manifest.json``;
    ``out_dir`` must not exist or be empty.

    Raises
    ------
    ValueError
        Unknown ``name`` (with the valid names), a non-empty ``out_dir``,
        ``rows_per_file < 1``, or options for a fixed layout.
    SourceError
        The dataset does not match its layout or a patch does not decode;
        nothing is written.
    """
    if name in FOLDER_SOURCES:
        return FOLDER_SOURCES[name].convert(root, out_dir, rows_per_file=rows_per_file, progress=progress, **options)
    source = get_source(name)  # an unknown name fails listing the fixed layouts
    if options:
        raise ValueError(f"source {name!r} has a fixed layout and takes no options, got {sorted(options)}")
    return convert_patch_dataset(source, root, out_dir, rows_per_file=rows_per_file, progress=progress)
