"""Figures logged as artifacts (matplotlib, headless)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["confusion_matrix_figure", "group_accuracy_figure", "metric_vs_params_figure"]


def confusion_matrix_figure(cm: np.ndarray, labels: list[str]):
    fig, ax = plt.subplots(figsize=(3 + 0.5 * len(labels), 2.5 + 0.5 * len(labels)))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]}\n{norm[i, j]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=30)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    return fig


def group_accuracy_figure(accs: dict, title: str = "accuracy per group"):
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(accs), 3))
    keys = list(accs)
    ax.bar([str(k) for k in keys], [accs[k] for k in keys], color="tab:blue")
    worst = min(accs, key=accs.get)
    ax.bar([str(worst)], [accs[worst]], color="tab:red", label="worst group")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def metric_vs_params_figure(rows: list[dict], metric: str, params: list[str]):
    """One panel per swept parameter: the sweep's ``metric`` against it (log x for positive spans > 100x)."""
    params = params or ["trial"]
    fig, axes = plt.subplots(1, len(params), figsize=(3.6 * len(params), 3.2), squeeze=False)
    for ax, p in zip(axes[0], params):
        xs = [r.get(p, i) for i, r in enumerate(rows)]
        ys = [r.get(metric, np.nan) for r in rows]
        numeric = all(isinstance(x, (int, float)) for x in xs)
        if numeric:
            ax.scatter(xs, ys)
            pos = [x for x in xs if x > 0]
            if pos and len(pos) == len(xs) and max(pos) / min(pos) > 100:
                ax.set_xscale("log")
            else:
                ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
            ax.tick_params(axis="x", labelrotation=30)
        else:
            labels = sorted({str(x) for x in xs})
            ax.scatter([labels.index(str(x)) for x in xs], ys)
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(p)
        ax.set_ylabel(metric)
    fig.tight_layout()
    return fig
