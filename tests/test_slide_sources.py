"""Slide dataset adapters (BACH, Gleason2019, DigestPath2019): tiny datasets in their documented layouts built in
tmp_path, prepared, checked pixel by pixel, and tiled with the real tiler."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from histoweak.data.sources import SourceError
from histoweak.data.sources._slides import SLIDE_SOURCES, prepare_slide_source, seeded_splits
from histoweak.data.sources.bach import bach_class, wsi_splits
from histoweak.data.sources.gleason2019 import map_to_classes
from histoweak.data.synthetic import write_pyramid
from histoweak.data.tiling_job import discover_slides, load_classes, tile_dataset
from histoweak.slides.reader import MaskReader
from histoweak.slides.tiling import PARAM_CHOICES, TilingParams, decode_image

PINK = (230, 160, 200)


def tissue(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.array(PINK) + rng.integers(-25, 25, (h, w, 3))).clip(0, 255).astype(np.uint8)


def save(path: Path, array: np.ndarray, fmt: str, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, fmt, **kwargs)
    return path


def read_csv(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


def no_leftovers(out: Path) -> bool:
    """Nothing at ``out`` and no hidden staging directory beside it."""
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# -- BACH ---------------------------------------------------------------------------------------

PHOTOS = {"Normal": "n", "Benign": "b", "InSitu": "is", "Invasive": "iv"}
# Part B outlines by slide, level-0 rectangles on the 8-px mask grid: (label, (x0, y0, x1, y1), label in Text?)
OUTLINES = {
    "A01": [("Benign", (0, 0, 64, 64), False)],
    "A02": [("Benign", (0, 0, 64, 64), False), ("Invasive carcinoma", (128, 64, 192, 128), True)],
    "A03": [("Benign", (0, 0, 64, 64), False), ("Carcinoma in situ", (64, 0, 128, 32), True),
            ("Invasive carcinoma", (32, 32, 96, 96), False)],  # painted over the benign square's corner
    "A04": [("carcinoma in situ", (8, 8, 16, 16), False)],
    "A05": [("Invasive", (0, 0, 256, 192), False)],
}


def imagescope(outlines) -> str:
    regions = []
    for i, (label, (x0, y0, x1, y1), in_text) in enumerate(outlines):
        attrs = "<Attributes/>" if in_text else f'<Attributes><Attribute Name="1" Id="0" Value="{label}"/></Attributes>'
        vertices = "".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1)))
        regions.append(f'<Region Id="{i}" Type="0" Text="{label if in_text else ""}" NegativeROA="0">{attrs}'
                       f"<Vertices>{vertices}</Vertices></Region>")
    return (f'<?xml version="1.0"?><Annotations MicronsPerPixel="0.467"><Annotation Id="1" Name="">'
            f'<Attributes/><Regions><RegionAttributeHeaders/>{"".join(regions)}</Regions></Annotation></Annotations>')


def build_bach(root: Path) -> Path:
    """The challenge archive's top folder inside ``root``: 2 photos per class, 5 annotated slides and 1 unannotated."""
    base = root / "ICIAR2018_BACH_Challenge"
    for k, (folder, prefix) in enumerate(PHOTOS.items()):
        for i in (1, 2):
            save(base / "Photos" / folder / f"{prefix}{i:03d}.tif", tissue(48, 64, 10 * k + i), "TIFF")
    (base / "Photos" / "microscopy_ground_truth.csv").write_text("b001.tif,Benign\n")
    for i, (sid, outlines) in enumerate({**OUTLINES, "A06": None}.items()):
        (base / "WSI").mkdir(parents=True, exist_ok=True)
        write_pyramid(base / "WSI" / f"{sid}.svs", tissue(192, 256, 100 + i), mpp=0.467)
        if outlines is not None:
            (base / "WSI" / f"{sid}.xml").write_text(imagescope(outlines))
    return root


