"""The folder / CSV adapter (``histoweak.data.sources.folder``): fixture datasets made in tmp_path, converted, read
back with pyarrow and PIL (not through histoweak's readers)."""

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from histoweak.cli import main
from histoweak.data.defaults import n_classes_of
from histoweak.data.schema import validate_table
from histoweak.data.sources import FOLDER_SOURCES, SourceError, convert_source
from histoweak.data.sources.folder import class_order, stratified_splits
from histoweak.data.tiling_job import read_manifest
from histoweak.slides.tissue import background_seed

SIDE = 16
GRADES = ["BN", "WD", "MD", "PD"]  # colorectal grades in ordinal order (USegMix §3.1)


def _pixels(seed: int, side: int = SIDE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(60, 200, (side, side, 3), dtype=np.uint8)
    rgb[: side // 4] = 255  # a band of glass: tissue ratio < 1
    return rgb


def _save(path: Path, rgb: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(rgb)
    if mode:
        img = img.convert(mode)
    img.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return path


def class_names_of(table: str) -> list[str]:
    """The manifest's class names, as ``histoweak.train.class_names_of`` reads them (importing histoweak.train,
    with Ray and the methods, would cost this file more than its tests)."""
    return list(read_manifest(table)["classes"])


def _rows(out: Path) -> list[dict]:
    table = pads.dataset(sorted(str(f) for f in out.rglob("*.parquet")), format="parquet").to_table()
    validate_table(table)
    return table.to_pylist()


def _by_split_class(rows, classes) -> dict[tuple[str, str], int]:
    return dict(Counter((r["split"], classes[r["label"]]) for r in rows))


def test_split_folders_colorectal_layout(tmp_path):
    counts = {"train": 3, "val": 1, "test": 2}
    written = {}
    k = 0
    for split, n in counts.items():
        for grade in GRADES:
            for i in range(n):
                k += 1
                fmt, suffix = ("JPEG", "jpg") if k % 3 == 0 else ("PNG", "png")
                p = _save(tmp_path / "crc" / split / grade / f"{grade}_{split}_{i}.{suffix}", _pixels(k), fmt)
                written[p.stem] = p
    report = convert_source("folder", tmp_path / "crc", tmp_path / "out", rows_per_file=5, classes=GRADES)
    out = tmp_path / "out"
    assert report.tiles == {s: n * 4 for s, n in counts.items()}
    rows = _rows(out)
    assert _by_split_class(rows, GRADES) == {(s, g): n for s, n in counts.items() for g in GRADES}
    assert class_names_of(str(out)) == GRADES and n_classes_of(out) == 4
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["params"]["splits"]["from"] == "folders" and "carved" not in manifest["params"]["splits"]
    assert manifest["counts"]["by_class"]["val"] == dict.fromkeys(GRADES, 1)
    for r in rows:
        src = written[r["slide_id"]]
        grade = src.parent.name
        assert r["label"] == GRADES.index(grade) and r["labels"] == [int(g == grade) for g in GRADES]
        assert src.parent.parent.name == r["split"]
        assert (r["mask"], r["class_ratios"], r["x"], r["y"], r["level"], r["downsample"], r["size"]) == \
            (None, None, 0, 0, 0, 1.0, SIDE)
        pixels = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"))
        assert np.array_equal(pixels, np.asarray(Image.open(src).convert("RGB")))  # the source's pixels
        if src.suffix == ".jpg":
            assert r["image"] == src.read_bytes()  # RGB JPEG kept as it is
        white = background_seed(pixels, 200, 50)
        assert r["tissue_ratio"] == pytest.approx(1 - white.mean()) and r["tissue_ratio"] < 1
    # default class order: sorted names
    convert_source("folder", tmp_path / "crc", tmp_path / "sorted")
    assert class_names_of(str(tmp_path / "sorted")) == sorted(GRADES)


def test_flat_layout_gets_a_seeded_stratified_split(tmp_path):
    sizes = {"tumour": 10, "stroma": 7, "normal": 3}
    k = 0
    for cls, n in sizes.items():
        for i in range(n):
            k += 1
            sub = "patientA" if i % 2 else ""  # images in sub-folders of a class count too
            _save(tmp_path / "flat" / cls / sub / f"img{i}.png", _pixels(k))
    (tmp_path / "flat" / "tumour" / "README.txt").write_text("not an image")
    recoded = {"tumour/x.tif": _save(tmp_path / "flat" / "tumour" / "x.tif", _pixels(90), "TIFF"),
               "tumour/x.png": _save(tmp_path / "flat" / "tumour" / "x.png", _pixels(91), mode="RGBA")}
    sizes["tumour"] += 2
    convert_source("folder", tmp_path / "flat", tmp_path / "out", val_fraction=0.2, test_fraction=0.2, seed=0)
    rows = _rows(tmp_path / "out")
    for r in rows:  # a TIFF and an RGBA PNG: stored as RGB PNG of the same pixels
        if r["slide_id"] in recoded:
            assert r["image"][:8] == b"\x89PNG\r\n\x1a\n" and r["image"] != recoded[r["slide_id"]].read_bytes()
            decoded = Image.open(io.BytesIO(r["image"]))
            assert decoded.mode == "RGB"
            assert np.array_equal(np.asarray(decoded), np.asarray(Image.open(recoded[r["slide_id"]]).convert("RGB")))
    assert sum(r["slide_id"] in recoded for r in rows) == 2
    classes = class_names_of(str(tmp_path / "out"))
    assert classes == ["normal", "stroma", "tumour"]
    # seeded_splits per class: val = test = max(1, round(0.2 n)), the rest train
    want = {"tumour": (8, 2, 2), "stroma": (5, 1, 1), "normal": (1, 1, 1)}  # tumour: 12 images
    got = _by_split_class(rows, classes)
    assert {c: tuple(got.get((s, c), 0) for s in ("train", "val", "test")) for c in sizes} == want
    ids = [r["slide_id"] for r in rows]
    assert len(set(ids)) == len(ids) == 22  # stems repeat across classes: those become relative paths
    assert "tumour/img0" not in ids and "tumour/img0.png" in ids and "stroma/patientA/img1.png" in ids
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["params"]["splits"] == {"from": "seeded", "folders": {}, "carved": ["val", "test"],
                                            "val_fraction": 0.2, "test_fraction": 0.2, "seed": 0}
    assert manifest["skipped"]["non_image_files"] == 1
    # deterministic: the same seed gives the same split; the split depends on the seed
    convert_source("folder", tmp_path / "flat", tmp_path / "again", val_fraction=0.2, test_fraction=0.2, seed=0)
    convert_source("folder", tmp_path / "flat", tmp_path / "other", val_fraction=0.2, test_fraction=0.2, seed=1)
    split_of = lambda d: {r["slide_id"]: r["split"] for r in _rows(tmp_path / d)}  # noqa: E731
    assert split_of("again") == split_of("out") != split_of("other")


def test_train_and_test_folders_carve_val_from_train(tmp_path):
    for split, n in {"Training": 6, "test": 2}.items():
        for cls in ("a", "b"):
            for i in range(n):
                _save(tmp_path / "d" / split / cls / f"{split}{cls}{i}.png", _pixels(i))
    convert_source("folder", tmp_path / "d", tmp_path / "out", val_fraction=0.5)
    rows = _rows(tmp_path / "out")
    assert _by_split_class(rows, ["a", "b"]) == {(s, c): n for s, n in {"train": 3, "val": 3, "test": 2}.items()
                                                 for c in "ab"}
    assert all(r["slide_id"].startswith("Training") for r in rows if r["split"] == "val")


def test_csv_with_and_without_splits(tmp_path):
    lines = ["path,label,split"]
    written = {}
    for k, (label, split) in enumerate([("G3", "train"), ("G4", "train"), ("BN", "train"), ("G5", "train"),
                                        ("G3", "val"), ("BN", "test"), ("G5", "test"), ("G4", "train")]):
        rel = f"imgs/{label.lower()}/{k}.png"
        written[str(k)] = _save(tmp_path / "data" / rel, _pixels(k))
        lines.append(f"{rel},{label},{split}")
    (tmp_path / "data" / "list.csv").write_text("\n".join(lines) + "\n")
    order = ["BN", "G3", "G4", "G5"]
    report = convert_source("csv", tmp_path / "data" / "list.csv", tmp_path / "out", classes=order)
    assert report.tiles == {"train": 5, "val": 1, "test": 2}
    rows = _rows(tmp_path / "out")
    assert _by_split_class(rows, order) == {("train", "G3"): 1, ("train", "G4"): 2, ("train", "BN"): 1,
                                            ("train", "G5"): 1, ("val", "G3"): 1, ("test", "BN"): 1,
                                            ("test", "G5"): 1}
    assert class_names_of(str(tmp_path / "out")) == order
    for r in rows:
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r["image"]))),
                              np.asarray(Image.open(written[r["slide_id"]])))
    # no split column: the seeded stratified split; integer labels sort as numbers
    (tmp_path / "data" / "nosplit.csv").write_text(
        "path,label\n" + "".join(f"imgs/x/{k}.png,{10 if k % 2 else 2}\n" for k in range(8)))
    for k in range(8):
        _save(tmp_path / "data" / "imgs" / "x" / f"{k}.png", _pixels(k))
    convert_source("csv", tmp_path / "data" / "nosplit.csv", tmp_path / "auto", val_fraction=0.25, test_fraction=0.25)
    assert class_names_of(str(tmp_path / "auto")) == ["2", "10"]
    assert Counter(r["split"] for r in _rows(tmp_path / "auto")) == {"train": 4, "val": 2, "test": 2}


