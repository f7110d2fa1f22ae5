"""Paper-style result tables: GERNE's Table 1 (WGA and BCA per threshold, mean ± std over seeds), Ciga & Martel's
Table D.5, and USegMix's Table 1 (Acc, F1, Kappa and Avg↑ per model and synthetic count).

Used by ``histoweak report --table1`` (runs from MLflow) and by
``benchmarks/gerne_vs_erm.py`` (runs it trains itself).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histoweak import metrics as M
from histoweak.methods.base import tissue_groups

__all__ = ["TABLE1_ROWS", "format_leaderboard", "FIG5_METRICS", "fig5_arm", "fig5_arm_parts", "fig5_arms", "fig5_cells", "fig5_relative", "format_table1", "format_table_d5", "group_count_artifacts", "group_counts", "metrics_at_tau", "table1_cells",
           "write_csv", "USEGMIX_KEYS", "USEGMIX_METRICS", "format_usegmix_table", "usegmix_cells", "usegmix_gain",
           "MAGNET_COLUMNS", "format_magnet_table", "magnet_cells", "magnet_row_label",
           "cam_hist_classes", "cam_histograms", "format_heatmap", "heatmap_cell_text", "heatmap_cells",
           "heatmap_column_labels", "heatmap_grid", "format_value", "param", "short_names"]

#: (row label, method, selection metric) in the paper's order, with group-balanced resampling (GERNE at c = 1,
#: beta = 0: the baseline its extrapolation starts from) before GERNE
TABLE1_ROWS = (("ERM", "erm", "val_bca"), ("ERM", "erm", "val_wga"), ("Resampling", "resampling", "val_wga"),
               ("GERNE", "gerne", "val_wga"))


def metrics_at_tau(pred: dict, tau: float, prefix: str) -> dict[str, float]:
    """Accuracy metrics of binary predictions with groups recomputed at threshold ``tau``.

    ``pred`` as from ``histoweak.train.predict_split``: ``targets``, ``probs`` and ``tissue_ratio``;
    groups do not depend on the model, so any run can be scored at any threshold after the fact.
    """
    y, p = pred["targets"], pred["probs"].argmax(1)
    g = tissue_groups(y, pred["tissue_ratio"], tau)
    acc = M.group_accuracies(y, p, g)
    return {f"{prefix}_bca": M.balanced_accuracy(y, p), f"{prefix}_wga": M.worst_group_accuracy(y, p, g),
            f"{prefix}_acc": M.accuracy(y, p), **{f"{prefix}_acc_group{k}": v for k, v in acc.items()},
            **{f"{prefix}_n_group{k}": int((g == k).sum()) for k in range(4)}}


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    v = 100 * np.asarray(values, float)
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v[0]:.2f}"


def format_table1(cells: dict[tuple[str, str], dict[float, list[tuple[float, float]]]], taus: list[float],
                  title: str = "", rows: tuple[tuple[str, str, str], ...] = TABLE1_ROWS) -> str:
    """The paper's Table 1 layout.

    cells : ``{(method, selection metric): {tau: [(test WGA, test BCA) per seed]}}``
    rows : (row label, method key of ``cells``, selection metric), in print order
    """
    head = ["Method", "Eval. metric"] + [f"{m} (tau={t:g})" for t in taus for m in ("WGA", "BCA")]
    lines = []
    for label, method, sel in rows:
        row = [label, sel.removeprefix("val_").upper()]
        for t in taus:
            runs = cells.get((method, sel), {}).get(t, [])
            row += [_cell([w for w, _ in runs]), _cell([b for _, b in runs])]
        lines.append(row)
    n = {(m, s): max((len(v) for v in cells.get((m, s), {}).values()), default=0) for _, m, s in rows}
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
    out = [title] if title else []
    out.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in lines]
    out.append(f"test accuracies (%), mean ± std over seeds (runs per cell: {', '.join(f'{m}/{s}: {k}' for (m, s), k in n.items())})")
    return "\n".join(out)


_COUNT_CHUNK_ROWS = 65536  # group_counts decodes and counts this many rows at a time


def group_counts(tile_table: str, target: str, n_classes: int, tau: float) -> dict[str, dict[int, int]]:
    """Tiles per group (``tissue_groups`` at ``tau``) in each split, read from the table's metadata columns only.

    The rows stream through in chunks of about ``_COUNT_CHUNK_ROWS`` and only the counts are kept, so memory
    does not grow with the table.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from histoweak.data.streaming import decode_tiles
    from histoweak.methods.base import Task

    files = sorted(str(p) for p in Path(tile_table).rglob("*.parquet"))
    if not files:
        raise ValueError(f"{tile_table}: no Parquet files")
    task = Task(target, n_classes)
    splits = pa.array(["train", "val", "test"])
    counts = np.zeros((len(splits), 4), np.int64)  # split x group

    def add(batches: list) -> None:
        t = pa.Table.from_batches(batches)
        groups = task.groups(decode_tiles(t), tau)
        split = pc.index_in(t.column("split"), value_set=splits).fill_null(-1).to_numpy()
        keep = split >= 0  # rows of other splits are not counted
        counts.flat[:] += np.bincount(4 * split[keep] + groups[keep], minlength=counts.size)

    # the scanner yields a batch per row group (128 rows in tiled tables); counting per batch would cost 5x more
    chunk, rows = [], 0
    for batch in pads.dataset(files, format="parquet").to_batches(columns=["split", "labels", "label", "tissue_ratio"]):
        chunk.append(batch)
        rows += batch.num_rows
        if rows >= _COUNT_CHUNK_ROWS:
            add(chunk)
            chunk, rows = [], 0
    if rows:
        add(chunk)
    return {s: {g: int(n) for g, n in enumerate(row)} for s, row in zip(splits.to_pylist(), counts) if row.any()}