def test_bach_prepares_part_a_labels_and_part_b_masks(tmp_path):
    csv_path = prepare_slide_source("bach", build_bach(tmp_path / "data"), tmp_path / "prep")
    prepared = csv_path.parent
    rows = read_csv(csv_path)
    assert json.loads((prepared / "classes.json").read_text()) == {"0": "normal", "1": "benign", "2": "in situ",
                                                                   "3": "invasive"}
    photos = {sid: r for sid, r in rows.items() if not sid.startswith("A")}
    assert len(photos) == 8
    for (folder, prefix), cls in zip(PHOTOS.items(), range(4)):
        for i in (1, 2):
            r = photos[f"{prefix}{i:03d}"]
            assert (r["label"], r["mask_path"], r["split"]) == (str(cls), "", "train")
            assert Path(r["path"]).is_absolute() and Path(r["path"]).parent.name == folder
    wsis = {sid: r for sid, r in rows.items() if sid.startswith("A")}
    assert sorted(wsis) == ["A01", "A02", "A03", "A04", "A05"]  # A06 has no outlines: skipped
    assert {sid: r["split"] for sid, r in wsis.items()} == {"A01": "train", "A02": "train", "A03": "val",
                                                           "A04": "train", "A05": "test"}  # A03 holds all classes
    assert all(r["label"] == "" and r["mask_path"] == f"masks/{sid}.tiff" for sid, r in wsis.items())
    masks = {sid: MaskReader(prepared / r["mask_path"], (256, 192)).read(8)[0] for sid, r in wsis.items()}
    assert all(m.shape == (24, 32) for m in masks.values())  # 192 / 8, 256 / 8
    a03 = masks["A03"]
    # benign 8x8 minus the invasive square's 4x4 corner over it; in situ 8x4; invasive 8x8
    assert [(a03 == c).sum() for c in range(4)] == [24 * 32 - 64 - 32 - 48, 64 - 16, 32, 64]
    assert (masks["A04"] == 2).sum() == 1 and masks["A04"][1, 1] == 2
    assert (masks["A05"] == 3).all()
    manifest = json.loads((prepared / "source.json").read_text())
    assert manifest["skipped"]["unannotated_slides"] == ["A06.svs"]
    assert manifest["params"]["mask_downsample"] == 8
    assert manifest["counts"]["by_split"] == {"train": 8 + 3, "val": 1, "test": 1}
    assert manifest["root"].endswith("ICIAR2018_BACH_Challenge")  # found inside the given root


def test_bach_tiles_part_a_as_labels_and_part_b_as_masks(tmp_path, ray_local):
    csv_path = prepare_slide_source("bach", build_bach(tmp_path / "data"), tmp_path / "prep")
    params = TilingParams(tile_size=32, min_tissue=0.0, tissue_source="detector", tiles_per_shard=64)
    classes = load_classes(csv_path.parent / "classes.json")
    report = tile_dataset(discover_slides(csv_path), tmp_path / "tiles", params, classes, source="bach",
                          progress=False)
    assert not report.failures, report.failures
    table = pq.read_table(tmp_path / "tiles").to_pylist()
    photos = [r for r in table if not r["slide_id"].startswith("A")]
    assert len(photos) == 8 * 2  # 64x48 photos, 32-px tiles
    for r in photos:
        cls = list(PHOTOS.values()).index(r["slide_id"][:-3])
        assert r["label"] == cls and r["mask"] is None and r["labels"] is None and r["class_ratios"] is None
        assert r["split"] == "train"
    wsi = [r for r in table if r["slide_id"].startswith("A")]
    assert len(wsi) == 5 * 8 * 6 and all(r["label"] is None for r in wsi)
    corner = next(r for r in wsi if r["slide_id"] == "A03" and (r["x"], r["y"]) == (0, 0))
    assert corner["split"] == "val" and list(corner["labels"]) == [0, 1, 0, 0]
    assert (decode_image(corner["mask"]) == 1).all()
    overlap = next(r for r in wsi if r["slide_id"] == "A03" and (r["x"], r["y"]) == (32, 32))
    assert list(overlap["labels"]) == [0, 0, 0, 1]  # the invasive outline was painted over the benign one
    tumour = [r for r in wsi if r["slide_id"] == "A05"]
    assert all(list(r["labels"]) == [0, 0, 0, 1] and r["split"] == "test" for r in tumour)


def test_bach_problems_are_all_listed_and_nothing_is_written(tmp_path):
    root = build_bach(tmp_path / "data") / "ICIAR2018_BACH_Challenge"
    (root / "Photos" / "InSitu" / "is001.tif").write_bytes(b"not a tiff")
    for p in (root / "Photos" / "Normal").iterdir():
        p.unlink()
    (root / "Photos" / "Normal").rmdir()
    (root / "WSI" / "A07.xml").write_text(imagescope(OUTLINES["A01"]))  # outlines without a slide
    (root / "WSI" / "A02.xml").write_text(imagescope([("Fibroadenoma", (0, 0, 8, 8), False)]))
    (root / "WSI" / "A04.svs").write_bytes(b"\x00" * 100)  # a corrupt slide
    out = tmp_path / "prep"
    with pytest.raises(SourceError) as info:
        prepare_slide_source("bach", tmp_path / "data", out)
    text = "\n".join(info.value.problems)
    assert len(info.value.problems) == 5, text
    assert "missing Normal/" in text and "is001.tif: unreadable image" in text
    assert "A07.xml: outlines without a slide" in text
    assert "A02.xml: outline label(s) ['Fibroadenoma'] name no BACH class" in text
    assert "A04.svs" in text
    assert no_leftovers(out)


