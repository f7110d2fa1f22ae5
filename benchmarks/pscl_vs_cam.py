"""PSCL vs the CAM baseline on synthetic slides with partial activation (thesis Tables 5.4-5.5 in miniature).

    python benchmarks/pscl_vs_cam.py              # lambda = 0 vs 0.1, 3 seeds, then stage 2 on each one's seed-0 pseudo-labels
    python benchmarks/pscl_vs_cam.py --partial 0  # the same without partial activation (the generator's knob)
    python benchmarks/pscl_vs_cam.py --quick      # 1 seed, no stage 2 (part of `make bench`)

Everything goes through the platform: the ``wsss`` synthetic preset tiled into a tile table,
``histoweak.train.fit`` on a local Ray, pseudo-labels (eq. 4.9) scored against the pixel ground
truth of the test tiles (mIoU, fwIoU), ``write_pseudo_labels`` + the ``pscl-seg`` decoder for stage 2.
Both arms share every setting but lambda (ImageNet EfficientNet-Lite0, CAMs at stride 16).
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
HP = {"backbone": "tf_efficientnet_lite0", "weights": "imagenet", "feature_level": 3, "lr": 1e-3, "tau": 0.25,
      "bg_grey": 225.0}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lam", type=float, default=0.1)
    ap.add_argument("--partial", type=float, default=None, help="the preset's partial-activation knob (default 0.7)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--no-stage2", action="store_true")
    ap.add_argument("--no-shuffle", action="store_true",
                    help="stream training rows in file order (train.shuffle: false), as every run did before epochs were shuffled: the before of a before/after")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.steps, args.no_stage2 = 1, 2, 15, True

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
    rows, outcomes = [], {}
    for lam in (0.0, args.lam):
        for seed in range(args.seeds):
            cfg = TrainConfig(method="pscl", target="labels", hparams={**HP, "lam": lam}, seed=seed,
                              epochs=args.epochs, steps_per_epoch=args.steps, batch_size=16,
                              shuffle=not args.no_shuffle, name=f"pscl-l{lam}-s{seed}-{stamp}", storage_path=str(storage))
            out = fit(cfg, table, n_classes)
            outcomes[(lam, seed)] = out
            rows.append({"arm": "CAM baseline" if lam == 0 else "PSCL", "lambda": lam, "seed": seed,
                         "val_miou": out.best.get("val_miou"), "test_miou": out.test.get("test_miou"),
                         "test_fwiou": out.test.get("test_fwiou"), "test_miou_fg": out.test.get("test_miou_fg")})
    stage2 = {}
    if not args.no_stage2:
        for lam in (0.0, args.lam):
            ck = outcomes[(lam, 0)].checkpoint
            pseudo = write_pseudo_labels(ck, table, str(storage / f"pseudo-l{lam}-{stamp}"), n_classes)
            cfg = TrainConfig(method="pscl-seg", target="mask", hparams={"stage1": ck, "loss": "nr", "lr": 1e-3},
                              epochs=args.epochs, steps_per_epoch=args.steps, batch_size=16,
                              shuffle=not args.no_shuffle, name=f"pscl-seg-l{lam}-{stamp}", storage_path=str(storage))
            out = fit(cfg, str(pseudo), n_classes)
            stage2[lam] = out.test
            rows.append({"arm": ("CAM baseline" if lam == 0 else "PSCL") + " + stage 2 (NR loss)", "lambda": lam,
                         "seed": 0, "test_miou": out.test.get("test_miou"), "test_fwiou": out.test.get("test_fwiou"),
                         "test_miou_fg": out.test.get("test_miou_fg")})

    def stat(lam, key):
        v = 100 * np.array([outcomes[(lam, s)].test[key] for s in range(args.seeds)])
        return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v[0]:.2f}"

    lines = ["arm            lambda  test pseudo-label mIoU  fwIoU" + ("   stage 2 mIoU  fwIoU" if stage2 else "")]
    for lam in (0.0, args.lam):
        name = "CAM baseline" if lam == 0 else "PSCL"
        extra = (f"   {100 * stage2[lam]['test_miou']:.2f}         {100 * stage2[lam]['test_fwiou']:.2f}"
                 if stage2 else "")
        lines.append(f"{name:<14} {lam:<7g} {stat(lam, 'test_miou'):<23} {stat(lam, 'test_fwiou')}{extra}")
    gain = np.mean([outcomes[(args.lam, s)].test["test_miou"] - outcomes[(0.0, s)].test["test_miou"]
                    for s in range(args.seeds)]) * 100
    name = ("pscl_vs_cam" + ("_quick" if args.quick else "") + ("" if args.partial is None else f"_partial{args.partial}")
            + ("" if args.lam == 0.1 else f"_lam{args.lam:g}") + ("_noshuffle" if args.no_shuffle else ""))
    report(name, rows, {"partial": args.partial if args.partial is not None else "preset default (0.7)",
                        "seeds": args.seeds, "mIoU gain (points, mean over seeds)": gain,
                        "goal": "PSCL >= baseline + 3 mIoU points", "table": "\n" + "\n".join(lines),
                        "minutes": (time.perf_counter() - t0) / 60})
    return {"miou_gain": gain}


if __name__ == "__main__":
    main(sys.argv[1:])