def group_count_artifacts(train: dict, swept: dict[str, dict], tile_table: str, n_classes: int
                          ) -> tuple[dict, dict[str, list[dict]]]:
    """Tiles per group and split at every ``group_tau`` a sweep uses (fixed in ``train`` or a choice/grid in
    ``swept``): a figure and a table per threshold, named ``group_counts_tau<tau>``."""
    from histoweak import figures
    from histoweak.methods.base import GROUP_NAMES, Task

    taus = set()
    if train.get("group_tau") is not None:
        taus.add(float(train["group_tau"]))
    dist = swept.get("train.group_tau")
    if dist and next(iter(dist)) in ("choice", "grid"):
        taus.update(float(t) for t in next(iter(dist.values())))
    target = train.get("target", "class:1")
    figs, tables = {}, {}
    for tau in sorted(taus):
        counts = group_counts(str(tile_table), target, n_classes, tau)
        tables[f"group_counts_tau{tau:g}.csv"] = [{"split": sp, **{GROUP_NAMES[g]: n for g, n in c.items()}}
                                                  for sp, c in counts.items()]
        figs[f"group_counts_tau{tau:g}.png"] = figures.group_counts_figure(counts, GROUP_NAMES,
                                                                           f"tiles per group, tau = {tau:g}")
    return figs, tables


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def table1_cells(runs: list[dict]) -> tuple[dict, list[float]]:
    """Table 1 cells from finished runs, each ``{"params": {...}, "metrics": {...}}`` (MLflow child runs).

    Runs are keyed by (method, selection metric, tau); GERNE runs at c = 1, beta = 0 also fill the resampling
    row. Within a key, the hyperparameter setting
    (every ``swept.*`` parameter except the seed) with the best mean validation score is kept, and
    its seeds' test (WGA, BCA) fill the cell.
    """
    from histoweak.methods import METHODS

    groups: dict = {}
    for r in runs:
        p, m = r["params"], r["metrics"]
        method = p.get("method")
        if method not in ("erm", "gerne") or p.get("group_tau") in (None, "None"):
            continue
        sel = p.get("select") if p.get("select") not in (None, "None") else METHODS[method].selection_metric
        tau = float(p["group_tau"])
        setting = tuple(sorted((k, v) for k, v in p.items()
                               if k.startswith("swept.") and k not in ("swept.train.seed", "swept.train.group_tau",
                                                                       "swept.train.select")))
        score = m.get(f"best_{sel}", m.get(sel))
        if score is None or "test_wga" not in m:
            continue
        groups.setdefault((method, sel, tau), {}).setdefault(setting, []).append((score, m["test_wga"], m["test_bca"]))
        if method == "gerne" and _num(p.get("hparams.c")) == 1.0 and _num(p.get("hparams.beta")) == 0.0:
            groups.setdefault(("resampling", sel, tau), {}).setdefault(setting, []).append(
                (score, m["test_wga"], m["test_bca"]))
    cells: dict = {}
    for (method, sel, tau), settings in groups.items():
        best = max(settings.values(), key=lambda runs: np.mean([s for s, _, _ in runs]))
        cells.setdefault((method, sel), {})[tau] = [(w, b) for _, w, b in best]
    taus = sorted({tau for (_, _, tau) in groups}, reverse=True)
    return cells, taus


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """``rows`` as a CSV with the union of their keys as columns (in first-seen order)."""
    import csv

    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return Path(path)


