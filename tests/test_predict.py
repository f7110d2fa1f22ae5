"""``histoweak predict``: stitching is exact, the command writes what it says, refusals and failures name their cause.

Checkpoints are real: ``save_checkpoint`` of registered models (``pscl-seg`` on ResNet-18, ``erm``) and
of two test-only segmentation methods registered here (constant probabilities; classes that depend only
on the absolute pixel position), loaded back by ``histoweak predict`` like any other.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from ray import cloudpickle
from torch import nn

from histoweak import cli
from histoweak import metrics as M
from histoweak.checkpoint import save_checkpoint
from histoweak.methods import build_method, register_method
from histoweak.methods.base import Method, Task
from histoweak.predict import (Stitcher, _read_tiles, blend_window, covering_grid, predict_slides,
                               resolve_checkpoint, tiling_params, tissue_tiles)
from histoweak.slides.reader import SlideReader
from histoweak.slides.tiling import TilingParams

N_CLASSES = 5
CLASS_NAMES = ["background", "tumor", "stroma", "lymphocytes", "necrosis"]
CONSTANT = (0.05, 0.1, 0.6, 0.15, 0.1)  # class 2 everywhere


def position_classes(X, Y):
    """The position model's class at absolute pixel (X, Y) of the predicted level (numpy or torch integers)."""
    return (X // 37 + 2 * (Y // 29) + (X + Y) // 101) % N_CLASSES


class _TestSegmentation(Method):
    """A segmentation method with one weight; subclasses say what ``forward`` predicts (log-probabilities)."""

    @classmethod
    def supports(cls, task: Task) -> bool:
        return task.target == "mask"

    def _build(self) -> None:
        self.scale = nn.Parameter(torch.ones(()))

    def _loss(self, batch):
        return (self.scale - 2) ** 2, {}

    @torch.no_grad()
    def predict(self, batch: dict) -> torch.Tensor:
        self.eval()
        return self.logits(batch).softmax(1)

    def forward(self, images):
        return self.logits({"image": images})


@register_method("test-predict-constant")
class ConstantSegmentation(_TestSegmentation):
    def logits(self, batch):
        n, _, h, w = batch["image"].shape
        return torch.tensor(CONSTANT).log().view(1, -1, 1, 1).expand(n, -1, h, w) * self.scale


@register_method("test-predict-position")
class PositionSegmentation(_TestSegmentation):
    def logits(self, batch):
        """Class ``position_classes`` at each pixel from the tile's key (level-0 x, y and downsample)."""
        n, _, h, w = batch["image"].shape
        zeros = torch.zeros(n, dtype=torch.int64)
        ds = batch.get("downsample", torch.ones(n)).double()
        x0 = torch.round(batch.get("x", zeros).double() / ds).long()
        y0 = torch.round(batch.get("y", zeros).double() / ds).long()
        X = x0[:, None, None] + torch.arange(w)[None, None, :]
        Y = y0[:, None, None] + torch.arange(h)[None, :, None]
        probs = 0.1 + 0.5 * F.one_hot(position_classes(X, Y), N_CLASSES).permute(0, 3, 1, 2).float()
        return probs.log() * self.scale


# Ray's workers cannot import this test module: ship its classes (the models inside the actor) by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _checkpoint(path: Path, method: str, target: str = "mask", tiling: dict | None = None, **hparams) -> Path:
    torch.manual_seed(0)  # an untrained model, the same one every run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random initialisation
        model = build_method(method, {**hparams, "weights": None}, Task(target, N_CLASSES))
    config = {"train": {"method": method, "target": target, "hparams": {**hparams, "weights": None}},
              "n_classes": N_CLASSES, "class_names": CLASS_NAMES, "tiling": tiling}
    return save_checkpoint(path, model.state_dict(), model.optimizer.state_dict(), 0, None, config)


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """A SQLite MLflow store of this module's own (``MLFLOW_TRACKING_URI``)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI")
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


# -- pure parts -----------------------------------------------------------------------------------------
def test_covering_grid_reaches_every_edge():
    g = covering_grid(203, 150, 64, 48)
    assert sorted(set(g[:, 0])) == [0, 48, 96, 139] and sorted(set(g[:, 1])) == [0, 48, 86]
    assert covering_grid(40, 30, 64, 48).tolist() == [[0, 0]]  # smaller than a tile: one tile, clipped later
    assert covering_grid(128, 128, 64, 64).tolist() == [[0, 0], [64, 0], [0, 64], [64, 64]]


def test_blend_window_cross_fades_to_one():
    w = blend_window(64, 16)[32]  # a row through the centre
    assert w.min() > 0 and w[16:48].tolist() == [1.0] * 32
    np.testing.assert_allclose(w[48:] + w[:16], 1.0, rtol=0, atol=1e-6)  # neighbours 48 px apart sum to 1
    assert (blend_window(8, 0) == 1).all()


@pytest.mark.parametrize("size", [(203, 150), (40, 30), (256, 256)])
def test_stitcher_reproduces_constant_and_position_models(size):
    """Whole-image coverage, awkward sizes (edge tiles overlap more; a slide smaller than a tile): borders too."""
    width, height, tile, stride = *size, 64, 48
    const, pos = Stitcher(N_CLASSES, width, height, tile, tile - stride), Stitcher(N_CLASSES, width, height, tile, tile - stride)
    p = np.asarray(CONSTANT, np.float32)[:, None, None] * np.ones((1, tile, tile), np.float32)
    for x, y in covering_grid(width, height, tile, stride):
        const.add(p, x, y)
        Y, X = np.mgrid[y:y + tile, x:x + tile]
        pos.add(0.1 + 0.5 * (np.arange(N_CLASSES)[:, None, None] == position_classes(X, Y)), x, y)
    assert (const.mask() == 2).all()
    np.testing.assert_allclose(const.probabilities(), np.broadcast_to(p[:, :1, :1], (N_CLASSES, height, width)),
                               rtol=1e-6, atol=1e-7)
    Y, X = np.mgrid[:height, :width]
    np.testing.assert_array_equal(pos.mask(), position_classes(X, Y))
    empty = Stitcher(N_CLASSES, width, height, tile, 16)
    assert (empty.mask() == 0).all()  # no tile: background


def test_tiling_follows_the_checkpoint_then_the_options():
    saved = {"tiling": TilingParams(level=1, tile_size=128, stride=128, tissue_method="otsu").to_dict()}
    p = tiling_params(saved)
    assert (p.level, p.tile_size, p.step, p.tissue_method) == (1, 128, 96, "otsu")  # a quarter tile of overlap
    p = tiling_params(saved, tile_size=64, stride=64, level=0)
    assert (p.level, p.tile_size, p.step) == (0, 64, 64)
    assert tiling_params({}).tile_size == TilingParams().tile_size  # an older checkpoint: the defaults
    with pytest.raises(ValueError, match="'stride': 200 is larger than the tile size 128"):
        tiling_params(saved, stride=200)
    with pytest.raises(ValueError, match="tiling parameter 'tile_size'"):
        tiling_params(saved, tile_size=4)


def test_a_slide_that_fails_to_read_marks_its_tiles(synth_dir, tmp_path):
    good = str(synth_dir / "slides" / "tiny-3-000.tiff")
    batch = {"slide_id": np.array(["a", "a", "b"], object), "path": np.array([good, good, str(tmp_path / "gone.tiff")], object),
             "x": np.array([0, 256, 0]), "y": np.array([0, 0, 0]), "downsample": np.array([2.0, 2.0, 2.0]),
             "col": np.array([0, 128, 0]), "row": np.array([0, 0, 0]), "level": np.array([1, 1, 1]),
             "level_downsample": np.array([2.0, 2.0, 2.0])}
    out = _read_tiles(batch, tile_size=64)
    assert out["error"][:2].tolist() == ["", ""] and "gone.tiff: file does not exist" in out["error"][2]
    with SlideReader(good) as r:
        np.testing.assert_array_equal(out["image"][1], r.read_region((256, 0), 1, (64, 64)))


def test_resolve_checkpoint_from_a_directory_or_an_mlflow_run(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    ck = (tmp_path / "ck").resolve()
    ck.mkdir()
    assert resolve_checkpoint(ck) == ck
    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.create_experiment("resolve-test")
    tagged = client.create_run(exp, tags={"best_checkpoint": str(ck)}).info.run_id
    bare = client.create_run(exp, run_name="trial-7").info.run_id
    stale = client.create_run(exp, tags={"best_checkpoint": str(tmp_path / "moved")}).info.run_id
    assert resolve_checkpoint(tagged) == ck
    with pytest.raises(ValueError, match=f"MLflow run {bare} \\(trial-7\\).*has no tag 'best_checkpoint'"):
        resolve_checkpoint(bare)
    with pytest.raises(ValueError, match=f"MLflow run {stale}.*points to .*moved, which is not a directory"):
        resolve_checkpoint(stale)
    with pytest.raises(ValueError, match=f"checkpoint {'0' * 32}: no such directory, and no MLflow run"):
        resolve_checkpoint("0" * 32)
    with pytest.raises(ValueError, match="checkpoint nowhere/ck: no such directory, and not an MLflow run id"):
        resolve_checkpoint("nowhere/ck")


def test_refuses_a_checkpoint_that_is_not_segmentation(tmp_path, capsys):
    ck = _checkpoint(tmp_path / "erm-ck", "erm", target="class:1", backbone="resnet18")
    code = cli.main(["predict", "--checkpoint", str(ck), str(tmp_path), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("histoweak predict: error:")
    assert f"checkpoint {ck}: method 'erm' was trained for target 'class:1', not 'mask'" in err
    assert "pscl-seg" in err  # what would do
    assert not (tmp_path / "out").exists()


# -- on a local Ray ---------------------------------------------------------------------------------------
def test_position_model_is_stitched_without_seams(synth_dir, ray_local, mlflow_uri, tmp_path):
    """Level 1, 64-px tiles every 40 px (24-px seams, more at the flush edge tiles): the written mask is
    ``position_classes`` at every pixel the tissue tiles cover, background elsewhere."""
    slide = synth_dir / "slides" / "tiny-3-001.tiff"
    ck = _checkpoint(tmp_path / "ck", "test-predict-position", tiling=TilingParams(level=1, tile_size=64).to_dict())
    report = predict_slides(ck, str(slide), tmp_path / "out", stride=40, batch_size=32, progress=False)
    assert report.failures == {} and report.slides["tiny-3-001"].status == "ok"
    mask = tifffile.imread(report.slides["tiny-3-001"].outputs["mask"], key=0)
    covered = _tissue_cover(slide, report.params)
    Y, X = np.mgrid[:512, :512]
    np.testing.assert_array_equal(mask, np.where(covered, position_classes(X, Y), 0))


def _tissue_cover(slide: Path, params: TilingParams) -> np.ndarray:
    """Pixels of the slide's tissue tiles at ``params.level`` (tiny-3-001 at level 1: tissue on all four borders)."""
    with SlideReader(slide) as r:
        positions, candidates = tissue_tiles(r, params)
        width, height = r.level_dimensions[params.level]
    covered = np.zeros((height, width), bool)
    for x, y in positions:
        covered[y:y + params.tile_size, x:x + params.tile_size] = True
    assert 0 < len(positions) < candidates and covered.mean() > 0.2
    assert covered[0].any() and covered[-1].any() and covered[:, 0].any() and covered[:, -1].any()
    return covered


def test_predict_command_end_to_end(synth_dir, ray_local, mlflow_uri, tmp_path, capsys):
    """pscl-seg (ResNet-18, untrained) on the three synthetic slides, at level 2 with 64-px tiles (the options
    override the checkpoint's tiling): masks (tifffile and OpenSlide), overlays, GeoJSON that rasterises back
    to the mask, metrics in MLflow equal to those of the written masks against the ground truth."""
    import openslide
    from PIL import Image

    tiling = TilingParams(level=1, tile_size=128).to_dict()
    ck = _checkpoint(tmp_path / "pscl-seg-ck", "pscl-seg", tiling=tiling, backbone="resnet18", decoder_width=32)
    out = tmp_path / "out"
    code = cli.main(["predict", "--checkpoint", str(ck), str(synth_dir / "slides.csv"), str(out), "--batch-size", "8",
                     "--level", "2", "--tile-size", "64"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "3/3 slides segmented with pscl-seg" in stdout
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("predict").experiment_id],
                              filter_string=f"params.checkpoint = '{ck}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == f"{ck.parent.name}/{ck.name}"
    assert {k: run.data.params[k] for k in ("method", "tile_size", "level", "stride")} == {
        "method": "pscl-seg", "tile_size": "64", "level": "2", "stride": "48"}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "overlays")}
    per_slide = []
    for sid in ("tiny-3-000", "tiny-3-001", "tiny-3-002"):
        mask_path = out / f"{sid}_mask.tiff"
        mask = tifffile.imread(mask_path, key=0)
        assert mask.shape == (256, 256) and mask.dtype == np.uint8 and mask.max() < N_CLASSES
        with openslide.OpenSlide(str(mask_path)) as s:
            assert s.dimensions == (256, 256)
            np.testing.assert_array_equal(np.asarray(s.read_region((0, 0), 0, (256, 256)))[..., 0], mask)
        with Image.open(out / f"{sid}_overlay.png") as im:
            assert im.format == "PNG" and min(im.size) > 200
        assert f"overlays/{sid}_overlay.png" in artifacts
        geo = json.loads((out / f"{sid}.geojson").read_text())
        assert geo["type"] == "FeatureCollection" and len(geo["features"]) > 0
        assert len(np.unique(mask)) >= 2  # regions of a class beside background (or of two classes) to outline
        _assert_geojson_rasterises_to(out / f"{sid}.geojson", mask, downsample=4.0)
        truth = tifffile.imread(synth_dir / "masks" / f"{sid}.tiff", key=2)  # the ground truth's 256² page
        scores = M.segmentation_scores(M.confusion_matrix(truth, mask, N_CLASSES))
        for k, v in scores.items():
            assert run.data.metrics[f"{sid}.{k}"] == pytest.approx(v, abs=1e-9)
        per_slide.append(scores)
    for k in ("f1_macro", "f1_micro", "miou"):
        assert run.data.metrics[f"mean.{k}"] == pytest.approx(np.mean([s[k] for s in per_slide]), abs=1e-9)
    assert run.data.metrics["n_failed"] == 0


