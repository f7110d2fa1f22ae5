"""GERNE against ERM and group-balanced resampling in the paper's regime (Table 1 layout), and the map of GERNE's
(c, beta) inside the Eq. 9 bound as gain over resampling, paired by seed.

    python benchmarks/gerne_vs_erm.py                    # 3 seeds, c in {0.5, 1}, 5 betas each, the default shortcut
    python benchmarks/gerne_vs_erm.py --shortcut 0.8     # a stronger shortcut (0.2: weaker)
    python benchmarks/gerne_vs_erm.py --quick            # 1 seed, c = 1, 2 betas (part of `make bench`)
    python benchmarks/gerne_vs_erm.py --seeds 2 --n-betas 4 --epochs 3 --steps 30   # the form in README (one session)

Everything goes through the platform: the ``gerne`` synthetic preset tiled into a tile table,
``histoweak.train.fit`` on a local Ray, the best checkpoint scored on test at tau = 0.1 and 0.03.
Every run trains with the groups at ``--tau`` (B_b and B_lb are drawn at that threshold) and the paper's
optimizer (SGD, momentum 0.9, weight decay 0.01) at one learning rate for every row:

- ERM: the shuffled stream (the data's class and group shares), every epoch kept; the checkpoint is picked per
  threshold by validation BCA and by validation WGA (the paper's two ERM rows);
- resampling: GERNE at c = 1, beta = 0 (k = 1: groups uniform within balanced classes), selected by val WGA;
- GERNE: each c, beta on a grid from (1 - c) / c (k = 1) to just under the bound beta_max(c) of the training
  split's group counts (``gerne.beta_bound``), selected by val WGA; the Table 1 row is the (c, beta) with the
  best mean validation WGA.

The map's cells are test WGA / BCA gains over resampling in points, mean ± std over seeds of the per-seed
differences. Train-set accuracy per group of the last epoch's weights says whether training fit the minority
groups (the paper's Appendix B assumes it does).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

import numpy as np  # noqa: E402

EVAL_TAUS = (0.1, 0.03)


def _pm(values) -> str:
    v = 100 * np.asarray(values, float)
    return f"{v.mean():+.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v[0]:+.1f}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shortcut", type=float, default=None, help="the preset's shortcut knob (default: the preset's)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tau", type=float, default=0.1, help="the groups B_b and B_lb are drawn at")
    ap.add_argument("--cs", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--n-betas", type=int, default=5, help="betas per c, from (1 - c) / c to 0.97 x the bound")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--train-acc-seeds", type=int, default=1, help="seeds whose last weights are scored on train")
    ap.add_argument("--erm-bca", action="store_true", help="also the ERM row selected by val BCA (every epoch scored)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.cs, args.n_betas, args.epochs, args.steps = 1, [1.0], 2, 2, 15

    import ray.train

    from histoweak._ray import init_ray
    from histoweak.data.defaults import default_tile_table, n_classes_of
    from histoweak.methods.gerne import beta_bound
    from histoweak.report import format_table1, group_counts, metrics_at_tau
    from histoweak.train import TrainConfig, fit, score_checkpoint

    knobs = {} if args.shortcut is None else {"shortcut": args.shortcut}
    table = str(default_tile_table(preset="gerne", **knobs))
    n_classes = n_classes_of(table)
    counts = group_counts(table, "class:1", n_classes, args.tau)["train"]
    init_ray()
    common = dict(target="class:1", epochs=args.epochs, steps_per_epoch=args.steps, batch_size=32, group_tau=args.tau,
                  eval_taus=list(EVAL_TAUS), keep_checkpoints=None, storage_path=str(Path(".cache/bench_gerne").resolve()))
    hp = {"backbone": "tf_efficientnet_lite0", "weights": "imagenet", "lr": args.lr, "optimizer": "sgd",
          "momentum": 0.9, "weight_decay": 0.01}
    stamp = time.strftime("%H%M%S")
    outs: dict = {}
    t_start = time.perf_counter()

    def scored(path: str, split: str) -> dict:
        return score_checkpoint(ray.train.Checkpoint.from_directory(path), table, n_classes, split)[1]

    def last_train_groups(out) -> dict[str, float]:
        """Train-set accuracy per group (at --tau) of the last epoch's weights."""
        last = max(out.checkpoints, key=lambda cm: cm[1].get("epoch", -1))[0]
        m = metrics_at_tau(scored(last, "train"), args.tau, "train")
        return {f"train_acc_group{g}": m.get(f"train_acc_group{g}", float("nan")) for g in range(4)}

    def run(name: str, method: str, extra: dict, seed: int, **train):
        return fit(TrainConfig(method=method, hparams={**hp, **extra}, seed=seed, name=f"{name}-s{seed}-{stamp}",
                               **common, **train), table, n_classes)

    rows, cells = [], {}
    # ERM on the shuffled stream, selected by val WGA (the paper's second ERM row; --erm-bca adds the first: every
    # epoch kept and scored on val and test afterwards)
    for seed in range(args.seeds):
        out = run("erm", "erm", {}, seed, select="val_wga")
        train_acc = last_train_groups(out) if seed < args.train_acc_seeds else {}
        outs[("erm", seed)] = out
        for tau in EVAL_TAUS:
            cells.setdefault(("erm", "val_wga"), {}).setdefault(tau, []).append(
                (out.test.get(f"test_tau{tau:g}_wga"), out.test.get(f"test_tau{tau:g}_bca")))
        rows.append({"arm": "ERM", "select": "val_wga", "seed": seed, "val_wga": out.best.get("val_wga"),
                     **{f"test_{m}_tau{t:g}": out.test.get(f"test_tau{t:g}_{m}") for t in EVAL_TAUS
                        for m in ("wga", "bca")}, **train_acc})
        if args.erm_bca:
            preds = [(scored(path, "val"), scored(path, "test")) for path, _ in out.checkpoints]
            for tau in EVAL_TAUS:
                per_ckpt = [(metrics_at_tau(v, tau, "val"), metrics_at_tau(t, tau, "test")) for v, t in preds]
                val, test = max(per_ckpt, key=lambda vt: vt[0]["val_bca"])
                cells.setdefault(("erm", "val_bca"), {}).setdefault(tau, []).append((test["test_wga"], test["test_bca"]))

    # resampling and the GERNE grid, every (c, beta) on every seed
    settings = [("resampling", 1.0, 0.0)]
    bounds = {c: beta_bound(counts, c) for c in args.cs}
    for c in args.cs:
        lo, hi = (1.0 - c) / c, 0.97 * bounds[c]
        betas = np.linspace(lo, hi, args.n_betas)
        settings += [("gerne", c, round(float(b), 3)) for b in betas if not (c == 1.0 and b == 0.0)]
    for seed in range(args.seeds):
        for arm, c, beta in settings:
            out = run(f"{arm}-c{c:g}-b{beta:g}", "gerne", {"c": c, "beta": beta}, seed)
            outs[(c, beta, seed)] = out
            rows.append({"arm": arm, "c": c, "beta": beta, "k": c * (beta + 1), "seed": seed,
                         "beta_max": out.data_state.get("beta_max"), "val_wga": out.best.get("val_wga"),
                         **{f"test_{m}_tau{t:g}": out.test.get(f"test_tau{t:g}_{m}") for t in EVAL_TAUS
                            for m in ("wga", "bca")},
                         **(last_train_groups(out) if seed < args.train_acc_seeds else {})})

    def test_at(out, metric: str, tau: float) -> float:
        return out.test.get(f"test_tau{tau:g}_{metric}", float("nan"))

    seeds = range(args.seeds)
    for tau in EVAL_TAUS:
        cells.setdefault(("resampling", "val_wga"), {})[tau] = [
            (test_at(outs[(1.0, 0.0, s)], "wga", tau), test_at(outs[(1.0, 0.0, s)], "bca", tau)) for s in seeds]
    grid = [(c, b) for arm, c, b in settings if arm == "gerne"]
    best = max(grid, key=lambda cb: np.mean([outs[(*cb, s)].best.get("val_wga", -1) for s in seeds]))
    for tau in EVAL_TAUS:
        cells.setdefault(("gerne", "val_wga"), {})[tau] = [
            (test_at(outs[(*best, s)], "wga", tau), test_at(outs[(*best, s)], "bca", tau)) for s in seeds]
    shortcut = args.shortcut if args.shortcut is not None else "preset default (0.5)"
    table1 = format_table1(cells, list(EVAL_TAUS), rows=TABLE_ROWS,
                           title=f"GERNE vs ERM and resampling, synthetic 'gerne' preset, shortcut={shortcut}, "
                                 f"groups at tau={args.tau:g}; GERNE's row: c={best[0]:g}, beta={best[1]:g} "
                                 f"(best mean val WGA)")
    # the map: gain over resampling, paired by seed
    head = f"{'c':<5}{'beta':<8}{'k':<6}" + "".join(f"{m + ' @' + format(t, 'g'):<15}" for t in EVAL_TAUS
                                                   for m in ("WGA", "BCA")) + "train acc, worst group (mean)"
    lines = [f"GERNE map: test gain over resampling (c=1, beta=0), points, mean ± std over {args.seeds} seed(s) of "
             f"paired differences; beta_max(c) = " + ", ".join(f"{bounds[c]:.3f} at c={c:g}" for c in args.cs), head]
    for c, beta in [(1.0, 0.0), *grid]:
        cols = []
        for tau in EVAL_TAUS:
            for m in ("wga", "bca"):
                cols.append(_pm([test_at(outs[(c, beta, s)], m, tau) - test_at(outs[(1.0, 0.0, s)], m, tau)
                                 for s in seeds]))
        worst = np.mean([min(r[f"train_acc_group{g}"] for g in range(4)) for r in rows
                         if r.get("c") == c and r.get("beta") == beta and "train_acc_group0" in r])
        label = " (resampling)" if (c, beta) == (1.0, 0.0) else ""
        lines.append(f"{c:<5g}{beta:<8g}{c * (beta + 1):<6.2f}" + "".join(f"{x:<15}" for x in cols)
                     + f"{100 * worst:.1f}{label}")
    lines.append("ERM (val WGA) vs resampling: " + ", ".join(
        f"WGA @{t:g} {_pm([test_at(outs[('erm', s)], 'wga', t) - test_at(outs[(1.0, 0.0, s)], 'wga', t) for s in seeds])}"
        for t in EVAL_TAUS))
    erm_worst = np.mean([min(r[f"train_acc_group{g}"] for g in range(4)) for r in rows
                         if r["arm"] == "ERM" and "train_acc_group0" in r])
    lines.append(f"ERM's train acc, worst group (mean): {100 * erm_worst:.1f}")
    text = table1 + "\n\n" + "\n".join(lines)
    print(text)
    name = "gerne_vs_erm" + ("_quick" if args.quick else "") + ("" if args.shortcut is None else f"_shortcut{args.shortcut}")
    gains = {tau: float(np.mean([w for w, _ in cells[("gerne", "val_wga")][tau]])
                        - np.mean([w for w, _ in cells[("resampling", "val_wga")][tau]])) for tau in EVAL_TAUS}
    erm_gap = {tau: float(np.mean([w for w, _ in cells[("resampling", "val_wga")][tau]])
                          - np.mean([w for w, _ in cells[("erm", "val_wga")][tau]])) for tau in EVAL_TAUS}
    report(name, rows, {"minutes": (time.perf_counter() - t_start) / 60, "tables": "\n" + text,
                        **{f"GERNE(best) - resampling test WGA, tau={t:g} (points)": 100 * g for t, g in gains.items()},
                        **{f"resampling - ERM(WGA) test WGA, tau={t:g} (points)": 100 * g for t, g in erm_gap.items()}})
    return {"table": text, "wga_gain": gains, "resampling_vs_erm": erm_gap}


#: the paper's rows plus resampling, the baseline GERNE's extrapolation starts from
TABLE_ROWS = (("ERM", "erm", "val_bca"), ("ERM", "erm", "val_wga"), ("Resampling", "resampling", "val_wga"),
              ("GERNE", "gerne", "val_wga"))


if __name__ == "__main__":
    main()
