"""Evaluation metrics as pure functions of numpy arrays.

Classification: accuracy, balanced-class accuracy (BCA), per-group accuracy,
worst-group accuracy (WGA), group-balanced accuracy (GBA), F1 (micro,
macro), AUROC. Segmentation: confusion matrix, per-class IoU, mIoU,
frequency-weighted IoU (fwIoU).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "accuracy",
    "auroc",
    "balanced_accuracy",
    "confusion_matrix",
    "segmentation_scores",
    "f1_scores",
    "fw_iou",
    "group_accuracies",
    "group_balanced_accuracy",
    "iou_per_class",
    "mean_iou",
    "worst_group_accuracy",
]


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of correct predictions.

    Parameters
    ----------
    y_true, y_pred : (N,) int
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float((y_true == y_pred).mean()) if y_true.size else float("nan")


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Balanced-class accuracy (BCA): mean recall over the classes present in ``y_true``.

    Parameters
    ----------
    y_true, y_pred : (N,) int
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes = np.unique(y_true)
    return float(np.mean([(y_pred[y_true == c] == c).mean() for c in classes])) if classes.size else float("nan")


def group_accuracies(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray) -> dict[int, float]:
    """Accuracy within each group present in ``groups``.

    Parameters
    ----------
    y_true, y_pred, groups : (N,) int

    Returns
    -------
    {group id: accuracy}
    """
    y_true, y_pred, groups = map(np.asarray, (y_true, y_pred, groups))
    return {int(g): float((y_true[groups == g] == y_pred[groups == g]).mean()) for g in np.unique(groups)}


def worst_group_accuracy(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray) -> float:
    """Worst-group accuracy (WGA): the lowest per-group accuracy (GERNE, Table 1)."""
    accs = group_accuracies(y_true, y_pred, groups)
    return min(accs.values()) if accs else float("nan")


def group_balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray) -> float:
    """Group-balanced accuracy (GBA): the mean of per-group accuracies."""
    accs = group_accuracies(y_true, y_pred, groups)
    return float(np.mean(list(accs.values()))) if accs else float("nan")


def f1_scores(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int | None = None) -> dict[str, float]:
    """F1, micro- and macro-averaged.

    Parameters
    ----------
    y_true, y_pred : (N,) int class indices, or (N, C) {0, 1} multi-label indicators
    n_classes : classes for single-label input (default: max label + 1)

    Returns
    -------
    {"f1_micro": float, "f1_macro": float}
        Macro averages over classes with any true or predicted sample.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.ndim == 1:
        n = n_classes or int(max(y_true.max(initial=0), y_pred.max(initial=0))) + 1
        y_true, y_pred = np.eye(n, dtype=bool)[y_true], np.eye(n, dtype=bool)[y_pred]
    t, p = y_true.astype(bool), y_pred.astype(bool)
    tp, fp, fn = (t & p).sum(0), (~t & p).sum(0), (t & ~p).sum(0)
    micro = 2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1)
    used = (tp + fp + fn) > 0
    per = 2 * tp[used] / (2 * tp[used] + fp[used] + fn[used])
    return {"f1_micro": float(micro), "f1_macro": float(per.mean()) if per.size else float("nan")}


def auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve for binary labels (Mann–Whitney U, ties counted half).

    Parameters
    ----------
    y_true : (N,) {0, 1}
    scores : (N,) float, higher = more positive
    """
    y_true, scores = np.asarray(y_true).astype(bool), np.asarray(scores, float)
    n_pos, n_neg = int(y_true.sum()), int((~y_true).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """(n_classes, n_classes) int64 counts, rows = truth, columns = prediction; pixels of ``ignore_index`` skipped.

    Parameters
    ----------
    y_true, y_pred : (...) int, same shape (e.g. (N, H, W) label maps)
    """
    t, p = np.asarray(y_true).ravel().astype(np.int64), np.asarray(y_pred).ravel().astype(np.int64)
    keep = (t >= 0) & (t < n_classes)
    if ignore_index is not None:
        keep &= t != ignore_index
    return np.bincount(t[keep] * n_classes + p[keep], minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """IoU of each class from a confusion matrix; NaN for a class absent from truth and prediction.

    Parameters
    ----------
    cm : (C, C) int, rows = truth
    """
    tp = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(cm: np.ndarray) -> float:
    """Mean IoU over the classes present in truth or prediction."""
    iou = iou_per_class(cm)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def fw_iou(cm: np.ndarray) -> float:
    """Frequency-weighted IoU: per-class IoU weighted by the class's share of true pixels (PSCL thesis, ch. 5)."""
    freq = cm.sum(1) / max(cm.sum(), 1)
    iou = np.nan_to_num(iou_per_class(cm))
    return float((freq * iou).sum())


def segmentation_scores(cm: np.ndarray) -> dict[str, float]:
    """Pixel F1 (macro and the paper's "micro") and mean IoU from a confusion matrix (Ciga & Martel §3.2, eq. 1-3).

    ``f1_macro`` averages the per-class F1 over classes present in truth or prediction. ``f1_micro`` is
    Ciga & Martel's "micro": the per-class F1 weighted by each class's share of the true pixels ("weighing
    the scores per ground truth ratios"), i.e. scikit-learn's ``average="weighted"``; both are equal on a
    two-class problem only when the classes are balanced, as their text notes for F1 itself.

    Parameters
    ----------
    cm : (C, C) int, rows = truth, columns = prediction
    """
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    denom = cm.sum(0) + cm.sum(1)  # 2 tp + fp + fn
    used = denom > 0
    f1 = np.where(used, 2 * tp / np.where(used, denom, 1), 0.0)
    support = cm.sum(1)
    return {"f1_macro": float(f1[used].mean()) if used.any() else float("nan"),
            "f1_micro": float((f1 * support).sum() / support.sum()) if support.sum() else float("nan"),
            "miou": mean_iou(cm)}