def test_bach_labels_and_splits_by_hand():
    assert [bach_class(t) for t in ("Benign", "Carcinoma in situ", "In situ carcinoma", "Invasive carcinoma",
                                    "normal", "Fibroadenoma", None)] == [1, 2, 2, 3, 0, None, None]
    ten = {f"A{i:02d}": {0, 1} for i in range(1, 11)}
    ten["A07"] = {0, 1, 2, 3}
    splits = wsi_splits(ten)
    assert splits["A07"] == "val" and [s for s in sorted(splits) if splits[s] == "train"] == ["A01", "A02", "A03"]
    assert sum(v == "test" for v in splits.values()) == 6  # the paper's 3 / 1 / 6
    assert wsi_splits({"A01": {0, 1}, "A02": {0, 1, 3}, "A03": {0}}) == {"A02": "val", "A01": "train", "A03": "test"}
    assert wsi_splits({"A01": {1}, "A02": {1}}) == {"A01": "val", "A02": "train"}
    assert wsi_splits({"A01": {1}}) == {"A01": "train"}


# -- Gleason2019 -------------------------------------------------------------------------------------

GLEASON_VALUES = (0, 1, 3, 4, 5, 6)


def gleason_map() -> np.ndarray:
    """Bands of 10 rows of each value 0, 1, 3, 4, 5, then 14 rows of 6: a 64x64 map."""
    m = np.full((64, 64), 6, np.uint8)
    for i, v in enumerate(GLEASON_VALUES[:-1]):
        m[10 * i:10 * (i + 1)] = v
    return m


def build_gleason(root: Path, variant: bool = False, n: int = 4) -> Path:
    images = root / ("Train_imgs" if variant else "Train Imgs")
    maps = root / ("Maps/Maps1_T" if variant else "Maps1_T")
    for i in range(1, n + 1):
        stem = f"slide001_core{i:03d}"
        save(images / f"{stem}.jpg", tissue(64, 64, i), "JPEG")
        save(maps / (f"{stem}.png" if variant else f"{stem}_classimg_nonconvex.png"), gleason_map(), "PNG")
    save(root / "Maps2_T" / "slide001_core001_classimg_nonconvex.png", np.zeros((64, 64), np.uint8), "PNG")
    return root


@pytest.mark.parametrize("variant", [False, True])
def test_gleason_maps_first_pathologist_values_to_classes(tmp_path, variant):
    csv_path = prepare_slide_source("gleason2019", build_gleason(tmp_path / "data", variant), tmp_path / "prep")
    rows = read_csv(csv_path)
    assert json.loads((csv_path.parent / "classes.json").read_text()) == {
        "0": "background", "1": "benign", "2": "gleason 3", "3": "gleason 4", "4": "gleason 5"}
    assert sorted(r["split"] for r in rows.values()) == ["test", "train", "train", "val"]  # 50 / 25 / 25 of 4
    for sid, r in rows.items():
        assert r["label"] == "" and r["mask_path"] == f"masks/{sid}.png"
        mask = np.asarray(Image.open(csv_path.parent / r["mask_path"]))
        # value 0 -> 0, 1 and 6 -> 1 (benign), 3 -> 2, 4 -> 3, 5 -> 4
        assert [(mask == c).sum() for c in range(5)] == [640, 640 + 14 * 64, 640, 640, 640]
        assert MaskReader(csv_path.parent / r["mask_path"], (64, 64)).downsample == 1
    again = prepare_slide_source("gleason2019", tmp_path / "data", tmp_path / "prep2")
    assert again.read_text() == csv_path.read_text()  # seeded: the same splits every time


