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
import os
from collections import OrderedDict
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 — pa.compute
from ray.data.collate_fn import NumpyBatchCollateFn

from histoweak.data.augment import augment_batch
from histoweak.data.schema import tile_keys
from histoweak.slides.tiling import decode_image

__all__ = [
    "DEFAULT_COLUMNS",
    "DEFAULT_SHUFFLE_BUFFER",
    "EpochShuffle",
    "ResourcePlan",
    "TorchCollate",
    "apply_resource_plan",
    "augment_dataset",
    "BalancedSampler",
    "DEFAULT_CACHE_BYTES",
    "ParquetRows",
    "TableRows",
    "add_column",
    "shares",
    "decode_tiles",
    "derive_table",
    "plan_resources",
    "read_split_meta",
    "read_tiles",
    "stain_batch",
    "stain_normalize_dataset",
    "torch_batches",
    "windowed_permutation",
]

DEFAULT_COLUMNS = ("image", "mask", "labels", "label", "tissue_ratio", "group", "slide_id")
MAX_READ_BLOCKS = 256  # read_tiles' tasks: a unit of row groups each, or several in turn past this many


@dataclass(frozen=True)
class ResourcePlan:
    """How many CPUs each training worker asks for, and how many Ray Data may use."""

    cpus_per_worker: float
    data_cpus: float


DRIVER_RESERVE_CPUS = 0.25  # left for drivers and Tune trial functions, which hold a token CPU share


def plan_resources(total_cpus: float, num_workers: int, min_data_cpus: float = 1.0) -> ResourcePlan:
    """Split a node's CPUs between ``num_workers`` training workers and Ray Data.

    Ray Data gets at least one CPU (its decode tasks take one each, so a
    smaller cap would never start one) and at most half the node; workers
    share what is left after ``DRIVER_RESERVE_CPUS``, in quarters, at least
    0.25 each (they mostly wait on data or on the GPU).

    Raises
    ------
    ValueError
        On fewer than 1.5 CPUs, where training and streaming cannot both run.

    Examples
    --------
    >>> plan_resources(2, 1)
    ResourcePlan(cpus_per_worker=0.75, data_cpus=1.0)
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if total_cpus < 1.5:
        raise ValueError(f"training with Ray Data needs at least 1.5 CPUs (1 for decoding); the cluster has {total_cpus}")
    spare = total_cpus - DRIVER_RESERVE_CPUS
    data = min(max(min_data_cpus, total_cpus / 2), spare - 0.25 * num_workers)
    data = max(data, 1.0)
    per_worker = max(0.25, math.floor((spare - data) / num_workers * 4) / 4)
    return ResourcePlan(cpus_per_worker=per_worker, data_cpus=data)


def apply_resource_plan(plan: ResourcePlan) -> None:
    """Cap the CPUs Ray Data may use in this driver to ``plan.data_cpus``."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(cpu=plan.data_cpus)
    if os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") == "1":  # Train workers inherit this context, not the env
        ctx.enable_progress_bars = False


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
        class_ratios : (N, C) float32, NaN rows where a row has none
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
        out["labels"] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1).astype(np.float32)
    for key in ("label", "group"):
        if key in names:
            out[key] = batch.column(key).fill_null(-1).to_numpy().astype(np.int64)
    for key in ("x", "y"):
        if key in names:
            out[key] = batch.column(key).to_numpy().astype(np.int64)
    if "tissue_ratio" in names:
        out["tissue_ratio"] = batch.column("tissue_ratio").to_numpy().astype(np.float32)
    if "class_ratios" in names and batch.column("class_ratios").null_count < len(batch):
        col = batch.column("class_ratios").combine_chunks()
        if col.null_count:  # rows without a mask (image-labelled tiles): NaN
            width = len(next(v for v in col.to_pylist() if v is not None))
            out["class_ratios"] = np.asarray([v if v is not None else [np.nan] * width for v in col.to_pylist()],
                                             np.float32)
        else:
            out["class_ratios"] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1).astype(np.float32)
    for key in names:  # other text columns (a slide table's path, size_class): passed through as objects
        if key not in out and key != "split" and (pa.types.is_string(batch.schema.field(key).type)
                                                  or pa.types.is_large_string(batch.schema.field(key).type)):
            out[key] = np.asarray(batch.column(key).to_pylist(), dtype=object)
    return out


