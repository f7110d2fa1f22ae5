"""The ordinal-grade synthetic patch dataset: deterministic, laid out as class folders, separable by
structure rather than colour, and ordinal (neighbouring grades closer than distant ones)."""

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi
from skimage.color import rgb2gray, rgb2hed
from skimage.feature import local_binary_pattern
from skimage.filters import threshold_otsu
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from histoweak.data.synthetic_grades import GRADES, SPLITS, render_grade_tile, write_grade_dataset

N_PER_GRADE = 40


@pytest.fixture(scope="module")
def tiles():
    """(160, 128, 128, 3) uint8 tiles, 40 per grade, their (160,) grades and (160, 5) structural features."""
    x = np.stack([render_grade_tile(g, np.random.default_rng([1, g, i])) for g in range(4) for i in range(N_PER_GRADE)])
    return x, np.repeat(np.arange(4), N_PER_GRADE), np.array([_structure(t) for t in x])


def _structure(x: np.ndarray) -> list[float]:
    """Features that know nothing of colour: nuclei from a per-image Otsu threshold of the hematoxylin
    channel (area share, count, mean size) and lumens as bright, opened regions (area share, count)."""
    h = rgb2hed(x)[..., 0]
    nuclei = h > threshold_otsu(h)
    _, k = ndi.label(nuclei)
    g = rgb2gray(x)
    mid = np.quantile(g, 0.5)
    lumen = ndi.binary_opening(g > mid + 0.5 * (g.max() - mid))
    _, k_lumen = ndi.label(lumen)
    return [nuclei.mean(), k, nuclei.sum() / max(k, 1), lumen.mean(), k_lumen]


def _lbp(x: np.ndarray) -> np.ndarray:
    """Rotation-invariant uniform local binary pattern histograms of the grey image at two radii."""
    g = (rgb2gray(x) * 255).astype(np.uint8)
    codes = [local_binary_pattern(g, 8, r, "uniform").astype(int).ravel() for r in (1, 3)]
    return np.concatenate([np.bincount(c, minlength=10) / g.size for c in codes])


def _cv_predict(features: np.ndarray, y: np.ndarray) -> np.ndarray:
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    return cross_val_predict(clf, features, y, cv=StratifiedKFold(5, shuffle=True, random_state=0))


def test_tiles_are_deterministic_from_the_seed():
    a = render_grade_tile(2, np.random.default_rng(7))
    assert a.shape == (128, 128, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_grade_tile(2, np.random.default_rng(7)))
    assert not np.array_equal(a, render_grade_tile(2, np.random.default_rng(8)))
    assert render_grade_tile(0, np.random.default_rng(0), size=48).shape == (48, 48, 3)


def test_dataset_layout_counts_and_determinism(tmp_path):
    root = write_grade_dataset(tmp_path / "a", n_train=2, n_val=1, n_test=3, size=48, seed=4)
    assert root == tmp_path / "a"
    for split, n in zip(SPLITS, (2, 1, 3)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(GRADES)
        for grade in GRADES:
            files = sorted((root / split / grade).glob("*.png"))
            assert len(files) == n, (split, grade)
            img = np.asarray(Image.open(files[0]))
            assert img.shape == (48, 48, 3) and img.dtype == np.uint8
    again = write_grade_dataset(tmp_path / "b", n_train=2, n_val=1, n_test=3, size=48, seed=4)
    other = write_grade_dataset(tmp_path / "c", n_train=2, n_val=1, n_test=3, size=48, seed=5)
    files = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.png"))
    assert all((root / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert any((root / f).read_bytes() != (other / f).read_bytes() for f in files)
    # More tiles leave the existing ones as they were: each tile has its own generator.
    more = write_grade_dataset(tmp_path / "d", n_train=3, n_val=1, n_test=3, size=48, seed=4)
    assert (more / "train/MD/MD_train_0001.png").read_bytes() == (root / "train/MD/MD_train_0001.png").read_bytes()


def test_bad_arguments_name_the_valid_values():
    with pytest.raises(ValueError, match=r"grade 4.*BN"):
        render_grade_tile(4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="size 16"):
        render_grade_tile(0, np.random.default_rng(0), size=16)
    with pytest.raises(ValueError, match="n_val -1"):
        write_grade_dataset("/nonexistent", n_val=-1)


def test_structure_not_mean_colour_tells_the_grades_apart(tiles):
    x, y, structure = tiles
    mean_rgb = x.reshape(len(x), -1, 3).mean(1)
    acc = {name: float((_cv_predict(f, y) == y).mean()) for name, f in
           (("mean RGB", mean_rgb), ("LBP texture", np.stack([_lbp(t) for t in x])),
            ("structure", structure))}
    print("5-fold logistic-regression accuracy (chance 0.25):", {k: round(v, 3) for k, v in acc.items()})
    assert acc["structure"] >= 0.75
    assert acc["structure"] >= acc["mean RGB"] + 0.15
    assert acc["LBP texture"] >= acc["mean RGB"] + 0.1
    assert acc["mean RGB"] < 0.7  # colour alone is a weak cue


def test_grades_are_ordinal(tiles):
    _, y, feats = tiles
    # A classifier's mistakes land on a neighbouring grade (chance: half of the off-diagonal pairs).
    pred = _cv_predict(feats, y)
    wrong = pred != y
    off_by_one = float((np.abs(pred - y)[wrong] == 1).mean())
    print(f"errors {wrong.sum()}/{len(y)}, off by one grade: {off_by_one:.2f}")
    assert wrong.sum() > 0  # neighbours overlap: not a trivially separable toy
    assert off_by_one >= 0.8
    # The nuclear area share separates grades the better the further apart they are.
    frac = feats[:, 0]
    auc = {(a, b): roc_auc_score(y[(y == a) | (y == b)] == b, frac[(y == a) | (y == b)])
           for a in range(4) for b in range(a + 1, 4)}
    print("AUC of the nuclear area share, grade pairs:",
          {f"{GRADES[a]}-{GRADES[b]}": round(v, 3) for (a, b), v in auc.items()})
    for a in range(4):
        for b in range(a + 1, 4):
            for c in range(b + 1, 4):
                assert auc[(a, b)] <= auc[(a, c)] and auc[(b, c)] <= auc[(a, c)], (a, b, c)
    assert all(np.median(frac[y == g]) < np.median(frac[y == g + 1]) for g in range(3))
