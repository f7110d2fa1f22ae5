"""Camelyon16 and Camelyon17 as one slide table, split as MagNets splits them (Dimitriou et al., §4.1).

Layouts read (``c16_root`` and ``c17_root`` are the datasets' top folders,
``CAMELYON16/`` and ``CAMELYON17/``, or their parents)::

    CAMELYON16/training/normal/normal_NNN.tif        label 0, size class "negative"
    CAMELYON16/training/tumor/tumor_NNN.tif          label 1, size class from its annotation (below)
    CAMELYON16/testing/images/test_NNN.tif           label and size class from reference.csv
    CAMELYON16/testing/reference.csv                 test_001,Tumor,Macro,Primary / test_002,Normal
    CAMELYON16/lesion_annotations/<slide>.xml        ASAP XML in level-0 px (the unzipped lesion_annotations.zip;
                                                     training/ and testing/lesion_annotations/ are read too)

    CAMELYON17/training/center_K/patient_PPP_node_N.tif    five lymph nodes per patient, center from the folder
    CAMELYON17/training/stage_labels.csv             patient_000_node_0.tif,negative|itc|micro|macro
                                                     (patient rows, patient_000.zip,pN0, are ignored)
    CAMELYON17/lesion_annotations/patient_PPP_node_N.xml   (or training/lesion_annotations/)
    CAMELYON17/testing/center_K/...                  optional; read like training/

``reference.csv`` has no header (one is skipped when its first field names no
test slide); its trailing fields may be missing (``test_002,Normal``), and its
size field is Macro, Micro or ITC. A C17 slide without a stage label (the
unlabelled test patients) is skipped and listed in the manifest's params
(``skipped_unlabelled``), not an error.

Size class (``slide_table.SIZE_CLASSES``): a label-0 slide is "negative"; a tumour slide
takes its class from the CSV where the CSV gives one, else from its lesion
annotation when it has one and its µm/px is known, else None (unknown). From
an annotation it is the TNM / Camelyon rule applied to ``lesion_extent``, the
longest extent of any lesion outline: > 2 mm macro, > 0.2 mm micro, else itc
(``size_class_from_extent``). The extent is an outline's diameter (the greatest
distance between two of its vertices), not its bounding box's diagonal, which
overstates a round lesion by up to sqrt(2) (a 1.6 mm round deposit would pass
for a macro-metastasis). Outlines of the exclusion groups (C16 ``_2``, C17
``normal``: normal tissue inside a tumour outline) are not lesions.
Approximations: separate outlines of one deposit are not merged, and the
Camelyon17 ITC rule's cell count (< 200 cells) cannot be read from an outline.

Splits (``camelyon_splits``), the protocol of MagNets §4.1:

- test: a seeded, label-stratified ``test_share`` of Camelyon17's labelled
  slides, drawn by patient so that all nodes of a patient share a split
  (``stratified_group_sample``). With only Camelyon16 given, its own testing
  set is the test split.
- train / val: the rest of Camelyon17 plus all of Camelyon16 (training and
  testing sets; with only Camelyon16, its training set), drawn the same way
  with ``val_share`` to val (a C16 slide is its own patient), so val is
  patient-disjoint from train too.
- ``exclude_itc_from_train``: the paper leaves ITC slides out of training;
  here they move from train to val instead of being dropped, so they still
  count in model selection. Such a slide's patient then has nodes in both
  train and val (test stays patient-disjoint from both). ITC slides drawn
  into test stay there; slides of unknown size class stay where drawn.

The whole layout is checked first (folders, file names, CSV rows, annotation
files) and every problem raised together as ``SourceError`` before anything
is written; then ``write_slide_table`` opens each slide and lists the
unreadable ones among its failures.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy.spatial import ConvexHull, QhullError

from histoweak.data.slide_table import SlideTableReport, write_slide_table
from histoweak.data.sources._patches import SourceError
from histoweak.data.sources._slides import dataset_root, files
from histoweak.slides.annotations import Annotation, read_annotations
from histoweak.slides.reader import SlideError, SlideReader

__all__ = [
    "EXCLUSION_GROUPS",
    "MACRO_UM",
    "MICRO_UM",
    "SLIDE_TABLE_SOURCES",
    "CamelyonSlide",
    "camelyon_slide_table",
    "camelyon_splits",
    "lesion_extent",
    "size_class_from_extent",
    "stratified_group_sample",
]

MACRO_UM = 2000.0  # a metastasis longer than 2 mm is a macro-metastasis (TNM pN, Camelyon17)
MICRO_UM = 200.0  # longer than 0.2 mm (and at most 2 mm): micro-metastasis; else isolated tumour cells
EXCLUSION_GROUPS = frozenset({"_2", "normal", "exclusion"})  # lower-cased annotation groups that are not lesions
PARTS = ("c16-training", "c16-testing", "c17")
SLIDE_SUFFIXES = (".tif", ".tiff")
C16_CENTER = "camelyon16"  # Radboud vs Utrecht is not derivable from Camelyon16's file names
REFERENCE = "https://camelyon17.grand-challenge.org/Data/ (Litjens et al., GigaScience 7(6), 2018)"
PROTOCOL = "MagNets §4.1 (Dimitriou et al.)"

_C16_FOLDERS = (  # folder, slide-name pattern, label (None: from reference.csv), part
    ("training/normal", "normal_NNN", 0, "c16-training"),
    ("training/tumor", "tumor_NNN", 1, "c16-training"),
    ("testing/images", "test_NNN", None, "c16-testing"),
)
_C16_ANNOTATIONS = ("lesion_annotations", "training/lesion_annotations", "testing/lesion_annotations")
_C17_ANNOTATIONS = ("lesion_annotations", "training/lesion_annotations")
_C17_NAME = re.compile(r"(patient_\d+)_node_\d+")
_CENTER = re.compile(r"center_\d+")
_REFERENCE_CLASSES = {"normal": 0, "tumor": 1, "tumour": 1}
_REFERENCE_SIZES = {"macro": "macro", "micro": "micro", "itc": "itc"}
_STAGES = {"negative": 0, "itc": 1, "micro": 1, "macro": 1}


@dataclass(frozen=True)
class CamelyonSlide:
    """One slide of either dataset, before splitting.

    Attributes
    ----------
    slide_id : file name without suffix (``tumor_001``, ``patient_004_node_2``).
    path : absolute path of the slide.
    label : 0 normal, 1 tumour (an ITC slide is 1).
    size_class : one of ``slide_table.SIZE_CLASSES``, or None when unknown.
    center : ``"center_K"`` for Camelyon17, ``"camelyon16"`` for Camelyon16.
    patient : ``patient_PPP`` for Camelyon17; a Camelyon16 slide is its own patient (its ``slide_id``).
    part : ``"c16-training"``, ``"c16-testing"`` or ``"c17"``.
    """

    slide_id: str
    path: Path
    label: int
    size_class: str | None
    center: str
    patient: str
    part: str


# -- pure rules ----------------------------------------------------------------------


def size_class_from_extent(extent_um: float) -> str:
    """The Camelyon / TNM size class of a metastasis whose longest extent is ``extent_um`` µm.

    > 2000 µm "macro", > 200 µm "micro", else "itc" (isolated tumour cells):
    2 mm exactly is micro, 0.2 mm exactly is itc.
    """
    if not np.isfinite(extent_um) or extent_um < 0:
        raise ValueError(f"a lesion extent must be a non-negative number of µm, got {extent_um}")
    return "macro" if extent_um > MACRO_UM else "micro" if extent_um > MICRO_UM else "itc"


def _diameter(points: np.ndarray) -> float:
    """Greatest distance between two of ``points`` ((N, 2)); through the convex hull when it has area."""
    pts = np.unique(points, axis=0)
    if len(pts) > 3:
        try:
            pts = pts[ConvexHull(pts).vertices]
        except QhullError:  # all points on a line: every pair is compared
            pass
    best = 0.0
    for i in range(0, len(pts), 1024):  # blocks keep a collinear ring of many vertices from needing N x N memory
        d2 = ((pts[i:i + 1024, None, :] - pts[None, :, :]) ** 2).sum(-1)
        best = max(best, float(d2.max()))
    return float(np.sqrt(best))


def lesion_extent(annotations: Iterable[Annotation]) -> float | None:
    """The longest extent of any lesion outline, in level-0 pixels; None when there is no lesion outline.

    An outline's extent is its diameter: the greatest distance between two of
    its exterior's vertices (equal to the greatest distance between any two
    points of the polygon). Outlines whose group (``class_name``, lower-cased)
    is in ``EXCLUSION_GROUPS`` are not lesions and are ignored.
    """
    extents = [_diameter(a.exterior) for a in annotations
               if (a.class_name or "").lower() not in EXCLUSION_GROUPS]
    return max(extents) if extents else None


def _half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def stratified_group_sample(groups: Mapping[str, Sequence[int]], share: float,
                            seed: int | Sequence[int] = 0) -> set[str]:
    """Whole groups (patients) drawn so that about ``share`` of each stratum's slides are in the sample.

    Parameters
    ----------
    groups : group id -> the labels (0/1) of its slides.
        A group's stratum is its largest label: a patient with any tumour
        slide is drawn among the tumour patients.
    share : fraction of slides to draw, in [0, 1].
    seed : for ``numpy.random.default_rng``.

    Returns
    -------
    set of str
        The drawn group ids. Per stratum (in increasing order) the groups,
        sorted by id, are shuffled and walked once; a group is taken when
        that brings the stratum's slide count closer to its target,
        ``round(share * slides in the stratum)`` (halves up). The result
        depends only on ``groups`` and ``seed``, not on their order.
    """
    if not 0 <= share <= 1:
        raise ValueError(f"share must be in [0, 1], got {share}")
    rng = np.random.default_rng(seed)
    strata: dict[int, list[str]] = {}
    for g in sorted(groups):
        if not len(groups[g]):
            raise ValueError(f"group {g!r} has no slides")
        strata.setdefault(int(max(groups[g])), []).append(g)
    chosen: set[str] = set()
    for stratum in sorted(strata):
        ids = strata[stratum]
        target = _half_up(share * sum(len(groups[g]) for g in ids))
        taken = 0
        for k in rng.permutation(len(ids)):
            n = len(groups[ids[k]])
            if abs(taken + n - target) < abs(taken - target):
                chosen.add(ids[k])
                taken += n
    return chosen


def camelyon_splits(slides: Sequence[CamelyonSlide], *, test_share: float = 0.25, val_share: float = 0.2,
                    seed: int = 0, exclude_itc_from_train: bool = True) -> dict[str, str]:
    """Train / val / test by MagNets §4.1 (the rules are in the module docstring).

    Returns
    -------
    dict
        slide id -> "train" | "val" | "test". Test is drawn with
        ``stratified_group_sample(..., seed=(seed, 0))`` over Camelyon17's
        patients, val with ``seed=(seed, 1)`` over the remaining groups.
    """
    for name, share in (("test_share", test_share), ("val_share", val_share)):
        if not 0 <= share < 1:
            raise ValueError(f"{name} must be in [0, 1), got {share}")
    ids = [s.slide_id for s in slides]
    if len(set(ids)) != len(ids):
        raise ValueError(f"slide ids must be distinct; repeated: {sorted({i for i in ids if ids.count(i) > 1})}")

    def groups(pool: Iterable[CamelyonSlide]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for s in pool:
            out.setdefault(s.patient, []).append(s.label)
        return out

    c17 = [s for s in slides if s.part == "c17"]
    if c17:
        test_patients = stratified_group_sample(groups(c17), test_share, (seed, 0))
        test = {s.slide_id for s in c17 if s.patient in test_patients}
    else:
        test = {s.slide_id for s in slides if s.part == "c16-testing"}
    pool = [s for s in slides if s.slide_id not in test]
    val_patients = stratified_group_sample(groups(pool), val_share, (seed, 1))
    split = {s.slide_id: "test" if s.slide_id in test else "val" if s.patient in val_patients else "train"
             for s in slides}
    if exclude_itc_from_train:
        for s in slides:
            if s.size_class == "itc" and split[s.slide_id] == "train":
                split[s.slide_id] = "val"
    return split


# -- layout checks --------------------------------------------------------------------


def _slides_in(folder: Path, pattern: re.Pattern, expected: str, problems: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in files(folder, SLIDE_SUFFIXES):
        if not pattern.fullmatch(p.stem):
            problems.append(f"{p}: not a slide name of this folder (expected {expected})")
        elif p.stem in out:
            problems.append(f"{p}: slide {p.stem} is there twice ({out[p.stem].name} and {p.name})")
        else:
            out[p.stem] = p
    if not out:
        problems.append(f"{folder}: no slides ({expected})")
    return out


def _csv_rows(path: Path, problems: list[str]) -> list[tuple[int, list[str]]]:
    """(line number, stripped non-empty fields) of each non-blank row."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [(n, [c.strip() for c in row]) for n, row in enumerate(csv.reader(f), 1)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        problems.append(f"{path}: unreadable CSV ({exc})")
        return []
    return [(n, row) for n, row in rows if any(row)]


