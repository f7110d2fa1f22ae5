"""Streaming throughput into torch batches: histoweak's Ray Data stream vs a plain DataLoader, vs the decode ceiling.

Each pipeline reads the same Parquet tile table and decodes with the same
function, so the comparison is about the pipelines:

- DataLoader: ``torch.utils.data.DataLoader(num_workers=2)`` over a
  map-style dataset reading rows with pyarrow, default collation.
- histoweak: ``read_tiles`` (read + decode fused in Ray Data tasks) →
  ``torch_batches`` (``iter_torch_batches``), consumed by the driver.
- ceiling: a bare decode loop over all images on every core
  (``multiprocessing.Pool``), no batching or transfer.
- shuffled, as training streams (every epoch in a random order): ``DataLoader(shuffle=True,
  num_workers=2)`` over the same dataset (a random row per item, so the row-group cache of one row
  group misses: it reads a row group per tile, as a plain map-style dataset does), against histoweak's
  ``EpochShuffle`` (row groups in a random order, rows shuffled within windows of 1024 rows, read
  through a bounded row-group cache and decoded by two threads in the consuming process).

They run on PNG tiles and on JPEG tiles (decoding ~3x cheaper, so the pipeline's own costs show more), and
with a training-shaped consumer: one model step (forward, backward, SGD on a small timm CNN, random
weights) per batch, where the model rather than the stream is the bottleneck.

Goal: histoweak >= 1.0x the DataLoader and >= 80 % of the ceiling.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, bench_slide, report, timed  # noqa: E402


def make_table(size: int, tile: int, stride: int, fmt: str = "png") -> Path:
    from histoweak._ray import init_ray
    from histoweak.data.tiling_job import discover_slides, tile_dataset
    from histoweak.slides.tiling import TilingParams

    out = CACHE / f"stream-{size}-{tile}-{stride}" if fmt == "png" else CACHE / f"stream-{size}-{tile}-{stride}-{fmt}"
    if not (out / "_manifest.json").exists():
        init_ray()
        shutil.rmtree(out, ignore_errors=True)
        params = TilingParams(tile_size=tile, stride=stride, min_tissue=0.0, image_format=fmt)
        tile_dataset(discover_slides(str(bench_slide(size))), out, params, ["background", "tissue"], progress=False)
    return out


class _ParquetTiles:
    """Map-style torch dataset over the tile table's files, reading one row group at a time."""

    def __init__(self, root: Path):
        import pyarrow.parquet as pq

        self.files = sorted(root.glob("*/part-*.parquet"))
        self.index = []
        for fi, f in enumerate(self.files):
            md = pq.ParquetFile(f).metadata
            for rg in range(md.num_row_groups):
                self.index += [(fi, rg, r) for r in range(md.row_group(rg).num_rows)]
        self._cache = (None, None)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        import pyarrow.parquet as pq
        import torch

        from histoweak.slides.tiling import decode_image

        fi, rg, r = self.index[i]
        if self._cache[0] != (fi, rg):
            self._cache = ((fi, rg), pq.ParquetFile(self.files[fi]).read_row_group(rg, columns=["image", "tissue_ratio"]))
        table = self._cache[1]
        img = decode_image(table.column("image")[r].as_py())
        return torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0), float(table.column("tissue_ratio")[r].as_py())


