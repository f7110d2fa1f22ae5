"""Why GERNE's extrapolation diverges here: a minimal run outside Ray (plain PyTorch, the platform's sampler and
method), GERNE at c = 0.5, beta = 1 (k = 1: in expectation the same group weights as resampling), three ways of
treating BatchNorm:

- ``two-pass``: B_b and B_lb in separate forward passes, each normalised by its own batch statistics (Alg. 1, the
  default);
- ``joint``: one forward of their concatenation (shared batch statistics);
- ``frozen``: BatchNorm in eval mode (ImageNet running statistics), so the network is one function of each
  image whatever batch it is in.

Prints L_b, L_lb and the train accuracy on B_b per block of steps. If only the batch-statistics variant diverges,
the extrapolation's -beta L_b term is being maximised through the batch statistics (B_b and B_lb differ in group
composition, so their statistics differ), not through the images.

    python benchmarks/gerne_bn_audit.py [--steps 60] [--shortcut 0.8]
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--shortcut", type=float, default=0.8)
    ap.add_argument("--c", type=float, default=0.5)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args(argv)

    from histoweak.data.defaults import default_tile_table
    from histoweak.data.streaming import BalancedSampler, ParquetRows
    from histoweak.methods import build_method
    from histoweak.methods.base import Task
    from histoweak.methods.gerne import batch_weights, gerne_loss

    table = str(default_tile_table(preset="gerne", shortcut=args.shortcut))
    task = Task("class:1", 5)
    groups = functools.partial(task.groups, tau=0.1)
    rows = ParquetRows(table, "train", ["image", "labels", "tissue_ratio"])
    out_rows, summary = [], {}
    for variant in ("two-pass", "joint", "frozen"):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = build_method("gerne", {"backbone": "tf_efficientnet_lite0", "weights": "imagenet", "lr": args.lr,
                                       "c": args.c, "beta": args.beta}, task)
        sb = BalancedSampler(rows, groups, seed=1)
        sl = BalancedSampler(rows, groups, seed=2)
        bb = sb.batches(32, batch_weights(sb.counts, 0.0))
        bl = sl.batches(32, batch_weights(sl.counts, args.c))
        log = []
        for step in range(args.steps):
            b, lb = next(bb), next(bl)
            m.train()
            if variant == "frozen":
                for mod in m.modules():
                    if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                        mod.eval()
            m.optimizer.zero_grad()
            if variant == "joint":
                logits = m(torch.cat([b["image"], lb["image"]]))
                out_b, out_lb = logits[:32], logits[32:]
            else:
                out_b, out_lb = m(b["image"]), m(lb["image"])
            loss_b = m.criterion(out_b, task.targets(b))
            loss_lb = m.criterion(out_lb, task.targets(lb))
            gerne_loss(loss_lb, loss_b, args.beta).backward()
            m.optimizer.step()
            acc_b = float((out_b.argmax(1) == task.targets(b)).float().mean())
            log.append((float(loss_b), float(loss_lb), acc_b))
            if (step + 1) % 10 == 0:
                lb_, llb_, a_ = np.mean(log[-10:], 0)
                print(f"{variant:<9} steps {step - 8:>3}-{step + 1:<3} L_b {lb_:8.3f}  L_lb {llb_:7.3f}  acc(B_b) {a_:.2f}",
                      flush=True)
                out_rows.append({"variant": variant, "steps": step + 1, "loss_b": lb_, "loss_lb": llb_, "acc_b": a_})
        summary[variant] = float(np.mean([l[0] for l in log[-10:]]))
    report("gerne_bn_audit", out_rows, {f"L_b over the last 10 steps, {k}": v for k, v in summary.items()})
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