def format_leaderboard(rows: list[dict], score: str, swept: list[str], headline: tuple[str, ...] = (),
                       width: int = 100) -> str:
    """A leaderboard that fits ``width`` columns: rank, trial, swept parameters, ``score`` and headline metrics.

    Swept parameters show by their last name (``swept.hparams.lr`` -> ``lr``); columns that do not fit are
    dropped, least important first (headline metrics from the last, then swept parameters), and counted.
    """
    def short(key: str) -> str:
        name = key.rsplit(".", 1)[-1]
        return name if sum(k.rsplit(".", 1)[-1] == name for k in swept) == 1 else key.removeprefix("swept.")

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)[:14]

    present = [m for m in headline if any(m in r for r in rows)]
    ranked = ["#", "trial", score, *swept, *present]  # most important first
    cells = [{"#": str(i + 1), "trial": str(r.get("trial", "")).removeprefix("trial_"),
              **{k: fmt(r.get(k)) for k in ranked[2:]}} for i, r in enumerate(rows)]
    header = {"#": "#", "trial": "trial", score: score, **{k: short(k) for k in swept}, **{m: m for m in present}}
    col_w = {k: max(len(header[k]), *(len(c[k]) for c in cells)) if cells else len(header[k]) for k in ranked}
    shown, used = [], 0
    for k in ranked:
        if used + col_w[k] + 2 <= width or k in ("#", "trial"):
            shown.append(k)
            used += col_w[k] + 2
    order = [k for k in ["#", "trial", *swept, score, *present] if k in shown]
    lines = ["  ".join(header[k].ljust(col_w[k]) for k in order)]
    lines += ["  ".join(c[k].ljust(col_w[k]) for k in order) for c in cells]
    if len(shown) < len(ranked):
        lines.append(f"({len(ranked) - len(shown)} more column(s) in the full table)")
    return "\n".join(line.rstrip() for line in lines)


#: Ciga & Martel's Fig. 5 / Table D.5 metrics: (test metric, label)
FIG5_METRICS = (("test_f1_micro", "F1 micro"), ("test_f1_macro", "F1 macro"), ("test_miou", "mIoU"))
_SETTINGS = ("S", "S+C", "S+C*")


def fig5_arm(setting: str, head: str | None) -> str:
    """The row name of a setting trained with a classifier head: the setting itself for the default head
    (``official``), ``"<setting> (<head>)"`` for the others (e.g. ``"S+C (table_a3)"``); **S** has no head."""
    return setting if setting == "S" or head in (None, "", "official") else f"{setting} ({head})"


def fig5_cells(runs: list[dict]) -> dict[tuple[str, float], dict[str, list[float]]]:
    """(arm, s) -> {test metric: one value per run (seed)} from finished ``segcls`` runs, each
    ``{"params": {...}, "metrics": {...}}`` (MLflow child runs; setting, s and head swept or fixed); the arm is
    ``fig5_arm(setting, head)``."""
    cells: dict = {}
    for r in runs:
        p, m = r["params"], r["metrics"]
        if p.get("method") != "segcls":
            continue
        setting = p.get("swept.hparams.setting") or p.get("hparams.setting")
        s = _num(p.get("swept.hparams.s") or p.get("hparams.s"))
        if setting is None or not isinstance(s, float):
            continue
        arm = fig5_arm(setting, p.get("swept.hparams.head") or p.get("hparams.head"))
        cell = cells.setdefault((arm, s), {k: [] for k, _ in FIG5_METRICS})
        for k, _ in FIG5_METRICS:
            if k in m:
                cell[k].append(float(m[k]))
    return cells


def fig5_arm_parts(arm: str) -> tuple[str, str]:
    """(setting, head) of an arm named by ``fig5_arm``; the head is "" for the default one."""
    setting, _, head = arm.partition(" ")
    return setting, head.strip("()")


def fig5_arms(cells: dict) -> list[str]:
    """The arms of ``cells`` in Table D.5's order: S, S+C, S+C*, each setting followed by its other heads."""
    def order(arm: str) -> tuple[int, str]:
        setting, _ = fig5_arm_parts(arm)
        return (_SETTINGS.index(setting) if setting in _SETTINGS else len(_SETTINGS), arm)

    return sorted({a for a, _ in cells}, key=order)


