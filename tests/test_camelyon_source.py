"""Camelyon16/17 slide-table adapter: tiny datasets in their documented layouts (real pyramidal TIFFs, CSVs and
ASAP XML) built in tmp_path, turned into a slide table, and checked against the labels, size classes and the
MagNets §4.1 split protocol."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from histoweak.data.slide_table import read_slide_table
from histoweak.data.sources import SourceError
from histoweak.data.sources.camelyon import (
    SLIDE_TABLE_SOURCES, CamelyonSlide, camelyon_slide_table, camelyon_splits, lesion_extent,
    size_class_from_extent, stratified_group_sample,
)
from histoweak.data.synthetic import write_pyramid
from histoweak.slides.annotations import Annotation

MPP = 0.25  # µm per level-0 pixel: 4 px per µm, 4000 px per mm


def rect(w: float, h: float, x0: float = 100, y0: float = 100) -> list[tuple[float, float]]:
    return [(x0, y0), (x0 + w, y0), (x0 + w, y0 + h), (x0, y0 + h)]


def round_lesion(diameter: float, n: int = 64) -> list[tuple[float, float]]:
    """A regular n-gon (n even) whose opposite vertices are ``diameter`` apart."""
    r, t = diameter / 2, 2 * np.pi * np.arange(n) / n
    return list(zip(5000 + r * np.cos(t), 5000 + r * np.sin(t)))


def asap(polygons: list[tuple[str, list[tuple[float, float]]]]) -> str:
    """An ASAP XML file as Camelyon ships them: one Polygon annotation per outline, in level-0 px."""
    anns = []
    for i, (group, pts) in enumerate(polygons):
        coords = "".join(f'<Coordinate Order="{k}" X="{x:.4f}" Y="{y:.4f}" />' for k, (x, y) in enumerate(pts))
        anns.append(f'<Annotation Name="_{i}" Type="Polygon" PartOfGroup="{group}" Color="#F4FA58">'
                    f"<Coordinates>{coords}</Coordinates></Annotation>")
    return ('<?xml version="1.0"?><ASAP_Annotations><Annotations>' + "".join(anns) + "</Annotations>"
            '<AnnotationGroups><Group Name="_0" PartOfGroup="None" Color="#FF0000"><Attributes /></Group>'
            "</AnnotationGroups></ASAP_Annotations>")


# Camelyon16: slide -> (label, size class expected in the table, XML outlines or None)
C16_TRAINING = {
    "normal_001": (0, "negative", None),
    "normal_002": (0, "negative", None),
    "normal_003": (0, "negative", None),
    # 2400 x 3200 px: diagonal 4000 px = 1 mm -> micro; the exclusion outline (_2, 7 mm) is not a lesion
    "tumor_001": (1, "micro", [("_0", rect(2400, 3200)), ("_2", rect(20000, 20000, 0, 0))]),
    "tumor_002": (1, "itc", [("_0", rect(240, 320))]),  # 400 px = 0.1 mm -> itc
    # round, 6400 px = 1.6 mm across -> micro (its bounding box's diagonal, 2.26 mm, would say macro)
    "tumor_003": (1, "micro", [("_1", round_lesion(6400))]),
    "tumor_004": (1, None, None),  # no annotation: unknown
}
REFERENCE_CSV = ("test_001,Tumor,Macro,Primary\n"
                 "test_002,Normal\n"
                 "test_003,Tumor,Micro,Secondary\n"
                 "test_004,Tumor\n"
                 "test_005,Tumor,,\n")
C16_TESTING = {
    "test_001": (1, "macro", None),
    "test_002": (0, "negative", None),
    "test_003": (1, "micro", [("_0", rect(240, 320))]),  # the CSV's Micro wins over the outline's itc
    "test_004": (1, "macro", [("_0", rect(6000, 8000))]),  # 10000 px = 2.5 mm -> macro
    "test_005": (1, None, None),
}
# Camelyon17: patient -> (center, stages of nodes 0..4)
C17_PATIENTS = {
    "patient_000": ("center_0", ["negative"] * 5),
    "patient_001": ("center_0", ["macro", "itc", "negative", "negative", "negative"]),
    "patient_002": ("center_1", ["negative"] * 5),
    "patient_003": ("center_1", ["negative", "negative", "micro", "itc", "negative"]),
    "patient_004": ("center_2", ["negative"] * 5),
    "patient_005": ("center_2", ["macro", "negative", "negative", "negative", "itc"]),
}
C17_UNLABELLED = ["patient_100_node_0", "patient_100_node_1"]  # a test patient: no stage label


def c17_stages() -> dict[str, str]:
    return {f"{p}_node_{n}": stage for p, (_, stages) in C17_PATIENTS.items() for n, stage in enumerate(stages)}


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory) -> Path:
    """One real pyramidal TIFF (512 x 512, two levels, 0.25 µm/px), copied to every slide name."""
    rng = np.random.default_rng(0)
    rgb = (np.array((230, 160, 200)) + rng.integers(-25, 25, (512, 512, 3))).clip(0, 255).astype(np.uint8)
    return write_pyramid(tmp_path_factory.mktemp("slide") / "slide.tif", rgb, mpp=MPP)


def put(slide: Path, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(slide, path)


def build_c16(root: Path, slide: Path) -> Path:
    for name, (_, _, outlines) in C16_TRAINING.items():
        put(slide, root / "training" / name.split("_")[0] / f"{name}.tif")
        if outlines:  # training annotations where the training zip unpacks
            (root / "training" / "lesion_annotations").mkdir(parents=True, exist_ok=True)
            (root / "training" / "lesion_annotations" / f"{name}.xml").write_text(asap(outlines))
    for name, (_, _, outlines) in C16_TESTING.items():
        put(slide, root / "testing" / "images" / f"{name}.tif")
        if outlines:  # testing annotations in the top-level folder
            (root / "lesion_annotations").mkdir(parents=True, exist_ok=True)
            (root / "lesion_annotations" / f"{name}.xml").write_text(asap(outlines))
    (root / "testing" / "reference.csv").write_text(REFERENCE_CSV)
    return root


def build_c17(root: Path, slide: Path) -> Path:
    lines = ["patient,stage"]
    for patient, (center, stages) in C17_PATIENTS.items():
        lines.append(f"{patient}.zip,pN1")
        for n, stage in enumerate(stages):
            put(slide, root / "training" / center / f"{patient}_node_{n}.tif")
            lines.append(f"{patient}_node_{n}.tif,{stage}")
    for name in C17_UNLABELLED:
        put(slide, root / "training" / "center_3" / f"{name}.tif")
    (root / "training" / "stage_labels.csv").write_text("\n".join(lines) + "\n")
    ann = root / "lesion_annotations"
    ann.mkdir(parents=True)
    (ann / "patient_001_node_0.xml").write_text(asap([("metastases", rect(9000, 12000))]))
    (ann / "patient_003_node_2.xml").write_text(asap([("metastases", rect(240, 320))]))  # CSV's micro wins
    return root


@pytest.fixture(scope="module")
def roots(tmp_path_factory, slide_file) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("camelyon")
    return build_c16(base / "CAMELYON16", slide_file), build_c17(base / "CAMELYON17", slide_file)


@pytest.fixture(scope="module")
def both(roots, tmp_path_factory):
    out = tmp_path_factory.mktemp("tables") / "both"
    report = camelyon_slide_table(*roots, out, seed=0)
    return report, {r["slide_id"]: r for r in read_slide_table(out)}, json.loads((out / "_manifest.json").read_text())


def patient(slide_id: str) -> str:
    return slide_id.rsplit("_node_", 1)[0] if "_node_" in slide_id else slide_id


# -- the table ----------------------------------------------------------------------------------


def test_registered_for_the_cli():
    assert SLIDE_TABLE_SOURCES["camelyon"] is camelyon_slide_table


def test_labels_size_classes_and_centers(both, roots):
    report, rows, manifest = both
    expected = {name: (label, size, "camelyon16") for name, (label, size, _) in {**C16_TRAINING, **C16_TESTING}.items()}
    centers = {f"{p}_node_{n}": c for p, (c, stages) in C17_PATIENTS.items() for n in range(len(stages))}
    expected.update({name: (int(stage != "negative"), stage, centers[name]) for name, stage in c17_stages().items()})
    assert report.failures == [] and report.written == len(expected) == 12 + 30
    assert {k: (r["label"], r["size_class"], r["center"]) for k, r in rows.items()} == expected
    assert all(r["source"] == "camelyon16+17" and r["mpp"] == pytest.approx(MPP) and r["width"] == 512
               for r in rows.values())
    assert rows["tumor_001"]["path"] == str((roots[0] / "training/tumor/tumor_001.tif").resolve())
    assert rows["patient_003_node_2"]["path"] == str((roots[1] / "training/center_1/patient_003_node_2.tif").resolve())
    params = manifest["params"]
    assert params["annotation_extents_um"] == {"tumor_001": 1000.0, "tumor_002": 100.0,
                                               "tumor_003": pytest.approx(1600.0), "test_004": 2500.0}
    assert params["size_class_from"] == {"label": 42 - 4 - 2, "annotation": 4, "unknown": 2}
    assert params["c16_root"] == str(roots[0].resolve()) and params["c17_root"] == str(roots[1].resolve())
    assert manifest["source"] == "camelyon16+17" and manifest["classes"] == ["normal", "tumor"]


def test_unlabelled_c17_slides_are_skipped_and_counted(both):
    _, rows, manifest = both
    assert not set(C17_UNLABELLED) & set(rows)
    assert manifest["params"]["skipped_unlabelled"] == {"count": 2, "slides": C17_UNLABELLED}


def test_splits_follow_the_magnets_protocol(both):
    _, rows, manifest = both
    splits = {k: r["split"] for k, r in rows.items()}
    by_patient: dict[str, set[str]] = {}
    for k, s in splits.items():
        by_patient.setdefault(patient(k), set()).add(s)
    test_patients = sorted(p for p, s in by_patient.items() if "test" in s)
    # test: Camelyon17 only, whole patients; per stratum round(0.25 * 15 slides) = 4 -> one 5-node patient each
    assert all(p.startswith("patient_") for p in test_patients) and len(test_patients) == 2
    assert all(by_patient[p] == {"test"} for p in test_patients)
    tumour_patients = {p for p, (_, stages) in C17_PATIENTS.items() if set(stages) != {"negative"}}
    assert len(set(test_patients) & tumour_patients) == 1
    # all of Camelyon16 (its testing set too) is in train / val; ITC never in train
    assert {splits[k] for k in {**C16_TRAINING, **C16_TESTING}} <= {"train", "val"}
    assert not [k for k, r in rows.items() if r["size_class"] == "itc" and r["split"] == "train"]
    moved = manifest["params"]["itc_moved_to_val"]
    assert all(rows[k]["size_class"] == "itc" and splits[k] == "val" for k in moved)
    # apart from the ITC slides moved to val, a patient's nodes share a split
    for p, s in by_patient.items():
        assert len({splits[k] for k in splits if patient(k) == p and k not in moved}) <= 1, p
    assert manifest["counts"]["test"] == dict(Counter(rows[k]["size_class"] for k in splits if splits[k] == "test"))


def test_same_seed_same_splits_and_itc_rule_only_moves_itc(roots, both, tmp_path):
    _, rows, manifest = both
    again = camelyon_slide_table(*roots, tmp_path / "again", seed=0)
    assert {r["slide_id"]: r["split"] for r in read_slide_table(again.out_dir)} == \
        {k: r["split"] for k, r in rows.items()}
    kept = camelyon_slide_table(*roots, tmp_path / "kept", seed=0, exclude_itc_from_train=False)
    drawn = {r["slide_id"]: r["split"] for r in read_slide_table(kept.out_dir)}
    changed = {k for k in rows if rows[k]["split"] != drawn[k]}
    assert changed == {k for k in rows if rows[k]["size_class"] == "itc" and drawn[k] == "train"}
    assert changed == set(manifest["params"]["itc_moved_to_val"])


def test_camelyon16_alone_tests_on_its_testing_set(roots, tmp_path):
    report = camelyon_slide_table(roots[0], out_dir=tmp_path / "c16", val_share=0.3)
    rows = {r["slide_id"]: r for r in read_slide_table(report.out_dir)}
    assert {k for k, r in rows.items() if r["split"] == "test"} == set(C16_TESTING)
    assert {rows[k]["split"] for k in C16_TRAINING} <= {"train", "val"}
    assert rows["tumor_002"]["split"] == "val"  # itc
    # val: round(0.3 * 3) = 1 of the normals, round(0.3 * 4) = 1 of the tumours drawn (+ tumor_002, itc, if not)
    assert sum(rows[k]["split"] == "val" for k in ("normal_001", "normal_002", "normal_003")) == 1
    assert sum(rows[k]["split"] == "val" for k in ("tumor_001", "tumor_003", "tumor_004")) <= 1
    assert {r["source"] for r in rows.values()} == {"camelyon16"}


def test_camelyon17_alone(roots, tmp_path):
    report = camelyon_slide_table(c17_root=roots[1].parent, out_dir=tmp_path / "c17")  # found inside the parent
    rows = read_slide_table(report.out_dir)
    assert len(rows) == 30 and {r["source"] for r in rows} == {"camelyon17"}
    assert Counter(r["split"] for r in rows)["test"] == 10


# -- layout problems and unreadable slides ------------------------------------------------------


def no_leftovers(out: Path) -> bool:
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_layout_problems_raise_before_anything_is_written(tmp_path, slide_file):
    c16 = build_c16(tmp_path / "CAMELYON16", slide_file)
    c17 = build_c17(tmp_path / "CAMELYON17", slide_file)
    (c16 / "testing" / "reference.csv").unlink()
    labels = c17 / "training" / "stage_labels.csv"
    labels.write_text(labels.read_text() + "patient_006_node_0.tif,macro\n")
    out = tmp_path / "out"
    with pytest.raises(SourceError) as err:
        camelyon_slide_table(c16, c17, out)
    problems = err.value.problems
    line = len(labels.read_text().splitlines())
    assert f"{labels}: line {line}: stage label for patient_006_node_0.tif" in "\n".join(problems)
    assert f"{c16 / 'testing' / 'reference.csv'}: missing" in "\n".join(problems)
    assert len(problems) == 2, problems  # the test slides are not each reported again
    assert str(c16) in str(err.value) and str(c17) in str(err.value)
    assert no_leftovers(out)


def test_camelyon16_reference_and_annotation_problems_are_all_listed(tmp_path, slide_file):
    c16 = build_c16(tmp_path / "CAMELYON16", slide_file)
    ref = c16 / "testing" / "reference.csv"
    ref.write_text(REFERENCE_CSV.replace("test_005,Tumor,,\n", "test_009,Tumor,Macro\ntest_002,Normal\n"))
    (c16 / "lesion_annotations" / "normal_001.xml").write_text(asap([("_0", rect(10, 10))]))
    (c16 / "lesion_annotations" / "tumor_002.xml").write_text(asap([("_0", rect(10, 10))]))  # also in training/
    (c16 / "training" / "tumor" / "tumour_x.tif").write_bytes(b"")
    shutil.rmtree(c16 / "training" / "normal")
    (c16 / "training" / "normal").mkdir()
    with pytest.raises(SourceError) as err:
        camelyon_slide_table(c16, out_dir=tmp_path / "out")
    text = "\n".join(err.value.problems)
    for expected in (f"{c16 / 'testing/images/test_005.tif'}: no row for test_005 in {ref}",
                     f"{ref}: line 5: test_009 has no slide",
                     f"{ref}: line 6: test_002 is listed again (first on line 2)",
                     f"{c16 / 'training/tumor/tumour_x.tif'}: not a slide name",
                     f"{c16 / 'training/normal'}: no slides",
                     f"{c16 / 'lesion_annotations/normal_001.xml'}: annotation without a slide",
                     "a second annotation of tumor_002"):
        assert expected in text, (expected, text)
    assert no_leftovers(tmp_path / "out")


def test_unreadable_slides_are_failures_while_the_others_are_written(tmp_path, slide_file):
    c16 = build_c16(tmp_path / "CAMELYON16", slide_file)
    rng = np.random.default_rng(1)
    for bad in ("training/normal/normal_002.tif", "training/tumor/tumor_001.tif"):  # tumor_001 has an annotation
        (c16 / bad).write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    report = camelyon_slide_table(c16, out_dir=tmp_path / "out")
    assert sorted(f["slide_id"] for f in report.failures) == ["normal_002", "tumor_001"]
    assert all(f["path"].endswith(f"{f['slide_id']}.tif") for f in report.failures)
    rows = {r["slide_id"] for r in read_slide_table(report.out_dir)}
    assert report.written == len(rows) == 12 - 2 and "normal_001" in rows


# -- the pure rules -------------------------------------------------------------------------------


def test_size_class_thresholds():
    got = [size_class_from_extent(um) for um in (0, 200, 200.001, 1000, 2000, 2000.001, 1e5)]
    assert got == ["itc", "itc", "micro", "micro", "micro", "macro", "macro"]
    with pytest.raises(ValueError):
        size_class_from_extent(-1)


def test_lesion_extent_is_the_outline_diameter():
    rng = np.random.default_rng(3)
    pts = rng.normal(size=(300, 2)) * (500, 80)
    brute = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)).max()
    assert lesion_extent([Annotation("_0", pts), Annotation("_0", pts[:10] / 4)]) == pytest.approx(brute)
    assert lesion_extent([Annotation("_0", rect(30, 40)), Annotation("_2", rect(1e4, 1e4)),
                          Annotation("normal", rect(1e4, 1e4))]) == pytest.approx(50)
    assert lesion_extent([Annotation("metastases", [(0, 0), (1, 0), (3, 0)])]) == pytest.approx(3)  # collinear
    assert lesion_extent([Annotation("_2", rect(5, 5))]) is None


def test_stratified_group_sample_draws_whole_groups_per_stratum():
    groups = {f"n{i:02d}": [0] * 5 for i in range(40)}
    groups |= {f"t{i:02d}": [1, 0, 0, 1, 0] for i in range(20)}
    groups |= {f"s{i:03d}": [i % 2] for i in range(100)}  # singletons (Camelyon16 slides)
    drawn = stratified_group_sample(groups, 0.25, seed=7)
    slides = Counter()
    for g in drawn:
        slides[max(groups[g])] += len(groups[g])
    # targets 0.25 * 250 and 0.25 * 150, halves up; a group is taken when it brings the count closer to its
    # target, so the count ends within half the largest group (5 slides) of it
    assert abs(slides[0] - 63) <= 2 and abs(slides[1] - 38) <= 2
    singletons = {g: v for g, v in groups.items() if g.startswith("s")}
    single = Counter(singletons[g][0] for g in stratified_group_sample(singletons, 0.3, seed=7))
    assert single == {0: 15, 1: 15}  # exactly round(0.3 * 50) of each stratum
    reordered = dict(reversed(list(groups.items())))
    assert stratified_group_sample(reordered, 0.25, seed=7) == drawn
    assert stratified_group_sample(groups, 0.25, seed=8) != drawn
    assert stratified_group_sample(groups, 0.0, seed=7) == set()


def synthetic_camelyon(seed: int = 0) -> list[CamelyonSlide]:
    """Camelyon-sized records: 100 C17 patients x 5 nodes with random stages, 270 + 130 C16 slides."""
    rng = np.random.default_rng(seed)
    out = []
    for p in range(100):
        for n in range(5):
            stage = rng.choice(["negative", "itc", "micro", "macro"], p=[0.64, 0.07, 0.12, 0.17])
            out.append(CamelyonSlide(f"patient_{p:03d}_node_{n}", Path("/x"), int(stage != "negative"), str(stage),
                                     f"center_{p // 20}", f"patient_{p:03d}", "c17"))
    for i in range(400):
        name = f"{'normal' if i % 3 else 'tumor'}_{i:03d}" if i < 270 else f"test_{i:03d}"
        label = int(name.startswith("tumor") or (name.startswith("test") and i % 2))
        size = "negative" if not label else ["itc", "micro", "macro"][i % 3]
        out.append(CamelyonSlide(name, Path("/x"), label, size, "camelyon16", name,
                                 "c16-training" if i < 270 else "c16-testing"))
    return out


def test_camelyon_splits_at_the_datasets_scale():
    slides = synthetic_camelyon()
    split = camelyon_splits(slides, seed=0)
    c17 = [s for s in slides if s.part == "c17"]
    test = [s for s in slides if split[s.slide_id] == "test"]
    assert all(s.part == "c17" for s in test)
    for stratum in (0, 1):  # label-stratified by patient: within half a patient of a quarter of each stratum
        patients = {s.patient for s in c17 if s.label == 1} if stratum else \
            {s.patient for s in c17} - {s.patient for s in c17 if s.label == 1}
        n = sum(s.patient in patients for s in c17)
        assert abs(sum(s.patient in patients for s in test) - 0.25 * n) <= 3
    for p in {s.patient for s in c17}:
        nodes = {split[s.slide_id] for s in c17 if s.patient == p}
        assert nodes == {"test"} or "test" not in nodes
    pool = [s for s in slides if split[s.slide_id] != "test"]
    drawn = camelyon_splits(slides, seed=0, exclude_itc_from_train=False)
    assert abs(sum(drawn[s.slide_id] == "val" for s in pool) - 0.2 * len(pool)) <= 2
    moved = {k for k in split if split[k] != drawn[k]}
    itc = {s.slide_id for s in slides if s.size_class == "itc"}
    assert moved and moved == {k for k in itc if drawn[k] == "train"}
    assert all(split[k] == "val" for k in moved) and not [k for k in itc if split[k] == "train"]
    assert camelyon_splits(slides[::-1], seed=0) == split
    c16_only = camelyon_splits([s for s in slides if s.part != "c17"], seed=0)
    assert {k for k, v in c16_only.items() if v == "test"} == {s.slide_id for s in slides if s.part == "c16-testing"}
