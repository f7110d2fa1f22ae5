"""Dataset adapters: tiny LUAD-HistoSeg / BCSS-WSSS layouts built in tmp_path, converted, read back."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from histoweak.data.defaults import n_classes_of
from histoweak.data.schema import validate_table
from histoweak.slides.tissue import background_seed
from histoweak.data.sources import (
    SOURCES, SourceError, convert_source, get_source, mask_to_classes, parse_label,
)
from histoweak.data.tiling_job import read_manifest
from histoweak.slides.tiling import decode_image

SIDE = 32
PINK = (230, 160, 200)
# LUAD-HistoSeg's palette (the dataset's Readme): TE, NEC, LYM, TAS, white background/exclude
PALETTE = [205, 51, 51, 0, 255, 0, 65, 105, 225, 255, 165, 0, 255, 255, 255]
# By hand: palette index -> histoweak class (0 background, 1.. the dataset's classes in palette order)
BY_HAND = {0: 1, 1: 2, 2: 3, 3: 4, 4: 0}

TRAIN_NAMES = {
    "luad-histoseg": ["1031280-2300-27920-[1 0 0 1]", "1031280-2524-27920-[0 1 1 0]", "385277-100-200-[0 0 0 1]"],
    "bcss-wsss": ["TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[1001]",
                  "TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+1[0110]",
                  "TCGA-A2-A0CM-DX1_xmin18562_ymin56852_MPP-0.2500+0[0001]"],
}
TRAIN_LABELS = [[1, 0, 0, 1], [0, 1, 1, 0], [0, 0, 0, 1]]


def png(array: np.ndarray, mode: str | None = None, palette: list[int] | None = None) -> bytes:
    img = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    if palette:
        img.putpalette(palette)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def tissue(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rgb = np.empty((SIDE, SIDE, 3), np.uint8)
    rgb[:] = PINK
    return (rgb.astype(int) + rng.integers(-20, 20, rgb.shape)).clip(0, 180).astype(np.uint8)


def index_masks() -> dict[str, np.ndarray]:
    a = np.zeros((SIDE, SIDE), np.uint8)
    a[:, 16:] = 3
    a[:8, :8] = 4  # 64 px background/exclude
    b = np.full((SIDE, SIDE), 2, np.uint8)
    b[20:, :] = 1
    c = np.full((SIDE, SIDE), 4, np.uint8)
    c[:16, :16] = 0
    return {"val/385277-44539-46781": a, "val/385277-44539-47005": b, "test/387709-10004-55944": c}


def build(root, source: str) -> dict:
    """A tiny dataset in Han et al.'s layout; returns what was written, for the checks."""
    (root / "train").mkdir(parents=True)
    images = {}
    for i, name in enumerate(TRAIN_NAMES[source]):
        rgb = tissue(i)
        if i == 0:
            rgb[4:14, 4:14] = 250  # 100 px of white background
        images[name] = rgb
        if i == 2:  # stored as RGBA: must be re-encoded to RGB
            (root / "train" / f"{name}.png").write_bytes(png(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])))
        else:
            (root / "train" / f"{name}.png").write_bytes(png(rgb))
    masks = index_masks()
    for i, (key, idx) in enumerate(masks.items()):
        split, stem = key.split("/")
        for sub in ("img", "mask"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        images[stem] = tissue(10 + i)
        (root / split / "img" / f"{stem}.png").write_bytes(png(images[stem]))
        (root / split / "mask" / f"{stem}.png").write_bytes(png(idx, "P", PALETTE))
    (root / "Readme.txt").write_text("not a patch")
    (root / "train" / ".DS_Store").write_bytes(b"\0")
    return {"images": images, "masks": {k.split("/")[1]: v for k, v in masks.items()}}


def read_rows(out) -> dict[str, dict]:
    rows = {}
    for part in sorted(out.glob("*/part-*.parquet")):
        table = pq.read_table(part)
        validate_table(table, str(part))
        for r in table.to_pylist():
            rows[r["slide_id"]] = r
    return rows


# -- pure helpers -------------------------------------------------------------------


def test_parse_label_both_spellings():
    assert parse_label("1031280-2300-27920-[1 0 0 1]", 4) == (1, 0, 0, 1)
    assert parse_label("TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[1101]", 4) == (1, 1, 0, 1)
    for stem, why in [("385277-44539-46781", "does not end with a class label"),
                      ("a-[1 0 0 1]-b", "does not end with a class label"),
                      ("a-[1 0 1]", r"'\[1 0 1\]' is not 4 digits"),
                      ("a-[1 0 2 1]", "is not 4 digits"),
                      ("a-[1 01 0]", "is not 4 digits"),
                      ("a-[]", "is not 4 digits")]:
        with pytest.raises(ValueError, match=why):
            parse_label(stem, 4)


def test_mask_to_classes_by_hand():
    idx = np.array([[0, 1, 2], [3, 4, 4]], np.uint8)
    assert mask_to_classes(idx).tolist() == [[1, 2, 3], [4, 0, 0]]
    with pytest.raises(ValueError, match=r"palette index \[5, 7\]"):
        mask_to_classes(np.array([[0, 7, 5]], np.uint8))


def test_background_seed_keeps_regions_not_specks():
    rgb = np.full((20, 20, 3), PINK, np.uint8)
    rgb[0:10, 0:10] = 255  # 100 px region: background
    rgb[15, 15] = 255  # isolated bright pixel: not background
    rgb[18, 0:3] = 201  # grey 201 > 200, but only 3 px
    white = background_seed(rgb)
    assert white.sum() == 100 and white[0:10, 0:10].all()
    assert background_seed(rgb, min_size=1).sum() == 104
    assert not background_seed(np.full((8, 8, 3), 200, np.uint8), min_size=1).any()  # threshold is strict


# -- conversion -----------------------------------------------------------------------


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_convert(tmp_path, source):
    fixture = build(tmp_path / "data", source)
    report = convert_source(source, tmp_path / "data", tmp_path / "out", rows_per_file=2)
    out = tmp_path / "out"
    assert report.tiles == {"train": 3, "val": 2, "test": 1} and report.n_tiles == 6
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet")) == [
        "test/part-00000.parquet", "train/part-00000.parquet", "train/part-00001.parquet", "val/part-00000.parquet"]

    manifest = read_manifest(out)
    assert manifest["source"] == source
    assert manifest["classes"] == ["background", *get_source(source).classes] and n_classes_of(out) == 5
    assert manifest["counts"] == {"tiles": 6, "pending": 0, "failed": 0, "by_split": {"train": 3, "val": 2, "test": 1}}
    assert pq.read_table(out).num_rows == 6  # the whole directory reads as one table

    rows = read_rows(out)
    assert set(rows) == set(fixture["images"])
    for r in rows.values():
        assert (r["source"], r["x"], r["y"], r["level"], r["downsample"], r["size"]) == (source, 0, 0, 0, 1.0, SIDE)
        assert r["label"] is None and r["group"] is None and r["mpp"] is None
        assert np.array_equal(decode_image(r["image"]), fixture["images"][r["slide_id"]])

    for name, labels in zip(TRAIN_NAMES[source], TRAIN_LABELS):
        r = rows[name]
        assert r["split"] == "train" and r["mask"] is None and r["class_ratios"] is None
        white = name == TRAIN_NAMES[source][0]
        assert r["labels"] == [int(white), *labels]
        assert r["tissue_ratio"] == pytest.approx(1 - 100 / SIDE**2 if white else 1.0)
    rgb_file = tmp_path / "data" / "train" / f"{TRAIN_NAMES[source][0]}.png"
    assert rows[TRAIN_NAMES[source][0]]["image"] == rgb_file.read_bytes()  # RGB PNG kept as is
    assert decode_image(rows[TRAIN_NAMES[source][2]]["image"]).shape == (SIDE, SIDE, 3)  # RGBA re-encoded

    for stem, idx in fixture["masks"].items():
        r = rows[stem]
        assert r["split"] == ("test" if stem.startswith("387709") else "val")
        expected = np.vectorize(BY_HAND.get)(idx).astype(np.uint8)
        assert np.array_equal(decode_image(r["mask"]), expected)
        counts = np.array([(idx == i).sum() for i in (4, 0, 1, 2, 3)]) / SIDE**2  # histoweak order: bg first
        np.testing.assert_allclose(r["class_ratios"], counts, rtol=1e-6)
        assert r["labels"] == (counts > 0).astype(int).tolist()
        assert r["tissue_ratio"] == pytest.approx(1 - counts[0])
    a = rows["385277-44539-46781"]
    assert a["labels"] == [1, 1, 0, 0, 1]
    np.testing.assert_allclose(a["class_ratios"], [64 / 1024, (512 - 64) / 1024, 0, 0, 512 / 1024])


