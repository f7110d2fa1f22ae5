"""Figures logged as artifacts (matplotlib, headless)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["cam_histogram_figure", "cam_overlay_figure", "classification_test_figures", "confusion_matrix_figure", "group_accuracy_figure", "group_counts_figure", "metric_vs_params_figure",
           "segmentation_samples_figure", "shortcut_figure", "stage2_prediction_figure", "fig5_figure",
           "magnet_zoom_figure", "slide_metric_figures"]


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


def shortcut_figure(pred: dict, target_class: int = 1, tau: float | None = None, bins: int = 10, title: str = ""):
    """GERNE's Fig. 1 (bottom row): where the tissue-size shortcut shows, and where the model fails.

    Normalized histograms over a split of p(r_tumor | y=1), p(r_tumor-tissue | y=1) and
    p(r_tissue | y=0), each bin split into the share of correct (green) and incorrect (red)
    predictions.

    pred : ``targets``, ``probs``, ``tissue_ratio`` and ``class_ratios`` (as from ``predict_split``)
    """
    y, p = np.asarray(pred["targets"]), np.asarray(pred["probs"]).argmax(1)
    r_tumor = np.asarray(pred["class_ratios"])[:, target_class]
    tissue = np.asarray(pred["tissue_ratio"], np.float64)
    panels = [("$r^{tumor}$ | y=1", r_tumor, y == 1),
              ("$r^{tumor-tissue}$ | y=1", np.divide(r_tumor, tissue, out=np.zeros_like(tissue), where=tissue > 0), y == 1),
              ("$r^{tissue}$ | y=0", tissue, y == 0)]
    edges = np.linspace(0, 1, bins + 1)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (name, r, sel) in zip(axes, panels):
        n = max(int(sel.sum()), 1)
        ok = np.histogram(np.clip(r[sel & (y == p)], 0, 1), edges)[0] / n
        bad = np.histogram(np.clip(r[sel & (y != p)], 0, 1), edges)[0] / n
        centres, w = (edges[:-1] + edges[1:]) / 2, 0.9 / bins
        ax.bar(centres, ok, w, color="#4c9f70", label="correct")
        ax.bar(centres, bad, w, bottom=ok, color="#d1495b", label="incorrect")
        if tau is not None and "tissue" in name and "tumor" not in name:
            ax.axvline(tau, color="k", ls="--", lw=1, label=f"tau = {tau:g}")
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of tiles")
        ax.set_title(f"{name}  (n = {int(sel.sum())})", fontsize=9)
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def group_counts_figure(counts: dict[str, dict[int, int]], names: tuple[str, ...], title: str = "tiles per group"):
    """Bars of tiles per group (``names``) for each split: ``{split: {group: count}}``."""
    splits = list(counts)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    w = 0.8 / max(len(splits), 1)
    for i, split in enumerate(splits):
        vals = [counts[split].get(g, 0) for g in range(len(names))]
        bars = ax.bar(np.arange(len(names)) + i * w, vals, w, label=split)
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(np.arange(len(names)) + w * (len(splits) - 1) / 2, names, fontsize=8)
    ax.set_ylabel("tiles")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _class_colours(n: int) -> np.ndarray:
    base = np.array([[255, 255, 255], [200, 40, 40], [60, 160, 60], [60, 90, 200], [230, 170, 30], [150, 60, 170],
                     [40, 170, 170], [120, 120, 120]], np.uint8)
    return base[np.arange(n) % len(base)]


def cam_overlay_figure(samples: dict, class_names: list[str], title: str = ""):
    """Fixed tiles: image | ground truth | pseudo-label | one CAM overlay per class (PSCL's pictures)."""
    images, n = samples["image"], len(samples["image"])
    k = len(class_names) - 1
    colours = _class_colours(len(class_names))
    fig, axes = plt.subplots(n, 3 + k, figsize=(1.6 * (3 + k), 1.6 * n + 0.4), squeeze=False)
    for i in range(n):
        row = [("image", images[i]), ("truth", colours[samples["mask"][i]]), ("pseudo-label", colours[samples["pseudo"][i]])]
        for j, (name, im) in enumerate(row):
            axes[i, j].imshow(im)
            if i == 0:
                axes[i, j].set_title(name, fontsize=8)
        for c in range(k):
            ax = axes[i, 3 + c]
            ax.imshow(images[i])
            ax.imshow(samples["cams"][i][c], cmap="jet", alpha=0.45, vmin=0, vmax=255)
            if i == 0:
                ax.set_title(f"CAM {class_names[c + 1]}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def stage2_prediction_figure(samples: dict, class_names: list[str], title: str = ""):
    """Fixed tiles, one row each: image | ground truth | stage-1 pseudo-label | stage-2 prediction (PSCL stage 2).

    samples : ``image`` (N of (H, W, 3) uint8), ``mask``, ``pseudo`` and ``pred`` (N of (H, W) class indices),
        as from ``PSCLSegmentation.evaluate_batches``; without ``pseudo`` (no stage-1 model) that column is left out.
    """
    return segmentation_samples_figure(samples, class_names, title, {"pseudo": "stage-1 pseudo-label",
                                                                     "pred": "stage-2 prediction"})


def segmentation_samples_figure(samples: dict, class_names: list[str], title: str = "",
                                labels: dict[str, str] | None = None):
    """Fixed tiles, one row each: image | ground truth | each label map of ``samples`` (e.g. the prediction).

    samples : ``image`` (N of (H, W, 3) uint8), ``mask`` and other (N of (H, W) class indices) maps
    labels : column titles of the maps after ``image`` and ``mask``, in order (default: ``{"pred": "prediction"}``)
    Classes in ``cam_overlay_figure``'s colours, with a legend of ``class_names``.
    """
    labels = {"image": "image", "mask": "ground truth", **(labels or {"pred": "prediction"})}
    columns = [(k, name) for k, name in labels.items() if k in samples]
    n, colours = len(samples["image"]), _class_colours(len(class_names))
    legend_rows = -(-len(class_names) // 5)
    height = 1.8 * n + 0.3 * legend_rows + (0.4 if title else 0.1)
    fig, axes = plt.subplots(n, len(columns), figsize=(1.9 * len(columns), height), squeeze=False)
    for i in range(n):
        for j, (key, name) in enumerate(columns):
            axes[i, j].imshow(samples[key][i] if key == "image" else colours[samples[key][i]])
            if i == 0:
                axes[i, j].set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=colours[c] / 255, edgecolor="0.4", label=name) for c, name in enumerate(class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(class_names), 5), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.3 * legend_rows / height, 1, 1))
    return fig


