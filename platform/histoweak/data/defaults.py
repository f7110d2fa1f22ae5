"""The embedded default datasets: synthetic slides tiled (or listed as a slide table) into a cache directory on
first use, reused after."""

from __future__ import annotations

import json
from pathlib import Path

from histoweak._storage import cache_dir

__all__ = ["PATCH_PRESETS", "SLIDE_PRESETS", "default_slide_table", "default_tile_table", "n_classes_of"]

#: embedded patch datasets (class-per-folder PNGs, imported with the `folder` source): name -> writer kwargs
PATCH_PRESETS = {"grades": {}}  # data.synthetic_grades: four ordinal grades (BN/WD/MD/PD), few tiles per class

#: synthetic presets served as slide tables (whole-slide classification; see ``default_slide_table``)
SLIDE_PRESETS = {"camelyon"}

_TILING = {"default": dict(tile_size=224, min_tissue=0.5), "tiny": dict(tile_size=128, min_tissue=0.3),
           # every tile with any tissue: GERNE's groups are about how little tissue a tile holds
           "gerne": dict(tile_size=96, min_tissue=0.01),
           # weakly-supervised segmentation: tiles mixing tissue classes and some background
           "wsss": dict(tile_size=128, min_tissue=0.3)}


def default_tile_table(cache: str | Path | None = None, preset: str = "default", **overrides) -> Path:
    """Path to the tiled synthetic ``preset`` under ``cache`` (synthesized and tiled when missing).

    ``overrides`` change knobs of the preset (e.g. ``shortcut=0.8``) and get a cache directory of their own.
    """
    from histoweak._ray import init_ray
    from histoweak.data.synthetic import synthesize
    from histoweak.data.tiling_job import discover_slides, load_classes, tile_dataset
    from histoweak.slides.tiling import TilingParams

    root = _cache_root(cache, preset, overrides)
    tiles = root / "tiles"
    manifest = tiles / "_manifest.json"
    if preset in PATCH_PRESETS:
        return _patch_table(root, preset, {**PATCH_PRESETS[preset], **overrides})
    if manifest.exists() and json.loads(manifest.read_text()).get("counts", {}).get("pending", 1) == 0:
        return tiles
    if not (root / "slides" / "slides.csv").exists():
        print(f"histoweak: synthesizing the {preset!r} dataset into {root / 'slides'} (first use)")
        synthesize(root / "slides", preset, **overrides)
    init_ray()
    report = tile_dataset(discover_slides(root / "slides" / "slides.csv"), tiles, TilingParams(**_TILING.get(preset, _TILING["default"])),
                          load_classes(root / "slides" / "classes.json"), source=f"synthetic-{preset}")
    if report.failures:
        raise RuntimeError(f"tiling the default dataset failed: {report.failures}")
    return tiles


def _cache_root(cache: str | Path | None, preset: str, overrides: dict) -> Path:
    """The cache directory of ``preset`` with ``overrides``: its synthetic slides and the tables made from them."""
    def word(v) -> str:  # a tuple knob (splits) without spaces or brackets in the directory name
        return "_".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)

    base = cache_dir("data") if cache is None else Path(cache).resolve()
    return base / "-".join([preset, *(f"{k}{word(v)}" for k, v in sorted(overrides.items()))])


def default_slide_table(cache: str | Path | None = None, preset: str = "camelyon", **overrides) -> Path:
    """Path to the synthetic ``preset`` as a slide table under ``cache`` (synthesized and written when missing).

    The slides are synthesized into ``<cache>/<preset…>/slides`` (shared with ``default_tile_table``) and the
    table written at ``<cache>/<preset…>/slide_table``; both are reused while the preset is unchanged, and
    made again when its knobs change (the table's manifest records them). ``overrides`` change knobs of
    the preset (e.g. ``n_slides=12``) and get a cache directory of their own. No Ray.
    """
    from dataclasses import asdict, replace

    from histoweak.data.slide_table import is_slide_table, slide_table_from_csv
    from histoweak.data.synthetic import PRESETS, synthesize

    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; valid: {sorted(PRESETS)}")
    recipe = json.loads(json.dumps({**asdict(replace(PRESETS[preset], **overrides)), "seed": 0}))
    root = _cache_root(cache, preset, overrides)
    slides, table = root / "slides", root / "slide_table"
    if is_slide_table(table) and json.loads((table / "_manifest.json").read_text())["params"].get("synthetic") == recipe:
        return table
    made = slides / "preset.json"
    if not (slides / "slides.csv").exists() or not made.exists() or json.loads(made.read_text()) != recipe:
        why = "the preset changed" if made.exists() else "first use"
        print(f"histoweak: synthesizing the {preset!r} dataset into {slides} ({why})")
        synthesize(slides, preset, **overrides)
    report = slide_table_from_csv(slides / "slides.csv", table, source=f"synthetic-{preset}",
                                  params={"synthetic": recipe}, overwrite=True)
    if report.failures:
        raise RuntimeError(f"writing the default slide table failed: {report.failures}")
    return table


def _patch_table(root: Path, preset: str, kwargs: dict) -> Path:
    """An embedded patch dataset: written as class folders, then converted (no tiling, no Ray)."""
    from histoweak.data.sources import convert_source
    from histoweak.data.synthetic_grades import GRADES, write_grade_dataset

    tiles = root / "tiles"
    if (tiles / "_manifest.json").exists():  # the conversion renames a finished table into place
        return tiles
    if not (root / "images").is_dir():
        print(f"histoweak: synthesizing the {preset!r} patch dataset into {root / 'images'} (first use)")
        write_grade_dataset(root / ".images.tmp", **kwargs)
        (root / ".images.tmp").rename(root / "images")
    convert_source("folder", root / "images", tiles, classes=list(GRADES))  # ordinal order, not sorted names
    return tiles


def n_classes_of(tile_table: str | Path) -> int:
    """Number of classes (with background) recorded in a tile table's manifest."""
    if not Path(tile_table).is_dir():
        raise ValueError(f"{tile_table}: no such tile table (a directory written by `histoweak tile` or "
                         "`histoweak import`)")
    m = Path(tile_table) / "_manifest.json"
    if not m.exists():
        raise ValueError(f"{m}: not a histoweak tile table (no manifest)")
    return len(json.loads(m.read_text())["classes"])
