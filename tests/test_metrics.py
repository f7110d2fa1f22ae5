import numpy as np
import pytest
from sklearn import metrics as skm

from histoweak import metrics as M

rng = np.random.default_rng(0)
Y = rng.integers(0, 3, 200)
P = np.where(rng.random(200) < 0.7, Y, rng.integers(0, 3, 200))


def test_accuracy_and_bca_against_sklearn():
    assert M.accuracy(Y, P) == pytest.approx(skm.accuracy_score(Y, P))
    assert M.balanced_accuracy(Y, P) == pytest.approx(skm.balanced_accuracy_score(Y, P))


def test_group_metrics_hand_made():
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0, 1, 1, 1, 0, 0])
    g = np.array([0, 0, 1, 1, 2, 3])
    assert M.group_accuracies(y, p, g) == {0: 0.5, 1: 1.0, 2: 0.0, 3: 1.0}
    assert M.worst_group_accuracy(y, p, g) == 0.0
    assert M.group_balanced_accuracy(y, p, g) == pytest.approx(0.625)


def test_f1_against_sklearn():
    got = M.f1_scores(Y, P)
    assert got["f1_micro"] == pytest.approx(skm.f1_score(Y, P, average="micro"))
    assert got["f1_macro"] == pytest.approx(skm.f1_score(Y, P, average="macro"))
    yt = rng.integers(0, 2, (50, 4))
    yp = np.where(rng.random((50, 4)) < 0.8, yt, 1 - yt)
    got = M.f1_scores(yt, yp)
    assert got["f1_micro"] == pytest.approx(skm.f1_score(yt, yp, average="micro"))
    assert got["f1_macro"] == pytest.approx(skm.f1_score(yt, yp, average="macro"))


def test_auroc_against_sklearn_with_ties():
    y = rng.integers(0, 2, 300)
    s = np.round(y * 0.3 + rng.random(300), 1)  # rounded: many ties
    assert M.auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s))
    assert np.isnan(M.auroc(np.ones(4), np.arange(4)))


def test_iou_against_sklearn():
    t = rng.integers(0, 4, (3, 16, 16))
    p = np.where(rng.random(t.shape) < 0.6, t, rng.integers(0, 4, t.shape))
    cm = M.confusion_matrix(t, p, 4)
    np.testing.assert_allclose(cm, skm.confusion_matrix(t.ravel(), p.ravel(), labels=range(4)))
    iou = M.iou_per_class(cm)
    np.testing.assert_allclose(iou, skm.jaccard_score(t.ravel(), p.ravel(), average=None, labels=range(4)))
    assert M.mean_iou(cm) == pytest.approx(skm.jaccard_score(t.ravel(), p.ravel(), average="macro"))
    assert M.fw_iou(cm) == pytest.approx(skm.jaccard_score(t.ravel(), p.ravel(), average="weighted"))


def test_iou_hand_made_with_absent_class_and_ignore():
    t = np.array([[0, 0, 1], [1, 255, 2]])
    p = np.array([[0, 1, 1], [1, 0, 0]])
    cm = M.confusion_matrix(t, p, 4, ignore_index=255)
    iou = M.iou_per_class(cm)
    # class 0: tp 1, union 3 ; class 1: tp 2, union 3 ; class 2: tp 0, union 1 ; class 3 absent
    np.testing.assert_allclose(iou[:3], [1 / 3, 2 / 3, 0.0])
    assert np.isnan(iou[3])
    assert M.mean_iou(cm) == pytest.approx(1 / 3)
    assert M.fw_iou(cm) == pytest.approx(2 / 5 * 1 / 3 + 2 / 5 * 2 / 3)


def test_segmentation_scores_equal_scikit_learn_on_pixels():
    """Ciga & Martel's F1 macro and "micro" (per-class F1 weighted by the true pixel shares) and mIoU."""
    from sklearn.metrics import f1_score, jaccard_score

    from histoweak.metrics import confusion_matrix, segmentation_scores

    rng = np.random.default_rng(0)
    truth = rng.choice(4, size=(3, 40, 40), p=[0.7, 0.2, 0.08, 0.02])
    pred = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, 4, truth.shape))
    got = segmentation_scores(confusion_matrix(truth, pred, 5))  # class 4: absent from both, left out
    t, p = truth.ravel(), pred.ravel()
    assert got["f1_macro"] == pytest.approx(f1_score(t, p, average="macro"))
    assert got["f1_micro"] == pytest.approx(f1_score(t, p, average="weighted"))
    assert got["miou"] == pytest.approx(jaccard_score(t, p, average="macro"))
    assert got["f1_micro"] != pytest.approx(f1_score(t, p, average="micro"))  # not scikit-learn's "micro" (= accuracy)