def fig5_relative(cells: dict) -> dict:
    """Fig. 5's normalisation: every value divided by the mean of **S** at s = 100 % (training on all the
    segmentation patches, the paper's fully supervised baseline), per metric. ``ValueError`` without such runs."""
    base = cells.get(("S", 100.0))
    if not base or not all(base[k] for k, _ in FIG5_METRICS):
        raise ValueError("Fig. 5 is normalised to S at s = 100 %: the sweep has no such finished run")
    ref = {k: float(np.mean(base[k])) for k, _ in FIG5_METRICS}
    return {key: {k: [v / ref[k] if ref[k] else float("nan") for v in vals] for k, vals in cell.items()}
            for key, cell in cells.items()}


def format_table_d5(cells: dict, title: str = "") -> str:
    """Table D.5's layout: a row per setting and metric, a column per s (%), cells "mean ± std" in % over seeds."""
    svals = sorted({s for _, s in cells})
    head = ["setting", "metric", *[f"{s:g}" for s in svals]]
    lines = []
    for setting in fig5_arms(cells):
        for k, label in FIG5_METRICS:
            row = [setting, label]
            for s in svals:
                v = [100 * x for x in cells.get((setting, s), {}).get(k, [])]
                row.append(f"{np.mean(v):.1f} ± {np.std(v):.1f}" if v else "-")
            lines.append(row)
    widths = [max(len(str(r[i])) for r in [head, *lines]) for i in range(len(head))]
    out = [title] if title else []
    out.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in lines]
    n = sorted({len(v[FIG5_METRICS[0][0]]) for v in cells.values()})
    out.append(f"test metrics (%) vs the share s of segmentation patches used, mean ± std over {'/'.join(map(str, n))} seeds")
    return "\n".join(out)


#: USegMix's Table 1 (Wang & Kwak): (test metric, column label, display scale, decimals) -- accuracy is logged
#: as a fraction and shown in %, F1 and kappa as fractions, as the paper prints them
USEGMIX_METRICS = (("test_acc", "Acc(%)", 100.0, 2), ("test_f1_macro", "F1", 1.0, 4), ("test_kappa", "Kappa", 1.0, 4))
#: where a run records its classifier backbone, synthetic tiles per class and batch-mixing baseline; a swept value
#: (``swept.<key>``) wins over the fixed one
USEGMIX_KEYS = {"backbone": "hparams.backbone", "synthetic": "hparams.synthetic_per_class", "mix": "hparams.mix"}
_USEGMIX_KEYS_M = tuple(k for k, *_ in USEGMIX_METRICS)
_NO_MIX = ("", "none", "null")


def _param(p: dict, key: str):
    v = p.get(f"swept.{key}", p.get(key))
    return None if v in (None, "None") else v


def usegmix_gain(base: dict[str, float], row: dict[str, float], metrics: tuple[str, ...] = _USEGMIX_KEYS_M) -> float:
    """Table 1's "Avg↑": the mean **relative** gain of a row over the same model's "No" (no synthesis) row,
    ``mean_k (row_k - base_k) / base_k`` over Acc, F1 and Kappa, as a fraction (0.025 = +2.5 %).

    This is the definition that reproduces the paper's printed column: 23 of its 24 values to the printed
    three decimals (the 24th, DenseNet121 +300 on Prostate, is printed -0.020 where its own numbers give
    +0.020: a sign misprint). The mean of absolute differences (accuracy as a fraction) does not: it gives
    0.021 for EfficientNet-B0 +300 on Test I, printed 0.025. Being relative, the gain does not depend on
    whether accuracy is in % or a fraction.

    base, row : ``{metric: value}`` holding every key of ``metrics``.
    """
    missing = [k for k in metrics if k not in base or k not in row]
    if missing:
        raise ValueError(f"usegmix_gain: metric(s) {missing} missing; need {list(metrics)}")
    zero = [k for k in metrics if base[k] == 0]
    if zero:
        raise ValueError(f"usegmix_gain: the base row's {zero} is 0; a relative gain needs non-zero bases")
    return float(np.mean([(row[k] - base[k]) / base[k] for k in metrics]))


