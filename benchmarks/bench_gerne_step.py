"""GERNE's step time against ERM on as many images.

Per backbone, seconds per ``Method.step`` on the same random images (CPU, plain PyTorch, the variants
interleaved round by round so they share the machine's state):

- ERM on one batch of 2B images (the baseline);
- GERNE: B biased + B less-biased images, two forward passes (each batch its own BatchNorm statistics, as the
  paper's Alg. 1), one backward through ``gerne_loss``.

Goal: GERNE / ERM step time <= 1.15x.
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
                "gerne": (build_method("gerne", {"backbone": backbone, "weights": None, "beta": 1.0}, task),
                          {**batch(b), "balanced": batch(b)}),
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
                     "erm_s_per_step": med["erm_2B"], "gerne_s_per_step": med["gerne"],
                     "gerne_vs_erm": med["gerne"] / med["erm_2B"]})
    worst = max(r["gerne_vs_erm"] for r in rows)
    report("gerne_step", rows, {"goal": "GERNE / ERM step time <= 1.15x", "worst gerne_vs_erm": worst})
    return {"gerne_vs_erm": worst}


if __name__ == "__main__":
    main(sys.argv[1:])
