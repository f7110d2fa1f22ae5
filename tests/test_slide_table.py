"""Slide tables (one row per whole slide) and the synthetic metastasis size classes they carry."""

import csv
import json
from dataclasses import replace

import numpy as np
import openslide
import pyarrow.parquet as pq
import pytest
import tifffile

from histoweak.data.slide_table import (SIZE_CLASSES, SLIDE_COLUMNS, SLIDE_SCHEMA, is_slide_table, read_slide_table,
                                        slide_table_from_csv, write_slide_table)
from histoweak.data.synthetic import PRESETS, SynthPreset, synthesize, write_pyramid

# (width, height, µm/px or None) of three small real pyramids
SHAPES = {"a": (640, 480, 0.25), "b": (300, 520, 0.5), "c": (256, 256, None)}


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("wsi")
    rng = np.random.default_rng(0)
    for name, (w, h, mpp) in SHAPES.items():
        write_pyramid(root / f"{name}.tiff", rng.integers(0, 255, (h, w, 3), dtype=np.uint8), mpp=mpp, tile=128,
                      min_size=128)
    (root / "garbage.tiff").write_bytes(bytes(rng.integers(0, 255, 4096, dtype=np.uint8)))
    return root


def _rows(root):
    return [dict(slide_id="a", path=str(root / "a.tiff"), label=1, split="train", size_class="macro", center="RUMC"),
            dict(slide_id="b", path=str(root / "b.tiff"), label=0, split="val", size_class="negative"),
            dict(slide_id="c", path=str(root / "c.tiff"), label="1", split="test")]


def test_round_trip_geometry_is_what_openslide_reports(slides, tmp_path):
    report = write_slide_table(_rows(slides), tmp_path / "t", source="toy", params={"why": "test"})
    assert report.written == 3 and report.failures == []
    got = {r["slide_id"]: r for r in read_slide_table(tmp_path / "t")}
    assert list(next(iter(got.values()))) == SLIDE_SCHEMA.names and set(SLIDE_COLUMNS) <= set(SLIDE_SCHEMA.names)
    for sid, (w, h, mpp) in SHAPES.items():
        r = got[sid]
        with openslide.OpenSlide(r["path"]) as s:
            assert (r["width"], r["height"]) == s.dimensions == (w, h)
            assert r["levels"] == s.level_count == len(tifffile.TiffFile(r["path"]).pages) > 1
            assert r["mpp"] == (pytest.approx(float(s.properties["openslide.mpp-x"])) if mpp else None)
        assert r["source"] == "toy"
    assert got["a"]["mpp"] == pytest.approx(0.25) and got["a"]["center"] == "RUMC"
    assert got["c"]["label"] == 1 and got["c"]["size_class"] is None and got["c"]["center"] is None
    m = json.loads((tmp_path / "t" / "_manifest.json").read_text())
    assert m["kind"] == "slides" and m["classes"] == ["normal", "tumor"] and m["params"] == {"why": "test"}
    assert m["counts"] == {"train": {"macro": 1}, "val": {"negative": 1}, "test": {"unknown": 1}}
    assert pq.read_schema(tmp_path / "t" / "slides.parquet").equals(SLIDE_SCHEMA, check_metadata=False)
    assert is_slide_table(tmp_path / "t")


def test_bad_slides_and_rows_are_reported_while_the_rest_are_written(slides, tmp_path):
    bad = [dict(slide_id="g", path=str(slides / "garbage.tiff"), label=0, split="train"),
           dict(slide_id="s", path=str(slides / "a.tiff"), label=0, split="training"),
           dict(slide_id="l", path=str(slides / "a.tiff"), label=2, split="train"),
           dict(slide_id="z", path=str(slides / "a.tiff"), label=1, split="train", size_class="huge"),
           dict(slide_id="n", path=str(slides / "a.tiff"), label=1, split="train", size_class="negative"),
           dict(slide_id="a", path=str(slides / "b.tiff"), label=0, split="train"),
           dict(slide_id="m", path=str(slides / "missing.tiff"), label=0, split="train")]
    report = write_slide_table(_rows(slides) + bad, tmp_path / "t", source="toy")
    assert report.written == 3
    assert [r["slide_id"] for r in read_slide_table(tmp_path / "t")] == ["a", "b", "c"]
    problems = {f["slide_id"]: f["problem"] for f in report.failures}
    assert list(problems) == ["g", "s", "l", "z", "n", "a", "m"]
    assert "corrupt" in problems["g"] or "unsupported" in problems["g"]
    assert "unknown split 'training'" in problems["s"] and "label must be 0" in problems["l"]
    assert "unknown size_class 'huge'" in problems["z"] and "contradicts label 1" in problems["n"]
    assert "duplicate slide_id 'a'" in problems["a"] and "does not exist" in problems["m"]
    assert report.failures[0]["path"] == str(slides / "garbage.tiff")
    assert json.loads((tmp_path / "t" / "_manifest.json").read_text())["failures"] == report.failures