def _list_parquet(path: str | Sequence[str]) -> list[tuple[str, int]]:
    """(file URI or path, number of row groups) for every Parquet file under ``path`` (local or any pyarrow URI)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    out: list[tuple[str, int]] = []
    for p in paths:
        uri = _as_uri(p)
        fs, root = pafs.FileSystem.from_uri(uri)
        prefix = uri.split("://", 1)[0] + "://" if "://" in str(p) else ""
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{p}: no such tile table")
        if info.type == pafs.FileType.File:
            files = [root]
        else:
            sel = fs.get_file_info(pafs.FileSelector(root, recursive=True))
            files = sorted(f.path for f in sel if f.path.endswith(".parquet") and not Path(f.path).name.startswith("."))
        for f in files:
            with fs.open_input_file(f) as fh:
                out.append((prefix + f, pq.ParquetFile(fh).metadata.num_row_groups))
    if not out:
        raise FileNotFoundError(f"{path}: no Parquet files")
    return out


def _as_uri(p) -> str:
    p = str(p)
    return p if "://" in p else str(Path(p).resolve())


def _read_decode_fn(columns: list[str], splits: list[str] | None, decode: bool):
    """The per-task UDF: read row groups of one file (needed columns only), filter by split (and by the unit's
    ``column < below`` where it has one), decode."""

    def read_decode(items: pa.Table) -> Iterator:
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq

        keys = ("path", "start", "stop", "column", "below")
        for uri, start, stop, column, below in zip(*(items.column(c).to_pylist() for c in keys)):
            fs, path = pafs.FileSystem.from_uri(_as_uri(uri))
            read = columns if not column or column in columns else [*columns, column]
            with fs.open_input_file(path) as fh:
                pf = pq.ParquetFile(fh)
                for rg in range(start, stop):
                    table = pf.read_row_group(rg, columns=read)
                    if splits is not None:
                        table = table.filter(pa.compute.is_in(table.column("split"), pa.array(splits)))
                    if column:
                        table = table.filter(pa.compute.less(table.column(column), below))
                        table = table.select(columns)  # every block has the same columns
                    if table.num_rows:
                        yield decode_tiles(table) if decode else table

    return read_decode


def read_tiles(path: str | Sequence[str], split: str | Sequence[str] | None = None,
               columns: Sequence[str] = DEFAULT_COLUMNS, decode: bool = True, row_groups_per_task: int = 4,
               more: Sequence = ()):
    """A Ray Dataset of (decoded) tiles from a tile table: a local path or any pyarrow URI (``s3://…``).

    Reading and decoding happen in one Ray Data operator over units of
    ``row_groups_per_task`` row groups (128 rows each): measured here, this
    streams about 1.5x faster than ``read_parquet`` followed by a separate
    decode ``map_batches``, which Ray Data 2.60 does not fuse.

    Parameters
    ----------
    path : the tile table directory (or files)
    split : keep only these splits
    columns : columns to read (``split`` is added when filtering)
    decode : decode images and masks (see ``decode_tiles``); else raw Arrow rows
    more : ``methods.base.TableSlice`` s — rows of other tile tables (same ``split`` filter, plus the slice's own
        ``column < below``) streamed with these
    """
    import ray.data

    splits = None if split is None else ([split] if isinstance(split, str) else list(split))
    cols = list(dict.fromkeys([*columns, *(["split"] if splits is not None else [])]))
    sources = [(path, None, None)] + [(m.path, m.column, m.below) for m in more]
    units = [{"path": f, "start": s, "stop": min(s + row_groups_per_task, n), "column": column,
              "below": None if below is None else float(below)}
             for p, column, below in sources for f, n in _list_parquet(p) for s in range(0, n, row_groups_per_task)]
    # a block of units per task, at most MAX_READ_BLOCKS blocks: from_items puts each block in the object store,
    # 1.5 ms apiece (a million-tile table has ~2000 units: 3 s before the first batch)
    items = ray.data.from_items(units, override_num_blocks=min(len(units), MAX_READ_BLOCKS))
    ds = items.map_batches(_read_decode_fn(cols, splits, decode), batch_size=1, batch_format="pyarrow")
    # One fused operator (read, decode, and what map_batches adds: augment, stain, columns). Ray Data's per-operator
    # reservation holds it to half the CPUs until its outputs are sized (measured on 2 cores: one task for the
    # first second, 0.9x a DataLoader; without it 1.15x). An actor stage after it re-enables it (derive_table).
    ds.context.op_resource_reservation_enabled = False
    rg_bytes = _decoded_row_group_bytes(units[0]["path"], cols) if decode else None
    if rg_bytes:
        # Ray Data merges what a task yields into blocks of up to target_max_block_size (128 MiB): a task's
        # decoded row groups would leave it as one block when it ends (measured: first batch at 2.2 s of a
        # 3.7 s stream). Just under one decoded row group makes each row group its own block, and no block
        # is sliced (Ray slices only blocks >= 1.5x the target). This dataset's context only.
        ds.context.target_max_block_size = max(int(rg_bytes / 1.2), 1 << 20)
    return ds


def _decoded_row_group_bytes(uri: str, columns: Sequence[str]) -> int | None:
    """Bytes of one full row group of ``uri`` once decoded (images, masks), from its footer; None if unknown."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    if "image" not in columns:
        return None
    fs, path = pafs.FileSystem.from_uri(_as_uri(uri))
    with fs.open_input_file(path) as fh:
        md = pq.ParquetFile(fh).metadata
    names = [md.schema.column(i).name for i in range(md.num_columns)]
    if "size" not in names or not md.num_row_groups:
        return None
    rg = md.row_group(0)
    stats = rg.column(names.index("size")).statistics
    if stats is None or not stats.has_min_max:
        return None
    side = int(stats.max)
    per_row = side * side * (3 + ("mask" in columns))
    return rg.num_rows * per_row



def read_split_meta(path: str, split: str, columns: Sequence[str], keys: set[str] | None = None) -> dict[str, np.ndarray]:
    """Columns of one split's rows, read in this process with pyarrow (no Ray), decoded by ``decode_tiles``.

    For the driver's planning (a method's ``data_plan``, the stain reference): ask for metadata columns,
    not images, unless ``keys`` (``schema.tile_keys``) selects a few rows.
    """
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    cols = list(dict.fromkeys([*columns, "split", *(["slide_id", "x", "y"] if keys is not None else [])]))
    tables = []
    for uri, _ in _list_parquet(path):
        fs, file = pafs.FileSystem.from_uri(_as_uri(uri))
        with fs.open_input_file(file) as fh:
            t = pq.ParquetFile(fh).read(columns=cols)
        t = t.filter(pa.compute.equal(t.column("split"), split))
        if keys is not None and t.num_rows:
            k = tile_keys(*(t.column(c).to_pylist() for c in ("slide_id", "x", "y")))
            t = t.filter(pa.array([v in keys for v in k]))
        if t.num_rows:
            tables.append(t)
    if not tables:
        raise ValueError(f"{path}: no {split!r} rows")
    return decode_tiles(pa.concat_tables(tables))


def stain_batch(batch: dict, reference: dict) -> dict:
    """A numpy batch with its images Macenko-normalised to ``reference`` (``data.stain``)."""
    from histoweak.data.stain import normalize_images

    batch["image"] = normalize_images(batch["image"], reference)[0]
    return batch


def stain_normalize_dataset(ds, reference: dict):
    """``ds`` with every image Macenko-normalised to ``reference`` (``data.stain``); fused with the decode."""
    return ds.map_batches(stain_batch, fn_kwargs={"reference": reference}, batch_format="numpy", batch_size=None)


def _augment(batch: dict, colour: bool) -> dict:
    # A stateless task (fresh entropy per batch), so Ray Data fuses it with the read and runs it on every core.
    return augment_batch(batch, seed=None, colour=colour)


def augment_dataset(ds, colour: bool = True):
    """Random flips, rot90 (images and masks) and colour jitter (images), after any ``materialize()``."""
    return ds.map_batches(_augment, fn_kwargs={"colour": colour}, batch_format="numpy", batch_size=None)


class TorchCollate(NumpyBatchCollateFn):
    """Numpy batch -> torch tensors: images (N, 3, H, W) float32 in [0, 1], masks int64, strings as lists."""

    def __call__(self, batch: dict) -> dict:
        import torch

        out = {}
        for k, v in batch.items():
            if v.dtype == object:
                out[k] = list(v)
                continue
            if k == "image":  # numpy converts in one pass, 2.4x less CPU than torch's uint8 -> float32 on this view
                f = v.astype(np.float32)
                np.divide(f, np.float32(255.0), out=f)
                out[k] = torch.from_numpy(f).permute(0, 3, 1, 2)  # NCHW view of NHWC memory (channels_last)
                continue
            t = torch.from_numpy(np.require(v, requirements=["C", "W"]))
            if k == "mask":
                t = t.long()
            out[k] = t
        return out


def torch_batches(ds, batch_size: int = 64, augment: bool = False, colour: bool = True, shuffle_buffer: int = 0,
                  drop_last: bool = False, seed: int | None = None, prefetch_batches: int = 2) -> Iterator[dict]:
    """Torch batches from a decoded tile dataset (or a ``streaming_split`` shard of one).

    Images come out as (N, 3, H, W) float32 in [0, 1]; masks (N, H, W) int64.
    ``augment`` applies random flips, rot90 and colour jitter per batch (fresh entropy; ``seed``
    fixes the shuffle order only).
    """
    it = augment_dataset(ds, colour) if augment else ds  # a Dataset; a DataIterator shard is used as is

    kwargs = dict(batch_size=batch_size, collate_fn=TorchCollate(), drop_last=drop_last, prefetch_batches=prefetch_batches)
    if shuffle_buffer:
        kwargs.update(local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=seed)
    return it.iter_torch_batches(**kwargs)


def add_column(ds, name: str, fn):
    """``ds`` with column ``name`` set to ``fn(batch)`` (numpy batch in, (N,) array out); fused with the read."""
    return ds.map_batches(_set_column, fn_kwargs={"name": name, "fn": fn}, batch_format="numpy", batch_size=None)


def _set_column(batch: dict, name: str, fn) -> dict:
    batch[name] = np.asarray(fn(batch))
    return batch


def shares(batch_size: int, weights: Sequence[float]) -> list[int]:
    """Rows per stream in a batch of ``batch_size``, proportional to ``weights`` (largest remainder)."""
    w = np.asarray(weights, np.float64)
    if len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"balanced stream: weights must be non-negative and not all zero, got {list(weights)}")
    exact = batch_size * w / w.sum()
    k = np.floor(exact).astype(int)
    k[np.argsort(-(exact - k), kind="stable")[: batch_size - k.sum()]] += 1
    return [int(x) for x in k]