def test_gleason_layout_problems_are_all_listed_and_nothing_is_written(tmp_path):
    root = build_gleason(tmp_path / "data", n=5)
    (root / "Maps1_T" / "slide001_core002_classimg_nonconvex.png").unlink()
    save(root / "Maps1_T" / "slide001_core003_classimg_nonconvex.png", np.zeros((32, 32), np.uint8), "PNG")
    (root / "Train Imgs" / "slide001_core004.jpg").write_bytes(b"\xff\xd8 truncated")
    (tmp_path / "prep").mkdir()  # an empty output directory is fine; nothing may appear in it
    with pytest.raises(SourceError) as info:
        prepare_slide_source("gleason2019", root, tmp_path / "prep")
    problems = info.value.problems
    assert len(problems) == 3, problems
    assert "slide001_core002.jpg: no map" in problems[0]
    assert "slide001_core003_classimg_nonconvex.png: map is 32x32 but its image is 64x64" in problems[1]
    assert "slide001_core004.jpg: unreadable image" in problems[2]
    assert str(root) in str(info.value) and "nothing written" in str(info.value)
    assert not any((tmp_path / "prep").iterdir())


def test_gleason_unknown_map_value_is_found_while_converting_and_leaves_nothing(tmp_path):
    root = build_gleason(tmp_path / "data")
    bad = gleason_map()
    bad[0, :3] = 2
    save(root / "Maps1_T" / "slide001_core003_classimg_nonconvex.png", bad, "PNG")
    save(root / "Maps1_T" / "slide001_core004_classimg_nonconvex.png", np.full((64, 64), 7, np.uint8), "PNG")
    with pytest.raises(SourceError) as info:
        prepare_slide_source("gleason2019", root, tmp_path / "prep")
    assert info.value.problems == [
        f"{root / 'Maps1_T' / 'slide001_core003_classimg_nonconvex.png'}: map holds value(s) [2]; "
        "expected [0, 1, 3, 4, 5, 6]",
        f"{root / 'Maps1_T' / 'slide001_core004_classimg_nonconvex.png'}: map holds value(s) [7]; "
        "expected [0, 1, 3, 4, 5, 6]",
    ]
    assert no_leftovers(tmp_path / "prep")


def test_map_to_classes_by_hand():
    values = np.array([[0, 1, 3], [4, 5, 6]], np.uint8)
    np.testing.assert_array_equal(map_to_classes(values), [[0, 1, 2], [3, 4, 1]])


# -- DigestPath2019 ----------------------------------------------------------------------------------

LESIONS = {"p1": (5, 13, 37, 70), "p2": (0, 0, 20, 96), "p3": (30, 41, 64, 59), "p4": (10, 10, 11, 11)}


def build_digestpath(root: Path) -> Path:
    base = root / "Colonoscopy_tissue_segment_dataset"
    for i, (name, (r0, c0, r1, c1)) in enumerate(LESIONS.items()):
        save(base / "tissue-train-pos-v1" / f"{name}.jpg", tissue(64, 96, i), "JPEG")
        m = np.zeros((64, 96), np.uint8)
        m[r0:r1, c0:c1] = 255
        save(base / "tissue-train-pos-v1" / f"{name}_mask.jpg", m, "JPEG", quality=75)
    for i in range(4):
        save(base / "tissue-train-neg" / f"n{i}.jpg", tissue(48, 80, 50 + i), "JPEG")
    save(base / "tissue-train-neg" / "n0_mask.jpg", np.full((48, 80), 255, np.uint8), "JPEG")  # ignored
    return root


def test_digestpath_thresholds_jpeg_masks_and_splits_each_folder(tmp_path):
    root = build_digestpath(tmp_path / "data")
    grey = np.asarray(Image.open(root / "Colonoscopy_tissue_segment_dataset/tissue-train-pos-v1/p1_mask.jpg"))
    assert len(np.unique(grey)) > 2  # JPEG artefacts the threshold must remove
    csv_path = prepare_slide_source("digestpath2019", root, tmp_path / "prep")
    rows = read_csv(csv_path)
    assert json.loads((csv_path.parent / "classes.json").read_text()) == {"0": "benign", "1": "malignant"}
    assert sorted(rows) == ["n0", "n1", "n2", "n3", "p1", "p2", "p3", "p4"]
    for name, (r0, c0, r1, c1) in LESIONS.items():
        mask = np.asarray(Image.open(csv_path.parent / rows[name]["mask_path"]))
        expected = np.zeros((64, 96), np.uint8)
        expected[r0:r1, c0:c1] = 1
        np.testing.assert_array_equal(mask, expected)
    for i in range(4):
        mask = np.asarray(Image.open(csv_path.parent / rows[f"n{i}"]["mask_path"]))
        assert mask.shape == (48, 80) and not mask.any()
    for group in ("p", "n"):  # 50 / 25 / 25 within the positive and within the negative images
        assert sorted(r["split"] for sid, r in rows.items() if sid[0] == group) == ["test", "train", "train", "val"]


