"""The training stream is shuffled: every epoch visits each training row once, in an order fixed by
``(train.seed, epoch)`` alone — through ``train.fit`` on a real local Ray, on a table sorted by class."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from histoweak.data.streaming import EpochShuffle, TableRows, windowed_permutation
from histoweak.train import TrainConfig, fit

TINY = {"backbone": "test_resnet", "weights": None}  # timm's 0.37 M-parameter ResNet


@pytest.fixture(scope="module")
def sorted_table(tile_table, tmp_path_factory) -> tuple[Path, dict, int]:
    """The tiny tile table rewritten with its training rows sorted by class (each tile's largest class) in row
    groups of 16, the way `histoweak import folder` writes class by class; val and test as they were.
    Returns the table, row key -> class, and the number of classes present."""
    files = sorted(str(f) for f in Path(tile_table).rglob("*.parquet"))
    t = pads.dataset(files, format="parquet").to_table()
    train = t.filter(pc.equal(t.column("split"), "train"))
    cls = np.array([int(np.argmax(r)) for r in train.column("class_ratios").to_pylist()])
    train = train.take(np.argsort(cls, kind="stable"))
    rest = t.filter(pc.not_equal(t.column("split"), "train"))
    out = tmp_path_factory.mktemp("sorted")
    pq.write_table(pa.concat_tables([train, rest]), out / "part-0.parquet", row_group_size=16)
    (out / "_manifest.json").write_text((Path(tile_table) / "_manifest.json").read_text())
    keys = zip(*(train.column(c).to_pylist() for c in ("slide_id", "x", "y")))
    by_key = {k: int(c) for k, c in zip(keys, np.sort(cls))}
    return out, by_key, len(np.unique(cls))


def _run(table, tmp_path, trace: Path, name: str | None = None, **kw):
    cfg = TrainConfig(**{"method": "erm", "hparams": TINY, "target": "class:1", "epochs": 3, "batch_size": 8,
                         "num_workers": 2, "augment": False, "name": name or f"s-{uuid.uuid4().hex[:8]}",
                         "storage_path": str(tmp_path / "results"),
                         "worker_env": {"HISTOWEAK_WORKER_TRACE": str(trace)}, **kw})
    return cfg, fit(cfg, str(table), n_classes=5)


def _epochs(trace: Path) -> dict[int, list[list[tuple]]]:
    """epoch -> [rank 0's rows, rank 1's rows] (row keys in the order they were stepped on); a resumed run's
    trace lines for an epoch replace its earlier ones."""
    out: dict[int, list] = {}
    for rank in (0, 1):
        for line in (trace / f"rank{rank}.jsonl").read_text().splitlines():
            e = json.loads(line)
            out.setdefault(e["epoch"], [[], []])[rank] = [tuple(r) for r in e["rows"]]
    return out


def _distinct_per_batch(rows: list[tuple], by_key: dict, bs: int) -> np.ndarray:
    labels = np.array([by_key[r] for r in rows])
    return np.array([len(set(labels[i:i + bs])) for i in range(0, len(labels), bs)])


def test_every_epoch_shuffled_exact_and_reproducible_through_fit(sorted_table, ray_local, tmp_path):
    table, by_key, n_classes = sorted_table
    assert n_classes >= 2
    n, bs = len(by_key), 8
    cfg, out = _run(table, tmp_path, tmp_path / "a")
    assert out.metrics["epoch"] == 2
    full = _epochs(tmp_path / "a")
    assert sorted(full) == [0, 1, 2]
    per_rank = (n // 2) // bs * bs
    uniform_d = []  # distinct classes per batch of a uniform permutation of the same labels (computed here)
    labels = np.array(list(by_key.values()))
    rng = np.random.default_rng(0)
    for _ in range(4000):
        perm = labels[rng.permutation(n)][:per_rank]
        uniform_d += [len(set(perm[i:i + bs])) for i in range(0, per_rank, bs)]
    mu, sd = float(np.mean(uniform_d)), float(np.std(uniform_d))
    for epoch, (r0, r1) in full.items():
        # (b) every row at most once over both workers, each worker the same full batches, none but the remainder
        # (n mod 2, then each worker's last partial batch) left for another epoch
        assert len(r0) == len(r1) == per_rank
        assert len(set(r0) | set(r1)) == 2 * per_rank and set(r0) | set(r1) <= set(by_key)
        # (a) not the table's (class-sorted) order; batches mix classes as a uniform permutation does: the mean
        # number of distinct classes per batch within 4 standard errors of a uniform permutation's (file order
        # gives about 1)
        seq = [by_key[r] for r in r0]
        assert seq != sorted(seq)
        d = np.concatenate([_distinct_per_batch(r, by_key, bs) for r in (r0, r1)])
        assert d.mean() >= mu - 4 * sd / np.sqrt(len(d)), (d.mean(), mu, sd)
    # (c) each epoch its own order
    assert full[0] != full[1] != full[2]

    # (d) the same seed gives the same order, epoch by epoch, in a run with another name; (e) that run, interrupted
    # after epoch 1 and resumed (the same name again with 3 epochs: it restarts from its last checkpoint), sees in
    # epoch 2 what the uninterrupted run saw
    name = f"s-{uuid.uuid4().hex[:8]}"
    _run(table, tmp_path, tmp_path / "c", name=name, epochs=2)
    again = _epochs(tmp_path / "c")
    assert again[0] == full[0] and again[1] == full[1]
    _, resumed = _run(table, tmp_path, tmp_path / "c", name=name, epochs=3)
    assert resumed.metrics["resumed_from_epoch"] == 2
    assert _epochs(tmp_path / "c")[2] == full[2]
    # another seed, another order (its first batch is enough to tell)
    _run(table, tmp_path, tmp_path / "d", epochs=1, seed=1, steps_per_epoch=1)
    other = _epochs(tmp_path / "d")[0]
    assert other[0] != full[0][0][:bs] and other[1] != full[0][1][:bs]


def test_shuffle_false_keeps_the_file_order_and_says_so(sorted_table, ray_local, tmp_path, capfd):
    """The file-order stream (Ray Data, blocks of whole row groups, in the order they are read): runs of one
    class, far fewer classes per batch than a uniform permutation — what every run saw before shuffling."""
    table, by_key, _ = sorted_table
    _run(table, tmp_path, tmp_path / "t", epochs=1, num_workers=1, shuffle=False)
    assert "train.shuffle is false" in capfd.readouterr().out
    rows = [tuple(r) for r in json.loads((tmp_path / "t" / "rank0.jsonl").read_text().splitlines()[0])["rows"]]
    labels = np.array([by_key[r] for r in rows])
    changes = int((np.diff(labels) != 0).sum())
    assert changes <= len(labels) // 16 + 6  # a change per row group (16 rows) read, plus each class's last one
    rng = np.random.default_rng(0)
    uniform = np.mean([(np.diff(labels[rng.permutation(len(labels))]) != 0).sum() for _ in range(200)])
    assert changes < uniform / 3, (changes, uniform)


def test_windowed_permutation_is_uniform_within_a_window_and_reads_by_unit():
    units = np.repeat(np.arange(10), 16)  # 10 row groups of 16 rows
    one = windowed_permutation(units, np.random.default_rng(0), window=10)
    assert sorted(one) == list(range(160))
    # a window of 2 row groups: each consecutive 32 rows of the order come from exactly two row groups
    two = windowed_permutation(units, np.random.default_rng(0), window=2)
    assert sorted(two) == list(range(160))
    assert all(len(set(units[two[i:i + 32]])) == 2 for i in range(0, 160, 32))
    # the first row's position under a full window is uniform over the rows (chi-square, 16 bins of 10 rows)
    firsts = [windowed_permutation(units, np.random.default_rng(s), 10)[0] // 10 for s in range(3200)]
    counts = np.bincount(firsts, minlength=16)
    chi2 = float(((counts - 200) ** 2 / 200).sum())
    assert chi2 < 37.7, counts  # 15 degrees of freedom, p = 0.001


def test_epoch_shuffle_splits_the_epoch_between_workers():
    table = pa.table({"label": np.arange(103), "tissue_ratio": np.ones(103, np.float32)})
    streams = [EpochShuffle(TableRows(table), seed=3, rank=r, world=2) for r in (0, 1)]
    for epoch in (0, 1):
        got = [streams[r].rows(epoch) for r in (0, 1)]
        assert len(got[0]) == len(got[1]) == 51
        assert not set(got[0]) & set(got[1])
        batches = [list(streams[r].batches(epoch, batch_size=10)) for r in (0, 1)]
        assert [len(b) for b in batches] == [5, 5]
        seen = np.concatenate([b["label"].numpy() for r in batches for b in r])
        assert len(set(seen.tolist())) == 100
    assert not np.array_equal(streams[0].rows(0), streams[0].rows(1))
    assert np.array_equal(streams[0].rows(1), EpochShuffle(TableRows(table), seed=3, rank=0, world=2).rows(1))
