"""GERNE's step time: one fused backward vs ERM on as many images, and vs a naive two-backward GERNE.

Per backbone, steps/s of three ``Method.step`` calls on the same random images (CPU, plain PyTorch,
the variants interleaved round by round so they share the machine's state):

- ERM on one batch of 2B images (the baseline);
- GERNE fused (``gerne_loss``): B biased + B balanced images, one forward of the concatenation, one backward;
- GERNE naive (``fused=False``): two forwards, two ``autograd.grad`` calls, gradients combined by hand.

Goal: GERNE fused / ERM step time <= 1.15x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402


def main(argv=None) -> dict:
    import torch

    from histoweak.methods import build_method
    from histoweak.methods.base import Task

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    configs = [("tf_efficientnet_lite0", 96, 32), ("resnet50", 96, 16)]
    rounds, steps = (2, 2) if args.quick else (4, 3)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    task = Task("class:1", 5)
    rows = []
    for backbone, size, b in configs:
        g = torch.Generator().manual_seed(0)

        def batch(n):
            labels = torch.zeros(n, 5)
            labels[:, 1] = (torch.rand(n, generator=g) < 0.5).float()
            return {"image": torch.rand(n, 3, size, size, generator=g), "labels": labels}

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random weights: speed does not depend on them
            torch.manual_seed(0)
            variants = {
                "erm_2B": (build_method("erm", {"backbone": backbone, "weights": None}, task), batch(2 * b)),
                "gerne_fused": (build_method("gerne", {"backbone": backbone, "weights": None, "beta": 1.0}, task),
                                {**batch(b), "balanced": batch(b)}),
                "gerne_naive": (build_method("gerne", {"backbone": backbone, "weights": None, "beta": 1.0,
                                                       "fused": False}, task), {**batch(b), "balanced": batch(b)}),
            }
        for m, bt in variants.values():  # warm-up
            m.step(bt)
        times = {k: [] for k in variants}
        for _ in range(rounds):
            for k, (m, bt) in variants.items():
                t0 = time.perf_counter()
                for _ in range(steps):
                    m.step(bt)
                times[k].append((time.perf_counter() - t0) / steps)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"backbone": backbone, "input": size, "images_per_step": 2 * b,
                     "erm_s_per_step": med["erm_2B"], "gerne_fused_s_per_step": med["gerne_fused"],
                     "gerne_naive_s_per_step": med["gerne_naive"],
                     "fused_vs_erm": med["gerne_fused"] / med["erm_2B"],
                     "naive_vs_fused": med["gerne_naive"] / med["gerne_fused"]})
    worst = max(r["fused_vs_erm"] for r in rows)
    report("gerne_step", rows, {"goal": "GERNE fused / ERM step time <= 1.15x", "worst fused_vs_erm": worst})
    return {"fused_vs_erm": worst, "naive_vs_fused": min(r["naive_vs_fused"] for r in rows)}


if __name__ == "__main__":
    main(sys.argv[1:])