def usegmix_cells(runs: list[dict], backbone_key: str = USEGMIX_KEYS["backbone"],
                  synthetic_key: str = USEGMIX_KEYS["synthetic"], mix_key: str = USEGMIX_KEYS["mix"],
                  metrics: tuple[str, ...] = _USEGMIX_KEYS_M) -> dict[tuple[str, int | str], dict[str, list[float]]]:
    """Table 1 cells from finished runs, each ``{"params": {...}, "metrics": {...}}`` (MLflow child runs,
    parameter values as strings or numbers).

    Returns ``{(backbone, synthesis): {test metric: one value per run}}``, where ``synthesis`` is the number
    of synthetic tiles per class (0 is the paper's "No"; a run without ``synthetic_key`` counts as 0) or, for
    a run with a batch-mixing baseline (``mix_key`` not none: ``"cutmix"``, ``"mixup"``, ``"cutout"``), the
    baseline's name (``"cutmix+300"`` with synthetic tiles as well). Every run of a cell counts as one seed:
    sweep nothing else than backbone, count, mix and seed, or filter ``runs`` first. Runs without a backbone or
    without all of ``metrics`` are left out.
    """
    cells: dict = {}
    for r in runs:
        p, m = r["params"], r["metrics"]
        backbone = _param(p, backbone_key)
        if backbone is None or not all(k in m for k in metrics):
            continue
        n = _param(p, synthetic_key)
        n = 0 if n is None else int(float(n))
        mix = _param(p, mix_key)
        mix = None if mix is None or str(mix).strip().lower() in _NO_MIX else str(mix)
        synthesis = n if mix is None else (mix if n == 0 else f"{mix}+{n}")
        cell = cells.setdefault((str(backbone), synthesis), {k: [] for k in metrics})
        for k in metrics:
            cell[k].append(float(m[k]))
    return cells


def _mean_std(values: list[float], scale: float, digits: int) -> str:
    if not values:
        return "-"
    v = scale * np.asarray(values, float)
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else f"{v[0]:.{digits}f}"


