"""USegMix's two derived tables, built before a sweep: the segment pool (phase 1) and the synthetic tiles
(phase 2). The mappers are plain classes that Ray Data actors hold (``SweepContext.map_table``): each builds
its segmenter / backbone / inpainter once and maps batches. No Ray in here.

Layout under the sweep storage's ``derived/`` directory::

    usegmix-pool-<digest>/raw.parquet          anchors of every training tile, raw backbone features
    usegmix-pool-<digest>/pool/                the pool: PCA'd features, masks, bboxes (``pool.write_pool``)
    usegmix-synth-<digest>/usegmix-<class>.parquet   ``count`` synthetic tiles of one class (tile schema +
                                               ``provenance``); a class whose file exists is not redone
    usegmix-synth-<digest>/_manifest.json      written last: settings, counts, classes

A digest covers the settings of its phase, the tile table's content and the source of this package (so a
fix to the method is never hidden by a table made before it): a changed setting, table or method makes new
directories, and the same ones are reused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from histoweak.data.schema import SCHEMA, tile_keys
from histoweak.methods.base import SweepContext

__all__ = ["POOL_KEYS", "SYNTH_KEYS", "PoolMapper", "SynthMapper", "build_pool", "build_synthetic"]

#: settings each phase depends on (its directory's digest)
POOL_KEYS = ("segmenter", "segmenter_weights", "n_superpixels", "prompts", "feature_backbone", "feature_weights",
             "feature_size", "pca_dim", "seed")
SYNTH_KEYS = ("count", "inpainter", "inpainter_model", "ddim_steps", "mcg", "ratio", "seed")
_META = ["image", "label", "slide_id", "x", "y", "tissue_ratio"]


def _digest(value: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _code() -> str:
    """Digest of this package's source: derived tables are only as good as the code that made them."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:12]


def _tile_seed(seed: int, key: str) -> int:
    import zlib

    return (seed * 1_000_003 + zlib.crc32(key.encode())) % 2**31


class PoolMapper:
    """Training tiles -> rows of their anchor segments (``pool.pool_rows_for_tile``) with raw features."""

    def __init__(self, segmenter: str, segmenter_weights: str | None, n_superpixels: int, prompts: int,
                 feature_backbone: str, feature_weights: str | None, feature_size: int, seed: int):
        import torch

        from histoweak.methods.usegmix.pool import SegmentFeaturizer
        from histoweak.methods.usegmix.segment import build_segmenter

        device = "cuda" if torch.cuda.is_available() else "cpu"  # the actor holds a GPU when the cluster has them
        if device == "cpu":
            torch.set_num_threads(1)  # one actor per CPU
        self.segmenter = build_segmenter(segmenter, segmenter_weights, device=device)
        self.featurizer = SegmentFeaturizer(feature_backbone, feature_weights, device=device, size=feature_size)
        self.n_superpixels, self.prompts, self.seed = n_superpixels, prompts, seed

    def __call__(self, batch: dict) -> pa.Table:
        from histoweak.methods.usegmix.pool import pool_rows_for_tile, pool_table

        rows = []
        for img, key, label in zip(batch["image"], tile_keys(batch["slide_id"], batch["x"], batch["y"]),
                                   batch["label"]):
            rows += pool_rows_for_tile(img, key, "train", int(label), self.segmenter, self.featurizer,
                                       n_superpixels=self.n_superpixels, k=self.prompts,
                                       seed=_tile_seed(self.seed, key))
        return pool_table(rows)


