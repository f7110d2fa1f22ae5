"""Experiment-plane overheads.

1. Ray Train vs plain PyTorch: steps/s of ERM (same backbone, data, batch)
   in the Ray Train loop with 1 CPU worker (second epoch, steady state)
   vs a plain loop over a ``DataLoader(num_workers=1)`` on the same tile
   table; also the end-to-end wall time of each (Ray start-up included).
   Goal: >= 0.9x steps/s.
2. Sweep overhead: wall time of an 8-trial sweep vs the sum of its trials'
   time inside their training loops.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, report  # noqa: E402

HP = {"backbone": "tf_efficientnet_lite0", "weights": "imagenet", "lr": 1e-3}


def plain_loop(table: str, n_classes: int, batch: int, steps: int, epochs: int) -> tuple[float, float]:
    import torch
    from torch.utils.data import DataLoader

    from histoweak.methods import build_method
    from histoweak.methods.base import Task

    t_start = time.perf_counter()
    torch.manual_seed(0)
    method = build_method("erm", HP, Task("class:1", n_classes))
    ds = _LabelledTiles(Path(table))
    rate = 0.0
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        for i, (img, labels) in enumerate(DataLoader(ds, batch_size=batch, shuffle=True, num_workers=1, drop_last=True)):
            if i >= steps:
                break
            method.step({"image": img, "labels": labels})
            n += 1
        rate = n / (time.perf_counter() - t0)
    return rate, time.perf_counter() - t_start


class _LabelledTiles:
    """Plain map-style dataset: image (3, H, W) float and the multi-hot labels, read with pyarrow."""

    def __init__(self, root: Path):
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        t = pq.read_table(root, columns=["image", "labels", "split"])
        t = t.filter(pc.equal(t.column("split"), "train"))
        self.images = t.column("image").to_pylist()
        self.labels = t.column("labels").to_pylist()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        import torch

        from histoweak.slides.tiling import decode_image

        img = torch.from_numpy(decode_image(self.images[i])).permute(2, 0, 1).float().div_(255.0)
        return img, torch.tensor(self.labels[i], dtype=torch.float32)


def ray_train(table: str, n_classes: int, batch: int, steps: int, epochs: int, storage: str) -> tuple[float, float]:
    from histoweak.train import TrainConfig, fit

    cfg = TrainConfig(method="erm", hparams=HP, epochs=epochs, batch_size=batch, steps_per_epoch=steps, num_workers=1,
                      augment=False, name=f"bench-{time.time_ns()}", storage_path=storage)
    t0 = time.perf_counter()
    out = fit(cfg, table, n_classes)
    return out.metrics["train_steps_per_s"], time.perf_counter() - t0


def sweep(table: str, n_classes: int, trials: int, storage: str) -> tuple[float, float]:
    from histoweak.tune import load_search_space, run_sweep

    space = load_search_space(Path(__file__).resolve().parents[1] / "search_spaces" / "erm.yaml").with_overrides(
        {"name": f"bench-sweep-{time.time_ns()}", "num_samples": trials, "scheduler": {"type": "fifo"},
         "train.epochs": 1, "train.steps_per_epoch": 4, "train.batch_size": 16})
    t0 = time.perf_counter()
    rows = run_sweep(space, table, n_classes, storage=storage, progress=False)
    wall = time.perf_counter() - t0
    return wall, sum(r["loop_seconds"] or 0 for r in rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--trials", type=int, default=8)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{CACHE / 'bench-mlruns.db'}")

    from histoweak.data.defaults import default_tile_table, n_classes_of

    table = str(default_tile_table(CACHE / "data", preset="default"))
    n_classes = n_classes_of(table)
    import ray

    ray.shutdown()
    plain_rate, plain_wall = plain_loop(table, n_classes, args.batch, args.steps, epochs=2)
    from histoweak._ray import init_ray

    init_ray()
    storage = tempfile.mkdtemp(prefix="hw-bench-train-")
    try:
        ray_rate, ray_wall = ray_train(table, n_classes, args.batch, args.steps, 2, storage)
        sweep_wall, trial_sum = sweep(table, n_classes, args.trials, storage)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    rows = [
        {"comparison": "plain PyTorch loop (DataLoader, 1 worker) - baseline", "steps/s": plain_rate,
         "wall s (2 epochs)": plain_wall, "ratio": 1.0},
        {"comparison": "Ray Train loop, 1 CPU worker, Ray Data stream", "steps/s": ray_rate,
         "wall s (2 epochs)": ray_wall, "ratio": ray_rate / plain_rate},
    ]
    report("train_overhead", rows, {"batch": args.batch, "steps/epoch": args.steps, "backbone": HP["backbone"],
                                    "goal": "Ray Train >= 0.9x steps/s"})
    report("sweep_overhead", [{"trials": args.trials, "sweep wall s": sweep_wall, "sum of trial loop s": trial_sum,
                               "wall / sum": sweep_wall / max(trial_sum, 1e-9)}],
           {"trial": "1 epoch x 4 steps, fifo"})
    return {"train_ratio": ray_rate / plain_rate, "sweep_ratio": sweep_wall / max(trial_sum, 1e-9)}


if __name__ == "__main__":
    main()
