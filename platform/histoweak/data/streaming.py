"""Streaming the tile table into PyTorch with Ray Data (the only module that knows Ray Data).

    read_parquet (split filter, needed columns) → decode (map_batches, fused with
    the read) → [materialize] → augment (map_batches) → iter_torch_batches

Images travel as uint8 NHWC (4x smaller than float) and become float on the
consumer. Resource plan: on a small machine Ray Train workers and Ray Data
tasks compete for the same CPUs; ``plan_resources`` gives workers a
fraction of a CPU and caps Ray Data so that neither can starve the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from histoweak.data.augment import augment_batch
from histoweak.slides.tiling import decode_image

__all__ = [
    "DEFAULT_COLUMNS",
    "ResourcePlan",
    "balanced_batches",
    "decode_tiles",
    "plan_resources",
    "read_tiles",
    "torch_batches",
]

DEFAULT_COLUMNS = ("image", "mask", "labels", "label", "tissue_ratio", "group", "slide_id")


@dataclass(frozen=True)
class ResourcePlan:
    """How many CPUs each training worker asks for, and how many Ray Data may use."""

    cpus_per_worker: float
    data_cpus: float


def plan_resources(total_cpus: float, num_workers: int, min_data_cpus: float = 1.0) -> ResourcePlan:
    """Split a node's CPUs between ``num_workers`` training workers and Ray Data.

    Ray Data always keeps at least ``min_data_cpus`` (so decode tasks can run
    while every worker holds its reservation); workers share the rest, at
    least 0.25 each (they mostly wait on data or on the GPU).

    Examples
    --------
    >>> plan_resources(2, 2)
    ResourcePlan(cpus_per_worker=0.5, data_cpus=1.0)
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    data = min(max(min_data_cpus, total_cpus / 2), total_cpus - 0.25 * num_workers)
    data = max(data, 0.5)
    per_worker = max(0.25, math.floor((total_cpus - data) / num_workers * 4) / 4)
    return ResourcePlan(cpus_per_worker=per_worker, data_cpus=total_cpus - per_worker * num_workers)


def _split_filter(split: str | Sequence[str]):
    from ray.data.expressions import col

    splits = [split] if isinstance(split, str) else list(split)
    return col("split").is_in(splits)


def decode_tiles(batch: pa.Table) -> dict[str, np.ndarray]:
    """Decode a batch of tile rows into arrays.

    Parameters
    ----------
    batch : pyarrow.Table with some of ``DEFAULT_COLUMNS``

    Returns
    -------
    dict with
        image : (N, H, W, 3) uint8
        mask : (N, H, W) uint8, where every row has one
        labels : (N, C) float32, where every row has them
        label, group : (N,) int64, -1 where null
        tissue_ratio : (N,) float32
        slide_id : (N,) object
    """
    out: dict[str, np.ndarray] = {}
    names = batch.column_names
    if "image" in names:
        imgs = batch.column("image").to_pylist()
        first = decode_image(imgs[0])
        arr = np.empty((len(imgs), *first.shape), np.uint8)
        arr[0] = first
        for i in range(1, len(imgs)):
            arr[i] = decode_image(imgs[i])
        out["image"] = arr
    if "mask" in names and batch.column("mask").null_count == 0:
        masks = batch.column("mask").to_pylist()
        out["mask"] = np.stack([decode_image(m) for m in masks])
    if "labels" in names and batch.column("labels").null_count == 0:
        col = batch.column("labels").combine_chunks()
        out["labels"] = col.values.to_numpy(zero_copy_only=False).reshape(len(col), -1).astype(np.float32)
    for key in ("label", "group"):
        if key in names:
            out[key] = batch.column(key).fill_null(-1).to_numpy().astype(np.int64)
    if "tissue_ratio" in names:
        out["tissue_ratio"] = batch.column("tissue_ratio").to_numpy().astype(np.float32)
    if "slide_id" in names:
        out["slide_id"] = np.asarray(batch.column("slide_id").to_pylist(), dtype=object)
    return out


def read_tiles(path: str | Sequence[str], split: str | Sequence[str] | None = None,
               columns: Sequence[str] = DEFAULT_COLUMNS, decode: bool = True, filesystem=None,
               batch_size: int = 128, concurrency: int | None = None):
    """A Ray Dataset of tiles from a tile table (local path or any pyarrow URI such as ``s3://…``).

    Parameters
    ----------
    path : the tile table directory (or files)
    split : keep only these splits (filtered in the Parquet reader)
    columns : columns to read; ``split`` is read for filtering when needed
    decode : decode images and masks in ``map_batches`` (fused with the read)
    batch_size : rows per decode task batch (row groups are 128)
    concurrency : decode tasks at once (Ray Data chooses when None)
    """
    import ray.data

    cols = list(dict.fromkeys([*columns, *(["split"] if split is not None else [])]))
    ds = ray.data.read_parquet(path, columns=cols, filesystem=filesystem, file_extensions=["parquet"])
    if split is not None:  # pushed down into the Parquet reader by Ray Data's optimizer
        ds = ds.filter(expr=_split_filter(split))
    if decode:
        ds = ds.map_batches(decode_tiles, batch_format="pyarrow", batch_size=batch_size, zero_copy_batch=True,
                            concurrency=concurrency)
    return ds


