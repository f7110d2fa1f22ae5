"""USegMix's Table 1 on synthetic data with known classes: no synthesis vs +n vs +2n synthetic tiles per class vs
CutMix, and how realistic the synthetic tiles are (KID), per inpainting backend.

    python benchmarks/usegmix_counts.py            # 3 seeds: 9 USegMix + 3 CutMix trials, KID of 4 image sets
    python benchmarks/usegmix_counts.py --quick    # 1 seed, no diffusion backend (part of `make bench`)

Everything goes through the platform: the embedded ``grades`` patch set (four ordinal grades, 24 training
tiles per class — the data-scarce setting), ``search_spaces/usegmix.yaml`` run as a Ray Tune sweep recorded in
MLflow (experiment ``usegmix-bench``; its ``before:`` step builds the segment pool and the synthetic tiles with
Ray Data), and a CutMix sweep (``usegmix-bench-cutmix``: the same classifier with ``mix: cutmix`` and no
synthetic tiles). Prints Table 1's layout (Acc, F1, Kappa, Avg↑ vs no synthesis).

Realism (the paper claims it and never measures it): KID (polynomial-kernel MMD², Bińkowski et al. 2018) between
held-out real tiles (the test split) and (a) real training tiles — the floor, (b) synthetic tiles inpainted
biharmonically, (c) synthetic tiles inpainted by a DDPM trained on the training tiles
(``search_spaces/inpainter.yaml``, the platform's Ray Train job), (d) CutMix images of training tiles; features:
EfficientNet-Lite0 (ImageNet) pooled features of the 224-px tile.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STORAGE = ROOT / "benchmarks" / ".cache" / "usegmix"


def _images(table: str | Path, split: str | None = None) -> np.ndarray:
    import pyarrow.parquet as pq

    from histoweak.slides.tiling import decode_image

    files = sorted(Path(table).rglob("*.parquet")) if Path(table).is_dir() else [Path(table)]
    out = []
    for f in files:
        if f.name.startswith((".", "_")):
            continue
        t = pq.read_table(f, columns=["image", "split"])
        out += [decode_image(b) for b, s in zip(t.column("image").to_pylist(), t.column("split").to_pylist())
                if split is None or s == split]
    return np.stack(out)


def _cutmix_images(images: np.ndarray, seed: int) -> np.ndarray:
    """CutMix images made by timm's ``Mixup`` (cutmix only) from pairs of training tiles."""
    import torch
    from timm.data import Mixup

    torch.manual_seed(seed)
    mix = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, num_classes=4, label_smoothing=0.0)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = x[: len(x) // 2 * 2]
    mixed, _ = mix(x.clone(), torch.zeros(len(x), dtype=torch.long))
    return mixed.permute(0, 2, 3, 1).round().clamp(0, 255).byte().numpy()


def _kid(featurize, real: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    from histoweak.metrics import kid

    return kid(featurize(real), featurize(other), subsets=50, subset_size=min(len(real), len(other), 100), seed=0)


def _sweep(space, table: str, n_classes: int, name: str):
    from histoweak import tracking
    from histoweak.tune import run_sweep

    run_sweep(space, table, n_classes, storage=str(STORAGE), progress=False)
    parent, children = tracking.latest_sweep(name)
    return parent, [{"params": c.data.params, "metrics": c.data.metrics} for c in children
                    if c.info.status == "FINISHED"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--diffusion-count", type=int, default=12, help="synthetic tiles per class with the DDPM")
    ap.add_argument("--no-shuffle", action="store_true",
                    help="stream training rows in file order (train.shuffle: false), as every run did before epochs were shuffled: the before of a before/after")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds = 1

    from histoweak._ray import init_ray
    from histoweak.data.defaults import default_tile_table, n_classes_of
    from histoweak.methods.usegmix import BEFORE_DEFAULTS
    from histoweak.methods.usegmix.pipeline import build_synthetic
    from histoweak.methods.usegmix.pool import SegmentFeaturizer
    from histoweak.report import format_usegmix_table, usegmix_cells
    from histoweak.tune import _sweep_context, load_search_space

    table = str(default_tile_table(preset="grades"))
    n_classes = n_classes_of(table)
    init_ray()
    space = load_search_space(ROOT / "search_spaces" / "usegmix.yaml")
    n = 24  # the originals per class
    space = space.with_overrides({"name": "usegmix-bench" + ("-noshuffle" if args.no_shuffle else ""),
                                  "train.epochs": args.epochs, "train.shuffle": not args.no_shuffle})
    space = space.with_params({"hparams.synthetic_per_class": {"grid": [0, n, 2 * n]},
                               "train.seed": {"grid": list(range(args.seeds))}})
    t0 = time.perf_counter()
    parent, runs = _sweep(space, table, n_classes, space.name)
    sweep_s = time.perf_counter() - t0
    cutmix = space.with_overrides({"name": space.name + "-cutmix", "before": {}, "hparams.mix": "cutmix",
                                   "hparams.synthetic_per_class": 0})
    _, cut_runs = _sweep(cutmix, table, n_classes, cutmix.name)
    cells = usegmix_cells(runs + cut_runs)
    print(format_usegmix_table(cells, title="Table 1 layout (synthetic grades, test split; mean ± std over seeds)"))

    # -- realism -------------------------------------------------------------------------------------------
    featurizer = SegmentFeaturizer("tf_efficientnet_lite0", "imagenet")
    synth_table = parent.data.params["before.synthetic_table"]
    real_test, real_train = _images(table, "test"), _images(table, "train")
    sets = {"real train tiles (floor)": real_train, "USegMix, biharmonic": _images(synth_table),
            "CutMix (timm)": _cutmix_images(real_train, 0)}
    settings = {**BEFORE_DEFAULTS, **space.before}
    if not args.quick:  # a DDPM trained on the training tiles by the platform's Ray Train job, then synthesis
        from histoweak.tune import run_sweep

        inp = load_search_space(ROOT / "search_spaces" / "inpainter.yaml")
        rows = run_sweep(inp, table, n_classes, storage=str(STORAGE), progress=False)
        ckpt = rows[0]["best_checkpoint"]
        diff = {**settings, "inpainter": "diffusion", "inpainter_model": ckpt, "count": args.diffusion_count}
        from histoweak import tracking
        from histoweak.methods.usegmix.pipeline import build_pool

        ctx = _sweep_context(space, table, n_classes, STORAGE / "derived", diff, parent.info.run_id,
                             tracking.tracking_uri())
        pool_dir = build_pool(ctx, diff)  # the sweep's pool: reused
        t1 = time.perf_counter()
        dtable = build_synthetic(ctx, diff, pool_dir)
        diffusion_s = time.perf_counter() - t1
        sets["USegMix, diffusion (DDPM)"] = _images(dtable)
    rows = []
    for name, imgs in sets.items():
        mean, std = _kid(featurizer, real_test, imgs)
        rows.append({"image set": name, "n": len(imgs), "KID x1000": 1000 * mean, "± x1000": 1000 * std})
    metrics = parent.data.metrics
    notes = {"pool segments/s (Ray Data, phase 1)": metrics.get("usegmix_pool_segments_per_s"),
             "synthesis images/s (biharmonic, phase 2)": metrics.get("usegmix_synthesis_images_per_s"),
             "sweep wall time, s": sweep_s}
    if "USegMix, diffusion (DDPM)" in sets:
        notes["synthesis images/s (diffusion)"] = 4 * args.diffusion_count / diffusion_s

    def mean_of(key, metric):
        return float(np.mean(cells[key][metric])) if key in cells else float("nan")

    backbone = space.hparams["backbone"]
    gains = {f"+{k}": 100 * (mean_of((backbone, k), "test_f1_macro") - mean_of((backbone, 0), "test_f1_macro"))
             for k in (n, 2 * n)}
    gains["cutmix"] = 100 * (mean_of((backbone, "cutmix"), "test_f1_macro") - mean_of((backbone, 0), "test_f1_macro"))
    notes.update({f"F1 macro gain vs no synthesis, {k} (points)": v for k, v in gains.items()})
    report("usegmix_counts" + ("_noshuffle" if args.no_shuffle else ""), rows, notes)
    return {"gains": gains, "kid": {r["image set"]: r["KID x1000"] for r in rows}}


if __name__ == "__main__":
    main()