def format_usegmix_table(cells: dict[tuple[str, int | str], dict[str, list[float]]], title: str = "",
                         metrics: tuple[tuple[str, str, float, int], ...] = USEGMIX_METRICS) -> str:
    """Table 1's layout: per model (sorted by name) the rows No, then the synthetic counts ascending, then any
    baseline rows (``"cutmix"``, …) by name; a column per metric (mean ± sample std over seeds, one value
    without ±) and Avg↑ (``usegmix_gain`` of the row's means over the model's No row's, printed as the paper
    prints it: a fraction to three decimals; "-" without a No row).

    cells : as from ``usegmix_cells``, keyed ``(backbone, synthesis)``.
    metrics : (test metric, column label, display scale, decimals), as ``USEGMIX_METRICS``.
    """
    keys = tuple(k for k, *_ in metrics)

    def means(c: dict | None) -> dict[str, float] | None:
        return {k: float(np.mean(c[k])) for k in keys} if c and all(c.get(k) for k in keys) else None

    head = ["Model", "Synthesis per class", *[label for _, label, *_ in metrics], "Avg↑"]
    lines = []
    for model in sorted({b for b, _ in cells}):
        # counts ascending (0 = No first), then baselines by name
        rows = sorted((s for b, s in cells if b == model),
                      key=lambda s: (isinstance(s, str), 0 if isinstance(s, str) else s, str(s)))
        base = means(cells.get((model, 0)))
        for i, s in enumerate(rows):
            c = cells[(model, s)]
            row = [model if i == 0 else "", "No" if s == 0 else str(s)]
            row += [_mean_std(c.get(k, []), scale, digits) for k, _, scale, digits in metrics]
            mine = means(c)
            row.append("" if s == 0 else f"{usegmix_gain(base, mine, keys):.3f}" if base and mine else "-")
            lines.append(row)
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
    out = [title] if title else []
    out.append("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines]
    n = sorted({len(v) for c in cells.values() for v in c.values()})
    out.append(f"test metrics, mean ± std over seeds (runs per cell: {'/'.join(map(str, n)) or 0}); "
               "Avg↑: mean relative gain of the metrics over the model's No row (0.025 = +2.5 %)")
    return "\n".join(out)


#: MagNets' Table 1 columns: (test metric, column label, display scale, decimals)
MAGNET_COLUMNS = (("test_auroc_macro", "Macro", 100, 0), ("test_auroc_micro", "Micro", 100, 0),
                  ("test_auroc_itc", "ITC", 100, 0), ("test_auroc_macro_micro", "Macro & Micro", 100, 0),
                  ("test_auroc", "All", 100, 0), ("test_pixels_read_per_slide", "Pixels read / slide", 1, 0),
                  ("test_tiling_pixels_per_slide", "Tiling / slide", 1, 0), ("test_pixels_ratio", "Tiling ÷ read", 1, 1),
                  ("test_seconds_per_slide", "s / slide", 1, 2))

_MAGNET_NAMES = {"mean_rgb": "Mean RGB baseline", "attention_mil": "Attention-MIL, every tile"}


def magnet_row_label(params: dict) -> str | None:
    """The Table 1 row of a whole-slide run from its parameters (MLflow's, values as strings): the baselines by
    name, a MagNet by its layers, patches per layer, sampler and learning rate; None for other methods."""
    method = _param(params, "method")
    if method in _MAGNET_NAMES:
        return _MAGNET_NAMES[method]
    if method != "magnet":
        return None
    layers = _param(params, "hparams.layers") or 3
    patches = _param(params, "hparams.patches") or 2
    sampler = _param(params, "hparams.sampler") or "lms"
    lr = _param(params, "hparams.lr")
    return f"{layers}-layer MagNet (P = {patches}, {sampler}" + (f", lr {float(lr):g})" if lr else ")")


def magnet_cells(runs: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Table 1 cells from finished runs (``{"params", "metrics"}``): ``{row label: {test metric: one value per
    run}}``; every run of a row counts as one seed."""
    cells: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        label = magnet_row_label(r["params"])
        if label is None or "test_auroc" not in r["metrics"]:
            continue
        cell = cells.setdefault(label, {})
        for k, *_ in MAGNET_COLUMNS:
            if k in r["metrics"]:
                cell.setdefault(k, []).append(float(r["metrics"][k]))
    return cells


def format_magnet_table(cells: dict[str, dict[str, list[float]]], title: str = "") -> str:
    """MagNets' Table 1 layout (AUROC % per size class, Macro & Micro, All) plus pixels read per slide, what
    tiling the same slides' tissue at the finest level read would read, their ratio and seconds per slide;
    mean ± sample std over seeds. Rows: the baselines, then MagNets by name."""
    head = ["Model", *[label for _, label, *_ in MAGNET_COLUMNS]]
    order = sorted(cells, key=lambda name: (name not in _MAGNET_NAMES.values(), name))
    lines = []
    for name in order:
        c = cells[name]
        row = [name]
        for k, _, scale, digits in MAGNET_COLUMNS:
            vals = [v for v in c.get(k, []) if v == v]
            if not vals:
                row.append("-")
            elif scale == 1 and digits == 0:  # pixel counts
                row.append(f"{np.mean(vals):.3g}")
            else:
                row.append(_mean_std(vals, scale, digits))
        lines.append(row)
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
    out = [title] if title else []
    out.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in lines]
    return "\n".join(out)


def param(run: dict, key: str):
    """A run's value of ``key`` (``hparams.beta``, ``train.epochs``, ``data.shortcut``): ``swept.<key>``, else
    ``<key>``, else, for ``train.<name>``, ``<name>`` (train fields are logged at the top level). Numeric strings
    become floats; missing or ``"None"`` is None."""
    p = run["params"]
    for k in (f"swept.{key}", key, key.removeprefix("train.") if key.startswith("train.") else None):
        if k is not None and k in p:
            v = p[k]
            return None if v in (None, "None") else _num(v)
    return None


def _order(v) -> tuple:
    """Sort key for parameter values that may mix None, numbers and strings."""
    return (v is not None, isinstance(v, str), v if isinstance(v, (int, float)) else str(v))


def _finite(run: dict, metric: str) -> float | None:
    v = run["metrics"].get(metric)
    return float(v) if v is not None and np.isfinite(float(v)) else None


def heatmap_cells(runs: list[dict], knob: str, baseline, metric: str, axes: list[str] | tuple[str, ...] = (),
                  seed_key: str = "train.seed") -> dict[tuple, dict]:
    """Gain of each value of ``knob`` over ``knob = baseline`` in ``metric``, per combination of ``axes`` values,
    paired by seed (issue 15: where do PSCL's λ and GERNE's β help?).

    runs : ``{"params", "metrics"}`` (MLflow child runs; values looked up with ``param``). Runs without ``knob``
        are left out; a run's metric counts even when it diverged (``diverged`` == 1: its metric, if any, is from
        a checkpoint before the divergence).
    baseline : the knob's reference value (``0`` or ``"0"``: compared after the same number parsing).

    Returns ``{(knob value, *axis values): cell}`` over every knob value (the baseline's included) and every
    combination of axis values some run has, with each cell

    - ``"baseline"``: whether this is a baseline row
    - ``"runs"``, ``"diverged"``: runs of the cell, and those with ``diverged`` == 1
    - ``"value"``: mean ``metric`` over the cell's runs (NaN without one); ``"base"``: the same for the
      baseline cell of the same axis values
    - ``"gains"``: ``{seed: metric - baseline metric}`` for the seeds both cells have with a finite metric
      (several runs of one cell and seed are averaged first); ``"n"`` = their number, ``"mean"`` and
      ``"std"`` (ddof=1; NaN under 2 seeds) = their mean and spread. Empty/0/NaN in baseline rows.

    ``ValueError`` without runs, without runs of the baseline, or without another knob value.
    """
    if not runs:
        raise ValueError("heatmap: no runs")
    base_value = _num(baseline)
    by_cell: dict[tuple, list[dict]] = {}
    for r in runs:
        v = param(r, knob)
        if v is not None:
            by_cell.setdefault((v, *(param(r, a) for a in axes)), []).append(r)
    values = sorted({k[0] for k in by_cell}, key=_order)
    if base_value not in values:
        raise ValueError(f"heatmap: no run has {knob} = {baseline}" + (f"; values: {values}" if values else
                                                                        f" (no run has {knob} at all)"))
    if len(values) == 1:
        raise ValueError(f"heatmap: every run has {knob} = {baseline}; nothing to compare")
    columns = sorted({k[1:] for k in by_cell}, key=lambda c: tuple(_order(v) for v in c))

    def per_seed(cell_runs: list[dict]) -> dict:
        seeds: dict = {}
        for r in cell_runs:
            m = _finite(r, metric)
            if m is not None:
                seeds.setdefault(param(r, seed_key), []).append(m)
        return {s: float(np.mean(ms)) for s, ms in seeds.items()}

    def mean(xs: list[float]) -> float:
        return float(np.mean(xs)) if xs else float("nan")

    cells = {}
    for col in columns:
        base_runs = by_cell.get((base_value, *col), [])
        base_seeds = per_seed(base_runs)
        base = mean([m for r in base_runs if (m := _finite(r, metric)) is not None])
        for v in values:
            cell_runs = by_cell.get((v, *col), [])
            seeds = per_seed(cell_runs)
            gains = {} if v == base_value else {s: seeds[s] - base_seeds[s] for s in seeds if s in base_seeds}
            g = np.asarray(list(gains.values()), float)
            cells[(v, *col)] = {
                "baseline": v == base_value, "runs": len(cell_runs),
                "diverged": sum(r["metrics"].get("diverged") == 1.0 for r in cell_runs),
                "value": mean([m for r in cell_runs if (m := _finite(r, metric)) is not None]), "base": base,
                "gains": gains, "n": len(gains), "mean": mean(list(g)),
                "std": float(g.std(ddof=1)) if len(g) > 1 else float("nan")}
    return cells


def format_value(v) -> str:
    """A parameter value, short: 0.2, 1e-4, 3, tumor."""
    if not isinstance(v, float) or not np.isfinite(v):
        return str(v)
    if v.is_integer():
        return str(int(v))
    pos = np.format_float_positional(v, trim="-")
    sci = np.format_float_scientific(v, trim="-", exp_digits=1).replace("e+", "e")
    return sci if len(sci) < len(pos) else pos


def short_names(keys: list[str] | tuple[str, ...]) -> list[str]:
    """``hparams.lr`` -> ``lr``, unless another key ends in the same name."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return [s if last.count(s) == 1 else k for k, s in zip(keys, last)]


def heatmap_grid(cells: dict[tuple, dict]) -> tuple[object, list, list[tuple]]:
    """(baseline value, knob values with the baseline first, axis-value columns) of ``heatmap_cells``' cells."""
    base = next(k[0] for k, c in cells.items() if c["baseline"])
    values = [base, *sorted({k[0] for k in cells if k[0] != base}, key=_order)]
    columns = sorted({k[1:] for k in cells}, key=lambda c: tuple(_order(v) for v in c))
    return base, values, columns


def heatmap_column_labels(axes: list[str] | tuple[str, ...], columns: list[tuple], sep: str = " ") -> list[str]:
    """Headers of the axis-value combinations: ``lr=1e-4 shortcut=0.2`` (``all runs`` without axes)."""
    names = short_names(axes)
    return [sep.join(f"{n}={format_value(v)}" for n, v in zip(names, col)) or "all runs" for col in columns]


def heatmap_cell_text(cell: dict) -> str:
    """A gain cell in points: ``+1.23 ± 0.80`` (no ± with one seed), ``-`` without a paired seed, then
    `` (div k/n)`` when ``k`` of the cell's ``n`` runs diverged."""
    if cell["n"] == 0:
        text = "-"
    elif cell["n"] == 1:
        text = f"{100 * cell['mean']:+.2f}"
    else:
        text = f"{100 * cell['mean']:+.2f} ± {100 * cell['std']:.2f}"
    return text + (f" (div {cell['diverged']}/{cell['runs']})" if cell["diverged"] else "")


def format_heatmap(cells: dict[tuple, dict], knob: str, axes: list[str] | tuple[str, ...], metric: str,
                   title: str = "") -> str:
    """``heatmap_cells`` as text: a row per knob value (the baseline's first, showing its mean ``metric`` in %),
    a column per combination of ``axes`` values, gains in points (``heatmap_cell_text``)."""
    base, values, columns = heatmap_grid(cells)
    knob_name = short_names([knob, *axes])[0]
    head = [knob_name, *heatmap_column_labels(axes, columns)]
    lines = []
    for v in values:
        row = [f"{format_value(v)} (base)" if v == base else format_value(v)]
        for col in columns:
            c = cells[(v, *col)]
            if v == base:
                text = "-" if np.isnan(c["value"]) else f"{100 * c['value']:.2f}"
                row.append(text + (f" (div {c['diverged']}/{c['runs']})" if c["diverged"] else ""))
            else:
                row.append(heatmap_cell_text(c))
        lines.append(row)
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
    out = [title] if title else []
    out.append("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines]
    n = sorted({c["n"] for c in cells.values() if not c["baseline"]})
    out.append(f"gain in {metric} over {knob}={format_value(base)} (points), mean ± std over paired seeds "
               f"(paired seeds per cell: {'/'.join(map(str, n))}); the base row: its {metric} (%), mean over runs")
    return "\n".join(out)


_CAM_HIST = "test_cam_hist_"


def _cam_hist_keys(runs: list[dict]) -> list[tuple[str, str, int]]:
    """(metric, class name, bin) of every ``test_cam_hist_<class>_<bin>`` metric of the runs."""
    keys = {k for r in runs for k in r["metrics"] if k.startswith(_CAM_HIST)}
    parts = ((k, *k[len(_CAM_HIST):].rpartition("_")[::2]) for k in keys)
    return [(k, c, int(b)) for k, c, b in parts if c and b.isdigit()]


def cam_hist_classes(runs: list[dict]) -> list[str]:
    """The class names of the runs' ``test_cam_hist_<class>_<bin>`` metrics, sorted (numbers numerically)."""
    names = {c for _, c, _ in _cam_hist_keys(runs)}
    return sorted(names, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))


def cam_histograms(runs: list[dict], knob: str, classes: list[str] | None = None) -> dict[object, np.ndarray]:
    """The thesis's Fig. 5.1 data per knob value: the mean over runs of the ``test_cam_hist_<class>_<bin>``
    metrics (share of the class's pixels with a CAM in [bin / B, (bin + 1) / B)).

    Returns ``{knob value: (n_classes, B) float}``, rows in the order of ``classes`` (default
    ``cam_hist_classes(runs)``), knob values sorted; a bin no run of a value has is NaN. Runs without the knob
    or without any such metric are left out.
    """
    classes = cam_hist_classes(runs) if classes is None else classes
    row = {c: i for i, c in enumerate(classes)}
    keys = [(k, row[c], b) for k, c, b in _cam_hist_keys(runs) if c in row]
    n_bins = 1 + max((b for _, _, b in keys), default=-1)
    stacks: dict = {}
    for r in runs:
        v = param(r, knob)
        if v is None or not any(k in r["metrics"] for k, _, _ in keys):
            continue
        h = np.full((len(classes), n_bins), np.nan)
        for k, c, b in keys:
            if k in r["metrics"]:
                h[c, b] = float(r["metrics"][k])
        stacks.setdefault(v, []).append(h)
    out = {}
    for v in sorted(stacks, key=_order):
        s = np.stack(stacks[v])
        seen = (~np.isnan(s)).sum(0)
        out[v] = np.where(seen > 0, np.nansum(s, 0) / np.maximum(seen, 1), np.nan)
    return out