class ShareSchedule:
    """Rows per stream in successive batches of ``batch_size``: the first batch is ``shares(batch_size,
    weights)``; each later one rounds its quota plus what earlier batches were owed (largest remainder), so over
    any run of batches every stream gets its exact quota to within two rows. A stream whose quota is under half a
    row still gets rows (one every few batches), where rounding each batch alone would give it none for ever."""

    def __init__(self, batch_size: int, weights: Sequence[float]):
        shares(batch_size, weights)  # validates
        w = np.asarray(weights, np.float64)
        self.batch_size, self.quota = batch_size, batch_size * w / w.sum()
        self.owed = np.zeros_like(self.quota)  # quota not yet drawn (in (-1, 1) after every batch)

    def next(self) -> list[int]:
        exact = self.quota + self.owed
        k = np.floor(np.maximum(exact, 0.0)).astype(int)
        left = self.batch_size - int(k.sum())
        if left > 0:  # the rows still missing go to the largest remainders
            k[np.argsort(-(exact - k), kind="stable")[:left]] += 1
        elif left < 0:  # over by a row or so (streams owed rows went below zero): the most over-served give one back
            over = np.flatnonzero(k > 0)
            k[over[np.argsort(exact[over] - k[over], kind="stable")[:-left]]] -= 1
        self.owed = exact - k
        return [int(x) for x in k]


