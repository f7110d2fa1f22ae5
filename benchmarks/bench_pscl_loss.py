"""PSCL loss: histoweak's chunked ``pscl_loss`` vs pytorch-metric-learning's ``SupConLoss`` on the same kept pixels.

Both get the same feature map (batch × D × s × s, standard normal) and the
same CAMs (uniform in [0, 1], K channels including background); both
include the pseudo-labelling (argmax, max CAM > tau) and the gather of the
kept pixels, then one forward and one backward to the feature map. Per
feature-map size:

- loss: the two must agree (relative difference printed);
- fwd+bwd s: wall time, best of up to ``--repeats`` runs (fewer once 5 s
  are spent, so large maps are timed once); cpu s: the process CPU time of
  that run, less sensitive than wall time to other work on the machine;
- peak MB: peak resident set size during the first forward+backward at that
  size minus the resident size just before it (Linux ``getrusage``
  high-water mark), in a fresh subprocess per row, after a tiny warm-up
  call so one-time initialisation is not counted. It includes the feature
  gradient and the gathered kept features. The subprocesses run with
  ``MALLOC_MMAP_THRESHOLD_=131072``: every tensor above 128 KiB is then its
  own mapping, returned to the OS when freed, so RSS follows the tensors
  alive. With glibc's default adaptive threshold, freed chunk buffers stay
  in the heap and RSS also counts that garbage (``--default-malloc`` to
  see it; it is reused, not leaked, on the next call).

SupConLoss materialises several n_kept × n_kept matrices; rows whose
estimated peak exceeds ``--budget-gb`` are skipped, not run. A last row
shows ``pscl_loss`` with ``max_pixels`` at the largest size (a random
sample of the kept pixels, so its loss is an estimate and is not compared).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

# n_kept² float32 matrices SupConLoss holds at its peak (forward + backward): 1611 MB at n_kept = 6082 is 11.4.
# Used only to skip sizes that would not fit.
SUPCON_MATRICES = 12


def worker(impl: str, size: int, batch: int, dim: int, classes: int, tau: float, chunk: int, max_pixels: int | None,
           repeats: int) -> dict:
    """Runs in its own process; prints one JSON row."""
    import psutil
    import torch

    from histoweak.methods.pscl_loss import kept_pixel_labels, pscl_loss

    if impl == "supcon":
        from pytorch_metric_learning.losses import SupConLoss

        supcon = SupConLoss(temperature=0.1)

        def loss_fn(features, cams):
            labels, keep = kept_pixel_labels(cams, tau)
            return supcon(features.permute(0, 2, 3, 1).reshape(-1, dim)[keep], labels[keep])
    else:
        def loss_fn(features, cams):
            return pscl_loss(features, cams, tau=tau, temperature=0.1, chunk_size=chunk, max_pixels=max_pixels,
                             generator=torch.Generator().manual_seed(0))

    def run(features, cams) -> float:
        features.grad = None
        loss = loss_fn(features, cams)
        loss.backward()
        return loss.item()

    def inputs(batch, size):
        g = torch.Generator().manual_seed(0)
        return (torch.randn(batch, dim, size, size, generator=g, requires_grad=True),
                torch.rand(batch, classes, size, size, generator=g))

    run(*inputs(2, 4))  # one-time lazy initialisation (kernels, thread pools) is not the loss's memory
    features, cams = inputs(batch, size)
    rss0 = psutil.Process().memory_info().rss
    def timed_run() -> tuple[float, float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        value = run(features, cams)
        return time.perf_counter() - t0, time.process_time() - c0, value

    times = [timed_run()]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0  # ru_maxrss is in KiB on Linux
    while len(times) < repeats and sum(t[0] for t in times) < 5:  # large maps are timed once
        times.append(timed_run())
    seconds, cpu_seconds, value = min(times)
    n_kept = int(kept_pixel_labels(cams, tau)[1].sum())
    return {"loss": value, "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mb": peak / 2**20, "n_kept": n_kept}


def measure(impl: str, size: int, args, max_pixels: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--sizes", str(size), "--batch", str(args.batch),
           "--dim", str(args.dim), "--classes", str(args.classes), "--tau", str(args.tau),
           "--chunk-size", str(args.chunk_size), "--max-pixels", str(max_pixels or 0), "--repeats", str(args.repeats)]
    env = dict(os.environ) if args.default_malloc else {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {args.timeout:.0f} s"}
    if out.returncode:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"failed ({out.returncode}): {last[:100]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dim", type=int, default=256, help="feature channels D")
    ap.add_argument("--sizes", type=int, nargs="+", default=[7, 28, 56], help="feature-map sides")
    ap.add_argument("--classes", type=int, default=5, help="CAM channels K, background included")
    ap.add_argument("--tau", type=float, default=0.5, help="keeps ~1 - tau^K of the pixels (97 %% with the defaults)")
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--max-pixels", type=int, default=8192, help="for the sampled row at the largest size; 0: no row")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs, while they take < 5 s in all")
    ap.add_argument("--budget-gb", type=float, default=6.0, help="skip SupConLoss if its estimated peak is above this")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per subprocess")
    ap.add_argument("--default-malloc", action="store_true", help="measure with glibc's adaptive mmap threshold")
    ap.add_argument("--worker", choices=["ours", "supcon"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.sizes[0], args.batch, args.dim, args.classes, args.tau,
                                args.chunk_size, args.max_pixels or None, args.repeats)))
        return {}

    try:
        import pytorch_metric_learning
        have_pml = f"pytorch-metric-learning {pytorch_metric_learning.__version__}"
    except ImportError:
        have_pml = None
    rows, agreement = [], []
    for size in args.sizes:
        label = f"{size}x{size}"
        ours = measure("ours", size, args)
        n = ours.get("n_kept", round(args.batch * size * size * (1 - args.tau ** args.classes)))
        estimate_gb = SUPCON_MATRICES * 4 * n * n / 2**30
        if not have_pml:
            base = {"error": "unavailable: pytorch-metric-learning not installed"}
        elif estimate_gb > args.budget_gb:
            base = {"error": f"skipped (n² = {4 * n * n / 2**30:.1f} GB per matrix, est. peak {estimate_gb:.0f} GB)"}
        else:
            base = measure("supcon", size, args)
        for name, r in (("SupConLoss (baseline)", base), ("pscl_loss", ours)):
            row = {"map": label, "kept": n, "impl": name}
            if "error" in r:
                row["loss"] = r["error"]
            else:
                row.update({"loss": r["loss"], "fwd+bwd s": r["seconds"], "cpu s": r["cpu_seconds"],
                            "peak MB": r["peak_mb"]})
                if name == "pscl_loss" and "error" not in base:
                    row["rel diff"] = abs(r["loss"] - base["loss"]) / abs(base["loss"])
                    row["time ratio"] = r["seconds"] / base["seconds"]
                    row["memory ratio"] = r["peak_mb"] / max(base["peak_mb"], 1e-9)
                    agreement.append(row["rel diff"])
            rows.append(row)
    if args.max_pixels:
        size = max(args.sizes)
        r = measure("ours", size, args, max_pixels=args.max_pixels)
        row = {"map": f"{size}x{size}", "kept": min(args.max_pixels, r.get("n_kept", args.max_pixels)),
               "impl": f"pscl_loss, max_pixels={args.max_pixels}"}
        row.update({"loss": f"{r['loss']:.4g} (sample)", "fwd+bwd s": r["seconds"], "cpu s": r["cpu_seconds"],
                    "peak MB": r["peak_mb"]}
                   if "error" not in r else {"loss": r["error"]})
        rows.append(row)
    notes = {"batch": args.batch, "D": args.dim, "K (incl. background)": args.classes, "tau": args.tau,
             "temperature": 0.1, "chunk_size": args.chunk_size, "baseline": have_pml or "not installed",
             "peak MB": "peak RSS during one fwd+bwd minus RSS before it, fresh process per row, "
                        + ("glibc default malloc" if args.default_malloc else "MALLOC_MMAP_THRESHOLD_=131072"),
             "ratios": "pscl_loss / SupConLoss (lower is better)"}
    report("pscl_loss", rows, notes)
    return {"max_rel_diff": max(agreement) if agreement else None,
            "memory_ratio": next((r["memory ratio"] for r in reversed(rows) if "memory ratio" in r), None),
            "compared_at": next((r["map"] for r in reversed(rows) if "memory ratio" in r), None)}


if __name__ == "__main__":
    main()
