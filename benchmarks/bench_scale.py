"""A million-tile table: generation, streaming into torch, memory of the driver and the Ray workers, group counts.

The table is synthetic but shaped like a tiled dataset: 64-px JPEG tiles (a pool of a few thousand distinct
ones, cycled), many slides, level-0 coordinates unique per slide, splits by slide (~80/10/10), multi-hot
labels over 5 classes and tissue ratios such that the groups of ``Task("class:1", 5).groups(meta, 0.5)`` are
imbalanced (few tiles of class 1 with little tissue, few without it with much). It is written once under
``.cache/scale-<tiles>/`` with ``write_table_atomic`` (row groups of 128) and a ``_manifest.json``.

Measured on it:

- ``torch_batches(read_tiles(root, split="train", columns=[image, labels, tissue_ratio]), batch_size=256)``:
  time to the first batch (from the ``read_tiles`` call, Ray workers starting included) and the steady rate
  over the following batches;
- peak memory of the driver and peak summed memory of the Ray worker processes (``ray::*`` processes
  descended from this driver) while streaming: RSS, and USS (private pages, from ``/proc/<pid>/smaps_rollup``
  via psutil), which leaves out shared libraries and the object store's shared memory that RSS counts in
  every process mapping it;
- ``histoweak.report.group_counts(root, "class:1", 5, 0.5)``: time and the driver's peak RSS.

Figures, not pass/fail: the memory figures show whether anything grows with the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, report, timed  # noqa: E402

CLASSES = ["background", "tumour", "stroma", "necrosis", "other"]
TILE = 64
TAU = 0.5
STREAM_COLUMNS = ["image", "labels", "tissue_ratio"]
MB = 1 << 20


def _tile_pool(n: int, seed: int) -> list[bytes]:
    """``n`` distinct 64-px JPEG tiles: an H&E-like tint, low-frequency texture and pixel noise."""
    from histoweak.slides.tiling import encode_image

    rng = np.random.default_rng(seed)
    tints = np.array([[0.85, 0.55, 0.75], [0.55, 0.35, 0.70], [0.95, 0.90, 0.92]], np.float32)
    out = []
    for start in range(0, n, 512):
        k = min(512, n - start)
        texture = rng.random((k, 8, 8, 1), np.float32).repeat(8, 1).repeat(8, 2)
        rgb = 255 * tints[rng.integers(len(tints), size=k)][:, None, None, :] * (0.6 + 0.4 * texture)
        rgb += rng.normal(0, 8, rgb.shape).astype(np.float32)
        out += [encode_image(im, "jpeg") for im in np.clip(rgb, 0, 255).astype(np.uint8)]
    return out


def _shard_table(rng: np.random.Generator, slides: list[dict], pool, n_classes: int):
    """The rows of ``slides`` (dicts with slide_id, split, label, n_tiles) as a tile table."""
    import pyarrow as pa

    from histoweak.data.schema import SCHEMA

    counts = np.array([s["n_tiles"] for s in slides])
    n = int(counts.sum())
    index = np.concatenate([np.arange(k) for k in counts])  # tile number within its slide
    cols = np.concatenate([np.full(k, int(np.ceil(np.sqrt(k)))) for k in counts])
    slide_label = np.repeat([s["label"] for s in slides], counts)
    # class 1 is common on slides labelled 1 and rare elsewhere; its tiles hold much tissue, the others little,
    # so at tau = 0.5 groups (y=0, large) and (y=1, small) are the rare ones
    y = rng.random(n) < np.where(slide_label == 1, 0.5, 0.03)
    tissue = np.where(y, rng.beta(4.0, 1.5, n), rng.beta(1.2, 3.0, n)).astype(np.float32)
    fg = np.zeros((n, n_classes - 1), bool)
    fg[:, 0] = y
    fg[:, 1:] = rng.random((n, n_classes - 2)) < np.linspace(0.3, 0.1, n_classes - 2)
    fg[~fg.any(1), 1] = True  # tissue is always of some class
    share = rng.gamma(1.0, size=fg.shape).astype(np.float32) * fg
    ratios = np.concatenate([(1 - tissue)[:, None], share / share.sum(1, keepdims=True) * tissue[:, None]], 1)
    labels = np.concatenate([(ratios[:, :1] > 0.01), fg], 1).astype(np.uint8)

    def lists(values: np.ndarray, type_):
        offsets = pa.array(np.arange(0, values.size + 1, values.shape[1], dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(values.ravel(), type_))

    given = {
        "slide_id": pa.array(np.repeat([s["slide_id"] for s in slides], counts)),
        "source": pa.array(["scale"] * n),
        "split": pa.array(np.repeat([s["split"] for s in slides], counts)),
        "x": pa.array((index % cols) * TILE, pa.int64()),
        "y": pa.array((index // cols) * TILE, pa.int64()),
        "level": pa.array(np.zeros(n, np.int16)),
        "downsample": pa.array(np.ones(n)),
        "size": pa.array(np.full(n, TILE, np.int32)),
        "image": pool.take(pa.array(rng.integers(len(pool), size=n))),
        "labels": lists(labels, pa.uint8()),
        "label": pa.array(slide_label.astype(np.int32)),
        "tissue_ratio": pa.array(tissue),
        "class_ratios": lists(ratios.astype(np.float32), pa.float32()),
        "mpp": pa.array(np.full(n, 0.5)),
    }
    # columns not set here (mask, group, any added later) are null
    return pa.Table.from_arrays([given.get(f.name, pa.nulls(n, f.type)) for f in SCHEMA], schema=SCHEMA)


def make_table(n_tiles: int, n_slides: int, n_files: int, seed: int = 0) -> Path:
    """The benchmark's tile table under ``CACHE/scale-<n_tiles>``, generated unless already there."""
    import pyarrow as pa

    from histoweak.data.schema import SCHEMA_VERSION, write_table_atomic

    out = CACHE / f"scale-{n_tiles}"
    generator = {"tiles": n_tiles, "slides": n_slides, "files": n_files, "tile_px": TILE, "seed": seed}
    manifest = out / "_manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("generator") == generator:
        return out
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    pool = pa.array(_tile_pool(4096, seed), pa.binary())
    print(f"scale: {len(pool)} distinct JPEG tiles encoded in {time.perf_counter() - start:.1f} s", flush=True)
    per_slide = np.full(n_slides, n_tiles // n_slides)
    per_slide[: n_tiles % n_slides] += 1
    split = np.array(["train", "val", "test"])[np.digitize(rng.permutation(n_slides) / n_slides, [0.8, 0.9])]
    slides = [{"slide_id": f"slide-{i:05d}", "split": str(split[i]), "label": int(rng.random() < 0.4),
               "n_tiles": int(per_slide[i])} for i in range(n_slides)]
    # a file holds slides of one split where it can, as a tiling job's per-slide files do
    order = sorted(range(n_slides), key=lambda i: (["train", "val", "test"].index(slides[i]["split"]), i))
    last = 0.0
    parts = np.array_split(order, min(n_files, n_slides))
    for k, part in enumerate(parts):
        write_table_atomic(_shard_table(rng, [slides[i] for i in part], pool, len(CLASSES)),
                           out / f"shard-{k:04d}" / "part-00000.parquet")
        if time.perf_counter() - last > 5 or k == len(parts) - 1:
            last = time.perf_counter()
            print(f"scale: {k + 1}/{len(parts)} files written, {last - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    manifest.write_text(json.dumps({
        "schema_version": SCHEMA_VERSION, "source": "scale", "classes": CLASSES, "generator": generator,
        "generation_s": seconds, "counts": {"slides": n_slides, "ok": n_slides, "failed": 0, "tiles": n_tiles},
        "slides": {s["slide_id"]: {"split": s["split"], "label": s["label"], "status": "ok", "n_tiles": s["n_tiles"]}
                   for s in slides}}, indent=1))
    return out


