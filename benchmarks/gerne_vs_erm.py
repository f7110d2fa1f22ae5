"""GERNE vs ERM on synthetic slides with a known tissue-size shortcut: the paper's Table 1.

    python benchmarks/gerne_vs_erm.py                    # 3 seeds, tau = 0.1 and 0.03, default shortcut
    python benchmarks/gerne_vs_erm.py --shortcut 0.8     # a stronger shortcut (0.2: weaker)
    python benchmarks/gerne_vs_erm.py --quick            # 1 seed, tau = 0.1, beta = 0.5 (part of `make bench`)

Everything goes through the platform: the ``gerne`` synthetic preset tiled
into a tile table, ``histoweak.train.fit`` on a local Ray. ERM trains once per
seed keeping every epoch's checkpoint; groups do not depend on the model, so
each checkpoint is scored on val and test at both thresholds and selected
after the fact by val BCA or val WGA (the paper's two ERM rows). GERNE's beta
comes from a small sweep on seed 0 per threshold (selected by val WGA), then
runs on the other seeds. Backbone: ImageNet EfficientNet-Lite0 (2 CPU cores;
the paper's ResNet-50 is GERNE's default for real data).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

import numpy as np  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shortcut", type=float, default=None, help="the preset's shortcut knob (default: the preset's)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--taus", type=float, nargs="+", default=[0.1, 0.03])
    ap.add_argument("--betas", type=float, nargs="+", default=[-0.5, 0.0, 0.5, 1.0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--no-shuffle", action="store_true",
                    help="stream training rows in file order (train.shuffle: false), as every run did before epochs were shuffled: the before of a before/after")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.taus, args.betas, args.epochs, args.steps = 1, [0.1], [0.5], 2, 15

    import ray.train

    from histoweak._ray import init_ray
    from histoweak.data.defaults import default_tile_table, n_classes_of
    from histoweak.report import format_table1, metrics_at_tau
    from histoweak.train import TrainConfig, fit, score_checkpoint

    knobs = {} if args.shortcut is None else {"shortcut": args.shortcut}
    table = str(default_tile_table(preset="gerne", **knobs))
    n_classes = n_classes_of(table)
    init_ray()
    common = dict(target="class:1", epochs=args.epochs, steps_per_epoch=args.steps, batch_size=32,
                  shuffle=not args.no_shuffle,
                  storage_path=str(Path(".cache/bench_gerne").resolve()))
    hp = {"backbone": "tf_efficientnet_lite0", "weights": "imagenet", "lr": 1e-3}
    stamp = time.strftime("%H%M%S")
    cells: dict = {}
    rows = []
    t_start = time.perf_counter()

    def scored(ckpt_path: str) -> tuple[dict, dict]:
        ck = ray.train.Checkpoint.from_directory(ckpt_path)
        return score_checkpoint(ck, table, n_classes, "val")[1], score_checkpoint(ck, table, n_classes, "test")[1]

    # ERM: one run per seed, every epoch kept, selected per threshold and metric afterwards.
    for seed in range(args.seeds):
        out = fit(TrainConfig(method="erm", hparams=hp, seed=seed, group_tau=args.taus[0], keep_checkpoints=None,
                              name=f"erm-s{seed}-{stamp}", **common), table, n_classes)
        preds = [scored(path) for path, _ in out.checkpoints]
        for tau in args.taus:
            per_ckpt = [(metrics_at_tau(v, tau, "val"), metrics_at_tau(t, tau, "test")) for v, t in preds]
            for sel in ("val_bca", "val_wga"):
                val, test = max(per_ckpt, key=lambda vt: vt[0][sel])
                cells.setdefault(("erm", sel), {}).setdefault(tau, []).append((test["test_wga"], test["test_bca"]))
                rows.append({"method": "erm", "select": sel, "tau": tau, "seed": seed, "beta": None,
                             sel: val[sel], "test_wga": test["test_wga"], "test_bca": test["test_bca"]})

    # GERNE: beta from a sweep on seed 0, per threshold; then the remaining seeds.
    for tau in args.taus:
        sweep = {}
        for beta in args.betas:
            out = fit(TrainConfig(method="gerne", hparams={**hp, "beta": beta}, seed=0, group_tau=tau,
                                  name=f"gerne-t{tau}-b{beta}-s0-{stamp}", **common), table, n_classes)
            sweep[beta] = out
            rows.append({"method": "gerne", "select": "val_wga", "tau": tau, "seed": 0, "beta": beta,
                         "val_wga": out.best.get("val_wga"), "test_wga": out.test.get("test_wga"),
                         "test_bca": out.test.get("test_bca"), "sweep": True})
        best_beta = max(sweep, key=lambda b: sweep[b].best.get("val_wga", -1))
        runs = [sweep[best_beta]]
        for seed in range(1, args.seeds):
            out = fit(TrainConfig(method="gerne", hparams={**hp, "beta": best_beta}, seed=seed, group_tau=tau,
                                  name=f"gerne-t{tau}-b{best_beta}-s{seed}-{stamp}", **common), table, n_classes)
            runs.append(out)
            rows.append({"method": "gerne", "select": "val_wga", "tau": tau, "seed": seed, "beta": best_beta,
                         "val_wga": out.best.get("val_wga"), "test_wga": out.test.get("test_wga"),
                         "test_bca": out.test.get("test_bca")})
        cells.setdefault(("gerne", "val_wga"), {})[tau] = [(o.test["test_wga"], o.test["test_bca"]) for o in runs]
        for r in rows:
            if r["method"] == "gerne" and r["tau"] == tau:
                r["chosen_beta"] = best_beta

    shortcut = args.shortcut if args.shortcut is not None else "preset default (0.5)"
    text = format_table1(cells, args.taus, title=f"GERNE vs ERM, synthetic 'gerne' preset, shortcut={shortcut}")
    name = "gerne_vs_erm" + ("_quick" if args.quick else "") + ("" if args.shortcut is None else f"_shortcut{args.shortcut}")
    name += "_noshuffle" if args.no_shuffle else ""
    gains = {tau: float(np.mean([w for w, _ in cells[("gerne", "val_wga")][tau]])
                        - np.mean([w for w, _ in cells[("erm", "val_wga")][tau]])) for tau in args.taus}
    report(name, rows, {"minutes": (time.perf_counter() - t_start) / 60, "table1": "\n" + text,
                        **{f"GERNE - ERM(WGA) test WGA, tau={t:g} (points)": 100 * g for t, g in gains.items()}})
    return {"table": text, "wga_gain": gains}


if __name__ == "__main__":
    main()
