"""Segmentation from classification labels: S vs S+C vs S+C* against the share s of segmentation patches
(Ciga & Martel, Fig. 5 / Table D.5), with the classifier head as an arm, on synthetic slides with pixel truth.

    python benchmarks/segcls_settings.py                 # s in {0, 1, 2.5, 5, 100}, 3 seeds, the 3 heads at s = 5: 42 runs
    python benchmarks/segcls_settings.py --quick         # s in {5, 100}, 1 seed, official head (part of `make bench`)

Everything goes through the platform: the ``wsss`` synthetic preset with 10 slides (6 train, 1 val, 3 test: a
cell is never one slide's luck; 128-px tiles that fall by §3.3's rule into segmentation, classification and
ignored tiles without any knob turned for this method) and ``search_spaces/segcls.yaml`` run as Ray Tune sweeps
recorded in MLflow (experiment ``segcls-bench``), their grids replaced by the benchmark's.

The regime is the authors' code (the method's defaults): the ``official`` head (max of each segmentation
channel), classification patches in the pixel loss with their constant mask, bilinear upsampling, inputs
standardised by the training tiles' statistics, Adam 1e-4, batches of 20 + 20. Every run makes the same number
of steps (``--epochs`` × one pass over the whole segmentation pool); S's validation curve at s = 100 % is printed
to show whether that budget lets S converge. The other heads (``avgpool``, ``table_a3`` = the paper's Table A.3)
are arms of S+C at ``--head-s`` (``--head-settings S+C S+C*`` adds S+C*). S+C at s = 100 % is S (no
classification patch is left), so it is not run; S+C* runs at ``--star-s``. The table is printed and written
after each sweep. The default form is 42 runs, ~100 minutes on 2 cores.

Prints Table D.5's layout, per-class IoU at the low shares, and checks the target: S+C >= S + 10 F1-macro points
at s = 5 %, per head; S+C* within 5 points of S at s = 100 %. Draws Fig. 5 into ``results/segcls_fig5.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, report  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "segcls-bench"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--s", type=float, nargs="+", default=[0, 1, 2.5, 5, 100],
                    help="shares of segmentation patches (%%)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6, help="passes over the segmentation pool (15 steps each)")
    ap.add_argument("--heads", nargs="*", default=["avgpool", "table_a3"],
                    help="classifier heads run as extra arms of S+C and S+C* (the official head runs everywhere)")
    ap.add_argument("--head-s", type=float, nargs="+", default=[5], help="the shares the extra heads run at")
    ap.add_argument("--star-s", type=float, nargs="+", default=[0, 5, 100], help="the shares S+C* runs at")
    ap.add_argument("--head-settings", nargs="+", default=["S+C"], help="settings the extra heads run in")
    ap.add_argument("--slides", type=int, default=10, help="synthetic wsss slides (60/10/30 %% train/val/test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.s, args.star_s, args.seeds, args.epochs, args.heads, args.slides = [5, 100], [5, 100], 1, 2, [], 6

    from histoweak import tracking
    from histoweak._ray import init_ray
    from histoweak.data.defaults import default_tile_table, n_classes_of
    from histoweak.report import fig5_arm
    from histoweak.tune import load_search_space, run_sweep

    # the preset's 6 slides give one test slide; 10 slides at 60/10/30 give 6 train, 1 val and 3 test slides
    data = {} if args.slides == 6 else {"n_slides": args.slides, "splits": (0.6, 0.1, 0.3)}
    table = str(default_tile_table(preset="wsss", **data))
    base = load_search_space(ROOT / "search_spaces" / "segcls.yaml")
    base = base.with_overrides({"name": EXPERIMENT, "train.epochs": args.epochs})
    seeds = {"train.seed": {"grid": list(range(args.seeds))}}
    # the paper's arms first, then the other heads
    sweeps = [("S", args.s, "official"), ("S+C", [s for s in args.s if s < 100], "official")]
    sweeps += [("S+C*", args.star_s, "official")]
    sweeps += [(setting, args.head_s, head) for head in args.heads for setting in args.head_settings]
    init_ray()
    runs: list = []
    out: dict = {}
    for setting, svals, head in sweeps:
        if not svals:
            continue
        space = base.with_params({"hparams.setting": {"grid": [setting]}, "hparams.head": {"grid": [head]},
                                  "hparams.s": {"grid": [float(s) for s in svals]}, **seeds})
        print(f"segcls bench: {fig5_arm(setting, head)} at s = {svals} %, {args.seeds} seed(s)", flush=True)
        run_sweep(space, table, n_classes_of(table), storage=str(ROOT / "benchmarks" / ".cache" / "segcls"))
        _, children = tracking.latest_sweep(EXPERIMENT)
        done = [c for c in children if c.info.status == "FINISHED"]
        if len(done) < len(children) or not done:
            raise RuntimeError(f"segcls bench: {len(children) - len(done)} of {len(children)} runs of "
                               f"{fig5_arm(setting, head)} did not finish (see the sweep's log above)")
        runs += done
        out = summarize(runs, args)  # after every sweep: a run stopped early leaves its table
    return out


def summarize(runs, args) -> dict:
    """Table D.5, S's validation curve, per-class IoU, Fig. 5 and the targets from the finished runs so far."""
    from histoweak.report import fig5_arm, fig5_cells, format_table_d5

    cells = fig5_cells([{"params": c.data.params, "metrics": c.data.metrics} for c in runs])
    print(format_table_d5(cells, title=f"Table D.5 layout (synthetic wsss, {args.slides} slides, test split)"))
    curve = s_curve(runs)
    if curve:
        print("S at s = 100 %: validation F1 macro by epoch (mean over seeds): "
              + "  ".join(f"{e + 1}: {100 * v:.1f}" for e, v in enumerate(curve)))
    class_iou = per_class_iou(runs, [s for s in args.s if s <= 5])
    for line in class_iou["lines"]:
        print(line)
    draw_fig5(cells, args.quick)

    def mean(arm, s, key="test_f1_macro"):
        v = cells.get((arm, float(s)), {}).get(key, [])
        return float(np.mean(v)) if v else float("nan")

    rows = [{"arm": arm, "s": s, **{k: mean(arm, s, k) for k in ("test_f1_micro", "test_f1_macro", "test_miou")},
             "seeds": len(cells[(arm, s)]["test_f1_macro"])} for arm, s in sorted(cells, key=lambda k: (k[1], k[0]))]
    notes = {}
    for head in ["official", *args.heads]:
        for setting in ("S+C", "S+C*"):
            arm = fig5_arm(setting, head)
            for s in sorted({s for a, s in cells if a == arm}):
                if s < 100:
                    notes[f"{arm} - S, F1 macro (points) at s={s:g}"] = 100 * (mean(arm, s) - mean("S", s))
        gain = 100 * (mean(fig5_arm("S+C", head), 5) - mean("S", 5))
        notes[f"target S+C >= S + 10 at s=5, head {head}"] = ("met" if gain >= 10 else "NOT met") if gain == gain else "-"
    full_gap = 100 * (mean("S+C*", 100) - mean("S", 100))
    notes["S+C* - S at s=100, F1 macro (points)"] = full_gap
    notes["target |S+C* - S| <= 5 at s=100"] = ("met" if abs(full_gap) <= 5 else "NOT met") if full_gap == full_gap else "-"
    notes["S val F1 macro by epoch at s=100"] = " ".join(f"{100 * v:.1f}" for v in curve)
    notes["steps per run"] = f"{args.epochs} epochs x one pass over the segmentation pool"
    report("segcls_settings_quick" if args.quick else "segcls_settings", rows + class_iou["rows"], notes)
    gain = {s: 100 * (mean("S+C", s) - mean("S", s)) for s in sorted({s for a, s in cells if a == "S+C"})}
    return {"cells": cells, "curve": curve, "gain": gain, "full_gap": full_gap}