def test_nothing_usable_or_a_table_already_there_is_a_clear_error(slides, tmp_path):
    with pytest.raises(ValueError, match="no usable slide among 1 row.*garbage.tiff"):
        write_slide_table([dict(slide_id="g", path=str(slides / "garbage.tiff"), label=0, split="train")],
                          tmp_path / "t", source="toy")
    assert not (tmp_path / "t").exists()
    write_slide_table(_rows(slides)[:1], tmp_path / "t", source="toy")
    with pytest.raises(ValueError, match=r"t: already holds a slide table; pass overwrite=True"):
        write_slide_table(_rows(slides), tmp_path / "t", source="toy")
    assert write_slide_table(_rows(slides), tmp_path / "t", source="toy", overwrite=True).written == 3
    assert len(read_slide_table(tmp_path / "t")) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # no staging left behind


def test_csv_relative_paths_are_resolved_against_the_csv(slides, tmp_path):
    sub = tmp_path / "list"
    sub.mkdir()
    with open(sub / "slides.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "path", "label", "split", "size_class", "extra"])
        w.writerow(["a", "../../" + slides.name + "/a.tiff", "1", "train", "micro", "x"])
        w.writerow(["b", str(slides / "b.tiff"), "0", "val", "", "y"])
    (tmp_path / slides.name).symlink_to(slides)  # the relative path goes through the CSV's parent
    report = slide_table_from_csv(sub / "slides.csv", tmp_path / "t", source="mine")
    assert report.failures == [] and report.written == 2
    rows = {r["slide_id"]: r for r in read_slide_table(tmp_path / "t")}
    assert rows["a"]["path"] == str(sub / ".." / ".." / slides.name / "a.tiff")
    assert (rows["a"]["width"], rows["a"]["height"]) == SHAPES["a"][:2]
    assert rows["a"]["size_class"] == "micro" and rows["b"]["size_class"] is None and rows["b"]["source"] == "mine"
    (sub / "bad.csv").write_text("slide_id,path\na,a.tiff\n")
    with pytest.raises(ValueError, match=r"bad.csv: missing column\(s\) \['label', 'split'\]"):
        slide_table_from_csv(sub / "bad.csv", tmp_path / "u")


def test_reading_a_directory_that_is_not_a_slide_table_names_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'}: not a slide table"):
        read_slide_table(tmp_path / "empty")
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    (tiles / "_manifest.json").write_text(json.dumps({"schema_version": 1, "classes": ["bg", "tumor"], "counts": {}}))
    with pytest.raises(ValueError, match=f"{tiles}: a tile table, not a slide table"):
        read_slide_table(tiles)
    assert not is_slide_table(tiles) and not is_slide_table(tmp_path / "empty") and not is_slide_table(tmp_path / "no")
    with pytest.raises(ValueError, match="exists and is not a slide table"):
        write_slide_table([], tiles, source="x")


# -- the synthetic metastasis preset -------------------------------------------------------------

SMALL = dict(size=1024, n_slides=8, metastasis=(("macro", 0.08, 0.1, 1), ("micro", 0.025, 0.035, 1),
                                                ("itc", 0.008, 0.012, 2)))


@pytest.fixture(scope="module")
def camelyon(tmp_path_factory):
    out = tmp_path_factory.mktemp("camelyon")
    synthesize(out, "camelyon", seed=1, **SMALL)
    return out


def test_size_class_agrees_with_the_mask(camelyon, tmp_path):
    rows = list(csv.DictReader(open(camelyon / "slides.csv")))
    area = {r["slide_id"]: int((tifffile.imread(camelyon / r["mask_path"], key=0) == 1).sum()) for r in rows}
    by_class = {}
    for r in rows:
        assert int(r["label"]) == int(area[r["slide_id"]] > 0)
        assert (r["size_class"] == "negative") == (area[r["slide_id"]] == 0)
        by_class.setdefault(r["size_class"], []).append(area[r["slide_id"]])
    assert set(by_class) == set(SIZE_CLASSES) and len(by_class["negative"]) == 4
    assert np.mean(by_class["macro"]) > np.mean(by_class["micro"]) > np.mean(by_class["itc"]) > 0
    for split in ("train", "val", "test"):  # stratified: both labels in every split
        assert {r["label"] for r in rows if r["split"] == split} == {"0", "1"}, split
    table = slide_table_from_csv(camelyon / "slides.csv", tmp_path / "t", source="synthetic-camelyon")
    got = {r["slide_id"]: r for r in read_slide_table(table.out_dir)}
    assert {k: (v["size_class"], v["label"], v["split"]) for k, v in got.items()} == {
        r["slide_id"]: (r["size_class"], int(r["label"]), r["split"]) for r in rows}
    assert all(v["width"] == v["height"] == 1024 and v["mpp"] == pytest.approx(0.5) for v in got.values())


def test_slides_csv_with_size_class_still_tiles(camelyon):
    from histoweak.data.tiling_job import discover_slides

    specs = discover_slides(camelyon / "slides.csv")
    assert len(specs) == 8 and all(s.mask_path and s.label in (0, 1) for s in specs)


def test_every_split_holds_both_labels_and_every_class_appears():
    from histoweak.data.synthetic import _layout

    for n in range(6, 41):
        layout = _layout(replace(PRESETS["camelyon"], n_slides=n), seed=n)
        for split in ("train", "val", "test"):
            assert {t for t, _, s in layout if s == split} == {True, False}, (n, split)
        assert {c for t, c, _ in layout if t} == {"macro", "micro", "itc"}
        assert sum(t for t, _, _ in layout) == round(0.5 * n)
    assert _layout(PRESETS["camelyon"], 3) == _layout(PRESETS["camelyon"], 3)  # deterministic from the seed


def test_itc_at_full_size_is_a_few_dozen_pixels():
    from histoweak.data.synthetic import render_slide

    p = replace(PRESETS["camelyon"], size=2048)  # the preset's radii; 2048 keeps it quick
    _, mask = render_slide(p, seed=4, has_tumor=True, size_class="itc")
    assert 2 * 24 <= (mask == 1).sum() <= 2 * np.pi * (0.005 * 2048) ** 2 * 3


@pytest.mark.parametrize("bad,match", [
    ((("macro", 0.1, 0.05, 1),), "0 < min <= max < 0.5"),
    ((("macro", 0.05, 0.1, 1), ("macro", 0.01, 0.02, 1)), "unique"),
    ((("huge", 0.05, 0.1, 1),), "not one of"),
    ((("itc", 0.01, 0.02, 0),), "clusters must be an integer >= 1"),
])
def test_metastasis_validation_names_the_key(bad, match):
    with pytest.raises(ValueError, match=f"'metastasis'.*{match}"):
        SynthPreset(metastasis=bad)


def test_default_slide_table_is_made_once_then_reused(tmp_path, capsys):
    from histoweak.data.defaults import SLIDE_PRESETS, default_slide_table

    assert "camelyon" in SLIDE_PRESETS
    table = default_slide_table(tmp_path, size=1024, n_slides=6)
    assert "synthesizing the 'camelyon' dataset" in capsys.readouterr().out
    before = (table / "slides.parquet").stat().st_mtime_ns
    assert default_slide_table(tmp_path, size=1024, n_slides=6) == table
    assert capsys.readouterr().out == "" and (table / "slides.parquet").stat().st_mtime_ns == before
    rows = read_slide_table(table)
    assert len(rows) == 6 and {r["size_class"] for r in rows} == set(SIZE_CLASSES)
    assert table == tmp_path.resolve() / "camelyon-n_slides6-size1024" / "slide_table"
