"""MagNets' Table 1 on synthetic slides with known metastases: MagNet vs the mean-RGB baseline vs a tile-based
attention-MIL model that reads every tissue tile, AUROC per metastasis size class, pixels read per slide and wall
time per slide.

    python benchmarks/magnet_vs_tiling.py            # 3 seeds, 60 slides of the camelyon preset (4096 px)
    python benchmarks/magnet_vs_tiling.py --quick    # 1 seed, fewer epochs (part of `make bench`)

Everything goes through the platform: the synthetic ``camelyon`` preset as a slide table (``histoweak slides``;
half the slides hold one metastasis, macro / micro / ITC-like in turn), each model trained by Ray Train
(``train.fit``: selection on validation AUROC, the best checkpoint scored on test), pixels counted by the slide
readers. The claim to check (the issue's): MagNet beats mean-RGB clearly and approaches the tile model with at
least 10× fewer pixels read; smaller metastases are harder.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STORAGE = ROOT / "benchmarks" / ".cache" / "magnet"

#: (row label, method, hparams, train overrides): the models of the table, on CPU-sized budgets (the labels are
#: the report's, ``report.magnet_row_label``, so the baselines come first)
MODELS = [
    ("Mean RGB baseline", "mean_rgb", {}, {"epochs": 30, "batch_size": 8}),
    ("Attention-MIL, every tile", "attention_mil",  # level 0
     {"backbone": "tf_efficientnet_lite0", "weights": "imagenet", "lr": 1e-3}, {"epochs": 20, "batch_size": 4}),
    ("3-layer MagNet (P = 2)", "magnet",
     {"backbone": "tf_efficientnet_lite0", "weights": "imagenet", "aux_backbone": "tf_efficientnet_lite0",
      "layers": 3, "patches": 2, "sampler": "lms", "lr": 3e-4}, {"epochs": 8, "batch_size": 4}),
]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed and a third of the epochs")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--slides", type=int, default=60, help="slides in the synthetic set (default %(default)s)")
    p.add_argument("--size", type=int, default=4096, help="level-0 side of a synthetic slide")
    p.add_argument("--models", nargs="+", default=[m[1] for m in MODELS], choices=[m[1] for m in MODELS],
                   help="the table's rows to train (default: all)")
    p.add_argument("--no-shuffle", action="store_true",
                    help="stream training rows in file order (train.shuffle: false), as every run did before epochs were shuffled: the before of a before/after")
    args = p.parse_args(argv)
    seeds = 1 if args.quick else args.seeds

    from histoweak._ray import init_ray
    from histoweak.data.defaults import default_slide_table
    from histoweak.data.slide_table import read_slide_table
    from histoweak.report import format_magnet_table
    from histoweak.train import TrainConfig, fit

    t0 = time.perf_counter()
    # a third of the slides for test (the preset's 20 % leaves one or two positives per size class)
    table = str(default_slide_table(preset="camelyon", n_slides=args.slides, size=args.size,
                                    splits=(0.5, 0.17, 0.33)))
    rows_by_split: dict = {}
    for r in read_slide_table(table):
        rows_by_split.setdefault(r["split"], {}).setdefault(r["size_class"], 0)
        rows_by_split[r["split"]][r["size_class"]] += 1
    print(f"slide table {table} ({time.perf_counter() - t0:.0f} s): {rows_by_split}")
    init_ray()
    cells: dict[str, dict[str, list[float]]] = {}
    rows = []
    shuffled = "noshuffle" if args.no_shuffle else "shuffle"
    for label, method, hparams, train in [m for m in MODELS if m[1] in args.models]:
        for seed in range(seeds):
            epochs = max(2, train["epochs"] // 3) if args.quick else train["epochs"]
            cfg = TrainConfig(method=method, hparams=hparams, target="label", seed=seed,
                              **{**train, "epochs": epochs}, lr_schedule={"name": "cosine"}, augment=True,
                              shuffle=not args.no_shuffle, name=f"magnet-bench-{method}-{seed}-{shuffled}", storage_path=str(STORAGE))
            t1 = time.perf_counter()
            out = fit(cfg, table, 2)
            wall = time.perf_counter() - t1
            test = out.test
            cell = cells.setdefault(label, {})
            for k, v in test.items():
                cell.setdefault(k, []).append(float(v))
            cell.setdefault("train_seconds", []).append(wall)
            rows.append({"model": label, "seed": seed, "epochs": epochs, "train_s": round(wall),
                         **{k.removeprefix("test_"): test.get(k, float("nan"))
                            for k in ("test_auroc_macro", "test_auroc_micro", "test_auroc_itc",
                                      "test_auroc_macro_micro", "test_auroc", "test_pixels_read_per_slide",
                                      "test_tiling_pixels_per_slide", "test_pixels_ratio",
                                      "test_seconds_per_slide")}})
            print(f"{label}, seed {seed}: {wall:.0f} s, test AUROC {test.get('test_auroc', float('nan')):.3f}, "
                  f"pixels read {test.get('test_pixels_read_per_slide', 0):.3g} per slide", flush=True)
    print()
    print(format_magnet_table(cells, title=f"Table 1 layout, synthetic camelyon ({args.slides} slides of "
                                           f"{args.size} px, {seeds} seed(s); test split, mean ± std over seeds)"))
    report("magnet_vs_tiling" + ("_quick" if args.quick else "") + ("_noshuffle" if args.no_shuffle else ""), rows, {"slides per split and size class": rows_by_split,
                                      "total seconds": round(time.perf_counter() - t0)})
    return cells


if __name__ == "__main__":
    main()