class MemorySampler:
    """Peak memory of this process and of the Ray workers it started, sampled every ``interval`` s in a thread.

    The driver's peak RSS is exact (the kernel's high-water mark, VmHWM, reset at start); its USS and the
    workers' figures are the largest sampled values. Workers are this process's descendants whose name or
    command line starts with ``ray::`` (a local cluster's raylet spawns them; on a joined cluster there
    are none here).
    """

    def __init__(self, interval: float = 0.1):
        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.peak = {"driver_uss": 0, "workers_rss": 0, "workers_uss": 0, "workers": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.rss_before = self.me.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        status = Path("/proc/self/status").read_text()
        self.peak["driver_rss"] = int(status.split("VmHWM:")[1].split()[0]) * 1024

    def _workers(self):
        import psutil

        out = []
        for p in self.me.children(recursive=True):
            try:
                if p.name().startswith("ray::") or (p.cmdline() or [""])[0].startswith("ray::"):
                    out.append(p)
            except psutil.Error:  # ended meanwhile
                pass
        return out

    def _sample(self):
        import psutil

        rss = uss = n = 0
        for p in self._workers():
            try:
                m = p.memory_full_info()
            except psutil.Error:
                continue
            rss, uss, n = rss + m.rss, uss + m.uss, n + 1
        me = self.me.memory_full_info().uss
        for key, value in (("driver_uss", me), ("workers_rss", rss), ("workers_uss", uss), ("workers", n)):
            self.peak[key] = max(self.peak[key], value)

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()


def stream(root: Path, n_batches: int, batch_size: int) -> dict:
    """Stream ``n_batches`` train batches; times in s from the ``read_tiles`` call."""
    from histoweak.data.streaming import read_tiles, torch_batches

    start = time.perf_counter()
    ds = read_tiles(str(root), split="train", columns=STREAM_COLUMNS)
    setup = time.perf_counter() - start
    it = iter(torch_batches(ds, batch_size=batch_size))
    first, images, batches = None, 0, 0
    try:
        for batch in it:
            batches += 1
            if first is None:
                first = time.perf_counter() - start
            else:
                images += len(batch["image"])
            if batches >= n_batches:
                break
    finally:
        if hasattr(it, "close"):
            it.close()
    end = time.perf_counter() - start
    return {"setup_s": setup, "first_batch_s": first, "batches": batches,
            "steady_img_s": images / (end - first) if batches > 1 else None}


def sampler_rate(root: Path, batch_size: int, n_batches: int) -> dict:
    """GERNE-style balanced batches (equal shares of the 4 groups at ``TAU``) drawn in this process by
    ``BalancedSampler.from_parquet`` from the train split: build time (row index and groups), first batch,
    steady images/s and the row-group cache's peak bytes."""
    import functools

    from histoweak.data.streaming import BalancedSampler
    from histoweak.methods.base import Task

    start = time.perf_counter()
    sampler = BalancedSampler.from_parquet(str(root), "train", STREAM_COLUMNS,
                                           functools.partial(Task("class:1", len(CLASSES)).groups, tau=TAU))
    build = time.perf_counter() - start
    t0, images, first = time.perf_counter(), 0, None
    for i, batch in enumerate(sampler.batches(batch_size, n_batches=n_batches)):
        if first is None:
            first, t0 = time.perf_counter() - t0, time.perf_counter()
        else:
            images += len(batch["image"])
    rate = images / (time.perf_counter() - t0) if n_batches > 1 else None
    return {"build_s": build, "first_batch_s": first, "img_s": rate, "cache_peak": sampler.source.peak_cache_nbytes,
            "reads": sampler.source.reads, "counts": sampler.counts}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=1_000_000)
    ap.add_argument("--slides", type=int, default=1000)
    ap.add_argument("--files", type=int, default=250)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--stream-batches", type=int, default=600,
                    help="batches to stream (default: ~60 s at the ~2,500 img/s measured on 2 cores)")
    ap.add_argument("--sampler-batches", type=int, default=100, help="balanced batches to draw")
    args = ap.parse_args(argv)

    root = make_table(args.tiles, args.slides, args.files)
    manifest = json.loads((root / "_manifest.json").read_text())
    files = sorted(root.glob("*/part-*.parquet"))
    on_disk = sum(f.stat().st_size for f in files)

    from histoweak import report as hw_report
    from histoweak._ray import init_ray

    with MemorySampler() as mem_counts:
        counts, counts_s = timed(hw_report.group_counts, str(root), "class:1", len(CLASSES), TAU)
    print(f"scale: group_counts in {counts_s:.1f} s", flush=True)

    _, ray_s = timed(init_ray)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    cold = stream(root, 2, args.batch)  # the first stream of a fresh cluster starts its Ray workers
    with MemorySampler() as mem_stream:
        s = stream(root, args.stream_batches, args.batch)
    print(f"scale: streamed {s['batches']} batches", flush=True)
    with MemorySampler() as mem_sampler:
        balanced = sampler_rate(root, args.batch, args.sampler_batches)
    print(f"scale: balanced sampler drew {args.sampler_batches} batches", flush=True)

    rows = [
        {"metric": "tiles in the table", "value": manifest["counts"]["tiles"], "unit": "tiles"},
        {"metric": "generation (when first made)", "value": manifest["generation_s"], "unit": "s"},
        {"metric": "table on disk", "value": on_disk / MB, "unit": f"MB in {len(files)} files"},
        {"metric": "init_ray() (local cluster start)", "value": ray_s, "unit": "s"},
        {"metric": "read_tiles() call (lists files, reads footers)", "value": s["setup_s"], "unit": "s"},
        {"metric": "first batch of a fresh cluster (Ray workers starting)", "value": cold["first_batch_s"], "unit": "s"},
        {"metric": "first batch, from read_tiles(), workers up", "value": s["first_batch_s"], "unit": "s"},
        {"metric": f"steady stream rate, batches 2-{s['batches']}", "value": s["steady_img_s"], "unit": "img/s"},
        {"metric": "driver RSS before streaming", "value": mem_stream.rss_before / MB, "unit": "MB"},
        {"metric": "driver peak RSS, streaming", "value": mem_stream.peak["driver_rss"] / MB, "unit": "MB"},
        {"metric": "driver peak USS, streaming", "value": mem_stream.peak["driver_uss"] / MB, "unit": "MB"},
        {"metric": f"Ray workers peak summed RSS ({mem_stream.peak['workers']} procs)",
         "value": mem_stream.peak["workers_rss"] / MB, "unit": "MB"},
        {"metric": "Ray workers peak summed USS", "value": mem_stream.peak["workers_uss"] / MB, "unit": "MB"},
        {"metric": "group_counts(class:1, tau=0.5)", "value": counts_s, "unit": "s"},
        {"metric": "driver RSS before group_counts", "value": mem_counts.rss_before / MB, "unit": "MB"},
        {"metric": "driver peak RSS, group_counts", "value": mem_counts.peak["driver_rss"] / MB, "unit": "MB"},
        {"metric": "BalancedSampler.from_parquet: row index and groups built", "value": balanced["build_s"],
         "unit": "s"},
        {"metric": "balanced sampler first batch", "value": balanced["first_batch_s"], "unit": "s"},
        {"metric": f"balanced sampler steady rate, batches 2-{args.sampler_batches}", "value": balanced["img_s"],
         "unit": "img/s"},
        {"metric": "balanced sampler row-group cache peak", "value": balanced["cache_peak"] / MB,
         "unit": f"MB ({balanced['reads']} row-group reads)"},
        {"metric": "driver RSS before the balanced sampler", "value": mem_sampler.rss_before / MB, "unit": "MB"},
        {"metric": "driver peak RSS, balanced sampler", "value": mem_sampler.peak["driver_rss"] / MB, "unit": "MB"},
    ]
    report("scale", rows, {"tiles": f"{TILE}px JPEG, {args.slides} slides, batch {args.batch}",
                           "train groups at tau=0.5 (y0 small, y0 large, y1 small, y1 large)":
                               list(counts.get("train", {}).values()),
                           "memory": "USS = private pages (psutil, smaps_rollup); RSS also counts shared pages "
                                     "(libraries, object store) in every process; workers = ray::* children"})
    return {"tiles": manifest["counts"]["tiles"], "generation_s": manifest["generation_s"], "disk_mb": on_disk / MB,
            "init_ray_s": ray_s,
            "first_batch_s": s["first_batch_s"], "cold_first_batch_s": cold["first_batch_s"], "steady_img_s": s["steady_img_s"], "batches": s["batches"],
            "driver_peak_rss_mb": mem_stream.peak["driver_rss"] / MB,
            "driver_peak_uss_mb": mem_stream.peak["driver_uss"] / MB,
            "workers_peak_rss_mb": mem_stream.peak["workers_rss"] / MB,
            "workers_peak_uss_mb": mem_stream.peak["workers_uss"] / MB,
            "group_counts_s": counts_s, "group_counts_driver_peak_rss_mb": mem_counts.peak["driver_rss"] / MB,
            "group_counts": counts, "sampler_img_s": balanced["img_s"], "sampler_build_s": balanced["build_s"],
            "sampler_driver_peak_rss_mb": mem_sampler.peak["driver_rss"] / MB}


if __name__ == "__main__":
    main()