DEFAULT_CACHE_BYTES = 256 << 20  # ParquetRows' row-group cache
MAX_OPEN_FILES = 16  # ParquetRows keeps this many Parquet files open (footer read once)


def windowed_permutation(units: np.ndarray, rng: np.random.Generator, window: int) -> np.ndarray:
    """A random order of rows that reads each unit (row group) about once: the units in a random order, and the
    rows shuffled within each window of ``window`` consecutive units of that order.

    With every row in one window it is a uniform permutation. Otherwise it is a two-level shuffle (as a
    shuffled block order with a local shuffle buffer gives), with one difference that matters for tests and
    resumes: it depends on ``rng`` alone, never on when blocks arrive.

    Parameters
    ----------
    units : (N,) int, the unit of each row (any ids)
    rng : the generator; draws one permutation of the units, then one of the rows
    window : units per window, >= 1

    Returns
    -------
    (N,) int64, a permutation of ``0..N-1``
    """
    _, unit_of = np.unique(np.asarray(units), return_inverse=True)
    n_units = int(unit_of.max()) + 1 if len(unit_of) else 0
    window_of = np.empty(n_units, np.int64)
    window_of[rng.permutation(n_units)] = np.arange(n_units) // window
    return np.lexsort((rng.permutation(len(unit_of)), window_of[unit_of]))


DEFAULT_SHUFFLE_BUFFER = 1024  # rows shuffled together in the training stream (whole row groups; see EpochShuffle)


