"""PSCL vs the CAM baseline on synthetic slides with partial activation (thesis Tables 5.4-5.5 in miniature), in
the thesis's stage-1 regime: lambda x gating x seeds, then stage 2 on the pseudo-labels.

    python benchmarks/pscl_vs_cam.py              # lambda in {0, 0.05, 0.2, 0.6} x gate on/off x 3 seeds, stage 2
    python benchmarks/pscl_vs_cam.py --ungated-lams 0.2   # the form in README: gate off for lambda 0.2 only
    python benchmarks/pscl_vs_cam.py --partial 0  # the same without partial activation (the generator's knob)
    python benchmarks/pscl_vs_cam.py --quick      # 1 seed, lambda 0 and 0.2 gated, 2 short epochs, no stage 2
                                                  # (part of `make bench`)

Everything goes through the platform: the ``wsss`` synthetic preset tiled into a tile table,
``histoweak.train.fit`` on a local Ray, pseudo-labels (eq. 4.9) scored against the pixel ground truth of the test
tiles (mIoU, fwIoU, CAM coverage of each class's pixels), ``write_pseudo_labels`` + the ``pscl-seg`` decoder for
stage 2. The regime is the thesis's Table 5.1 (SGD, lr 0.1, polynomial decay, 5 epochs, batch 16) with PSCL's
defaults: CAMs from the last encoder stage, gated by class score > 0.8 in the PSCL loss (``gate``), colour-threshold
background seed. ImageNet EfficientNet-Lite0 (ships offline) stands in for Swin-T.

The base row is the CAM baseline (lambda = 0; the gate acts only in the PSCL loss, so it has one row). Each PSCL
cell shows its gain over the baseline paired by seed, and ``pscl_grad_ratio`` = ||grad lambda L_pscl|| /
||grad L_cls|| on the encoder at the last epoch's first step (mean over seeds): whether lambda acts at all.
Stage 2 (the decoder on pseudo-labels, NR loss) runs on seed 0 of the baseline and of the best PSCL cell by mean
validation mIoU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

# bg_grey 225: the synthetic background is ~241 grey and necrosis ~210 (a dataset-level setting, like min_size)
HP = {"backbone": "tf_efficientnet_lite0", "weights": "imagenet", "tau": 0.25, "bg_grey": 225.0, "bg_min_size": 200,
      "optimizer": "sgd", "momentum": 0.9, "lr": 0.1}


def _pm(values) -> str:
    v = 100 * np.asarray(values, float)
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v[0]:.1f}"


def _gain(values) -> str:
    v = 100 * np.asarray(values, float)
    return f"{v.mean():+.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v[0]:+.1f}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lams", type=float, nargs="+", default=[0.05, 0.2, 0.6])
    ap.add_argument("--gates", choices=["on", "off"], nargs="+", default=["on", "off"])
    ap.add_argument("--ungated-lams", type=float, nargs="+", default=None,
                    help="the lambdas of the gate-off cells (default: --lams)")
    ap.add_argument("--partial", type=float, default=None, help="the preset's partial-activation knob (default 0.7)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--no-stage2", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.lams, args.gates, args.epochs, args.steps, args.no_stage2 = 1, [0.2], ["on"], 2, 8, True

    from histoweak._ray import init_ray
    from histoweak.data.defaults import default_tile_table, n_classes_of
    from histoweak.methods.pscl import write_pseudo_labels
    from histoweak.train import TrainConfig, fit

    knobs = {} if args.partial is None else {"partial": args.partial}
    table = str(default_tile_table(preset="wsss", **knobs))
    n_classes = n_classes_of(table)
    init_ray()
    storage = Path(".cache/bench_pscl").resolve()
    stamp = time.strftime("%H%M%S")
    t0 = time.perf_counter()
    cells = [(0.0, True)] + [(lam, True) for lam in args.lams if "on" in args.gates] + [
        (lam, False) for lam in (args.ungated_lams or args.lams) if "off" in args.gates]
    seeds = range(args.seeds)
    rows, outs = [], {}
    for seed in seeds:
        for lam, gate in cells:
            cfg = TrainConfig(method="pscl", target="labels", hparams={**HP, "lam": lam, "gate": gate}, seed=seed,
                              epochs=args.epochs, steps_per_epoch=args.steps, batch_size=16,
                              lr_schedule={"name": "poly", "power": 0.9},
                              name=f"pscl-l{lam}-g{int(gate)}-s{seed}-{stamp}", storage_path=str(storage))
            out = fit(cfg, table, n_classes)
            outs[(lam, gate, seed)] = out
            rows.append({"lambda": lam, "gate": gate, "seed": seed, "val_miou": out.best.get("val_miou"),
                         "test_miou": out.test.get("test_miou"), "test_fwiou": out.test.get("test_fwiou"),
                         "test_coverage": out.test.get("test_coverage"),
                         "grad_ratio_last_epoch": out.metrics.get("train_pscl_grad_ratio"),
                         "loss_pscl_last_epoch": out.metrics.get("train_loss_pscl")})

    def col(lam, gate, key):
        return [outs[(lam, gate, s)].test.get(key, float("nan")) for s in seeds]

    base = (0.0, True)
    head = (f"{'arm':<14}{'lambda':<8}{'gate':<6}{'grad ratio':<12}{'pseudo mIoU':<15}{'gain':<14}{'fwIoU':<15}"
            f"{'gain':<14}{'coverage':<15}")
    lines = [f"pseudo-labels on test, %, mean ± std over {args.seeds} seed(s); gains over the CAM baseline paired by "
             "seed; grad ratio: ||grad lambda L_pscl|| / ||grad L_cls|| on the encoder, last epoch", head]
    for lam, gate in cells:
        ratio = np.nanmean([outs[(lam, gate, s)].metrics.get("train_pscl_grad_ratio", np.nan) for s in seeds]) \
            if lam else 0.0
        miou, fw, cov = col(lam, gate, "test_miou"), col(lam, gate, "test_fwiou"), col(lam, gate, "test_coverage")
        gain_m = "" if (lam, gate) == base else _gain(np.subtract(miou, col(*base, "test_miou")))
        gain_f = "" if (lam, gate) == base else _gain(np.subtract(fw, col(*base, "test_fwiou")))
        arm = "CAM baseline" if lam == 0 else "PSCL"
        lines.append(f"{arm:<14}{lam:<8g}{('on' if gate else 'off'):<6}{ratio:<12.3f}{_pm(miou):<15}{gain_m:<14}"
                     f"{_pm(fw):<15}{gain_f:<14}{_pm(cov):<15}")
    pscl_cells = [c for c in cells if c[0] > 0]
    best = max(pscl_cells, key=lambda c: np.mean([outs[(*c, s)].best.get("val_miou", -1) for s in seeds])) \
        if pscl_cells else None
    stage2 = {}
    if not args.no_stage2 and best is not None:
        for lam, gate in (base, best):
            ck = outs[(lam, gate, 0)].checkpoint
            pseudo = write_pseudo_labels(ck, table, str(storage / f"pseudo-l{lam}-g{int(gate)}-{stamp}"), n_classes)
            cfg = TrainConfig(method="pscl-seg", target="mask", hparams={"stage1": ck, "loss": "nr", "lr": 1e-3},
                              epochs=args.epochs, steps_per_epoch=args.steps, batch_size=16,
                              name=f"pscl-seg-l{lam}-g{int(gate)}-{stamp}", storage_path=str(storage))
            stage2[(lam, gate)] = fit(cfg, str(pseudo), n_classes).test
            rows.append({"lambda": lam, "gate": gate, "seed": 0, "stage": 2,
                         "test_miou": stage2[(lam, gate)].get("test_miou"),
                         "test_fwiou": stage2[(lam, gate)].get("test_fwiou")})
        lines.append("stage 2 (decoder on the seed-0 pseudo-labels, NR loss), test mIoU / fwIoU: " + "; ".join(
            f"{'CAM baseline' if lam == 0 else f'PSCL lambda {lam:g} gate ' + ('on' if gate else 'off')}: "
            f"{100 * t['test_miou']:.1f} / {100 * t['test_fwiou']:.1f}" for (lam, gate), t in stage2.items()))
    text = "\n".join(lines)
    print(text)
    gains = {f"{lam:g}/{'on' if gate else 'off'}": float(np.mean(np.subtract(col(lam, gate, "test_miou"),
                                                                             col(*base, "test_miou")))) * 100
             for lam, gate in pscl_cells}
    name = ("pscl_vs_cam" + ("_quick" if args.quick else "") + ("" if args.partial is None else f"_partial{args.partial}"))
    report(name, rows, {"partial": args.partial if args.partial is not None else "preset default (0.7)",
                        "seeds": args.seeds, "table": "\n" + text,
                        **{f"mIoU gain, lambda/gate {k} (points)": v for k, v in gains.items()},
                        "minutes": (time.perf_counter() - t0) / 60})
    return {"miou_gain": max(gains.values()) if gains else float("nan"), "gains": gains}


if __name__ == "__main__":
    main(sys.argv[1:])