def test_bad_files_are_named_and_nothing_is_written(tmp_path):
    root = tmp_path / "bad"
    _save(root / "a" / "good.png", _pixels(0))
    _save(root / "a" / "grey.png", _pixels(1), mode="L")
    _save(root / "b" / "wide.png", np.zeros((SIDE, SIDE + 4, 3), np.uint8))
    _save(root / "b" / "big.png", _pixels(2, side=2 * SIDE))
    _save(root / "b" / "fine.jpg", _pixels(3), "JPEG")
    (root / "b" / "broken.png").write_bytes(b"not an image at all")
    (root / "stray.png").write_bytes(b"")
    with pytest.raises(SourceError) as info:
        convert_source("folder", root, tmp_path / "out")
    msg = str(info.value)
    for name, why in [("grey.png", "image mode 'L'"), ("wide.png", f"{SIDE + 4}x{SIDE}, expected a square"),
                      ("big.png", f"{2 * SIDE}x{2 * SIDE} but most are {SIDE}x{SIDE}"),
                      ("broken.png", "unreadable image"), ("stray.png", "image outside a class folder")]:
        assert any(name in p and why in p for p in info.value.problems), (name, msg)
    assert "fine.jpg" not in msg and "good.png" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no output, no staging directory


def test_corrupt_pixels_found_while_converting_leave_nothing(tmp_path):
    root = tmp_path / "d"
    for i in range(3):
        _save(root / "a" / f"{i}.png", _pixels(i))
    data = (root / "a" / "1.png").read_bytes()
    (root / "a" / "1.png").write_bytes(data[: len(data) // 2])  # a valid header, truncated pixel data
    with pytest.raises(SourceError, match=r"1\.png: unreadable image"):
        convert_source("folder", root, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_bad_layouts_and_options(tmp_path):
    _save(tmp_path / "mixed" / "train" / "a" / "0.png", _pixels(0))
    _save(tmp_path / "mixed" / "b" / "1.png", _pixels(1))
    with pytest.raises(SourceError, match=r"holds split folders \(train/\) and other folders \(b/\)"):
        convert_source("folder", tmp_path / "mixed", tmp_path / "out")
    _save(tmp_path / "only" / "train" / "a" / "0.png", _pixels(0))
    _save(tmp_path / "only" / "test" / "z" / "1.png", _pixels(1))
    with pytest.raises(SourceError, match=r"class\(es\) \['z'\] have no training images"):
        convert_source("folder", tmp_path / "only", tmp_path / "out")
    with pytest.raises(SourceError, match=r"do not match the dataset's \['a', 'z'\]; without images: \['b'\]"):
        convert_source("folder", tmp_path / "only", tmp_path / "out", classes=["a", "b", "z"])
    with pytest.raises(ValueError, match=r"val_fraction 0.6 and test_fraction 0.5"):
        convert_source("folder", tmp_path / "only", tmp_path / "out", val_fraction=0.6, test_fraction=0.5)
    (tmp_path / "l.csv").write_text("file,label\nx.png,a\n")
    with pytest.raises(SourceError, match=r"header \['file', 'label'\]: missing \['path'\]; unknown \['file'\]"):
        convert_source("csv", tmp_path / "l.csv", tmp_path / "out")
    (tmp_path / "m.csv").write_text("path,label,split\nmixed/b/1.png,b,dev\nnowhere.png,b,train\n")
    with pytest.raises(SourceError) as info:
        convert_source("csv", tmp_path / "m.csv", tmp_path / "out")
    assert any("line 2: split 'dev'" in p for p in info.value.problems)
    assert any("nowhere.png: no such file" in p for p in info.value.problems)
    with pytest.raises(ValueError, match=r"fixed layout and takes no options"):
        convert_source("luad-histoseg", tmp_path, tmp_path / "out", seed=1)
    assert not (tmp_path / "out").exists()


def test_pure_helpers():
    assert class_order(["b", "a", "c"]) == ["a", "b", "c"]
    assert class_order(["10", "9", "1"]) == ["1", "9", "10"]
    assert class_order(["MD", "BN"], ["BN", "MD"]) == ["BN", "MD"]
    with pytest.raises(ValueError, match=r"repeated \['BN'\]"):
        class_order(["BN"], ["BN", "BN"])
    labels = {f"i{k}": k % 3 for k in range(30)}
    splits = stratified_splits(labels, 0.2, 0.1, seed=4)
    for c in range(3):  # 10 per class: 2 val, 1 test, 7 train
        per = Counter(s for i, s in splits.items() if labels[i] == c)
        assert per == {"train": 7, "val": 2, "test": 1}
    assert stratified_splits(dict(reversed(labels.items())), 0.2, 0.1, seed=4) == splits  # order-free


def test_cli_import_folder_and_help(tmp_path, capsys):
    for split in ("train", "val", "test"):
        for g in GRADES:
            _save(tmp_path / "crc" / split / g / f"{split}{g}.png", _pixels(len(g)))
    assert main(["import", "folder", str(tmp_path / "crc"), str(tmp_path / "out"), "--classes", "BN,WD,MD,PD"]) == 0
    assert "12 tiles {'train': 4, 'val': 4, 'test': 4}" in capsys.readouterr().out
    assert class_names_of(str(tmp_path / "out")) == GRADES
    assert main(["import", "folder", str(tmp_path / "crc"), str(tmp_path / "o2"), "--classes", "BN,WD"]) == 2
    assert "not listed: ['MD', 'PD']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["import", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "{" in help_text and all(name in help_text for name in [*FOLDER_SOURCES, "luad-histoseg", "bach"])
    assert "--val-fraction" in help_text