class EpochShuffle:
    """One worker's part of the training stream: each epoch visits every training row once over all workers, in
    an order fixed by ``(seed, epoch)`` and nothing else.

    The epoch's order is ``windowed_permutation`` of all rows under ``default_rng([seed, epoch])``: row groups
    in a random order, rows shuffled within windows of row groups that hold about ``buffer_rows`` rows (a
    table smaller than that is one uniform permutation). Worker ``rank`` of ``world`` takes every
    ``world``-th row of it, so all workers step the same number of batches; the ``N mod world`` rows at the
    end of the order, and with ``drop_last`` each worker's last partial batch, wait for another epoch (they
    differ from epoch to epoch). Nothing here depends on scheduling: a rerun, a resumed run and any number of
    Ray nodes see the same rows in the same order, and the same augmentation (seeded per batch).

    Rows are read in this process through the row source (``ParquetRows``: the row index, 8 bytes a row, and a
    bounded row-group cache — a window's row groups fit in the default cache for tiles up to ~250 KB
    encoded) and decoded by ``threads`` threads (the codecs release the GIL), ``prefetch`` batches ahead.

    Parameters
    ----------
    source : ``ParquetRows`` or ``TableRows`` of the training split
    seed : the run's seed (``train.seed``)
    rank, world : this worker and the number of workers
    buffer_rows : rows shuffled together (``train.shuffle_buffer``)
    augment : random flips, rot90 and colour jitter, seeded by (seed, epoch, rank, batch)
    transform : numpy batch -> numpy batch after decoding, before augmentation (stain normalisation)
    group_fn : numpy batch -> (N,) int, the ``group`` column of every batch (the run's tissue groups)
    """

    def __init__(self, source, seed: int = 0, rank: int = 0, world: int = 1,
                 buffer_rows: int = DEFAULT_SHUFFLE_BUFFER, augment: bool = False, transform=None, group_fn=None,
                 threads: int = 2, prefetch: int = 4):
        if not 0 <= rank < world:
            raise ValueError(f"shuffled stream: rank {rank} is not one of {world} workers")
        if buffer_rows < 1:
            raise ValueError(f"shuffled stream: buffer_rows must be >= 1, got {buffer_rows}")
        self.source, self.seed, self.rank, self.world = source, int(seed), rank, world
        self.augment, self.transform, self.group_fn = augment, transform, group_fn
        self.threads, self.prefetch = max(1, threads), max(1, prefetch)
        units = source.units
        per_unit = len(units) / max(len(np.unique(units)), 1)
        self.window = max(1, math.ceil(buffer_rows / per_unit))

    def order(self, epoch: int) -> np.ndarray:
        """(N,) every row's position in epoch ``epoch``'s order (all workers)."""
        return windowed_permutation(self.source.units, np.random.default_rng([self.seed, epoch]), self.window)

    def rows(self, epoch: int) -> np.ndarray:
        """This worker's rows of epoch ``epoch``, in order."""
        order = self.order(epoch)
        return order[: len(order) // self.world * self.world][self.rank::self.world]

    def batches(self, epoch: int, batch_size: int, drop_last: bool = True) -> Iterator[dict]:
        """Torch batches (as ``torch_batches`` makes them) of this worker's rows of epoch ``epoch``."""
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        mine = self.rows(epoch)
        stop = len(mine) // batch_size * batch_size if drop_last else len(mine)
        parts = [mine[i:i + batch_size] for i in range(0, stop, batch_size)]
        collate = TorchCollate()

        def make(step: int) -> dict:
            batch = decode_tiles(self.source.take(parts[step]))
            if self.group_fn is not None:
                batch["group"] = np.asarray(self.group_fn(batch)).astype(np.int64)
            if self.transform is not None:
                batch = self.transform(batch)
            if self.augment:
                batch = augment_batch(batch, seed=[self.seed, epoch, self.rank, step])
            return collate(batch)

        pool = ThreadPoolExecutor(self.threads)
        ahead: deque = deque()
        try:
            for step in range(len(parts)):
                while len(ahead) < self.prefetch and step + len(ahead) < len(parts):
                    ahead.append(pool.submit(make, step + len(ahead)))
                yield ahead.popleft().result()
        finally:  # a consumer that stops early (steps_per_epoch) leaves no batch decoding behind
            for f in ahead:
                f.cancel()
            pool.shutdown(wait=True)


class BalancedSampler:
    """Batches with a fixed share of rows per stratum (GERNE's less-biased batch B_lb, a method's subsets), drawn exactly.

    Each batch draws ``ShareSchedule(batch_size, weights)`` rows of each group without
    replacement (a group starts a new pass when used up, so rare groups are
    oversampled), then decodes and augments only those rows. Drawing locally
    keeps every batch's group counts exact and costs one decode per row used,
    where one Ray Data stream per group stalled on 2 cores (dozens of tiny
    blocks per group and four extra executors competing for one CPU).

    The rows come from a row source, which several samplers can share:

    - ``ParquetRows`` (``from_parquet``): read from the tile table's files in
      this process, bounded in memory (each row's location, 8 bytes, and a
      byte-bounded cache of encoded row groups). For local reads a pass visits
      the group's row groups in a random order and shuffles its rows within
      windows of ``window`` consecutive row groups of that order: with room in
      the cache for ``window`` row groups per group, a pass reads each row
      group about once per group.
    - ``TableRows``: raw rows held in memory as one pyarrow Table; one window,
      so each pass is a uniform permutation of the group's rows.

    Parameters
    ----------
    source : a row source, or raw (undecoded) tile rows as a pyarrow Table, a ``read_tiles(..., decode=False)``
        Dataset or a worker's shard of one (``collect``)
    group_fn : numpy batch (``decode_tiles`` of every row, without images, masks and ``hidden``) -> (N,) int
        group per row; rows of group -1 are never drawn
    seed : the sampling and augmentation stream
    augment : random flips, rot90 and colour jitter per batch
    hidden : columns left out of every batch (their values never leave the sampler)
    transform : numpy batch -> numpy batch, applied after decoding and before augmentation (e.g. stain
        normalisation)
    window : row groups per shuffle window (a ``ParquetRows`` source; a group within one window is drawn in a
        uniform permutation)
    """

    def __init__(self, source, group_fn, seed: int = 0, augment: bool = False, hidden: Sequence[str] = (),
                 transform=None, window: int = 4):
        if window < 1:
            raise ValueError(f"balanced stream: window must be >= 1 row group, got {window}")
        if not isinstance(source, (TableRows, ParquetRows)):
            source = TableRows(source if isinstance(source, pa.Table) else self.collect(source))
        self.source, self.hidden, self.window = source, tuple(hidden), window
        groups = np.asarray(group_fn(source.meta(self.hidden))).astype(np.int64)
        order = np.argsort(groups, kind="stable")  # each group's rows ascending, so by row group
        values, starts = np.unique(groups[order], return_index=True)
        self.rows: dict[int, np.ndarray] = {}
        self._unit_of: dict[int, np.ndarray] = {}  # per row of a group: its row group, numbered within the group
        for g, rows in zip(values.tolist(), np.split(order, starts[1:])):
            if g >= 0:
                self.rows[g] = rows
                self._unit_of[g] = np.unique(source.units[rows], return_inverse=True)[1].astype(np.int32)
        if not self.rows:
            raise ValueError(f"balanced stream: none of the {len(groups)} rows is in a stratum")
        self.rng = np.random.default_rng(seed)
        self.augment = augment
        self.transform = transform
        # per group: its current pass and the position of the next row in it
        self._queues: dict[int, tuple[np.ndarray, int]] = {g: (rows[:0], 0) for g, rows in self.rows.items()}

    @classmethod
    def from_parquet(cls, path: str | Sequence[str], split: str | Sequence[str] | None, columns: Sequence[str],
                     group_fn, more: Sequence = (), seed: int = 0, augment: bool = False, hidden: Sequence[str] = (),
                     transform=None, window: int = 4, cache_bytes: int = DEFAULT_CACHE_BYTES) -> "BalancedSampler":
        """A sampler over ``ParquetRows(path, split, columns, more, cache_bytes)`` (the rows ``read_tiles`` gives)."""
        return cls(ParquetRows(path, split, columns, more, cache_bytes), group_fn, seed=seed, augment=augment,
                   hidden=hidden, transform=transform, window=window)

    @staticmethod
    def collect(source) -> pa.Table:
        """The raw rows of a Dataset or shard as one pyarrow Table (kept encoded)."""
        tables = [t for t in source.iter_batches(batch_format="pyarrow", batch_size=None) if t.num_rows]
        if not tables:
            raise ValueError("balanced stream: no rows")
        return pa.concat_tables(tables).combine_chunks()

    @property
    def counts(self) -> dict[int, int]:
        return {g: len(r) for g, r in self.rows.items()}

    def _pass(self, g: int) -> np.ndarray:
        """Every row of group ``g`` once (``windowed_permutation`` of its rows)."""
        return self.rows[g][windowed_permutation(self._unit_of[g], self.rng, self.window)]

    def _draw(self, g: int, k: int) -> list[np.ndarray]:
        out = []
        while k:
            queue, at = self._queues[g]
            if at == len(queue):
                queue, at = self._pass(g), 0
            n = min(k, len(queue) - at)
            out.append(queue[at:at + n])
            self._queues[g] = (queue, at + n)
            k -= n
        return out

    def batches(self, batch_size: int, weights: dict[int, float] | None = None,
                n_batches: int | None = None) -> Iterator[dict]:
        """Torch batches (as ``torch_batches`` makes them) with ``weights[g]`` of each group; endless by default.

        ``weights`` default to equal shares; a group with weight > 0 and no rows fails, naming it.
        """
        if weights is None:
            if batch_size < len(self.rows):
                raise ValueError(f"balanced stream: batch_size {batch_size} < {len(self.rows)} groups")
            weights = {g: 1.0 for g in self.rows}
        missing = sorted(g for g, w in weights.items() if w > 0 and g not in self.rows)
        if missing:
            raise ValueError(f"balanced stream: no rows in group(s) {missing}; groups present: {self.counts}")
        order = sorted(weights)
        schedule = ShareSchedule(batch_size, [weights[g] for g in order])
        collate = TorchCollate()
        made = 0
        while n_batches is None or made < n_batches:
            share = schedule.next()
            idx = np.concatenate([part for g, k in zip(order, share) for part in self._draw(g, k)])
            batch = decode_tiles(self.source.take(idx, self.hidden))
            batch["group"] = np.repeat(np.asarray(order, np.int64), share)
            if self.transform is not None:
                batch = self.transform(batch)
            if self.augment:
                batch = augment_batch(batch, seed=int(self.rng.integers(2**63)))
            made += 1
            yield collate(batch)


def _without(table: pa.Table, columns: Sequence[str]) -> pa.Table:
    return table.select([c for c in table.column_names if c not in columns])


class TableRows:
    """Raw tile rows held in memory as one pyarrow Table: a ``BalancedSampler`` row source."""

    def __init__(self, table: pa.Table):
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def units(self) -> np.ndarray:
        """(N,) the unit of reading of each row: one (the table), so draws are uniform permutations."""
        return np.zeros(len(self), np.int64)

    def meta(self, hidden: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """``decode_tiles`` of every row, without images, masks and ``hidden``."""
        return decode_tiles(_without(self.table, [*hidden, "image", "mask"]))

    def take(self, idx: np.ndarray, hidden: Sequence[str] = ()) -> pa.Table:
        """Rows ``idx`` (positions), in that order, without ``hidden``."""
        return _without(self.table, hidden).take(idx)


class ParquetRows:
    """The rows ``read_tiles(path, split, columns, more=more)`` streams, read from the Parquet files in this
    process: a ``BalancedSampler`` row source bounded in memory.

    In memory: each row's location (row group and row within it, 8 bytes a row)
    and a least-recently-used cache of row groups (``columns``, images still
    encoded) of at most ``cache_bytes``; a row group larger than that is read
    for the batch that needs it and dropped. ``meta`` reads the metadata
    columns once per call and keeps none of them.

    Building one lists the files (absolute paths, so build it where relative
    paths mean what the caller meant, e.g. the driver); it pickles as that list.
    The row index is built on first use, in the process that draws.

    Parameters
    ----------
    path : the tile table directory (or files), local or any pyarrow URI
    split : keep only these splits (None: every row)
    columns : the columns a row carries
    more : ``methods.base.TableSlice`` s — rows of other tile tables (same ``split`` filter, plus the slice's own
        ``column < below``)
    cache_bytes : bound of the row-group cache (Arrow buffer bytes)

    Attributes
    ----------
    cache_nbytes, peak_cache_nbytes : bytes in the cache now, and the most so far
    reads : row groups read so far (``meta`` and the index aside)
    """

    def __init__(self, path: str | Sequence[str], split: str | Sequence[str] | None, columns: Sequence[str],
                 more: Sequence = (), cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.splits = None if split is None else ([split] if isinstance(split, str) else list(split))
        self.columns = list(dict.fromkeys(columns))
        sources = [(path, None, None)] + [(m.path, m.column, m.below) for m in more]
        # (file, column, below) per file; every file of a source has its filter
        self.files = [(uri, column, None if below is None else float(below))
                      for p, column, below in sources for uri, _ in _list_parquet(p)]
        self.cache_bytes = int(cache_bytes)
        self._reset()

    def _reset(self) -> None:
        import threading

        self._lock = threading.Lock()  # take() from several threads (EpochShuffle's decoders, samplers)
        self._index: tuple[np.ndarray, ...] | None = None
        self._cache: OrderedDict[int, tuple[pa.Table, int]] = OrderedDict()
        self._open: OrderedDict[int, tuple[Any, Any]] = OrderedDict()
        self.cache_nbytes = self.peak_cache_nbytes = self.reads = 0

    def __getstate__(self) -> dict:  # the file list: never the index, the cache or open files
        return {k: getattr(self, k) for k in ("splits", "columns", "files", "cache_bytes")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def __len__(self) -> int:
        return len(self._locations()[2])

    @property
    def units(self) -> np.ndarray:
        """(N,) the row group (numbered over all files) of each row."""
        return self._locations()[2]

    def meta(self, hidden: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """``decode_tiles`` of every row, without images, masks and ``hidden`` (read now, not kept)."""
        cols = [c for c in self.columns if c not in (*hidden, "image", "mask")]
        tables = [self._kept(i, cols)[1] for i in range(len(self.files))]
        return decode_tiles(pa.concat_tables(tables, promote_options="permissive"))

    def take(self, idx: np.ndarray, hidden: Sequence[str] = ()) -> pa.Table:
        """Rows ``idx`` (positions), in that order, without ``hidden``: read by row group, through the cache."""
        with self._lock:
            return self._take(idx, hidden)

    def _take(self, idx: np.ndarray, hidden: Sequence[str]) -> pa.Table:
        _, _, unit_of, row_of = self._locations()
        units, rows = unit_of[idx], row_of[idx]
        order = np.argsort(units, kind="stable")
        cols = [c for c in self.columns if c not in hidden]
        pieces = [self._row_group(int(units[part[0]])).select(cols).take(rows[part])  # take copies: no pin
                  for part in np.split(order, np.flatnonzero(np.diff(units[order])) + 1)]
        return pa.concat_tables(pieces, promote_options="permissive").take(np.argsort(order))

    def _file(self, i: int):
        """File ``i`` as an open ``pq.ParquetFile`` (the last ``MAX_OPEN_FILES`` stay open)."""
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq

        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i][1]
        fs, path = pafs.FileSystem.from_uri(_as_uri(self.files[i][0]))
        fh = fs.open_input_file(path)
        self._open[i] = (fh, pq.ParquetFile(fh))
        if len(self._open) > MAX_OPEN_FILES:
            self._open.popitem(last=False)[1][0].close()
        return self._open[i][1]

    def _kept(self, i: int, columns: list[str]) -> tuple[np.ndarray, pa.Table]:
        """Positions in file ``i`` of the rows its filters keep (split, ``column < below``), and their ``columns``."""
        _, column, below = self.files[i]
        pf = self._file(i)
        need = list(dict.fromkeys([*columns, *(["split"] if self.splits is not None else []),
                                   *([column] if column else [])]))
        if not need:
            return np.arange(pf.metadata.num_rows), pa.table({})
        t = pf.read(columns=need)
        keep = np.ones(t.num_rows, bool)
        if self.splits is not None:
            keep &= pa.compute.is_in(t.column("split"), pa.array(self.splits)).to_numpy(zero_copy_only=False)
        if column:
            keep &= pa.compute.less(t.column(column), below).fill_null(False).to_numpy(zero_copy_only=False)
        pos = np.flatnonzero(keep)
        return pos, t.select(columns).take(pos)

    def _locations(self) -> tuple[np.ndarray, ...]:
        """(file, row group) per unit; (unit, row within it) per row, in file and row order."""
        if self._index is None:
            unit_file, unit_rg, unit_of, row_of = [], [], [], []
            for i in range(len(self.files)):
                md = self._file(i).metadata
                starts = np.cumsum([0] + [md.row_group(r).num_rows for r in range(md.num_row_groups)])
                pos, _ = self._kept(i, [])
                rg = np.searchsorted(starts, pos, side="right") - 1
                unit_of.append((len(unit_file) + rg).astype(np.int32))
                row_of.append((pos - starts[rg]).astype(np.int32))
                unit_file += [i] * md.num_row_groups
                unit_rg += range(md.num_row_groups)
            self._index = (np.asarray(unit_file, np.int32), np.asarray(unit_rg, np.int32),
                           np.concatenate(unit_of), np.concatenate(row_of))
            if not len(self._index[2]):
                raise ValueError(f"balanced stream: no rows of splits {self.splits} in {len(self.files)} Parquet "
                                 f"file(s), the first {self.files[0][0]}")
        return self._index

    def _row_group(self, unit: int) -> pa.Table:
        """Row group ``unit`` (``columns``), from the cache or read (and cached when it fits)."""
        if unit in self._cache:
            self._cache.move_to_end(unit)
            return self._cache[unit][0]
        unit_file, unit_rg = self._locations()[:2]
        table = self._file(int(unit_file[unit])).read_row_group(int(unit_rg[unit]), columns=self.columns)
        self.reads += 1
        size = table.get_total_buffer_size()
        if size <= self.cache_bytes:
            while self.cache_nbytes + size > self.cache_bytes:
                self.cache_nbytes -= self._cache.popitem(last=False)[1][1]
            self._cache[unit] = (table, size)
            self.cache_nbytes += size
            self.peak_cache_nbytes = max(self.peak_cache_nbytes, self.cache_nbytes)
        return table


def derive_table(inputs, out: str | Path, fn_cls, fn_kwargs: dict | None = None, split: str | Sequence[str] | None = None,
                 columns: Sequence[str] = DEFAULT_COLUMNS, concurrency: int | None = None, batch_size: int = 4,
                 desc: str = "", part_column: str | None = None) -> int:
    """A derived table: ``fn_cls(**fn_kwargs)`` held by Ray Data actors maps the decoded rows of a tile table (or a
    list of JSON-able items) to rows of a new table, written as Parquet (atomically: temp name, then rename).

    The actors keep what is costly to build (a segmenter, an inpainter, a backbone) across batches. Returns the
    number of rows written; prints progress (``desc``).

    Parameters
    ----------
    inputs : a tile table path (its ``split`` rows, ``columns`` decoded) or a list of dicts (one item per row)
    out : the Parquet file; with ``part_column``, a directory that gets one file ``<value>.parquet`` per value of
        that column (every output batch must hold one value: e.g. one item per batch), written as soon as that
        batch is done, so an interrupted job keeps its finished parts
    fn_cls : a class whose instances map a numpy batch (dict of arrays) to a ``pyarrow.Table``
    concurrency : actors (default: one per GPU when the cluster has GPUs, else one per CPU)
    """
    import time

    import pyarrow.parquet as pq
    import ray
    import ray.data

    if isinstance(inputs, (list, tuple)):
        ds = ray.data.from_items(list(inputs), override_num_blocks=max(1, len(inputs)))
    else:  # read first: actors holding every CPU would starve the read tasks (measured: a deadlock on 2 CPUs);
        # blocks of one batch, since a block (a row group, ~128 rows) goes to one actor
        ds = read_tiles(inputs, split=split, columns=columns).repartition(
            target_num_rows_per_block=batch_size).materialize()
    gpus = int(ray.cluster_resources().get("GPU", 0))  # a segmenter / inpainter per GPU where there are GPUs
    n_actors = concurrency or gpus or max(1, int(ray.cluster_resources().get("CPU", 1)))
    if isinstance(inputs, (list, tuple)):
        n_actors = min(n_actors, len(inputs))
    ds.context.op_resource_reservation_enabled = True  # actors beside read tasks: keep Ray Data's reservation
    mapped = ds.map_batches(fn_cls, fn_constructor_kwargs=dict(fn_kwargs or {}), batch_size=batch_size,
                            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=n_actors), num_cpus=1,
                            num_gpus=1 if gpus else 0)
    out = Path(out)
    writers: dict[Path, tuple[Path, Any]] = {}
    n_out, start, last = 0, time.perf_counter(), 0.0

    def target(table: pa.Table) -> Path:
        if part_column is None:
            return out
        values = set(table.column(part_column).to_pylist())
        if len(values) != 1:
            raise ValueError(f"{desc or out}: a batch holds {part_column} values {sorted(values)}; one per batch")
        return out / f"{values.pop()}.parquet"

    try:
        for table in mapped.iter_batches(batch_format="pyarrow", batch_size=None):
            if not table.num_rows:
                continue
            path = target(table)
            if path not in writers:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                writers[path] = (tmp, pq.ParquetWriter(tmp, table.schema))
            tmp, writer = writers[path]
            writer.write_table(table.cast(writer.schema), row_group_size=128)
            n_out += table.num_rows
            if part_column is not None:  # a part is one batch: done
                writer.close()
                os.replace(tmp, path)
                del writers[path]
            if desc and time.perf_counter() - last > 10:
                last = time.perf_counter()
                print(f"histoweak: {desc}: {n_out} rows in {last - start:.0f} s", flush=True)
        if not n_out:
            raise ValueError(f"{desc or out}: no rows came out of {fn_cls.__name__}")
        for path, (tmp, writer) in list(writers.items()):
            writer.close()
            os.replace(tmp, path)
            del writers[path]
    finally:
        for tmp, writer in writers.values():
            writer.close()
            tmp.unlink(missing_ok=True)
    if desc:
        print(f"histoweak: {desc}: {n_out} rows in {time.perf_counter() - start:.0f} s -> {out}", flush=True)
    return n_out
