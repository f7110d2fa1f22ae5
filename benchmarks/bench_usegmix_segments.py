"""USegMix phase 1 throughput: ``anchor_segments`` per tile, per segmenter and tile size; cached vs re-encoded
LiteMedSAM embeddings; segment features.

Tiles are the most tissue-filled 128- and 256-px windows of synthetic H&E
slides (``histoweak.data.synthetic``, 512² px). Each segmenter is warmed up
on one tile first (imports, kernel initialisation), then per tile size:

- superpixels / prompts / anchors: means per tile (N_s superpixels asked,
  K prompts each; anchors after duplicate removal);
- s/tile: wall time of ``anchor_segments`` (SLIC, prompts, one encode, one
  decode batch per superpixel, anchor selection); encode s: one
  ``set_image`` alone; decode ms/prompt: the rest of the time over the
  prompts;
- segments/s: anchors per second (what the pool gains), prompts/s: decoded
  prompts per second.

LiteMedSAM resizes every tile to its 256-px input, so its cost barely
depends on the tile size. The cached-vs-re-encode rows decode
``--reencode-prompts`` prompts of one 256-px tile two ways: one
``set_image`` then one batched ``masks`` call (what ``anchor_segments``
does), and ``set_image`` + ``masks`` per prompt; "per 450 prompts" projects
both to the paper's N_s · K = 30 · 15 prompts of one image. The last row
times ``SegmentFeaturizer`` (EfficientNet-Lite0, ImageNet) on 224-px crops.

Torch runs with ``--threads`` intra-op threads (default 1, as each Ray Data
actor of the pool job does).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402


def bench_tiles(size: int, n: int) -> list[np.ndarray]:
    """``n`` size² tiles, each the most tissue-filled window (step size/4) of its own 512² synthetic slide."""
    from histoweak.data.synthetic import SynthPreset, render_slide

    tiles = []
    for i in range(n):
        rgb, mask = render_slide(SynthPreset(size=512, n_slides=1), seed=11 + i)
        step = size // 4
        y, x = max(((y, x) for y in range(0, 512 - size + 1, step) for x in range(0, 512 - size + 1, step)),
                   key=lambda p: (mask[p[0]:p[0] + size, p[1]:p[1] + size] > 0).mean())
        tiles.append(np.ascontiguousarray(rgb[y:y + size, x:x + size]))
    return tiles


def time_anchor_segments(seg, tiles, n_superpixels: int, k: int) -> dict:
    from histoweak.methods.usegmix.segment import anchor_segments

    secs, enc, sps, prompts, anchors = [], [], [], [], []
    for i, tile in enumerate(tiles):
        t0 = time.perf_counter()
        seg.set_image(tile)
        enc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        r = anchor_segments(tile, seg, n_superpixels=n_superpixels, k=k, seed=i)
        secs.append(time.perf_counter() - t0)
        sps.append(len(r.prompts))
        prompts.append(r.n_prompts)
        anchors.append(len(r.anchors))
    total = sum(secs)
    return {"tiles": len(tiles), "superpixels": float(np.mean(sps)), "prompts": float(np.mean(prompts)),
            "anchors": float(np.mean(anchors)), "s/tile": total / len(tiles), "encode s": float(np.mean(enc)),
            "decode ms/prompt": 1000 * (total - sum(enc)) / sum(prompts),
            "segments/s": sum(anchors) / total, "prompts/s": sum(prompts) / total}


def cached_vs_reencode(seg, tile: np.ndarray, n_prompts: int, per_image: int) -> list[dict]:
    from histoweak.methods.usegmix.segment import prompt_boxes, sample_prompts, superpixel_bboxes, superpixels

    labels = superpixels(tile)
    prompts = sample_prompts(labels, k=n_prompts, rng=0)
    sp = max(prompts, key=lambda s: (labels == s).sum())  # the biggest superpixel
    pts = prompts[sp]
    boxes = prompt_boxes(pts, superpixel_bboxes(labels)[sp])
    t0 = time.perf_counter()
    seg.set_image(tile)
    t_enc = time.perf_counter() - t0
    cached = seg.masks(pts, boxes)
    t_cached = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = []
    for i in range(n_prompts):
        seg.set_image(tile)
        again.append(seg.masks(pts[i:i + 1], boxes[i:i + 1])[0])
    t_re = time.perf_counter() - t0
    agree = float(np.mean([(a == b).mean() for a, b in zip(cached, again)]))
    # per image: one encode + per_image decodes, vs per_image (encode + decode)
    projected = {"cached embedding": t_enc + per_image * (t_cached - t_enc) / n_prompts,
                 "re-encode per prompt": per_image * t_re / n_prompts}
    rows = [{"segmenter": f"litemedsam: {mode}", "tile px": tile.shape[0], "prompts": n_prompts, "s total": t,
             "s/prompt": t / n_prompts, f"s per {per_image} prompts": projected[mode], "pixel agreement": agree}
            for mode, t in (("cached embedding", t_cached), ("re-encode per prompt", t_re))]
    rows[1]["speedup"] = projected["re-encode per prompt"] / projected["cached embedding"]
    return rows


def time_featurizer(n: int) -> dict:
    from histoweak.methods.usegmix.pool import SegmentFeaturizer

    feat = SegmentFeaturizer("tf_efficientnet_lite0", "imagenet")
    crops = np.random.default_rng(0).integers(0, 256, size=(n, 224, 224, 3), dtype=np.uint8)
    feat(crops[:2])  # warm-up
    t0 = time.perf_counter()
    feat(crops)
    t = time.perf_counter() - t0
    return {"segmenter": "features: tf_efficientnet_lite0 (224 px crops)", "crops": n, "s total": t,
            "segments/s": n / t}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--segmenters", nargs="+", default=["classical", "litemedsam"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="tile sides, px")
    ap.add_argument("--tiles", type=int, default=3, help="tiles per size")
    ap.add_argument("--n-superpixels", type=int, default=30, help="N_s (paper: 30)")
    ap.add_argument("--k", type=int, default=15, help="prompts per superpixel (paper: 15)")
    ap.add_argument("--reencode-prompts", type=int, default=5, help="prompts for the cached-vs-re-encode rows")
    ap.add_argument("--feature-crops", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--quick", action="store_true", help="one tile per size, fewer feature crops")
    args = ap.parse_args(argv)
    if args.quick:
        args.tiles, args.feature_crops = 1, 16

    import torch

    from histoweak.methods.usegmix.segment import build_segmenter

    torch.set_num_threads(args.threads)
    tiles = {s: bench_tiles(s, args.tiles) for s in args.sizes}
    rows = []
    for name in args.segmenters:
        t0 = time.perf_counter()
        seg = build_segmenter(name)
        build_s = time.perf_counter() - t0
        time_anchor_segments(seg, [tiles[min(args.sizes)][0][:64, :64].copy()], 4, 2)  # warm-up
        for size in args.sizes:
            r = time_anchor_segments(seg, tiles[size], args.n_superpixels, args.k)
            rows.append({"segmenter": name, "tile px": size, **r, "build s": build_s})
            print(f"  {name} {size}px: {r['s/tile']:.2f} s/tile, {r['segments/s']:.2f} segments/s", flush=True)
        if name == "litemedsam" and args.reencode_prompts > 1:
            rows += cached_vs_reencode(seg, tiles[max(args.sizes)][0], args.reencode_prompts,
                                       args.n_superpixels * args.k)
    if args.feature_crops:
        rows.append(time_featurizer(args.feature_crops))
    notes = {"N_s": args.n_superpixels, "K": args.k, "torch threads": args.threads, "quick": args.quick,
             "tiles": "most tissue-filled windows of 512 px synthetic H&E slides (seed 11+)",
             "segments/s": "anchor segments (after duplicate removal) per second of anchor_segments"}
    report("usegmix_segments", rows, notes)
    by = {(r["segmenter"], r.get("tile px")): r for r in rows}
    return {f"{n}_{s}px_segments_per_s": by[(n, s)]["segments/s"] for n in args.segmenters for s in args.sizes}


if __name__ == "__main__":
    main()