def build_pool(ctx: SweepContext, settings: dict[str, Any]) -> Path:
    """Phase 1 over the training split (skipped when the pool exists); returns the pool directory."""
    from histoweak import tracking
    from histoweak.methods.usegmix.pool import finish_pool

    part = {k: settings[k] for k in POOL_KEYS}
    root = Path(ctx.directory) / f"usegmix-pool-{_digest([part, tracking.dataset_hash(ctx.tile_table), _code()])}"
    pool_dir = root / "pool"
    if (pool_dir / "_manifest.json").exists():
        print(f"histoweak: usegmix: segment pool exists: {pool_dir}")
        return pool_dir
    raw = root / "raw.parquet"
    if not raw.exists():
        start = time.perf_counter()
        n = ctx.map_table(ctx.tile_table, raw, PoolMapper,
                          {"segmenter": settings["segmenter"], "segmenter_weights": settings["segmenter_weights"],
                           "n_superpixels": settings["n_superpixels"], "prompts": settings["prompts"],
                           "feature_backbone": settings["feature_backbone"],
                           "feature_weights": settings["feature_weights"],
                           "feature_size": settings["feature_size"], "seed": settings["seed"]},
                          split="train", columns=_META, concurrency=settings["concurrency"], batch_size=2,
                          desc="usegmix phase 1 (segment pool)")
        seconds = time.perf_counter() - start
        ctx.log_metrics({"usegmix_pool_segments": n, "usegmix_pool_seconds": seconds,
                         "usegmix_pool_segments_per_s": n / max(seconds, 1e-9)})
    finish_pool(raw, pool_dir, dim=settings["pca_dim"], seed=settings["seed"],
                manifest={"settings": part, "tile_table": ctx.tile_table})
    if ctx.log_figures is not None:
        from histoweak.methods.usegmix.figures import pool_figures

        ctx.log_figures(pool_figures(ctx.tile_table, settings, n_tiles=2))
    return pool_dir


class SynthMapper:
    """Items ``{"class": c, "count": n, "seed": s}`` -> the class's ``n`` synthetic tiles (rows of the tile schema
    plus ``provenance``), made in order by one sampler, so eq. 1's usage weights run over the whole class."""

    def __init__(self, pool_dir: str, tile_table: str, inpainter: str, inpainter_model: str | None, ddim_steps: int,
                 mcg: bool, ratio: list[float], class_names: list[str]):
        import torch

        from histoweak.data.streaming import read_split_meta
        from histoweak.methods.usegmix.inpaint import build_inpainter
        from histoweak.methods.usegmix.pool import read_pool

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(1)
        self.pool = read_pool(pool_dir)
        self.inpainter = build_inpainter(inpainter, inpainter_model, scheduler_steps=ddim_steps, mcg=mcg,
                                         device=device)
        self.backend = inpainter if inpainter != "diffusion" else f"diffusion:{inpainter_model}"
        self.ratio = tuple(ratio)
        self.class_names = class_names
        self.tiles = read_split_meta(tile_table, "train", _META)
        self.keys = np.asarray(tile_keys(self.tiles["slide_id"], self.tiles["x"], self.tiles["y"]), dtype=object)

    def __call__(self, batch: dict) -> pa.Table:
        return pa.concat_tables([self._class(int(c), int(n), int(s))
                                 for c, n, s in zip(batch["class"], batch["count"], batch["seed"])])

    def _class(self, c: int, n: int, seed: int) -> pa.Table:
        from histoweak.methods.usegmix.replace import ReplacementSampler, synthesize
        from histoweak.slides.tiling import encode_image

        rng = np.random.default_rng([seed, c])
        sampler = ReplacementSampler(self.pool.features_by_class(), seed=seed * 7919 + c)
        source = self.pool.source()
        in_class = self.pool.by_class(c)  # the sampler's index j within class c -> the pool's row
        targets = [i for i in np.flatnonzero(self.tiles["label"] == c) if self.pool.segments_of(self.keys[i])]
        if not targets:
            raise ValueError(f"usegmix: class {c} has no training tile with segments in the pool")
        order = rng.permutation(targets)
        rows, made, tries = [], 0, 0
        while made < n:
            i = int(order[tries % len(order)])  # round robin over the class's tiles, in a seeded order
            tries += 1
            segs = self.pool.segments_of(self.keys[i])
            out = synthesize(self.tiles["image"][i], [self.pool.mask(j) for j in segs], self.pool.features[segs], c,
                             source, sampler, self.inpainter, rng, ratio=self.ratio,
                             own=set(np.flatnonzero(np.isin(in_class, segs)).tolist()))
            if not out.ok and tries < 10 * n:  # this tile's segments cannot reach the ratio: take another
                continue
            size = out.image.shape[0]
            labels = np.zeros(len(self.class_names), np.uint8)
            labels[c] = 1
            rows.append({
                "slide_id": f"usegmix-{self.class_names[c]}", "source": "usegmix", "split": "train",
                "x": made, "y": 0, "level": 0, "downsample": 1.0, "size": size, "image": encode_image(out.image),
                "mask": None, "labels": labels.tolist(), "label": c,
                "tissue_ratio": float(self.tiles["tissue_ratio"][i]), "class_ratios": None, "group": None,
                "mpp": None,  # decode_tiles does not carry the column
                "provenance": json.dumps({
                    "target_tile": self.keys[i],
                    "replaced": [[self.pool.segment_ids[segs[t]], self.pool.segment_ids[in_class[p]]]
                                 for t, p in out.replaced],
                    "new_area_ratio": round(float(out.ratio), 4), "ok": bool(out.ok), "backend": self.backend}),
            })
            made += 1
        schema = SCHEMA.append(pa.field("provenance", pa.string()))
        return pa.Table.from_pylist(rows, schema=schema)