def test_training_dir_may_be_called_training(tmp_path):
    build(tmp_path / "data", "luad-histoseg")
    (tmp_path / "data" / "train").rename(tmp_path / "data" / "training")
    assert convert_source("luad-histoseg", tmp_path / "data", tmp_path / "out").tiles["train"] == 3


# -- bad input: clear errors, nothing written -------------------------------------------


def _rename_train(root, old, new):
    (root / "train" / f"{old}.png").rename(root / "train" / f"{new}.png")


BAD = {
    "no label": (lambda r: _rename_train(r, TRAIN_NAMES["luad-histoseg"][1], "1031280-2524-27920"),
                 r"train/1031280-2524-27920\.png: file name does not end with a class label.*\(TE NEC LYM TAS\)"),
    "bad label": (lambda r: _rename_train(r, TRAIN_NAMES["luad-histoseg"][1], "x-[1 0 3 0]"),
                  r"train/x-\[1 0 3 0\]\.png: class label '\[1 0 3 0\]' is not 4 digits 0/1"),
    "mask missing": (lambda r: (r / "val/mask/385277-44539-47005.png").unlink(),
                     r"val/img/385277-44539-47005\.png: no mask .*val/mask/385277-44539-47005\.png"),
    "mask without image": (lambda r: (r / "test/img/387709-10004-55944.png").unlink(),
                           r"test/mask/387709-10004-55944\.png: mask without an image"),
    "mask size": (lambda r: (r / "val/mask/385277-44539-46781.png").write_bytes(
        png(np.zeros((SIDE, SIDE + 4), np.uint8), "P", PALETTE)),
        r"val/mask/385277-44539-46781\.png: mask is 36x32 but its image is 32x32"),
    "rgb mask": (lambda r: (r / "val/mask/385277-44539-46781.png").write_bytes(png(tissue(0))),
                 r"385277-44539-46781\.png: mask is a 8-bit RGB PNG; expected palette"),
    "not a png": (lambda r: (r / "test/img/387709-10004-55944.png").write_bytes(b"GIF89a not really"),
                  r"test/img/387709-10004-55944\.png: unreadable PNG: no PNG signature"),
    "empty file": (lambda r: (r / "train" / f"{TRAIN_NAMES['luad-histoseg'][0]}.png").write_bytes(b""),
                   r"unreadable PNG: empty file"),
    "not square": (lambda r: _rename_train(r, TRAIN_NAMES["luad-histoseg"][0], "skip") or
                   (r / "train" / "y-[1 0 0 0].png").write_bytes(png(np.zeros((SIDE, 20, 3), np.uint8))),
                   r"train/y-\[1 0 0 0\]\.png: patch is 20x32, expected a square patch"),
    "missing split": (lambda r: __import__("shutil").rmtree(r / "test"), r"missing test/img/ and test/mask/"),
    # found only when decoding, after the header check passed: still nothing written
    "truncated png": (lambda r: (r / "val/img/385277-44539-46781.png").write_bytes(
        png(tissue(3))[:200]), r"val/img/385277-44539-46781\.png: unreadable PNG \("),
    "palette index": (lambda r: (r / "test/mask/387709-10004-55944.png").write_bytes(
        png(np.full((SIDE, SIDE), 7, np.uint8), "P", PALETTE + [9] * 9)),
        r"test/mask/387709-10004-55944\.png: mask holds palette index \[7\]; expected \[0, 1, 2, 3, 4\]"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, case):
    corrupt, message = BAD[case]
    build(tmp_path / "data", "luad-histoseg")
    corrupt(tmp_path / "data")
    with pytest.raises(SourceError, match=message) as info:
        convert_source("luad-histoseg", tmp_path / "data", tmp_path / "out")
    assert "nothing written" in str(info.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))  # no staging left behind