def cam_histogram_figure(hist: np.ndarray, class_names: list[str], title: str = "CAM activation at each class's pixels"):
    """The thesis's Fig. 5.1: distribution of CAM values over the pixels of each class (one panel per class)."""
    k = hist.shape[0]
    fig, axes = plt.subplots(1, k, figsize=(2.6 * k, 2.6), squeeze=False)
    edges = np.linspace(0, 1, hist.shape[1] + 1)
    for c in range(k):
        ax = axes[0, c]
        h = hist[c] / max(hist[c].sum(), 1)
        ax.bar((edges[:-1] + edges[1:]) / 2, h, width=0.9 / hist.shape[1], color="tab:purple")
        ax.set_title(class_names[c + 1], fontsize=9)
        ax.set_xlabel("CAM value")
        if c == 0:
            ax.set_ylabel("fraction of pixels")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def classification_test_figures(pred: dict, target: str, tau: float | None = None) -> dict:
    """A classifier's pictures on test: confusion matrix and, with groups, accuracy per group and the
    shortcut analysis (correct/incorrect per tissue-ratio bin), from ``predict_split``'s predictions."""
    from histoweak import metrics
    from histoweak.methods.base import GROUP_NAMES

    out = {}
    if not pred or "probs" not in pred or pred["probs"].ndim != 2 or target == "labels":
        return out
    y, p = pred["targets"], pred["probs"].argmax(1)
    k = pred["probs"].shape[1]
    out["test_confusion_matrix.png"] = confusion_matrix_figure(metrics.confusion_matrix(y, p, k),
                                                               [f"{target}={i}" for i in range(k)])
    if (pred["groups"] >= 0).all():
        accs = metrics.group_accuracies(y, p, pred["groups"])
        out["test_group_accuracy.png"] = group_accuracy_figure(
            {GROUP_NAMES[g].replace(", ", "\n") if tau is not None else g: a for g, a in accs.items()},
            "test accuracy per group")
    if tau is not None and target.startswith("class:") and "class_ratios" in pred:
        out["test_shortcut_analysis.png"] = shortcut_figure(
            pred, int(target.split(":")[1]), tau, title="test split, best checkpoint: correct and incorrect predictions per bin")
    return out


