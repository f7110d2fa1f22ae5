"""USegMix phase 2 per image: the segment-replacement loop, then each inpainting backend on its seams.

One 128-px target image with 15×15-px segments and a made-up pool of ellipses runs ``synthesize`` to the §3.2
new-area ratio (≥ 30 %); its image before inpainting and its seam mask are then inpainted by every backend:

- biharmonic (scikit-image), the CPU default; Telea if OpenCV is installed;
- diffusion: RePaint with DDIM steps through a ``UNet2DModel`` of the ``ddpm`` method's default architecture
  (64 px, widths 32/64/64, one layer per block; random weights: the cost does not depend on training), 50 steps,
  RePaint resampling (jump length 10, 2 samples per jump), with and without MCG.

Each row: wall and CPU seconds per image (best of ``--repeats``), images/s, the UNet evaluations per image, and
the CPU cost relative to biharmonic. One torch thread by default (``--threads``): the cost per core, as one Ray
Data actor per CPU would see it, and stable on a shared machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402


class _Pool:
    """A class-0 pool of ellipses of random size and colour, as ``SegmentSource``."""

    def __init__(self, n: int, seed: int):
        rng = np.random.default_rng(seed)
        self.feats = rng.normal(size=(n, 8))
        self.crops = []
        for _ in range(n):
            h, w = rng.integers(8, 20, 2)
            yy, xx = np.mgrid[:h, :w]
            m = ((yy + 0.5 - h / 2) / (h / 2)) ** 2 + ((xx + 0.5 - w / 2) / (w / 2)) ** 2 <= 1
            colour = rng.integers(60, 230, 3)
            self.crops.append((np.broadcast_to(colour, (h, w, 3)).astype(np.uint8), m))

    def n(self, c):
        return len(self.crops)

    def features(self, c):
        return self.feats

    def crop(self, c, j):
        return self.crops[j]


class _Keep:
    """An inpainter that returns its input: isolates the replacement loop's own cost."""

    name = "none"

    def inpaint(self, image, mask, seed=0):
        return image.copy()


def _target(size: int, step: int, seed: int):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    image = np.stack([200 - 40 * np.sin(x / 9.0), 150 + 40 * np.cos(y / 7.0), 210 + 0 * x], -1)
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    segments = []
    for r in range(0, size, step):
        for c in range(0, size, step):
            m = np.zeros((size, size), bool)
            m[r:r + step - 1, c:c + step - 1] = True
            segments.append(m)
    return image, segments, rng.normal(size=(len(segments), 8))


def _best(fn, repeats: int) -> tuple[float, float]:
    """(wall s, process CPU s) of the fastest of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return min(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=128, help="target image side in pixels")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps of the diffusion backend")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--segment", type=int, default=16, help="target segments: a grid of this pitch (px)")
    args = ap.parse_args(argv)

    import torch

    import histoweak.methods.usegmix.ddpm  # noqa: F401  — registers "ddpm"
    from histoweak.methods.base import Task, build_method
    from histoweak.methods.usegmix.inpaint import ClassicalInpainter, DiffusionInpainter
    from histoweak.methods.usegmix.replace import ReplacementSampler, synthesize

    torch.set_num_threads(args.threads)
    image, segments, feats = _target(args.size, args.segment, seed=0)
    pool = _Pool(40, seed=1)
    sampler = ReplacementSampler({0: pool.features(0)}, seed=0)
    run = lambda: synthesize(image, segments, feats, 0, pool, sampler, _Keep(), np.random.default_rng(0))  # noqa: E731
    synth = run()
    replace_s, replace_cpu = _best(run, args.repeats)
    before, seam = synth.before, synth.seam

    torch.manual_seed(0)
    unet = build_method("ddpm", {}, Task("class:1")).unet
    backends = {"biharmonic": (ClassicalInpainter("biharmonic"), 0)}
    try:
        backends["telea (OpenCV)"] = (ClassicalInpainter("telea"), 0)
    except ImportError:
        pass
    for mcg in (False, True):
        inp = DiffusionInpainter(unet, scheduler_steps=args.steps, jump_length=10, jump_n_sample=2, mcg=mcg)
        inp.scheduler.set_timesteps(args.steps, 10, 2)
        evals = int((inp.scheduler.timesteps[1:] < inp.scheduler.timesteps[:-1]).sum()) + 1
        backends[f"diffusion, {args.steps} DDIM steps{', MCG' if mcg else ''}"] = (inp, evals)

    rows = [{"stage": "replacement loop (paste, eq. 1)", "s / image": replace_s, "cpu s / image": replace_cpu,
             "images / s": 1 / replace_s, "UNet evals": "-", "x biharmonic": "-"}]
    base = None
    for name, (inp, evals) in backends.items():
        out = inp.inpaint(before, seam, seed=0)  # warm-up, and the contract once more
        assert np.array_equal(out[~seam], before[~seam]), name
        s, cpu = _best(lambda: inp.inpaint(before, seam, seed=0), args.repeats)
        base = base or cpu
        rows.append({"stage": f"inpaint: {name}", "s / image": s, "cpu s / image": cpu, "images / s": 1 / s,
                     "UNet evals": evals or "-", "x biharmonic": cpu / base})
    notes = {"image": f"{args.size} px, {len(segments)} segments of {args.segment - 1} px squares, "
                      "pool of 40 ellipses of 8-19 px",
             "x biharmonic": "ratio of CPU seconds (less sensitive than wall time to other work on the machine)",
             "new-area ratio": synth.ratio, "seam (inpainted) fraction": float(seam.mean()),
             "replacements": len(synth.replaced),
             "UNet": "ddpm defaults: 64 px, block_out_channels (32, 64, 64), 1 layer per block, random weights",
             "RePaint": "jump_length 10, jump_n_sample 2; the image is resized to 64 px and back",
             "torch threads": args.threads, "timing": f"best of {args.repeats}"}
    report("usegmix_inpaint", rows, notes)
    return {r["stage"]: r["s / image"] for r in rows}


if __name__ == "__main__":
    main()
