"""Stage 1 hands off to stage 2 through files: ``write_pseudo_labels`` and ``load_stage1`` on a real checkpoint.

The expectations are computed apart from the code under test: tiles decoded with PIL, the checkpoint's
weights read with ``torch.load``, the stage-1 model called directly.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from histoweak.checkpoint import save_checkpoint
from histoweak.methods import build_method
from histoweak.methods.base import Task
from histoweak.methods.pscl import PSCL
from histoweak.methods.pscl import write_pseudo_labels
from histoweak.train import TrainConfig

HPARAMS = {"backbone": "resnet18", "weights": None, "lam": 0.1, "max_pixels": None}
BATCH = 3  # small, so a file's train rows are labelled in several batches with a remainder

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _n_classes(tile_table: Path) -> int:
    return len(json.loads((tile_table / "_manifest.json").read_text())["classes"])


@pytest.fixture(scope="module")
def stage1(tile_table, tmp_path_factory) -> Path:
    """A stage-1 (pscl) checkpoint as ``histoweak.train`` writes one, with weights no fresh model has."""
    n_classes = _n_classes(tile_table)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_method("pscl", HPARAMS, Task("labels", n_classes))
    with torch.no_grad():  # move every tensor off its seed-0 initialisation (a fresh model could equal it)
        g = torch.Generator().manual_seed(1)
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.mul_(torch.empty(t.shape).uniform_(0.5, 1.5, generator=g))
            else:
                t.add_(0.05 * torch.randn(t.shape, generator=g))
    cfg = TrainConfig(method="pscl", target="labels", hparams=HPARAMS, name="stage1")
    d = tmp_path_factory.mktemp("stage1") / "checkpoint_000000"
    save_checkpoint(d, model.state_dict(), model.optimizer.state_dict(), 0, 0.5,
                    {"train": dataclasses.asdict(cfg), "n_classes": n_classes})
    return d


def _checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint / "state.pt", weights_only=True)["model"]


def _pil(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _expected_pseudo_labels(checkpoint: Path, table, n_classes: int) -> dict[int, np.ndarray]:
    """Row index -> stage-1 pseudo-label (eq. 4.9) of every train row, from the checkpoint's weights.

    Batches follow the function's (``BATCH`` train rows at a time, in file order) only so that both see
    the same float rounding; which tile gets which label is worked out here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PSCL(PSCL.Hparams(**HPARAMS), Task("labels", n_classes))
    model.load_state_dict(_checkpoint_weights(checkpoint))
    model.eval()
    split = table.column("split").to_pylist()
    images, labels = table.column("image").to_pylist(), table.column("labels").to_pylist()
    train = [i for i, s in enumerate(split) if s == "train"]
    out = {}
    for start in range(0, len(train), BATCH):
        rows = train[start:start + BATCH]
        x = torch.from_numpy(np.stack([_pil(images[i]) for i in rows])).permute(0, 3, 1, 2).float() / 255
        y = torch.tensor([labels[i] for i in rows], dtype=torch.float32)
        for i, p in zip(rows, model.pseudo_labels({"image": x, "labels": y}).numpy()):
            out[i] = p
    return out


def _parquet_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*.parquet"))


