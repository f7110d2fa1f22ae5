import collections
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from histoweak.data.augment import augment_batch, colour_jitter, flip_rot90
from histoweak.data.streaming import (
    apply_resource_plan, plan_resources, read_tiles, torch_batches,
)


def test_shapes_dtypes_counts(tile_table, ray_local):
    import torch

    expected = pq.read_table(tile_table, columns=["split"]).column("split").to_pylist().count("train")
    ds = read_tiles(str(tile_table), split="train")
    n = 0
    for b in torch_batches(ds, batch_size=7):
        assert b["image"].dtype == torch.float32 and b["image"].shape[1:] == (3, 128, 128)
        assert 0.0 <= float(b["image"].min()) and float(b["image"].max()) <= 1.0
        assert b["mask"].dtype == torch.int64 and b["mask"].shape[1:] == (128, 128)
        assert b["labels"].shape[1] == 5 and b["labels"].dtype == torch.float32
        # labels agree with the mask they came from
        present = torch.stack([(b["mask"] == c).flatten(1).any(1) for c in range(5)], 1).float()
        assert torch.equal(present, b["labels"])
        n += len(b["image"])
    assert n == expected > 0


# -- augmentation ------------------------------------------------------------------------
#
# The eight elements of D4, numbered k + 4·flip: rotate counter-clockwise by k·90° (np.rot90), then, when
# flip, mirror left-right. On the 2x2 grid [[1, 2], [3, 4]], worked out by hand:
D4_OF_GRID = {
    (0, False): [[1, 2], [3, 4]], (1, False): [[2, 4], [1, 3]],
    (2, False): [[4, 3], [2, 1]], (3, False): [[3, 1], [4, 2]],
    (0, True): [[2, 1], [4, 3]], (1, True): [[4, 2], [3, 1]],
    (2, True): [[3, 4], [1, 2]], (3, True): [[1, 3], [2, 4]],
}
# The transforms flip_rot90 draws for 8 samples from np.random.default_rng(PINNED_SEED), recorded once: a change
# of the draws (or of what a draw means) must show up here.
PINNED_SEED = 1
PINNED = [(1, True), (2, True), (3, False), (3, True), (0, False), (0, True), (3, False), (3, False)]
JITTER = 0.1  # colour_jitter's default: brightness, contrast and saturation factors each in [0.9, 1.1]


def _d4(a, k, flip):
    a = np.rot90(a, k)
    return a[:, ::-1] if flip else a


def _undo_d4(a, k, flip):
    return np.rot90(a[:, ::-1] if flip else a, -k)


def _d4_variants(a):
    return [_d4(a, t % 4, t >= 4) for t in range(8)]


def _jitter_bound(x, delta=JITTER):
    """Largest |out - x| per value that colour_jitter's documented factors allow.

    With factors b, c, s in [1 - delta, 1 + delta], brightness (b·x), contrast about the image mean μ and
    saturation about the pixel's channel mean g compose to
        s·c·b·(x - g) + c·b·(g - μ) + b·μ,
    so out - x = (scb - 1)(x - g) + (cb - 1)(g - μ) + (b - 1)μ, plus < 1 for truncation to uint8
    (clipping to [0, 255] only brings out closer to x).

    x : (H, W, 3) uint8, one image.
    """
    x = x.astype(np.float64)
    g = x.mean(-1, keepdims=True)
    mu = x.mean()
    return ((1 + delta) ** 3 - 1) * np.abs(x - g) + ((1 + delta) ** 2 - 1) * np.abs(g - mu) + delta * mu + 1.0


def _jitter_fit_rms(orig, out):
    """RMS residual of out ≈ A·(x - g) + B·(g - μ) + C (the jitter's form, see _jitter_bound), unclipped values.

    Fitted on every other row and column (4x faster, as telling). Measured on the synthetic tiles: at most
    0.42 (truncation) when ``out`` is a colour-jittered ``orig``; 0.84 and up when it is a jittered *other*
    dihedral transform of ``orig`` (tens on tissue).
    """
    x = orig[::2, ::2].astype(np.float64)
    y = out[::2, ::2].astype(np.float64).ravel()
    g = x.mean(-1, keepdims=True)
    f1 = (x - g).ravel()
    f2 = np.broadcast_to(g - x.mean(), x.shape).ravel()
    keep = (y > 0) & (y < 255)
    design = np.stack([f1[keep], f2[keep], np.ones(int(keep.sum()))], 1)
    coef, *_ = np.linalg.lstsq(design, y[keep] + 0.5, rcond=None)
    return float(np.sqrt(np.mean((design @ coef - y[keep] - 0.5) ** 2)))


