"""USegMix's pictures, logged on the sweep's MLflow run: Fig. 3/4 analogs (superpixels, prompts, anchor
segmentation of fixed training tiles) and Fig. 5 analogs (target, replacement, before and after inpainting).

The tiles are fixed — the first training tiles of each class in tile-key order — so two sweeps show the same
tiles and a changed setting is visible side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["fixed_tiles", "pool_figures", "synthesis_figures"]


def fixed_tiles(tile_table: str, per_class: int = 1, max_tiles: int = 4) -> dict[str, np.ndarray]:
    """The first ``per_class`` training tiles of each class in tile-key order (images, labels, keys)."""
    from histoweak.data.schema import tile_keys
    from histoweak.data.streaming import read_split_meta

    meta = read_split_meta(tile_table, "train", ["label", "slide_id", "x", "y"])
    keys = np.asarray(tile_keys(meta["slide_id"], meta["x"], meta["y"]), dtype=object)
    order = np.argsort(keys, kind="stable")
    chosen: list[str] = []
    for c in np.unique(meta["label"]):
        chosen += [str(k) for k in keys[order][meta["label"][order] == c][:per_class]]
    chosen = chosen[:max_tiles]
    rows = read_split_meta(tile_table, "train", ["image", "label"], keys=set(chosen))
    got = tile_keys(rows["slide_id"], rows["x"], rows["y"])
    idx = [got.index(k) for k in chosen]
    return {"image": rows["image"][idx], "label": rows["label"][idx], "key": np.asarray(chosen, dtype=object)}


def _outline(ax, mask: np.ndarray, colour: str) -> None:
    if mask.any():
        ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=0.8)


def pool_figures(tile_table: str, settings: dict[str, Any], n_tiles: int = 2) -> dict[str, Any]:
    """``usegmix_phase1.png``: per fixed tile — the tile; SLIC superpixels with the K prompts of each (Fig. 3);
    the anchor segments after duplicate removal, one colour each (Fig. 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import mark_boundaries

    from histoweak.methods.usegmix.segment import anchor_segments, build_segmenter

    tiles = fixed_tiles(tile_table, per_class=1, max_tiles=n_tiles)
    segmenter = build_segmenter(settings["segmenter"], settings["segmenter_weights"])
    fig, axes = plt.subplots(len(tiles["key"]), 3, figsize=(9, 3 * len(tiles["key"])), squeeze=False)
    for row, (img, key) in enumerate(zip(tiles["image"], tiles["key"])):
        res = anchor_segments(img, segmenter, n_superpixels=settings["n_superpixels"], k=settings["prompts"],
                              seed=settings["seed"])
        axes[row, 0].imshow(img)
        axes[row, 0].set_title(str(key), fontsize=7)
        axes[row, 1].imshow(mark_boundaries(img, res.labels, color=(1, 1, 0)))
        for pts in res.prompts.values():
            axes[row, 1].plot(pts[:, 0], pts[:, 1], ".", ms=2, color="cyan")
        axes[row, 1].set_title(f"{len(res.prompts)} superpixels, {res.n_prompts} prompts", fontsize=8)
        seg = np.zeros(img.shape[:2], np.int32)
        for i, m in enumerate(res.anchors, start=1):
            seg[m & (seg == 0)] = i
        axes[row, 2].imshow(img)
        axes[row, 2].imshow(np.ma.masked_equal(seg, 0), cmap="tab20", alpha=0.55, interpolation="nearest")
        axes[row, 2].set_title(f"{len(res.anchors)} anchor segments ({settings['segmenter']})", fontsize=8)
        for ax in axes[row]:
            ax.axis("off")
    fig.suptitle("USegMix phase 1: superpixels, prompts, anchor segments (Fig. 3/4)", fontsize=9)
    fig.tight_layout()
    return {"usegmix_phase1.png": fig}


def synthesis_figures(tile_table: str, pool_dir: str | Path, settings: dict[str, Any], n_tiles: int = 3
                      ) -> dict[str, Any]:
    """``usegmix_phase2.png``: per fixed tile — the target with its replaced segments outlined; the replacement
    segments; the pasted image before inpainting (seam outlined); after inpainting (Fig. 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from histoweak.methods.usegmix.inpaint import build_inpainter
    from histoweak.methods.usegmix.pool import read_pool
    from histoweak.methods.usegmix.replace import ReplacementSampler, synthesize

    pool = read_pool(pool_dir)
    inpainter = build_inpainter(settings["inpainter"], settings["inpainter_model"], scheduler_steps=settings["ddim_steps"],
                                mcg=settings["mcg"])
    tiles = fixed_tiles(tile_table, per_class=1, max_tiles=n_tiles)
    sampler = ReplacementSampler(pool.features_by_class(), seed=settings["seed"])
    rng = np.random.default_rng(settings["seed"])
    fig, axes = plt.subplots(len(tiles["key"]), 4, figsize=(12, 3 * len(tiles["key"])), squeeze=False)
    for row, (img, c, key) in enumerate(zip(tiles["image"], tiles["label"], tiles["key"])):
        segs = pool.segments_of(str(key))
        for ax in axes[row]:
            ax.axis("off")
        if not segs:
            axes[row, 0].set_title(f"{key}: no segments in the pool", fontsize=7)
            continue
        masks = [pool.mask(j) for j in segs]
        out = synthesize(img, masks, pool.features[segs], int(c), pool.source(), sampler, inpainter, rng,
                         ratio=tuple(settings["ratio"]),
                         own=set(np.flatnonzero(np.isin(pool.by_class(int(c)), segs)).tolist()))
        axes[row, 0].imshow(img)
        for t, _ in out.replaced:
            _outline(axes[row, 0], masks[t], "yellow")
        axes[row, 0].set_title(f"target ({key}), class {int(c)}", fontsize=7)
        crops = [pool.source().crop(int(c), j)[0] for _, j in out.replaced[:4]]
        if crops:
            h = max(x.shape[0] for x in crops)
            axes[row, 1].imshow(np.concatenate([np.pad(x, ((0, h - x.shape[0]), (0, 2), (0, 0)),
                                                       constant_values=255) for x in crops], axis=1))
        axes[row, 1].set_title(f"{len(out.replaced)} replacement segment(s)", fontsize=8)
        axes[row, 2].imshow(out.before)
        _outline(axes[row, 2], out.seam, "cyan")
        axes[row, 2].set_title("pasted, seam outlined", fontsize=8)
        axes[row, 3].imshow(out.image)
        axes[row, 3].set_title(f"inpainted ({settings['inpainter']}), new area {out.ratio:.0%}", fontsize=8)
    fig.suptitle("USegMix phase 2: segment replacement and inpainting (Fig. 5)", fontsize=9)
    fig.tight_layout()
    return {"usegmix_phase2.png": fig}
