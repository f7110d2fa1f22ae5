import collections

import pyarrow.parquet as pq
import pytest

from histoweak.data.defaults import n_classes_of
from histoweak.report import group_counts


@pytest.mark.parametrize("target", ["class:1", "class:2"])
def test_group_counts_streamed_match_rows(tile_table, target):
    files = sorted(tile_table.rglob("*.parquet"))
    assert len(files) > 1  # the counts add up over several files' batches
    c = int(target.split(":")[1])
    rows = pq.read_table(tile_table, columns=["split", "labels", "tissue_ratio"]).to_pylist()
    for tau in (0.03, 0.5, 0.9):
        # GERNE's groups by hand: 2 * y + [tissue_ratio >= tau], y = class c present
        expected = collections.defaultdict(lambda: dict.fromkeys(range(4), 0))
        for r in rows:
            expected[r["split"]][2 * (r["labels"][c] > 0) + (r["tissue_ratio"] >= tau)] += 1
        got = group_counts(str(tile_table), target, n_classes_of(tile_table), tau)
        assert got == dict(expected)
        assert sum(n for s in got.values() for n in s.values()) == len(rows)