def test_flip_rot90_pinned_for_a_seed():
    """The exact transform of each sample for a fixed seed, on a hand-worked grid and on random images and masks."""
    grid = np.array([[1, 2], [3, 4]], np.uint8)
    out, none = flip_rot90(np.stack([np.dstack([grid] * 3)] * 8), None, np.random.default_rng(PINNED_SEED))
    assert none is None
    assert [o[..., 0].tolist() for o in out] == [D4_OF_GRID[t] for t in PINNED]
    assert all((o == o[..., :1]).all() for o in out)  # channels are not moved

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (8, 6, 6, 3), dtype=np.uint8)
    mask = rng.integers(0, 5, (8, 6, 6), dtype=np.uint8)
    before = img.copy()
    out_i, out_m = flip_rot90(img, mask, np.random.default_rng(PINNED_SEED))
    assert np.array_equal(img, before)  # inputs untouched
    for a, m, b, bm, (k, flip) in zip(img, mask, out_i, out_m, PINNED):
        assert np.array_equal(b, _d4(a, k, flip))
        assert np.array_equal(bm, _d4(m, k, flip))
    # augment_batch draws the same transforms from the same seed; without colour the images are exact
    out = augment_batch({"image": img, "mask": mask}, seed=PINNED_SEED, colour=False)
    for a, m, b, bm, t in zip(img, mask, out["image"], out["mask"], PINNED):
        assert np.array_equal(b, _d4(a, *t)) and np.array_equal(bm, _d4(m, *t))