def model_step():
    """One SGD step of a small CNN per batch (torch's default threads): the training-shaped consumer."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(images):
        loss = model(images).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def dataloader(root: Path, batch: int, train: bool = False, shuffle: bool = False) -> int:
    import torch
    from torch.utils.data import DataLoader

    step = model_step() if train else None
    n = 0
    loader = DataLoader(_ParquetTiles(root), batch_size=batch, num_workers=2, shuffle=shuffle,
                        generator=torch.Generator().manual_seed(0))
    for imgs, _ in loader:
        n += len(imgs)
        if step:
            step(imgs)
    return n


def histoweak_stream(root: Path, batch: int, train: bool = False) -> int:
    from histoweak.data.streaming import read_tiles, torch_batches

    step = model_step() if train else None
    n = 0
    for b in torch_batches(read_tiles(str(root), columns=["image", "tissue_ratio"]), batch_size=batch):
        n += len(b["image"])
        if step:
            step(b["image"])
    return n


def shuffled_stream(root: Path, batch: int, train: bool = False) -> int:
    """The training stream as a worker reads it: one epoch of ``EpochShuffle`` (no Ray needed)."""
    from histoweak.data.streaming import EpochShuffle, ParquetRows

    step = model_step() if train else None
    n = 0
    for b in EpochShuffle(ParquetRows(str(root), None, ["image", "tissue_ratio"]), seed=0).batches(0, batch, False):
        n += len(b["image"])
        if step:
            step(b["image"])
    return n


def ray_data_shuffled(root: Path, batch: int) -> int:
    """Ray Data's own shuffle, the alternative measured: a random block order (one block per row group) and a
    local shuffle buffer of 1024 rows. Not the training stream: with several workers, which rows reach which
    worker follows Ray Data's timing, so a rerun or a resumed run does not see the same order."""
    from histoweak.data.streaming import read_tiles, torch_batches

    ds = read_tiles(str(root), columns=["image", "tissue_ratio"]).randomize_block_order(seed=0)
    return sum(len(b["image"]) for b in torch_batches(ds, batch_size=batch, shuffle_buffer=1024, seed=0))


def _decode_file(path: str) -> int:
    import pyarrow.parquet as pq

    from histoweak.slides.tiling import decode_image

    col = pq.read_table(path, columns=["image"]).column("image").to_pylist()
    for data in col:
        decode_image(data)
    return len(col)


