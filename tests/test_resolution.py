"""Tiles at a physical resolution: the level read, the area resize, masks by nearest, slides without mpp."""

from __future__ import annotations

import json

import numpy as np
import openslide
import pyarrow.parquet as pq
import pytest
import tifffile
from PIL import Image

from histoweak.data.tiling_job import discover_slides, load_classes, read_manifest, tile_dataset
from histoweak.slides.reader import SlideError, SlideReader
from histoweak.slides.resolution import mpp_for_magnification, read_scaled, resize_area, resolve
from histoweak.slides.tiling import TilingParams, decode_image


def _supersampled_area(img: np.ndarray, num: int, den: int, n_out: int) -> np.ndarray:
    """Area resize by a rational factor num/den (input pixels per output pixel), computed by repeating every
    input pixel den x den times and averaging num x num blocks: exact, and independent of ``resize_area``."""
    sup = img.astype(np.float64).repeat(den, 0).repeat(den, 1)[: n_out * num, : n_out * num]
    return sup.reshape(n_out, num, n_out, num, -1).mean((1, 3))


def test_resize_area_is_the_exact_area_mean():
    rng = np.random.default_rng(0)
    img = (rng.random((90, 90, 3)) * 255).astype(np.uint8)
    ref = _supersampled_area(img, 7, 5, 64)  # 1.4 input pixels per output pixel, 64 span 89.6
    out = resize_area(img, (64, 64), (89.6, 89.6))
    assert np.abs(out - ref).max() <= 0.5 + 1e-4  # rounding only
    big = (rng.random((400, 300, 3)) * 255).astype(np.uint8)  # an integer factor: block means
    block_means = big.reshape(40, 10, 30, 10, 3).mean((1, 3))
    assert np.abs(resize_area(big, (30, 40)) - block_means).max() <= 0.5 + 1e-4  # float32 sums at .5 ties


def test_resolve_picks_the_coarsest_level_at_least_as_fine(synth_dir):
    path = synth_dir / "slides" / "tiny-3-000.tiff"  # 1024², levels 1, 2, 4 at 0.5 µm/px
    with SlideReader(path) as r:
        assert r.mpp == pytest.approx(0.5) and r.level_downsamples[:3] == pytest.approx((1, 2, 4))
        res = resolve(r, mpp=1.4)
        assert (res.level, res.downsample, res.mpp) == (1, pytest.approx(2.8), pytest.approx(1.4))
        assert res.scale == pytest.approx(2 / 2.8) and not res.native
        assert res.dimensions(r) == (int(1024 / 2.8), int(1024 / 2.8))
        on_level = resolve(r, mpp=1.0)  # exactly level 1: read as is
        assert (on_level.level, on_level.native, on_level.scale) == (1, True, 1.0)
        assert resolve(r, magnification=10).downsample == pytest.approx(2.0)  # 10x = 1 µm/px
        assert resolve(r, level=2).mpp == pytest.approx(2.0)
        with pytest.raises(SlideError, match=r"tiny-3-000.tiff: 0.25 µm/px requested, but level 0 is 0.5 µm/px"):
            resolve(r, mpp=0.25)
        with pytest.raises(ValueError, match="exactly one of"):
            resolve(r, mpp=1.0, level=1)
    assert mpp_for_magnification(20) == 0.5
    assert TilingParams(mpp=0.5, tile_um=112).tile_size == 224
    assert TilingParams(magnification=40, tile_um=56).tile_size == 224
    with pytest.raises(ValueError, match="'tile_um': needs mpp or magnification"):
        TilingParams(tile_um=100)
    with pytest.raises(ValueError, match="'level': 1 with a physical resolution"):
        TilingParams(level=1, mpp=0.5)


def test_tiles_between_two_levels(synth_dir, ray_local, tmp_path):
    """At 1.4 µm/px (between levels 1 and 2 of a 0.5 µm/px slide) each tile is level 1 shrunk by area, its mask
    the nearest-resized level-0 mask, positions in level-0 pixels."""
    slides = discover_slides(synth_dir / "slides.csv")[:1]
    params = TilingParams(mpp=1.4, tile_size=64, min_tissue=0.3)
    report = tile_dataset(slides, tmp_path, params, load_classes(synth_dir / "classes.json"), progress=False)
    assert not report.failures
    rows = pq.read_table(tmp_path).to_pylist()
    assert len(rows) >= 5
    mask0 = tifffile.imread(synth_dir / "masks" / f"{slides[0].slide_id}.tiff", key=0)
    with openslide.OpenSlide(slides[0].path) as s:
        for row in rows:
            assert (row["level"], row["size"]) == (1, 64)
            assert row["downsample"] == pytest.approx(2.8) and row["mpp"] == pytest.approx(1.4)
            assert row["scale"] == pytest.approx(2 / 2.8)
            col, r = row["x"] / 2.8, row["y"] / 2.8  # grid positions in output pixels, stored in level-0 pixels
            assert abs(col - round(col)) * 2.8 <= 0.5 and abs(r - round(r)) * 2.8 <= 0.5
            region = np.asarray(s.read_region((row["x"], row["y"]), 1, (90, 90)))[..., :3]  # 64 px span 89.6
            ref = _supersampled_area(region, 7, 5, 64)
            assert np.abs(decode_image(row["image"]).astype(float) - ref).max() <= 0.5 + 1e-4
            # nearest at output pixel centres, computed by PIL on the level-0 mask's 179.2-px footprint
            box = (row["x"], row["y"], row["x"] + 64 * 2.8, row["y"] + 64 * 2.8)
            want = np.asarray(Image.fromarray(mask0).resize((64, 64), Image.Resampling.NEAREST, box=box))
            np.testing.assert_array_equal(decode_image(row["mask"]), want)
    entry = read_manifest(tmp_path)["slides"][slides[0].slide_id]
    assert (entry["level_read"], entry["mpp_assumed"]) == (1, False)
    assert entry["tile_mpp"] == pytest.approx(1.4) and entry["scale"] == pytest.approx(2 / 2.8)