def s_curve(runs) -> list[float]:
    """S at s = 100 %: the validation F1 macro after each epoch, mean over its runs (from MLflow's history)."""
    from mlflow.tracking import MlflowClient

    from histoweak import tracking
    from histoweak.report import param

    client = MlflowClient(tracking.tracking_uri())
    hist = []
    for c in runs:
        run = {"params": c.data.params}
        if param(run, "hparams.setting") == "S" and param(run, "hparams.s") == 100:
            h = sorted(client.get_metric_history(c.info.run_id, "val_f1_macro"), key=lambda m: m.step)
            hist.append([m.value for m in h])
    n = min((len(h) for h in hist), default=0)
    return [float(np.mean([h[e] for h in hist])) for e in range(n)]


def per_class_iou(runs, svals) -> dict:
    """Test IoU per class (mean over seeds) of every arm at the low shares: which class the classification
    patches bring (tumour is rare in the segmentation patches)."""
    from histoweak.report import fig5_arm, param

    acc: dict = {}
    names: list[str] = []
    for c in runs:
        run, m = {"params": c.data.params}, c.data.metrics
        s = param(run, "hparams.s")
        if s not in svals:
            continue
        arm = fig5_arm(param(run, "hparams.setting"), param(run, "hparams.head"))
        for k, v in m.items():
            if k.startswith("test_iou_"):
                name = k[len("test_iou_"):]
                names += [name] if name not in names else []
                acc.setdefault((arm, s), {}).setdefault(name, []).append(v)
    lines, rows = [], []
    if acc:
        lines.append("test IoU per class (%), mean over seeds, at s <= 5 %:")
        lines.append("  ".join(["arm".ljust(18), "s".ljust(4), *(n[:11].ljust(11) for n in names)]))
        for (arm, s), per in sorted(acc.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            vals = [float(np.mean(per[n])) if n in per else float("nan") for n in names]
            lines.append("  ".join([arm.ljust(18), f"{s:g}".ljust(4), *(f"{100 * v:.1f}".ljust(11) for v in vals)]))
            rows.append({"arm": arm, "s": s, **{f"iou_{n}": v for n, v in zip(names, vals)}})
    return {"lines": lines, "rows": rows}


def draw_fig5(cells, quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from histoweak import figures
    from histoweak.report import FIG5_METRICS, fig5_relative

    try:
        plotted, relative = fig5_relative(cells), True
    except ValueError:
        plotted, relative = cells, False
    fig = figures.fig5_figure(plotted, FIG5_METRICS, relative, "Fig. 5 layout: synthetic wsss, test split")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"segcls_fig5{'_quick' if quick else ''}.png"
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