def test_digestpath_problems_are_all_listed(tmp_path):
    base = build_digestpath(tmp_path / "data") / "Colonoscopy_tissue_segment_dataset"
    pos = base / "tissue-train-pos-v1"
    (pos / "p1_mask.jpg").unlink()
    (pos / "p2.jpg").unlink()
    save(pos / "p3_mask.jpg", np.zeros((10, 10), np.uint8), "JPEG")
    for p in (base / "tissue-train-neg").iterdir():
        p.unlink()
    (base / "tissue-train-neg").rmdir()
    with pytest.raises(SourceError) as info:
        prepare_slide_source("digestpath2019", base, tmp_path / "prep")
    text = "\n".join(info.value.problems)
    assert len(info.value.problems) == 4, text
    assert "missing tissue-train-neg/" in text
    assert "p1.jpg: no mask" in text and "p2_mask.jpg: mask without an image" in text
    assert "p3_mask.jpg: mask is 10x10 but its image is 96x64" in text
    assert no_leftovers(tmp_path / "prep")


# -- the registry and the shared parts -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SLIDE_SOURCES))
def test_every_slide_source_refuses_an_empty_root_and_writes_nothing(tmp_path, name):
    source = SLIDE_SOURCES[name]
    assert source.name == name and len(source.classes) >= 2 and source.reference
    assert source.tissue_source in PARAM_CHOICES["tissue_source"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="missing") as info:
        prepare_slide_source(name, tmp_path / "empty", tmp_path / "out")
    assert f"in the {name} dataset" in str(info.value)
    assert no_leftovers(tmp_path / "out")


def test_unknown_slide_source_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown slide source 'camelyon'; valid: \['bach', 'digestpath2019', "
                                         r"'gleason2019'\]"):
        prepare_slide_source("camelyon", tmp_path, tmp_path / "out")


def test_a_non_empty_output_directory_is_refused(tmp_path):
    build_gleason(tmp_path / "data")
    (tmp_path / "prep").mkdir()
    (tmp_path / "prep" / "old.txt").write_text("x")
    with pytest.raises(ValueError, match="prep: exists and is not empty"):
        prepare_slide_source("gleason2019", tmp_path / "data", tmp_path / "prep")


def test_seeded_splits_by_hand():
    ids = [f"core{i}" for i in range(8)]
    splits = seeded_splits(ids)
    assert sorted(splits.values()) == ["test"] * 2 + ["train"] * 4 + ["val"] * 2
    assert seeded_splits(ids[::-1]) == splits  # order does not matter
    assert seeded_splits(ids, seed=1) != splits
    counts = {n: sorted(seeded_splits([str(i) for i in range(n)]).values()) for n in (1, 2, 3, 5)}
    assert counts == {1: ["train"], 2: ["train", "train"], 3: ["test", "train", "val"],
                      5: ["test", "train", "train", "train", "val"]}
    with pytest.raises(ValueError, match="summing to 1"):
        seeded_splits(ids, (0.5, 0.5, 0.5))


# -- the CLI: prepare, then tile ---------------------------------------------------------------------


def test_import_prepares_then_tiles_and_resumes(tmp_path, ray_local, capsys):
    from histoweak.cli import main

    root = build_gleason(tmp_path / "data")
    out = tmp_path / "tiles"
    argv = ["import", "gleason2019", str(root), str(out), "--tile-size", "32", "--min-tissue", "0", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 images (4 with masks" in printed and "--tissue-source detector" in printed
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["source"] == "gleason2019" and manifest["params"]["tissue_source"] == "detector"
    assert manifest["classes"] == ["background", "benign", "gleason 3", "gleason 4", "gleason 5"]
    table = pq.read_table(out)  # the prepared files under _prepared/ are not mistaken for Parquet
    assert table.num_rows == 4 * 4
    first = next(r for r in table.to_pylist() if (r["x"], r["y"]) == (0, 0))
    # rows 0-31 of the map: values 0 (rows 0-9), 1 (10-19), 3 (20-29) and 4 (30-31) -> classes 0, 1, 2, 3
    assert list(first["labels"]) == [1, 1, 1, 1, 0] and first["label"] is None
    assert main(argv) == 0  # again: the preparation is reused and the tiling resumes
    assert "using the dataset prepared earlier" in capsys.readouterr().out
    assert pq.read_table(out).num_rows == 4 * 4
    assert main(["import", "luad-histoseg", str(root), str(tmp_path / "x"), "--tile-size", "32"]) == 2
    assert "patch dataset, converted without tiling" in capsys.readouterr().err