def class_overlay(rgb: np.ndarray, mask: np.ndarray, n_classes: int, alpha: float = 0.45) -> np.ndarray:
    """``rgb`` with each pixel of a class other than background (0) tinted in that class's colour.

    Parameters
    ----------
    rgb : (h, w, 3) uint8, e.g. a slide thumbnail
    mask : (H, W) int class indices over the same area, resized to (h, w) by nearest neighbour
    n_classes : classes including background (the colours of ``cam_overlay_figure``)

    Returns
    -------
    (h, w, 3) uint8
    """
    from PIL import Image

    h, w = rgb.shape[:2]
    labels = np.asarray(Image.fromarray(np.asarray(mask, np.uint8)).resize((w, h), Image.Resampling.NEAREST))
    colours = _class_colours(n_classes).astype(np.float32)
    tint = (1 - alpha) * rgb.astype(np.float32) + alpha * colours[labels]
    return np.where((labels > 0)[..., None], tint, rgb).round().astype(np.uint8)


def overlay_figure(rgb: np.ndarray, mask: np.ndarray, class_names: list[str], title: str = ""):
    """A slide's thumbnail beside the same thumbnail with its predicted classes coloured (``class_overlay``),
    with a legend of ``class_names``."""
    from matplotlib.patches import Patch

    colours = _class_colours(len(class_names))
    h, w = rgb.shape[:2]
    fig, axes = plt.subplots(1, 2, figsize=(9, 9 * h / (2 * w) + 0.8))
    axes[0].imshow(rgb)
    axes[0].set_title("slide", fontsize=9)
    axes[1].imshow(class_overlay(rgb, mask, len(class_names)))
    axes[1].set_title("predicted classes", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(facecolor=colours[c] / 255, edgecolor="0.4", label=name) for c, name in enumerate(class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(class_names), 6), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


__all__ += ["class_overlay", "overlay_figure"]


def fig5_figure(cells: dict, metrics: tuple[tuple[str, str], ...], relative: bool = True, title: str = ""):
    """Ciga & Martel's Fig. 5: a panel per metric, the metric vs s (%) with a line and a mean ± std band per setting.

    cells : (arm, s) -> {metric: values over seeds} (``report.fig5_cells``, or ``report.fig5_relative``); an arm is a
        setting, or a setting with another classifier head (``report.fig5_arm``): one colour per setting, one line
        style per head
    """
    from histoweak.report import fig5_arm_parts, fig5_arms

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    colours = {"S": "tab:blue", "S+C": "tab:orange", "S+C*": "tab:green"}
    for ax, (key, label) in zip(axes[0], metrics):
        for arm in fig5_arms(cells):
            pts = sorted((s, np.mean(c[key]), np.std(c[key])) for (a, s), c in cells.items() if a == arm and c[key])
            if not pts:
                continue
            s, m, sd = map(np.asarray, zip(*pts))
            setting, head = fig5_arm_parts(arm)
            style = {"": "o-", "avgpool": "s--", "table_a3": "^:"}.get(head, "x-.")
            colour = colours.get(setting, "tab:grey")
            ax.plot(s, m, style, color=colour, label=arm, ms=3)
            if not head:
                ax.fill_between(s, m - sd, m + sd, color=colour, alpha=0.2)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("segmentation patches used, s (%)")
        ax.set_ylabel(f"{label}{' relative to S at s = 100 %' if relative else ''}", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def slide_metric_figures(pred: dict) -> dict:
    """A whole-slide classifier's pictures on test: AUROC per metastasis size class (MagNets' Table 1 columns)
    and pixels read per slide against tiling the slide's tissue at the finest level read (log scale)."""
    from histoweak import metrics

    out = {}
    if not pred or "probs" not in pred:
        return out
    aucs = metrics.auroc_by_size_class(pred["targets"], pred["probs"][:, 1], pred["size_class"])
    fig, ax = plt.subplots(figsize=(5, 3))
    names = ["macro", "micro", "itc", "macro_micro", "all"]
    vals = [aucs[n] for n in names]
    ax.bar(range(len(names)), np.nan_to_num(vals, nan=0.0), color="#4477aa")
    for i, v in enumerate(vals):
        ax.text(i, (0 if np.isnan(v) else v) + 0.02, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", fontsize=8)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(names)), ["Macro", "Micro", "ITC", "Macro & Micro", "All"])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("test AUROC")
    fig.tight_layout()
    out["test_auroc_by_size_class.png"] = fig
    fig, ax = plt.subplots(figsize=(5, 3))
    idx = np.arange(len(pred["pixels"]))
    ax.bar(idx - 0.2, np.maximum(pred["pixels"], 1), 0.4, label="read", color="#4477aa")
    ax.bar(idx + 0.2, np.maximum(pred["tiling_pixels"], 1), 0.4, label="tiling at the finest level read",
           color="#bbbbbb")
    ax.set_yscale("log")
    ax.set_xticks(idx, [str(s)[-12:] for s in pred["slide_id"]], rotation=60, fontsize=6)
    ax.set_ylabel("pixels per slide")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out["test_pixels_read.png"] = fig
    return out


def magnet_zoom_figure(path: str, record: dict, label: int, size_class: str, overview: int = 512):
    """MagNets' Fig. 5 for one slide: the slide (grey-filtered) with the squares chosen at each layer, the
    last layer's patches, and the GRU's probability of tumour after each patch.

    record : a ``MagNet.forward_slides`` record: ``boxes`` (per layer (n, 3) cx, cy, half in canvas
        coordinates), ``leaves`` (n, h, w, 3) uint8, ``step_probs`` (n,)
    """
    from matplotlib.patches import Rectangle

    from histoweak.slides.reader import SlideReader
    from histoweak.slides.regions import grey_filter, read_box

    with SlideReader(path) as reader:
        rgb, _ = read_box(reader, (0.0, 0.0, 1.0), overview)
    leaves, probs = record["leaves"], record["step_probs"]
    n = len(leaves)
    cols = min(n, 9)
    rows = int(np.ceil(n / cols))
    fig = plt.figure(figsize=(4 + 1.1 * cols, max(4.2, 1.2 * rows + 1.8)))
    gs = fig.add_gridspec(rows + 1, cols + 4)
    ax = fig.add_subplot(gs[:, :4])
    ax.imshow(grey_filter(rgb))
    colours = ["#ee3377", "#ffdd00", "#33bbee", "#44dd66"]
    for layer, bx in enumerate(record["boxes"][1:]):
        for cx, cy, half in bx:
            x0, y0 = (cx - half + 1) / 2 * overview, (cy - half + 1) / 2 * overview
            ax.add_patch(Rectangle((x0, y0), half * overview, half * overview, fill=False,
                                   ec=colours[layer % len(colours)], lw=1.2, label=f"layer {layer + 1}"))
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="lower right")
    ax.set_title(f"{str(path).rsplit('/', 1)[-1]}  label={label} ({size_class})", fontsize=8)
    ax.axis("off")
    for i in range(n):
        a = fig.add_subplot(gs[i // cols, 4 + i % cols])
        a.imshow(leaves[i])
        a.set_title(f"{i + 1}", fontsize=6)
        a.axis("off")
    a = fig.add_subplot(gs[rows, 4:])
    a.plot(np.arange(1, n + 1), probs, marker="o", color="#ee3377")
    a.set_ylim(0, 1)
    a.set_xlabel("last-layer patch (GRU step)", fontsize=7)
    a.set_ylabel("P(tumour)", fontsize=7)
    a.tick_params(labelsize=6)
    fig.tight_layout()
    return fig


def heatmap_figure(cells: dict, knob: str, axes: list[str] | tuple[str, ...], metric: str, title: str = ""):
    """``report.heatmap_cells`` as an image: a row per knob value but the baseline, a column per combination of
    ``axes`` values, colour = mean gain in points (red below 0, blue above, limits symmetric), each cell
    annotated with ``report.heatmap_cell_text`` (mean ± std, ``div k/n`` where runs diverged); cells without a
    paired seed grey."""
    from histoweak.report import format_value, heatmap_cell_text, heatmap_column_labels, heatmap_grid, short_names

    base, values, columns = heatmap_grid(cells)
    rows = values[1:]
    gain = np.array([[100 * cells[(v, *c)]["mean"] if cells[(v, *c)]["n"] else np.nan for c in columns]
                     for v in rows])
    lim = float(np.nanmax(np.abs(gain), initial=0.0)) or 1.0  # no gain but 0 (or none): any symmetric range
    cmap = plt.get_cmap("RdBu").with_extremes(bad="0.8")
    fig, ax = plt.subplots(figsize=(2.5 + 1.7 * len(columns), 1.6 + 0.6 * len(rows)))
    im = ax.imshow(np.ma.masked_invalid(gain), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
    for i, v in enumerate(rows):
        for j, c in enumerate(columns):
            cell = cells[(v, *c)]
            text = heatmap_cell_text(cell).replace(" (div", "\n(div")
            dark = np.isfinite(gain[i, j]) and abs(gain[i, j]) > 0.6 * lim
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    names = short_names([knob, *axes])
    ax.set_xticks(range(len(columns)), heatmap_column_labels(axes, columns, "\n"), fontsize=7)
    ax.set_yticks(range(len(rows)), [format_value(v) for v in rows], fontsize=8)
    ax.set_ylabel(f"{names[0]} (vs {names[0]}={format_value(base)})")
    fig.colorbar(im, ax=ax, label=f"gain in {metric} (points)")
    ax.set_title(title or f"{metric}: mean ± std of the gain over paired seeds", fontsize=9, wrap=True)
    fig.tight_layout()
    return fig


def cam_histograms_figure(hists: dict, class_names: list[str], title: str = "", knob: str = ""):
    """The thesis's Fig. 5.1 per knob value (e.g. PSCL's λ): a panel per class, the share of the class's pixels
    per CAM-value bin as a step line per knob value.

    hists : ``{knob value: (n_classes, B)}`` (``report.cam_histograms``), rows named by ``class_names``
    knob : the legend's name of the values (``lam`` -> ``lam=0.1``)
    """
    from histoweak.report import format_value

    k = len(class_names)
    fig, axes = plt.subplots(1, k, figsize=(2.8 * k + 0.6, 2.8), squeeze=False, sharey=True)
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(hists), 1)))
    for (v, h), colour in zip(hists.items(), colours):
        edges = np.linspace(0, 1, h.shape[1] + 1)
        label = f"{knob}={format_value(v)}" if knob else format_value(v)
        for c in range(k):
            axes[0, c].stairs(h[c], edges, color=colour, lw=1.4, label=label)
    for c, ax in enumerate(axes[0]):
        ax.set_title(class_names[c], fontsize=9)
        ax.set_xlabel("CAM value")
    axes[0, 0].set_ylabel("fraction of the class's pixels")
    axes[0, -1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


__all__ += ["cam_histograms_figure", "heatmap_figure"]