def test_every_problem_is_listed(tmp_path):
    build(tmp_path / "data", "luad-histoseg")
    for corrupt, _ in (BAD["no label"], BAD["mask missing"], BAD["not a png"]):
        corrupt(tmp_path / "data")
    with pytest.raises(SourceError) as info:
        convert_source("luad-histoseg", tmp_path / "data", tmp_path / "out")
    assert len(info.value.problems) == 3, info.value.problems
    assert str(info.value).startswith(f"{tmp_path / 'data'}: 3 problem(s) in the luad-histoseg dataset")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"unknown source 'luad'; valid: \['bcss-wsss', 'luad-histoseg'\]"):
        convert_source("luad", tmp_path, tmp_path / "out")
    with pytest.raises(SourceError, match="dataset root is not a directory"):
        convert_source("bcss-wsss", tmp_path / "nowhere", tmp_path / "out")
    build(tmp_path / "data", "bcss-wsss")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="exists and is not empty"):
        convert_source("bcss-wsss", tmp_path / "data", tmp_path / "out")
    with pytest.raises(ValueError, match="rows_per_file must be >= 1"):
        convert_source("bcss-wsss", tmp_path / "data", tmp_path / "new", rows_per_file=0)
    (tmp_path / "empty").mkdir()  # an existing empty directory is fine
    assert convert_source("bcss-wsss", tmp_path / "data", tmp_path / "empty").n_tiles == 6
    assert json.loads((tmp_path / "empty" / "_manifest.json").read_text())["source"] == "bcss-wsss"