def build_synthetic(ctx: SweepContext, settings: dict[str, Any], pool_dir: Path) -> Path:
    """Phase 2: ``count`` synthetic tiles per class (classes already made are kept); returns the table."""
    from histoweak import tracking

    part = {k: settings[k] for k in SYNTH_KEYS}
    key = _digest([part, str(pool_dir), tracking.dataset_hash(ctx.tile_table), _code()])
    out = Path(ctx.directory) / f"usegmix-synth-{key}"
    manifest = out / "_manifest.json"
    if manifest.exists():
        print(f"histoweak: usegmix: synthetic tiles exist: {out}")
        return out
    names = ctx.class_names or [str(c) for c in range(ctx.n_classes)]
    todo = [{"class": c, "count": settings["count"], "seed": settings["seed"]} for c in range(len(names))
            if not (out / f"usegmix-{names[c]}.parquet").exists()]
    start = time.perf_counter()
    if todo:  # one file per class, written when the class is done: an interrupted synthesis keeps those
        ctx.map_table(todo, out, SynthMapper,
                      {"pool_dir": str(pool_dir), "tile_table": ctx.tile_table, "inpainter": settings["inpainter"],
                       "inpainter_model": settings["inpainter_model"], "ddim_steps": settings["ddim_steps"],
                       "mcg": settings["mcg"], "ratio": list(settings["ratio"]), "class_names": names},
                      concurrency=settings["concurrency"], batch_size=1, part_column="slide_id",
                      desc=f"usegmix phase 2 ({settings['count']} synthetic tiles x {len(todo)} classes)")
    if todo:
        seconds = time.perf_counter() - start
        made = settings["count"] * len(todo)
        ctx.log_metrics({"usegmix_synthesis_seconds": seconds, "usegmix_synthesis_images_per_s": made / seconds})
    import pyarrow.parquet as pq

    ratios = [json.loads(p)["new_area_ratio"] for f in sorted(out.glob("*.parquet"))
              for p in pq.read_table(f, columns=["provenance"]).column("provenance").to_pylist()]
    manifest.write_text(json.dumps({
        "source": "usegmix", "classes": names, "settings": part, "pool": str(pool_dir), "tile_table": ctx.tile_table,
        "counts": {"per_class": {c: settings["count"] for c in range(len(names))}, "tiles": len(ratios)},
        "new_area_ratio": {"mean": float(np.mean(ratios)), "min": float(np.min(ratios)), "max": float(np.max(ratios))},
    }, indent=2))
    if ctx.log_figures is not None:
        from histoweak.methods.usegmix.figures import synthesis_figures

        ctx.log_figures(synthesis_figures(ctx.tile_table, pool_dir, settings, n_tiles=3))
    return out