def test_flip_rot90_draws_all_eight_and_moves_mask_with_image():
    """Each output is exactly one of the 8 dihedral variants of its input, the mask the same one; all 8 occur."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 5, 5, 3), dtype=np.uint8)
    mask = rng.integers(0, 5, (64, 5, 5), dtype=np.uint8)
    out_i, out_m = flip_rot90(img, mask, np.random.default_rng(2))
    drawn = []
    for a, m, b, bm in zip(img, mask, out_i, out_m):
        hits = [t for t, v in enumerate(_d4_variants(a)) if np.array_equal(v, b)]
        assert len(hits) == 1  # random 5x5 images: the 8 variants are distinct
        assert [t for t, v in enumerate(_d4_variants(m)) if np.array_equal(v, bm)] == hits
        drawn.append(hits[0])
    assert sorted(set(drawn)) == list(range(8))


def _scale_interval(x, centre, out, eps=1e-3):
    """The factors f with trunc(f·(x - centre) + centre) == out at every value: (lo, hi), empty if lo > hi."""
    x, centre, out = (np.broadcast_to(np.asarray(v, np.float64), np.shape(x)) for v in (x, centre, out))
    d = x - centre
    nz = np.abs(d) > 1e-6
    a = (out[nz] - eps - centre[nz]) / d[nz]
    b = (out[nz] + 1 + eps - centre[nz]) / d[nz]
    return float(np.minimum(a, b).max()), float(np.maximum(a, b).min())


@pytest.mark.parametrize("factor", ["brightness", "contrast", "saturation"])
def test_colour_jitter_factor_is_one_draw_per_sample_in_range(factor):
    """One factor at a time (±0.5): each sample's output is exactly its formula for one factor in [0.5, 1.5].

    brightness: trunc(f·x); contrast: trunc(f·(x - μ) + μ), μ the sample's mean; saturation:
    trunc(f·(x - g) + g), g the pixel's channel mean (grey pixels stay as they are). The factors differ
    between samples and from 1 (a no-op jitter fails).
    """
    rng = np.random.default_rng(0)
    img = rng.integers(64, 161, (16, 6, 6, 3), dtype=np.uint8)  # no clipping at any factor in [0.5, 1.5]
    img[:, 0] = img[:, 0, :, :1]  # a grey row: R = G = B
    kw = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, factor: 0.5}
    out = colour_jitter(img, np.random.default_rng(3), **kw)
    assert out.dtype == np.uint8 and out.shape == img.shape
    intervals = []
    for x, y in zip(img.astype(np.float64), out):
        centre = {"brightness": 0.0, "contrast": x.mean(), "saturation": x.mean(-1, keepdims=True)}[factor]
        lo, hi = _scale_interval(x, centre, y)
        assert lo <= hi and lo <= 1.5 and hi >= 0.5, (lo, hi)
        intervals.append((lo, hi))
        if factor == "saturation":
            assert np.array_equal(y[0], x[0])
    assert any(hi < 0.99 or lo > 1.01 for lo, hi in intervals)  # not a no-op
    assert max(lo for lo, _ in intervals) - min(hi for _, hi in intervals) > 0.2  # drawn per sample
    assert np.array_equal(colour_jitter(img, np.random.default_rng(3), 0, 0, 0), img)


def test_colour_jitter_defaults_within_documented_bound():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 8, 8, 3), dtype=np.uint8)
    out = colour_jitter(img, np.random.default_rng(1))
    changed = 0
    for x, y in zip(img, out):
        assert (np.abs(y.astype(int) - x) <= _jitter_bound(x)).all()
        changed += not np.array_equal(x, y)
    assert changed >= 30


def test_augment_batch_jitters_images_only_after_the_pinned_transform():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (8, 6, 6, 3), dtype=np.uint8)
    mask = rng.integers(0, 5, (8, 6, 6), dtype=np.uint8)
    out = augment_batch({"image": img, "mask": mask, "slide_id": np.array(list("abcdefgh"), object)}, seed=PINNED_SEED)
    assert out["slide_id"].tolist() == list("abcdefgh")
    for a, m, b, bm, t in zip(img, mask, out["image"], out["mask"], PINNED):
        assert np.array_equal(bm, _d4(m, *t))  # masks: the transform only, no jitter
        back = _undo_d4(b, *t)
        assert (np.abs(back.astype(int) - a) <= _jitter_bound(a)).all()
        assert not np.array_equal(back, a)


def test_streamed_augmentation_against_the_unaugmented_tiles(tile_table, ray_local):
    """Every streamed tile (flips, rot90, colour jitter) against its own tile in the Parquet table.

    The image is one dihedral transform of the original plus colour jitter within its documented bound;
    the mask is exactly that same transform of the original mask. The transforms vary and the colours change.
    """
    table = pq.read_table(tile_table, columns=["slide_id", "x", "y", "split", "image", "mask"]).to_pylist()
    originals = {(r["slide_id"], r["x"], r["y"]): r for r in table if r["split"] == "train"}
    ds = read_tiles(str(tile_table), split="train", columns=["image", "mask", "slide_id", "x", "y"])
    seen, transforms, recoloured = set(), collections.Counter(), 0
    for b in torch_batches(ds, batch_size=16, augment=True):
        for img, mask, sid, x, y in zip(b["image"], b["mask"], b["slide_id"], b["x"].tolist(), b["y"].tolist()):
            row = originals[(sid, x, y)]
            seen.add((sid, x, y))
            orig = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))
            orig_mask = np.asarray(Image.open(io.BytesIO(row["mask"])))
            aug = np.rint(img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            aug_mask = mask.numpy()
            by_image = {t for t, v in enumerate(_d4_variants(orig)) if _jitter_fit_rms(v, aug) < 0.75}
            by_mask = {t for t, v in enumerate(_d4_variants(orig_mask)) if np.array_equal(v, aug_mask)}
            assert by_image & by_mask, (sid, x, y, by_image, by_mask)
            if len(by_image) == 1:
                (t,) = by_image
                transforms[t] += 1
                undone = _undo_d4(aug, t % 4, t >= 4)
                assert (np.abs(undone.astype(int) - orig) <= _jitter_bound(orig)).all()
                recoloured += not np.array_equal(undone, orig)
    assert seen == set(originals)
    assert sum(transforms.values()) >= 0.9 * len(originals)  # the image alone tells the transform
    assert len(transforms) >= 6, transforms  # ~40 tiles: P(< 6 of 8) < C(8,5)(5/8)^40 < 1e-6
    assert recoloured >= 0.9 * sum(transforms.values())


def test_balanced_stream_frequencies(tile_table, ray_local):
    """Exact per-batch group shares (equal, then weighted), rows drawn from the right group, all rows visited."""
    import functools

    from histoweak.data.streaming import BalancedSampler
    from histoweak.methods.base import Task

    raw = read_tiles(str(tile_table), split="train", columns=["image", "labels", "tissue_ratio"], decode=False)
    group_fn = functools.partial(Task("class:1", 5).groups, tau=0.9)
    sampler = BalancedSampler(raw, group_fn, seed=0)
    counts = sampler.counts
    assert len(counts) >= 3 and max(counts.values()) > 2 * min(counts.values())  # imbalanced to begin with
    k = len(counts)
    seen = collections.Counter()
    for b in sampler.batches(batch_size=4 * k, n_batches=6):
        assert b["image"].shape == (4 * k, 3, 128, 128) and b["image"].dtype == torch.float32
        g = b["group"].numpy()
        assert collections.Counter(g.tolist()) == {grp: 4 for grp in counts}
        # each row really belongs to its group: recompute from the row's own labels and tissue ratio
        meta = {"labels": b["labels"].numpy(), "tissue_ratio": b["tissue_ratio"].numpy()}
        assert (group_fn(meta) == g).all()
        seen.update(g.tolist())
    assert set(seen.values()) == {24}
    rare = min(counts, key=counts.get)
    weights = {grp: (3.0 if grp == rare else 1.0) for grp in counts}
    b = next(sampler.batches(batch_size=10 * (k + 2), weights=weights))
    assert collections.Counter(b["group"].tolist())[rare] == 30
    with pytest.raises(ValueError, match="batch_size 1 <"):
        next(sampler.batches(batch_size=1))
    with pytest.raises(ValueError, match=r"no rows in group\(s\) \[7\]"):
        next(sampler.batches(batch_size=8, weights={**weights, 7: 1.0}))


def test_plan_resources():
    from histoweak.data.streaming import DRIVER_RESERVE_CPUS

    for total, n in [(2, 1), (2, 2), (4, 1), (64, 8)]:
        p = plan_resources(total, n)
        assert p.data_cpus >= 1.0  # a 1-CPU decode task always fits under the cap
        assert p.cpus_per_worker >= 0.25
        # workers + one decode task + the driver's token share fit on the node at once
        assert p.cpus_per_worker * n + 1.0 + DRIVER_RESERVE_CPUS <= total
    assert plan_resources(64, 8).cpus_per_worker >= 1
    with pytest.raises(ValueError, match="at least 1.5 CPUs"):
        plan_resources(1, 1)


def test_two_train_style_consumers_do_not_starve(tile_table, ray_local):
    """Two actors holding CPUs like Ray Train workers, each reading its streaming_split shard."""
    ray = ray_local
    total = int(ray.cluster_resources()["CPU"])
    plan = plan_resources(total, 2)
    apply_resource_plan(plan)

    @ray.remote(num_cpus=plan.cpus_per_worker)
    class Worker:
        def consume(self, shard):
            from histoweak.data.streaming import torch_batches

            n, shapes = 0, set()
            for b in torch_batches(shard, batch_size=8):
                n += len(b["image"])
                shapes.add(tuple(b["image"].shape[1:]))
            return n, shapes

    ds = read_tiles(str(tile_table))
    shards = ds.streaming_split(2, equal=True)
    workers = [Worker.remote() for _ in range(2)]
    results = ray.get([w.consume.remote(s) for w, s in zip(workers, shards)], timeout=240)
    n_rows = pq.read_table(tile_table, columns=["x"]).num_rows
    assert {s for _, shp in results for s in shp} == {(3, 128, 128)}
    assert abs(results[0][0] - results[1][0]) <= 1  # equal split
    assert sum(n for n, _ in results) >= n_rows - 1
    for w in workers:
        ray.kill(w)


# -- BalancedSampler over the Parquet files (ParquetRows) ----------------------------------------

SAMPLED_COLUMNS = ["image", "mask", "labels", "tissue_ratio", "class_ratios", "slide_id", "x", "y"]


def _tissue_groups(meta):
    from histoweak.methods.base import Task

    return Task("class:1", 5).groups(meta, tau=0.9)


def _rows_by_key(paths, split="train"):
    """Every ``split`` row of the Parquet files under ``paths``, read with pyarrow alone: key -> (row, (file, rg))."""
    from pathlib import Path

    files = sorted(f for p in paths for f in ([Path(p)] if Path(p).is_file() else Path(p).rglob("*.parquet")))
    out = {}
    for f in files:
        pf = pq.ParquetFile(f)
        for rg in range(pf.metadata.num_row_groups):
            for row in pf.read_row_group(rg).to_pylist():
                if row["split"] == split:
                    out[(row["slide_id"], row["x"], row["y"])] = (row, (str(f), rg))
    return out


def _expected_groups(rows: dict) -> dict:
    """group -> keys, from the rows' own labels and tissue ratios."""
    keys = list(rows)
    meta = {"labels": np.asarray([rows[k][0]["labels"] for k in keys], np.float32),
            "tissue_ratio": np.asarray([rows[k][0]["tissue_ratio"] for k in keys], np.float32)}
    g = _tissue_groups(meta)
    return {int(v): {k for k, gk in zip(keys, g) if gk == v} for v in np.unique(g) if v >= 0}