def _read_reference(path: Path, problems: list[str]) -> dict[str, tuple[int, str | None, int]]:
    """test slide id -> (label, size class or None, line) from Camelyon16's ``reference.csv``."""
    out: dict[str, tuple[int, str | None, int]] = {}
    rows = _csv_rows(path, problems)
    if rows and not re.fullmatch(r"test_\d+", Path(rows[0][1][0]).stem):
        rows = rows[1:]  # a header
    for n, row in rows:
        where = f"{path}: line {n}"
        name = Path(row[0]).stem
        if not re.fullmatch(r"test_\d+", name):
            problems.append(f"{where}: {row[0]!r} is not a test slide name (test_NNN)")
            continue
        cls = row[1].lower() if len(row) > 1 else ""
        if cls not in _REFERENCE_CLASSES:
            problems.append(f"{where}: class {cls or '(missing)'!r} for {name}; valid: Tumor, Normal")
            continue
        label = _REFERENCE_CLASSES[cls]
        size_field = row[2].lower() if len(row) > 2 else ""
        if label == 0 and size_field:
            problems.append(f"{where}: {name} is Normal but has a lesion size {row[2]!r}")
            continue
        if size_field and size_field not in _REFERENCE_SIZES:
            problems.append(f"{where}: lesion size {row[2]!r} for {name}; valid: Macro, Micro, ITC (or none)")
            continue
        if name in out:
            problems.append(f"{where}: {name} is listed again (first on line {out[name][2]})")
            continue
        out[name] = (label, "negative" if label == 0 else _REFERENCE_SIZES.get(size_field), n)
    return out