def test_slide_without_mpp_fails_alone_unless_assumed(synth_dir, ray_local, tmp_path):
    """A slide with no mpp metadata is reported in the manifest (the others finish); with --assume-mpp it tiles,
    and the assumption is recorded."""
    from histoweak.data.synthetic import write_pyramid

    good = discover_slides(synth_dir / "slides.csv")[0]
    with openslide.OpenSlide(good.path) as s:
        pixels = np.asarray(s.read_region((0, 0), 0, s.dimensions))[..., :3]
    bare = tmp_path / "bare.tiff"
    write_pyramid(bare, pixels, mpp=None, compression="zlib")  # lossless: the same pixels as the original
    with SlideReader(bare) as r:
        assert r.mpp is None
    csv_path = tmp_path / "slides.csv"
    csv_path.write_text(f"slide_id,path\n{good.slide_id},{good.path}\nbare,{bare}\n")
    classes = load_classes(synth_dir / "classes.json")
    params = TilingParams(mpp=1.0, tile_size=64, min_tissue=0.3)
    report = tile_dataset(discover_slides(csv_path), tmp_path / "a", params, classes, progress=False)
    assert set(report.failures) == {"bare"}
    assert "bare.tiff: no microns-per-pixel metadata" in report.failures["bare"]
    assert "--assume-mpp" in report.failures["bare"]
    manifest = read_manifest(tmp_path / "a")
    assert manifest["slides"][good.slide_id]["status"] == "ok" and manifest["slides"][good.slide_id]["n_tiles"] > 0

    assumed = TilingParams(mpp=0.5, tile_size=128, min_tissue=0.3, assume_mpp=0.5)  # level 0: pixels identical
    report = tile_dataset(discover_slides(csv_path), tmp_path / "b", assumed, classes, progress=False)
    assert not report.failures
    manifest = json.loads((tmp_path / "b" / "_manifest.json").read_text())
    assert manifest["params"]["assume_mpp"] == 0.5
    assert manifest["slides"]["bare"]["mpp_assumed"] is True and manifest["slides"][good.slide_id]["mpp_assumed"] is False
    rows = pq.read_table(tmp_path / "b", columns=["slide_id", "image", "x", "y", "mpp", "level"]).to_pylist()
    by = {}
    for row in rows:
        by.setdefault(row["slide_id"], {})[(row["x"], row["y"])] = row
    assert by["bare"].keys() == by[good.slide_id].keys()  # same pixels, same assumed mpp: the same tiles
    for key, row in by["bare"].items():
        assert row["mpp"] == 0.5 and row["level"] == 0
        np.testing.assert_array_equal(decode_image(row["image"]), decode_image(by[good.slide_id][key]["image"]))


def test_read_scaled_on_a_native_level_is_read_region(synth_dir):
    with SlideReader(synth_dir / "slides" / "tiny-3-000.tiff") as r:
        res = resolve(r, mpp=1.0)
        np.testing.assert_array_equal(read_scaled(r, (256, 128), (64, 48), res), r.read_region((256, 128), 1, (64, 48)))


def test_predict_follows_the_checkpoints_mpp(synth_dir):
    """A checkpoint trained on tiles at an mpp predicts at that mpp (positions and reads through the same
    resolution); --level replaces it."""
    from histoweak.predict import _read_tiles, covering_grid, tiling_params, tissue_tiles

    saved = {"tiling": TilingParams(mpp=1.4, tile_size=64).to_dict()}
    params = tiling_params(saved)
    assert params.target_mpp == 1.4 and params.step == 48
    assert tiling_params(saved, level=1).target_mpp is None and tiling_params(saved, level=1).level == 1
    path = str(synth_dir / "slides" / "tiny-3-000.tiff")
    with SlideReader(path) as r:
        positions, candidates = tissue_tiles(r, params)
        res = resolve(r, mpp=1.4)
        w, h = res.dimensions(r)
        grid = covering_grid(w, h, 64, 48)  # over the slide at 1.4 µm/px (365 px), not over level 1 (512 px)
        assert candidates == len(grid) and 0 < len(positions) <= len(grid)
        assert {tuple(p) for p in positions} <= {tuple(p) for p in grid}
        c, row = positions[0]
        x, y = int(round(c * 2.8)), int(round(row * 2.8))
        want = read_scaled(r, (x, y), (64, 64), res)
    batch = {"slide_id": np.array(["a"], object), "path": np.array([path], object), "x": np.array([x]),
             "y": np.array([y]), "downsample": np.array([2.8]), "col": np.array([c]), "row": np.array([row]),
             "level": np.array([1]), "level_downsample": np.array([2.0])}
    np.testing.assert_array_equal(_read_tiles(batch, tile_size=64)["image"][0], want)