def test_only_train_masks_become_the_stage1_pseudo_labels(tile_table, stage1, tmp_path):
    n_classes = _n_classes(tile_table)
    roundabout = tile_table.parent / ".." / tile_table.parent.name / tile_table.name  # the manifest resolves it
    out = write_pseudo_labels(str(stage1), str(roundabout), str(tmp_path / "pseudo"), n_classes, batch_size=BATCH,
                              progress=False)
    assert Path(out) == tmp_path / "pseudo"
    files = _parquet_files(tile_table)
    assert files and _parquet_files(out) == files  # every file of the source, at the same relative path

    seen = {"train": 0, "val": 0, "test": 0}
    changed = 0
    for rel in files:
        src, dst = pq.read_table(tile_table / rel), pq.read_table(out / rel)
        assert dst.num_rows == src.num_rows, rel
        # everything but the mask is the source's, row for row
        assert dst.drop_columns(["mask"]).equals(src.drop_columns(["mask"])), rel
        expected = _expected_pseudo_labels(stage1, src, n_classes)
        for i, (split, before, after) in enumerate(zip(src.column("split").to_pylist(), src.column("mask").to_pylist(),
                                                       dst.column("mask").to_pylist())):
            seen[split] += 1
            if split != "train":
                assert after == before, (rel, i, split)  # ground truth, byte for byte
                continue
            written = _pil(after)
            assert written.dtype == np.uint8 and written.shape == expected[i].shape, (rel, i)
            np.testing.assert_array_equal(written, expected[i], err_msg=f"{rel} row {i}")
            changed += not np.array_equal(written, _pil(before))
    assert all(seen.values()), seen  # the table has tiles of every split
    assert changed > 0  # pseudo-labels are not the ground truth: the comparison above can tell them apart

    manifest = json.loads((out / "_manifest.json").read_text())
    source = json.loads((tile_table / "_manifest.json").read_text())
    assert manifest["pseudo_labels"]["checkpoint"] == str(stage1)
    assert manifest["pseudo_labels"]["source"] == str(tile_table.resolve())
    assert manifest["classes"] == source["classes"]  # stage 2 reads its class count from here


def test_rerun_skips_finished_files_and_rewrites_a_missing_one(tile_table, stage1, tmp_path):
    n_classes = _n_classes(tile_table)
    out = tmp_path / "pseudo"
    write_pseudo_labels(str(stage1), str(tile_table), str(out), n_classes, batch_size=BATCH, progress=False)
    files = _parquet_files(out)
    assert len(files) >= 2
    past = 1_000_000_000  # 2001: any write after this changes the time
    for rel in files:
        os.utime(out / rel, ns=(past, past))
    contents = {rel: pq.read_table(out / rel) for rel in files}

    write_pseudo_labels(str(stage1), str(tile_table), str(out), n_classes, batch_size=BATCH, progress=False)
    assert {rel: (out / rel).stat().st_mtime_ns for rel in files} == {rel: past for rel in files}  # nothing rewritten
    assert _parquet_files(out) == files

    gone = files[len(files) // 2]
    (out / gone).unlink()
    write_pseudo_labels(str(stage1), str(tile_table), str(out), n_classes, batch_size=BATCH, progress=False)
    assert (out / gone).exists() and (out / gone).stat().st_mtime_ns != past
    assert pq.read_table(out / gone).equals(contents[gone])  # written again, the same pseudo-labels
    assert {rel: (out / rel).stat().st_mtime_ns for rel in files if rel != gone} == \
        {rel: past for rel in files if rel != gone}
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no half-written leftovers


def test_stage2_encoder_starts_from_the_stage1_checkpoint(tile_table, stage1):
    n_classes = _n_classes(tile_table)
    encoder = {k.removeprefix("encoder."): v for k, v in _checkpoint_weights(stage1).items()
               if k.startswith("encoder.")}
    assert encoder

    torch.manual_seed(0)  # the seed the stage-1 model was built with: a random init alone would look alike
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stage2 = build_method("pscl-seg", {"backbone": "resnet18", "weights": None, "stage1": str(stage1),
                                           "decoder_width": 16}, Task("mask", n_classes))
    got = stage2.encoder.state_dict()
    assert got.keys() == encoder.keys()
    for k, v in encoder.items():
        assert torch.equal(got[k], v), k

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = build_method("pscl-seg", {"backbone": "resnet18", "weights": None, "decoder_width": 16},
                             Task("mask", n_classes))
    assert not all(torch.equal(fresh.encoder.state_dict()[k], v) for k, v in encoder.items())  # the test can fail