def _keys(b) -> list:
    return list(zip(b["slide_id"], b["x"].tolist(), b["y"].tolist()))


def _draws_per_group(batches) -> dict:
    """group -> keys in draw order (a batch holds each group's draws contiguously, in order)."""
    out = collections.defaultdict(list)
    for b in batches:
        for k, g in zip(_keys(b), b["group"].tolist()):
            out[g].append(k)
    return out


def _copy_split(tile_table, out, row_group_size: int, split="train", **change):
    """The ``split`` rows of the tile table rewritten as one Parquet file with small row groups (``change``: column ->
    new values)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = pq.read_table(tile_table)
    t = t.filter(pc.equal(t.column("split"), split))
    for name, values in change.items():
        t = t.set_column(t.schema.get_field_index(name), name, pa.array(values, t.schema.field(name).type))
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, out, row_group_size=row_group_size)
    return t


def test_parquet_sampler_exact_shares_and_each_row_once_per_pass(tile_table):
    """From the files: exact equal shares, each row in its own group, every row of a group once per pass."""
    import pickle

    from histoweak.data.streaming import BalancedSampler, ParquetRows

    rows = _rows_by_key([tile_table])
    expected = _expected_groups(rows)
    source = ParquetRows(str(tile_table), "train", ["image", "labels", "tissue_ratio", "slide_id", "x", "y"])
    assert len(pickle.dumps(source)) < 4096  # what goes to a worker: the file list, not rows
    sampler = BalancedSampler(pickle.loads(pickle.dumps(source)), _tissue_groups, seed=0)
    assert sampler.counts == {g: len(k) for g, k in expected.items()}
    k = len(expected)
    n_batches = -(-2 * max(sampler.counts.values()) // 4)  # two passes of the largest group
    batches = []
    for b in sampler.batches(batch_size=4 * k, n_batches=n_batches):
        assert b["image"].shape == (4 * k, 3, 128, 128) and b["image"].dtype == torch.float32
        assert collections.Counter(b["group"].tolist()) == {g: 4 for g in expected}
        meta = {"labels": b["labels"].numpy(), "tissue_ratio": b["tissue_ratio"].numpy()}
        assert (_tissue_groups(meta) == b["group"].numpy()).all()
        batches.append(b)
    for g, drawn in _draws_per_group(batches).items():
        n = len(expected[g])
        assert len(drawn) == 4 * n_batches
        for p in range(len(drawn) // n):  # every full pass: each row of the group exactly once
            assert sorted(drawn[p * n:(p + 1) * n]) == sorted(expected[g])


def test_parquet_sampler_reads_a_pass_row_group_by_row_group(tile_table, tmp_path):
    """window=1: a pass takes a group's rows one row group at a time, each row group once; with room in the cache,
    each row group is read once in all."""
    import itertools

    from histoweak.data.streaming import BalancedSampler

    path = tmp_path / "small_rg" / "part.parquet"
    _copy_split(tile_table, path, row_group_size=4)
    rows = _rows_by_key([path])
    expected = _expected_groups(rows)
    cols = ["image", "labels", "tissue_ratio", "slide_id", "x", "y"]
    sampler = BalancedSampler.from_parquet(str(path), "train", cols, _tissue_groups, seed=1, window=1)
    n_batches = -(-3 * max(sampler.counts.values()) // 2)
    drawn = _draws_per_group(sampler.batches(batch_size=2 * len(expected), n_batches=n_batches))
    for g, seq in drawn.items():
        n = len(expected[g])
        for p in range(len(seq) // n):
            units = [rows[key][1] for key in seq[p * n:(p + 1) * n]]
            runs = [u for u, _ in itertools.groupby(units)]
            assert len(runs) == len(set(runs)) == len(set(units)), (g, runs)  # each row group one run
    touched = {u for seq in drawn.values() for key in seq for u in [rows[key][1]]}
    assert len(touched) > 4 and sampler.source.reads == len(touched)


def test_parquet_sampler_cache_stays_within_its_bytes(tile_table):
    """A cache bounded below two row groups: it never holds more, row groups are read again, batches stay exact."""
    from histoweak.data.streaming import BalancedSampler, ParquetRows

    cols = ["image", "labels", "tissue_ratio", "slide_id", "x", "y"]
    rows = _rows_by_key([tile_table])
    expected = _expected_groups(rows)
    files = {u[0] for _, u in rows.values()}
    rg_bytes = [pq.ParquetFile(f).read_row_group(0, columns=cols).get_total_buffer_size() for f in files]
    for bound in (int(1.5 * max(rg_bytes)), 1):
        source = ParquetRows(str(tile_table), "train", cols, cache_bytes=bound)
        sampler = BalancedSampler(source, _tissue_groups, seed=0)
        for b in sampler.batches(batch_size=2 * len(expected), n_batches=12):
            assert collections.Counter(b["group"].tolist()) == {g: 2 for g in expected}
            assert all(key in expected[g] for key, g in zip(_keys(b), b["group"].tolist()))
            assert source.cache_nbytes <= bound
        assert source.peak_cache_nbytes <= bound
        assert source.reads > len(files)  # read again: the cache could not keep them
        assert (source.peak_cache_nbytes > 0) == (bound > 1)


def test_parquet_sampler_rows_are_the_tables_rows(tile_table):
    """Every sampled row (no augmentation) is its row in the table, read with pyarrow: images and masks decoded
    bit for bit, labels, ratios and group."""
    import io

    from histoweak.data.streaming import BalancedSampler

    rows = _rows_by_key([tile_table])
    sampler = BalancedSampler.from_parquet(str(tile_table), "train", SAMPLED_COLUMNS, _tissue_groups, seed=3)
    seen = set()
    for b in sampler.batches(batch_size=8, n_batches=8):
        images = np.rint(b["image"].permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
        for i, key in enumerate(_keys(b)):
            row = rows[key][0]
            seen.add(key)
            assert np.array_equal(images[i], np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB")))
            assert np.array_equal(b["mask"][i].numpy(), np.asarray(Image.open(io.BytesIO(row["mask"]))))
            assert b["labels"][i].tolist() == row["labels"]
            assert np.allclose(b["class_ratios"][i].numpy(), row["class_ratios"])
            assert b["tissue_ratio"][i].item() == np.float32(row["tissue_ratio"])
        meta = {"labels": b["labels"].numpy(), "tissue_ratio": b["tissue_ratio"].numpy()}
        assert (_tissue_groups(meta) == b["group"].numpy()).all()
    assert len(seen) > 30


def test_parquet_sampler_takes_only_a_slices_rows_below_its_bound(tile_table, tmp_path):
    """A TableSlice of another table joins the split with its train rows of ``x < below`` only (its val rows and
    rows above the bound never come), each as it is in its own file."""
    import io

    from histoweak.data.streaming import BalancedSampler
    from histoweak.methods.base import TableSlice

    main = _rows_by_key([tile_table])
    n_val = pq.read_table(tile_table, columns=["split"]).column("split").to_pylist().count("val")
    syn = tmp_path / "syn"
    # train rows renamed, x = 0.., in two files of row groups of 5; a val copy with x = 0.. too
    t = _copy_split(tile_table, syn / "a.parquet", 5, slide_id=[f"syn-{i}" for i in range(len(main))],
                    x=list(range(len(main))))
    _copy_split(tile_table, syn / "b.parquet", 5, split="val", slide_id=[f"syn-val-{i}" for i in range(n_val)],
                x=list(range(n_val)))
    below = 17
    synth = _rows_by_key([syn])
    expected = {0: set(main), 1: {k for k in synth if k[1] < below}}
    assert len(expected[1]) == below and t.num_rows > below

    def origin(meta):
        return np.asarray([s.startswith("syn-") for s in meta["slide_id"]], np.int64)

    sampler = BalancedSampler.from_parquet(str(tile_table), "train", SAMPLED_COLUMNS, origin,
                                           more=(TableSlice(str(syn), "x", below),), seed=0)
    assert sampler.counts == {0: len(main), 1: below}
    # weights = counts: one batch of every row is one pass of each group
    b = next(sampler.batches(len(main) + below, weights={g: float(n) for g, n in sampler.counts.items()}))
    drawn = _draws_per_group([b])
    assert {g: set(k) for g, k in drawn.items()} == expected and len(drawn[1]) == below
    images = np.rint(b["image"].permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    for i, key in enumerate(_keys(b)):
        row = (synth if key[0].startswith("syn-") else main)[key][0]
        assert np.array_equal(images[i], np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB")))