def ceiling(root: Path) -> int:
    files = [str(f) for f in sorted(root.glob("*/part-*.parquet"))]
    with mp.get_context("fork").Pool(os.cpu_count()) as pool:
        return sum(pool.map(_decode_file, files, chunksize=1))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--tile", type=int, default=224)
    ap.add_argument("--stride", type=int, default=180)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    roots = {fmt: make_table(args.size, args.tile, args.stride, fmt) for fmt in ("png", "jpeg")}
    import ray

    ray.shutdown()  # tiling started Ray; the process-forking contenders run before it starts again

    def best(fn, *a):
        return min((timed(fn, *a) for _ in range(args.repeats)), key=lambda r: r[1])

    # The process-forking contenders run before Ray starts in this process (forking a Ray driver crashes).
    measured = {}
    for fmt, root in roots.items():
        measured[("ceiling", fmt)] = best(ceiling, root)
        measured[("dataloader", fmt)] = best(dataloader, root, args.batch)
        measured[("dataloader-shuffled", fmt)] = best(dataloader, root, args.batch, False, True)
        measured[("shuffled", fmt)] = best(shuffled_stream, root, args.batch)
    measured[("dataloader", "train")] = best(dataloader, roots["png"], args.batch, True)
    measured[("dataloader-shuffled", "train")] = best(dataloader, roots["png"], args.batch, True, True)
    measured[("shuffled", "train")] = best(shuffled_stream, roots["png"], args.batch, True)

    from histoweak._ray import init_ray

    init_ray()
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    histoweak_stream(roots["png"], args.batch)  # warm: Ray workers started
    for fmt, root in roots.items():
        measured[("histoweak", fmt)] = best(histoweak_stream, root, args.batch)
    measured[("histoweak", "train")] = best(histoweak_stream, roots["png"], args.batch, True)
    measured[("raydata-shuffled", "png")] = best(ray_data_shuffled, roots["png"], args.batch)
    rate = {k: n / t for k, (n, t) in measured.items()}
    rows = []
    for fmt in ("png", "jpeg"):
        dl, hw, ce = rate[("dataloader", fmt)], rate[("histoweak", fmt)], rate[("ceiling", fmt)]
        rows += [
            {"pipeline": f"{fmt.upper()}: DataLoader(num_workers=2) over pyarrow (baseline)", "images": measured[("dataloader", fmt)][0],
             "img/s": dl, "vs DataLoader": 1.0, "vs ceiling": dl / ce},
            {"pipeline": f"{fmt.upper()}: histoweak read_tiles -> torch_batches (Ray Data)", "images": measured[("histoweak", fmt)][0],
             "img/s": hw, "vs DataLoader": hw / dl, "vs ceiling": hw / ce},
            {"pipeline": f"{fmt.upper()}: ceiling, bare decode loop on all cores", "images": measured[("ceiling", fmt)][0],
             "img/s": ce, "vs DataLoader": ce / dl, "vs ceiling": 1.0},
        ]
        sdl, sh = rate[("dataloader-shuffled", fmt)], rate[("shuffled", fmt)]
        rows += [
            {"pipeline": f"{fmt.upper()} shuffled: DataLoader(shuffle=True, num_workers=2) (baseline)",
             "images": measured[("dataloader-shuffled", fmt)][0], "img/s": sdl, "vs DataLoader": 1.0,
             "vs ceiling": sdl / ce},
            {"pipeline": f"{fmt.upper()} shuffled: histoweak EpochShuffle (the training stream)",
             "images": measured[("shuffled", fmt)][0], "img/s": sh, "vs DataLoader": sh / sdl, "vs ceiling": sh / ce,
             "vs unshuffled": sh / hw},
        ]
        if ("raydata-shuffled", fmt) in rate:
            rd = rate[("raydata-shuffled", fmt)]
            rows.append({"pipeline": f"{fmt.upper()} shuffled: Ray Data randomize_block_order + 1024-row buffer",
                         "images": measured[("raydata-shuffled", fmt)][0], "img/s": rd, "vs DataLoader": rd / sdl,
                         "vs ceiling": rd / ce, "vs unshuffled": rd / hw})
    dl_t, hw_t = rate[("dataloader", "train")], rate[("histoweak", "train")]
    rows += [
        {"pipeline": "PNG + model step: DataLoader (baseline)", "images": measured[("dataloader", "train")][0],
         "img/s": dl_t, "vs DataLoader": 1.0},
        {"pipeline": "PNG + model step: histoweak", "images": measured[("histoweak", "train")][0], "img/s": hw_t,
         "vs DataLoader": hw_t / dl_t},
        {"pipeline": "PNG shuffled + model step: DataLoader(shuffle=True) (baseline)",
         "images": measured[("dataloader-shuffled", "train")][0], "img/s": rate[("dataloader-shuffled", "train")],
         "vs DataLoader": 1.0},
        {"pipeline": "PNG shuffled + model step: histoweak EpochShuffle", "images": measured[("shuffled", "train")][0],
         "img/s": rate[("shuffled", "train")],
         "vs DataLoader": rate[("shuffled", "train")] / rate[("dataloader-shuffled", "train")]},
    ]
    report("streaming", rows, {"tiles": f"{args.tile}px, {measured[('ceiling', 'png')][0]} per table", "batch": args.batch,
                               "model step": "mobilenetv3_small_050, SGD, random weights",
                               "goal": ">= 1.0x DataLoader and >= 0.80 of ceiling"})
    return {"vs_dataloader": rate[("histoweak", "png")] / rate[("dataloader", "png")],
            "vs_ceiling": rate[("histoweak", "png")] / rate[("ceiling", "png")],
            "jpeg_vs_dataloader": rate[("histoweak", "jpeg")] / rate[("dataloader", "jpeg")],
            "jpeg_vs_ceiling": rate[("histoweak", "jpeg")] / rate[("ceiling", "jpeg")],
            "train_vs_dataloader": hw_t / dl_t,
            "shuffled_vs_dataloader": rate[("shuffled", "png")] / rate[("dataloader-shuffled", "png")],
            "shuffled_vs_ceiling": rate[("shuffled", "png")] / rate[("ceiling", "png")],
            "shuffled_vs_unshuffled": rate[("shuffled", "png")] / rate[("histoweak", "png")],
            "jpeg_shuffled_vs_dataloader": rate[("shuffled", "jpeg")] / rate[("dataloader-shuffled", "jpeg")],
            "shuffled_train_vs_dataloader": rate[("shuffled", "train")] / rate[("dataloader-shuffled", "train")]}


if __name__ == "__main__":
    main()