class _Augment:
    """Callable for ``map_batches``: a different random stream per task and epoch."""

    def __init__(self, seed: int, colour: bool):
        self.seed, self.colour = seed, colour
        self.rng = np.random.default_rng()

    def __call__(self, batch: dict) -> dict:
        return augment_batch(batch, seed=int(self.rng.integers(2**31)), colour=self.colour)


def torch_batches(ds, batch_size: int = 64, augment: bool = False, colour: bool = True, shuffle_buffer: int = 0,
                  drop_last: bool = False, seed: int | None = None, prefetch_batches: int = 2) -> Iterator[dict]:
    """Torch batches from a decoded tile dataset (or a ``streaming_split`` shard of one).

    Images come out as (N, 3, H, W) float32 in [0, 1]; masks (N, H, W) int64.
    ``augment`` applies random flips, rot90 and colour jitter per batch.
    """
    import torch

    it = ds
    if augment:
        it = ds.map_batches(_Augment, fn_constructor_args=(seed or 0, colour), batch_format="numpy",
                            batch_size=batch_size, concurrency=1)

    def collate(batch: dict) -> dict:
        out = {}
        for k, v in batch.items():
            if k == "image":
                out[k] = torch.from_numpy(np.ascontiguousarray(v)).permute(0, 3, 1, 2).float().div_(255.0)
            elif k == "mask":
                out[k] = torch.from_numpy(np.ascontiguousarray(v)).long()
            elif v.dtype == object:
                out[k] = list(v)
            else:
                out[k] = torch.from_numpy(np.ascontiguousarray(v))
        return out

    kwargs = dict(batch_size=batch_size, collate_fn=collate, drop_last=drop_last, prefetch_batches=prefetch_batches)
    if shuffle_buffer:
        kwargs.update(local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=seed)
    return it.iter_torch_batches(**kwargs)


def balanced_batches(ds, key: str, batch_size: int, n_batches: int, seed: int = 0, values: Sequence[int] | None = None,
                     augment: bool = False) -> Iterator[dict]:
    """Batches with an equal share of each value of column ``key`` (group- or class-balanced).

    Each value gets its own stream, cycled (rare groups are oversampled) and
    shuffled locally; every batch takes ``batch_size // len(values)`` rows of
    each (the remainder goes to the first values). ``values`` default to the
    distinct values found in the dataset.

    Parameters
    ----------
    ds : a decoded tile Dataset holding column ``key``
    key : e.g. ``"group"`` or ``"label"``
    n_batches : batches to yield
    """
    import torch

    if values is None:
        values = sorted(int(v) for v in ds.unique(key))
    if not values:
        raise ValueError(f"balanced stream: column {key!r} has no values")
    if batch_size < len(values):
        raise ValueError(f"balanced stream: batch_size {batch_size} < {len(values)} values of {key!r}")
    share = [batch_size // len(values) + (i < batch_size % len(values)) for i in range(len(values))]
    from ray.data.expressions import col

    parts = {v: ds.filter(expr=col(key) == v).materialize() for v in values}
    for v, part in parts.items():
        if part.count() == 0:
            raise ValueError(f"balanced stream: no rows with {key} == {v}")

    def cycle(v: int, k: int):
        epoch = 0
        while True:
            for b in torch_batches(parts[v], batch_size=k, augment=augment, shuffle_buffer=max(4 * k, 64),
                                   drop_last=False, seed=seed * 7919 + epoch * 31 + v):
                yield b
            epoch += 1

    streams = [(cycle(v, k), k) for v, k in zip(values, share)]
    pending = [None] * len(streams)
    for _ in range(n_batches):
        pieces = []
        for i, (stream, k) in enumerate(streams):
            got, need = [], k
            while need > 0:
                b = pending[i] if pending[i] is not None else next(stream)
                pending[i] = None
                n = len(b[key])
                if n > need:
                    head = {c: (x[:need] if not isinstance(x, list) else x[:need]) for c, x in b.items()}
                    pending[i] = {c: (x[need:] if not isinstance(x, list) else x[need:]) for c, x in b.items()}
                    b, n = head, need
                got.append(b)
                need -= n
            pieces.extend(got)
        batch = {}
        for c in pieces[0]:
            vals = [p[c] for p in pieces]
            batch[c] = sum(vals, []) if isinstance(vals[0], list) else torch.cat(vals)
        yield batch