def _read_stage_labels(path: Path, problems: list[str]) -> dict[str, tuple[str, int]]:
    """slide id -> (stage, line) from Camelyon17's ``stage_labels.csv``; patient rows (``*.zip``) are ignored."""
    out: dict[str, tuple[str, int]] = {}
    rows = _csv_rows(path, problems)
    if rows and rows[0][1][0].lower() == "patient":
        rows = rows[1:]  # the header, "patient,stage"
    for n, row in rows:
        where = f"{path}: line {n}"
        if row[0].lower().endswith(".zip"):
            continue
        name = Path(row[0]).stem
        if not _C17_NAME.fullmatch(name):
            problems.append(f"{where}: {row[0]!r} is neither a patient (patient_PPP.zip) nor a slide "
                            "(patient_PPP_node_N.tif)")
            continue
        stage = row[1].lower() if len(row) > 1 else ""
        if stage not in _STAGES:
            problems.append(f"{where}: stage {stage or '(missing)'!r} for {name}; valid: {', '.join(_STAGES)}")
            continue
        if name in out:
            problems.append(f"{where}: {name} is labelled again (first on line {out[name][1]})")
            continue
        out[name] = (stage, n)
    return out


def _annotation_files(root: Path, folders: Sequence[str], problems: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for folder in folders:
        if not (root / folder).is_dir():
            continue
        for xml in files(root / folder, (".xml",)):
            if xml.stem in out:
                problems.append(f"{xml}: a second annotation of {xml.stem} (also {out[xml.stem]})")
            else:
                out[xml.stem] = xml
    return out


def _check_annotations(xmls: Mapping[str, Path], present: set[str], slides: Mapping[str, CamelyonSlide],
                       problems: list[str]) -> None:
    """Every annotation names a slide on disk (``present``); none outlines a lesion on a slide labelled normal."""
    for stem, xml in sorted(xmls.items()):
        if stem not in present:
            problems.append(f"{xml}: annotation without a slide {stem}.tif")
        elif stem in slides and slides[stem].label == 0:
            problems.append(f"{xml}: lesion annotation of {stem}, which is labelled normal")


def _scan_c16(root: Path, problems: list[str]) -> tuple[list[CamelyonSlide], dict[str, Path]]:
    found: list[tuple[Path, int | None, str]] = []
    for folder, name, label, part in _C16_FOLDERS:
        if not (root / folder).is_dir():
            problems.append(f"{root}: missing {folder}/")
            continue
        pattern = re.compile(name.replace("NNN", r"\d+"))
        found += [(p, label, part) for p in _slides_in(root / folder, pattern, f"{name}.tif", problems).values()]
    reference_path = root / "testing" / "reference.csv"
    reference = {}
    if reference_path.is_file():
        reference = _read_reference(reference_path, problems)
    else:
        problems.append(f"{reference_path}: missing (the labels of testing/images/)")
    slides: dict[str, CamelyonSlide] = {}
    for path, label, part in found:
        size = "negative" if label == 0 else None
        if part == "c16-testing":
            if path.stem not in reference:
                if reference_path.is_file():
                    problems.append(f"{path}: no row for {path.stem} in {reference_path} (its label is unknown)")
                continue
            label, size, _ = reference[path.stem]
        slides[path.stem] = CamelyonSlide(path.stem, path.resolve(), label, size, C16_CENTER, path.stem, part)
    tested = {p.stem for p, _, part in found if part == "c16-testing"}
    if (root / "testing" / "images").is_dir():
        for name, (*_, line) in sorted(reference.items()):
            if name not in tested:
                problems.append(f"{reference_path}: line {line}: {name} has no slide in {root / 'testing/images'}")
    xmls = _annotation_files(root, _C16_ANNOTATIONS, problems)
    _check_annotations(xmls, {p.stem for p, _, _ in found}, slides, problems)
    return list(slides.values()), xmls


def _scan_c17(root: Path, problems: list[str]) -> tuple[list[CamelyonSlide], dict[str, Path], list[str]]:
    training = root / "training"
    if not training.is_dir():
        problems.append(f"{root}: missing training/")
        return [], {}, []
    found: dict[str, tuple[Path, str]] = {}
    for part in ("training", "testing"):
        centers = sorted(d for d in (root / part).glob("center_*") if d.is_dir() and _CENTER.fullmatch(d.name))
        if part == "training" and not centers:
            problems.append(f"{training}: no center_K/ folders")
        for center in centers:
            for name, path in _slides_in(center, _C17_NAME, "patient_PPP_node_N.tif", problems).items():
                if name in found:
                    problems.append(f"{path}: slide {name} is also in {found[name][0].parent}")
                else:
                    found[name] = (path, center.name)
    labels_path = training / "stage_labels.csv"
    labels = {}
    if labels_path.is_file():
        labels = _read_stage_labels(labels_path, problems)
    else:
        problems.append(f"{labels_path}: missing (the slides' stage labels)")
    for name, (_, line) in sorted(labels.items()):
        if name not in found:
            problems.append(f"{labels_path}: line {line}: stage label for {name}.tif, which is in no "
                            f"{root.name}/training/center_K/ folder")
    slides = {}
    for name, (path, center) in sorted(found.items()):
        if name in labels:
            stage = labels[name][0]
            slides[name] = CamelyonSlide(name, path.resolve(), _STAGES[stage], stage, center,
                                         _C17_NAME.fullmatch(name).group(1), "c17")
    unlabelled = sorted(name for name in found if name not in labels)
    xmls = _annotation_files(root, _C17_ANNOTATIONS, problems)
    _check_annotations(xmls, set(found), slides, problems)
    return list(slides.values()), xmls, unlabelled


def _lesion_extents(slides: Sequence[CamelyonSlide], xmls: Mapping[str, Path],
                    problems: list[str]) -> dict[str, float | None]:
    """Lesion extent (level-0 px) of each tumour slide of unknown size class that has an annotation."""
    out = {}
    for s in slides:
        if s.label == 1 and s.size_class is None and s.slide_id in xmls:
            try:
                out[s.slide_id] = lesion_extent(read_annotations(xmls[s.slide_id]))
            except ValueError as exc:
                problems.append(str(exc))
    return out


def _slide_mpp(path: Path) -> float | None:
    """µm per level-0 pixel, or None when the file does not say or cannot be opened (``write_slide_table`` then
    lists it among its failures)."""
    try:
        with SlideReader(path) as reader:
            return reader.mpp
    except SlideError:
        return None


# -- the adapter ---------------------------------------------------------------------


def camelyon_slide_table(c16_root: str | Path | None = None, c17_root: str | Path | None = None,
                         out_dir: str | Path | None = None, *, test_share: float = 0.25, val_share: float = 0.2,
                         seed: int = 0, exclude_itc_from_train: bool = True,
                         overwrite: bool = False) -> SlideTableReport:
    """Write the slide table of Camelyon16 and/or Camelyon17 found at the roots, split by MagNets §4.1.

    Parameters
    ----------
    c16_root, c17_root : the datasets' folders (either or both; layouts in the module docstring).
    out_dir : where ``write_slide_table`` writes the table (required).
    test_share : share of Camelyon17's labelled slides drawn as test (by patient, label-stratified).
    val_share : share of the remaining slides drawn as val (by patient, label-stratified).
    seed : seeds both draws.
    exclude_itc_from_train : move ITC slides drawn into train to val.
    overwrite : passed to ``write_slide_table``.

    Returns
    -------
    SlideTableReport
        Of ``write_slide_table(rows, out_dir, source="camelyon16+17" | "camelyon16" | "camelyon17", params=...)``;
        ``params`` records the roots, the protocol, the C17 slides skipped for
        want of a stage label, the ITC slides moved to val, where each size
        class came from and the extent (µm) of each size class read from an
        annotation.

    Raises
    ------
    SourceError
        Listing every layout problem (missing folders or CSVs, slide names
        that do not fit their folder, a test slide without a row in
        reference.csv or a row without its slide, a stage label for a slide
        that does not exist, an annotation without its slide or of a normal
        slide, an unreadable CSV or XML), before anything is written.
    ValueError
        No root or no ``out_dir`` given, or a share outside [0, 1).
    """
    if c16_root is None and c17_root is None:
        raise ValueError("give c16_root, c17_root or both")
    if out_dir is None:
        raise ValueError("out_dir is required")
    for name, share in (("test_share", test_share), ("val_share", val_share)):
        if not 0 <= share < 1:
            raise ValueError(f"{name} must be in [0, 1), got {share}")
    roots = {"c16": c16_root, "c17": c17_root}
    source = "camelyon16+17" if c16_root is not None and c17_root is not None else \
        "camelyon16" if c16_root is not None else "camelyon17"
    problems: dict[str, list[str]] = {"c16": [], "c17": []}
    slides: list[CamelyonSlide] = []
    xmls: dict[str, Path] = {}
    unlabelled: list[str] = []
    if c16_root is not None:
        roots["c16"] = dataset_root(Path(c16_root), source, "CAMELYON16", ("training", "testing"))
        found, ann = _scan_c16(roots["c16"], problems["c16"])
        slides += found
        xmls.update(ann)
    if c17_root is not None:
        roots["c17"] = dataset_root(Path(c17_root), source, "CAMELYON17", ("training",))
        found, ann, unlabelled = _scan_c17(roots["c17"], problems["c17"])
        slides += found
        xmls.update(ann)
    extents: dict[str, float | None] = {}
    for key in problems:
        extents.update(_lesion_extents([s for s in slides if s.part.startswith(key)], xmls, problems[key]))
    bad = [k for k in problems if problems[k]]
    if bad:
        raise SourceError(" and ".join(str(roots[k]) for k in bad), source, problems["c16"] + problems["c17"])
    if not slides:
        root = roots["c16"] if roots["c16"] is not None else roots["c17"]
        raise SourceError(root, source, [f"{root}: no labelled slides"])

    extents_um: dict[str, float] = {}
    derived = []
    for s in slides:
        extent = extents.get(s.slide_id)
        mpp = _slide_mpp(s.path) if extent is not None else None
        if mpp is not None:
            extents_um[s.slide_id] = round(extent * mpp, 3)
            s = replace(s, size_class=size_class_from_extent(extent * mpp))
        derived.append(s)
    slides = derived
    split = camelyon_splits(slides, test_share=test_share, val_share=val_share, seed=seed,
                            exclude_itc_from_train=exclude_itc_from_train)
    drawn = camelyon_splits(slides, test_share=test_share, val_share=val_share, seed=seed,
                            exclude_itc_from_train=False)
    rows = [{"slide_id": s.slide_id, "path": str(s.path), "label": s.label, "split": split[s.slide_id],
             "size_class": s.size_class, "center": s.center} for s in slides]
    n_unknown = sum(s.size_class is None for s in slides)
    params = {
        "c16_root": None if roots["c16"] is None else str(Path(roots["c16"]).resolve()),
        "c17_root": None if roots["c17"] is None else str(Path(roots["c17"]).resolve()),
        "reference": REFERENCE,
        "protocol": PROTOCOL,
        "test_split": "camelyon17 patients" if any(s.part == "c17" for s in slides) else "camelyon16 testing set",
        "test_share": test_share,
        "val_share": val_share,
        "seed": seed,
        "exclude_itc_from_train": exclude_itc_from_train,
        "itc_moved_to_val": sorted(k for k in split if split[k] != drawn[k]),
        "skipped_unlabelled": {"count": len(unlabelled), "slides": unlabelled},
        "size_class_rule": {"macro_um": MACRO_UM, "micro_um": MICRO_UM, "extent": "largest outline diameter",
                            "exclusion_groups": sorted(EXCLUSION_GROUPS)},
        "size_class_from": {"label": len(slides) - len(extents_um) - n_unknown, "annotation": len(extents_um),
                            "unknown": n_unknown},
        "annotation_extents_um": extents_um,
    }
    return write_slide_table(rows, out_dir, source=source, classes=("normal", "tumor"), params=params,
                             overwrite=overwrite)


SLIDE_TABLE_SOURCES = {"camelyon": camelyon_slide_table}