def _assert_geojson_rasterises_to(path: Path, mask: np.ndarray, downsample: float) -> None:
    """The GeoJSON's polygons (level-0 pixels), drawn back at the mask's resolution, are the mask's classes."""
    from histoweak.slides.annotations import rasterize, read_geojson

    drawn = rasterize(read_geojson(path), mask.shape, {n: i for i, n in enumerate(CLASS_NAMES)}, downsample)
    np.testing.assert_array_equal(drawn, mask)


def test_constant_model_everywhere_while_a_corrupt_slide_is_reported(synth_dir, ray_local, mlflow_uri, tmp_path,
                                                                       capsys):
    """``histoweak predict`` on a good slide and a truncated one: the good one's mask is the constant class at
    every tissue-tile pixel, seams and slide borders included; the broken one is named with its problem; exit 1."""
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(synth_dir / "slides" / "tiny-3-001.tiff", slides / "good.tiff")
    data = (synth_dir / "slides" / "tiny-3-001.tiff").read_bytes()
    (slides / "broken.tiff").write_bytes(data[:len(data) // 2])  # truncated mid-file
    tiling = TilingParams(level=1, tile_size=64)
    ck = _checkpoint(tmp_path / "ck", "test-predict-constant", tiling=tiling.to_dict())
    out = tmp_path / "out"
    code = cli.main(["predict", "--checkpoint", str(ck), str(slides), str(out), "--stride", "40"])
    cap = capsys.readouterr()
    assert code == 1
    assert f"FAILED broken: {slides / 'broken.tiff'}: corrupt or truncated image" in cap.err
    assert "1/2 slides segmented" in cap.out
    assert sorted(p.name for p in out.iterdir()) == ["good.geojson", "good_mask.tiff", "good_overlay.png"]
    mask = tifffile.imread(out / "good_mask.tiff", key=0)
    covered = _tissue_cover(slides / "good.tiff", replace(tiling, stride=40))
    np.testing.assert_array_equal(mask, np.where(covered, 2, 0))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("predict").experiment_id],
                                filter_string=f"params.checkpoint = '{ck}'")
    assert run.data.metrics["n_failed"] == 1 and run.info.status == "FINISHED"
