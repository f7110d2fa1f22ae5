"""Evaluation metrics as pure functions of numpy arrays.

Classification: accuracy, balanced-class accuracy (BCA), per-group accuracy,
worst-group accuracy (WGA), group-balanced accuracy (GBA), F1 (micro,
macro), AUROC. Segmentation: confusion matrix, per-class IoU, mIoU,
frequency-weighted IoU (fwIoU). Ordinal grading: quadratic-weighted Cohen's kappa. Realism of generated
images: Kernel Inception Distance (KID) on feature vectors.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

__all__ = ["auroc_by_size_class", 
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
    "kid",
    "mean_iou",
    "quadratic_kappa",
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


def auroc_by_size_class(y_true: np.ndarray, scores: np.ndarray, size_class: np.ndarray,
                        classes: tuple[str, ...] = ("macro", "micro", "itc")) -> dict[str, float]:
    """Slide-level AUROC overall and per metastasis size class, as MagNets' Table 1 reports it.

    ``all``: every slide. ``<c>``: the positive slides of size class ``c`` against every negative slide;
    ``macro_micro``: the positives of either against every negative. NaN where a side is empty.

    Parameters
    ----------
    y_true : (N,) {0, 1} slide labels
    scores : (N,) float, higher = more likely tumour
    size_class : (N,) str ("negative", "itc", "micro", "macro"; anything else is counted in ``all`` only)
    """
    y_true, scores = np.asarray(y_true).astype(bool), np.asarray(scores, float)
    size_class = np.asarray(size_class, dtype=object)
    out = {"all": auroc(y_true, scores)}
    for name, members in [*((c, (c,)) for c in classes), ("macro_micro", ("macro", "micro"))]:
        keep = ~y_true | (y_true & np.isin(size_class, members))
        out[name] = auroc(y_true[keep], scores[keep])
    return out


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


def quadratic_kappa(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int | None = None) -> float:
    """Quadratic-weighted Cohen's kappa: agreement on an ordinal scale (e.g. grades), chance-corrected.

    ``kappa = 1 - sum(W * O) / sum(W * E)`` with ``O`` the confusion matrix, ``E = outer(O.sum(1), O.sum(0)) / N``
    the counts expected from the marginals alone, and ``W[i, j] = (i - j)^2`` (Cohen 1968; the USegMix paper's
    "Kappa", Table 1). 1 is perfect agreement, 0 chance level, negative worse than chance.

    Distances are between class *indices*: classes 0 and 3 are three grades apart even when 1 and 2 never
    occur. (scikit-learn's ``cohen_kappa_score`` measures them between positions in the sorted labels it sees;
    pass ``labels=range(n_classes)`` to it for the same value.)

    Parameters
    ----------
    y_true, y_pred : (N,) int class indices in [0, n_classes)
    n_classes : classes on the scale (default: max label + 1)

    Returns
    -------
    float
        NaN when undefined: no samples, or truth and prediction both a single and the same class
        (``sum(W * E) = 0``).
    """
    y_true, y_pred = np.asarray(y_true).astype(np.int64).ravel(), np.asarray(y_pred).astype(np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"quadratic_kappa: y_true has {y_true.size} samples but y_pred {y_pred.size}")
    if y_true.size == 0:
        return float("nan")
    n = n_classes or int(max(y_true.max(), y_pred.max())) + 1
    if min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= n:
        raise ValueError(f"quadratic_kappa: labels must lie in [0, {n}), got "
                         f"[{min(y_true.min(), y_pred.min())}, {max(y_true.max(), y_pred.max())}]")
    observed = confusion_matrix(y_true, y_pred, n).astype(np.float64)
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    idx = np.arange(n)
    weights = (idx[:, None] - idx[None, :]) ** 2.0
    chance = float((weights * expected).sum())
    return 1.0 - float((weights * observed).sum()) / chance if chance > 0 else float("nan")


def kid(feats_a: np.ndarray, feats_b: np.ndarray, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
        gamma: float | None = None, coef: float = 1.0, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al., "Demystifying MMD GANs", ICLR 2018, §4 and appendix).

    The unbiased estimator of the squared MMD between the two feature distributions under the polynomial
    kernel ``k(x, y) = (gamma * x.y + coef) ** degree`` (default ``gamma = 1 / D``: ``(x.y / D + 1)^3``),

        MMD² = [sum_{i≠j} k(a_i, a_j)] / (m (m-1)) + [sum_{i≠j} k(b_i, b_j)] / (m (m-1)) - 2 [sum_{i,j} k(a_i, b_j)] / m²

    computed on ``subsets`` random subsets of ``m`` rows of each set (drawn without replacement) and averaged,
    as the authors' reference code does. Unbiased, so it can be slightly negative when the two sets come from
    one distribution; 0 in expectation then.

    Parameters
    ----------
    feats_a : (N, D) float, e.g. backbone features of real tiles
    feats_b : (M, D) float, e.g. of synthetic tiles
    subsets : number of random subsets
    subset_size : rows per subset; capped at ``min(N, M)`` (the reference code's rule), which must be >= 2
    degree, gamma, coef : the polynomial kernel
    seed : the subsets' random draw

    Returns
    -------
    (mean, std) of MMD² over the subsets (std with ``ddof=0``)
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"kid: need (N, D) and (M, D) features with one D, got {a.shape} and {b.shape}")
    m = min(len(a), len(b), subset_size)
    if m < 2:
        raise ValueError(f"kid: need at least 2 rows in each set and subset_size >= 2, got {len(a)}, {len(b)} "
                         f"rows and subset_size {subset_size}")
    if subsets < 1:
        raise ValueError(f"kid: subsets must be >= 1, got {subsets}")
    g = 1.0 / a.shape[1] if gamma is None else gamma
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for s in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx, k_yy, k_xy = ((g * u @ v.T + coef) ** degree for u, v in ((x, x), (y, y), (x, y)))
        values[s] = ((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
                     - 2.0 * k_xy.mean())
    return float(values.mean()), float(values.std())
