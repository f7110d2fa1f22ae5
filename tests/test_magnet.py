"""MagNets on real pyramidal slides: reading where the model looks (levels, views, pixel accounting), the patch
tree, the step's gradients through the straight-through sampling, and the whole-slide methods' contract."""

from __future__ import annotations

import warnings

import numpy as np
import openslide
import pytest
import torch
from sklearn.metrics import roc_auc_score

from histoweak import metrics as M
from histoweak.data.synthetic import write_pyramid
from histoweak.methods import METHODS, build_method
from histoweak.methods.base import Task
from histoweak.methods.magnet import patch_tree_size
from histoweak.slides.reader import SlideReader, cached_reader
from histoweak.slides.regions import grey_filter, read_box, tile_grid, tiling_pixels, view_pixels

SLIDE_METHODS = sorted(n for n in METHODS if METHODS[n].table == "slides")
TINY = {"backbone": "test_resnet", "weights": None}


def _slide(path, w=1024, h=768, seed=0):
    """A pyramidal TIFF (levels 1, 2, 4) of blocky random colour, lossless so reads compare exactly."""
    rng = np.random.default_rng(seed)
    img = np.kron((rng.random((h // 16, w // 16, 3)) * 255).astype(np.uint8), np.ones((16, 16, 1), np.uint8))
    write_pyramid(path, img, mpp=0.5, compression="zlib")
    return path, img


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    return [str(_slide(d / f"s{i}.tiff", seed=i)[0]) for i in range(4)]


def test_a_box_reads_its_pixels_from_the_coarsest_level_that_holds_them(tmp_path):
    path, img = _slide(tmp_path / "a.tiff", w=1024, h=1024)
    reader = SlideReader(path)
    assert reader.level_downsamples == (1.0, 2.0, 4.0)
    # theta with s = 0.5, t = (-0.5, -0.5) selects the top-left quarter: 512 level-0 px; at 128 px out that is
    # downsample 4 = level 2, read from (0, 0), 128 x 128 pixels of level 2
    rgb, read = read_box(reader, (-0.5, -0.5, 0.5), 128)
    assert (read.level, read.downsample, read.pixels, read.level0_pixels) == (2, 4.0, 128 * 128, 512 * 512)
    expected = np.asarray(openslide.OpenSlide(str(path)).read_region((0, 0), 2, (128, 128)))[..., :3]
    np.testing.assert_array_equal(rgb, expected)
    # at 512 px out the same box needs level 0: exactly the slide's own top-left quarter
    rgb, read = read_box(reader, (-0.5, -0.5, 0.5), 512)
    assert read.level == 0
    np.testing.assert_array_equal(rgb, img[:512, :512])
    # in between (300 px: downsample 1.71), the finer level 0 is read and resized, never the coarser level 1
    assert read_box(reader, (-0.5, -0.5, 0.5), 300)[1].level == 0


def test_boxes_outside_the_slide_read_nothing_there_and_count_what_they_read(tmp_path):
    path, img = _slide(tmp_path / "b.tiff", w=1024, h=768)  # canvas 1024 x 1024: 128 px bands above and below
    reader = SlideReader(path)
    before = reader.pixels_read
    rgb, read = read_box(reader, (0.0, 0.0, 1.0), 1024)  # the whole canvas at level 0
    assert read.pixels == 1024 * 768 and reader.pixels_read - before == 1024 * 768  # by hand: the slide, once
    np.testing.assert_array_equal(rgb[128:896], img)
    assert (rgb[:128] == 255).all() and (rgb[896:] == 255).all()  # outside: white, as OpenSlide's border
    assert (grey_filter(rgb)[:128] == 0).all()  # and black after the grey filter (the paper's padding)
    # a box half out of the slide on the right: only the inside half is read, at level 1 (256 px for 512)
    rgb, read = read_box(reader, (1.0, 0.0, 0.5), 256)
    assert (read.level, read.pixels) == (1, 128 * 256)
    assert read.level0_pixels == 128 * 256 * 4
    np.testing.assert_array_equal(rgb[:, 128:], np.full((256, 128, 3), 255, np.uint8))


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("flip", [False, True])
def test_a_box_of_a_turned_view_reads_the_turned_pixels(tmp_path, k, flip):
    path, _ = _slide(tmp_path / "c.tiff", w=1024, h=768)
    reader = SlideReader(path)
    whole = view_pixels(read_box(reader, (0.0, 0.0, 1.0), 1024)[0], (k, flip))
    for box, (r0, c0) in [((-0.5, -0.5, 0.5), (0, 0)), ((0.25, 0.5, 0.25), (640, 512))]:
        got, _ = read_box(reader, box, int(box[2] * 1024), (k, flip))
        side = int(box[2] * 1024)
        np.testing.assert_array_equal(got, whole[r0:r0 + side, c0:c0 + side])


def test_grey_filter_blackens_pixels_whose_channels_lie_within_15():
    rgb = np.array([[[255, 255, 255], [200, 190, 186], [200, 185, 190], [90, 40, 140]]], np.uint8)
    out = grey_filter(rgb)
    # spreads 0, 14, 15 are grey (within 15 of each other); 100 is tissue
    np.testing.assert_array_equal(out, np.array([[[0, 0, 0], [0, 0, 0], [0, 0, 0], [90, 40, 140]]], np.uint8))


def test_tiling_pixels_count_the_tissue_tiles_of_the_level(tmp_path):
    img = np.full((1024, 1024, 3), 245, np.uint8)  # white
    img[0:256, 0:256] = (150, 60, 170)  # tissue: 4 tiles of 128 at level 0, 1 tile of 128 at level 1
    img[512:640, 768:1024] = (150, 60, 170)  # 2 tiles of 128 at level 0; half of a level-1 tile (256 level-0 px)
    write_pyramid(tmp_path / "t.tiff", img, mpp=0.5, compression="zlib")
    reader = SlideReader(tmp_path / "t.tiff")
    assert sorted(tile_grid(reader, 0, 128, min_tissue=0.5)) == [(0, 0), (0, 128), (128, 0), (128, 128),
                                                                 (768, 512), (896, 512)]
    assert tiling_pixels(reader, 0, 128, min_tissue=0.5) == 6 * 128 * 128
    assert tiling_pixels(reader, 1, 128, min_tissue=0.6) == 1 * 128 * 128
    assert tiling_pixels(reader, 1, 128, min_tissue=0.5) == 2 * 128 * 128


def test_auroc_by_size_class_matches_sklearn_on_the_subsets():
    rng = np.random.default_rng(0)
    size = np.array(["negative"] * 10 + ["macro"] * 4 + ["micro"] * 4 + ["itc"] * 4, object)
    y = (size != "negative").astype(int)
    p = rng.random(len(y)) + 0.3 * y
    got = M.auroc_by_size_class(y, p, size)
    assert got["all"] == pytest.approx(roc_auc_score(y, p))
    for name, members in [("macro", ["macro"]), ("micro", ["micro"]), ("itc", ["itc"]),
                          ("macro_micro", ["macro", "micro"])]:
        keep = (size == "negative") | np.isin(size, members)
        assert got[name] == pytest.approx(roc_auc_score(y[keep], p[keep])), name
    assert np.isnan(M.auroc_by_size_class(y[:14], p[:14], size[:14])["micro"])  # no micro positives


def _magnet(**hp):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights, on purpose
        return build_method("magnet", {**TINY, "aux_backbone": "test_resnet", "leaf_size": 64, **hp}, Task("label", 2))


def _batch(slides, labels=(0, 1, 0, 1)):
    return {"slide_id": [f"s{i}" for i in range(len(slides))], "path": list(slides),
            "label": torch.tensor(labels[:len(slides)]), "size_class": ["negative", "macro", "negative", "itc"]}


@pytest.mark.parametrize("layers, patches", [(1, 3), (2, 2), (3, 2)])
def test_the_patch_tree_has_p_to_the_l_leaves_each_inside_its_parent(slides, layers, patches):
    torch.manual_seed(0)
    method = _magnet(layers=layers, patches=patches).eval()
    with torch.no_grad():
        logits, records = method.forward_slides(_batch(slides[:2]), record=True)
    assert logits.shape == (2, 2)
    assert patch_tree_size(patches, layers)[-1] == patches ** layers
    for rec in records:
        assert [len(b) for b in rec["boxes"]] == [1, *patch_tree_size(patches, layers)]
        assert len(rec["leaves"]) == len(rec["step_probs"]) == patches ** layers
        for parent, child in zip(rec["boxes"][:-1], rec["boxes"][1:]):
            for i, (cx, cy, half) in enumerate(child):
                px, py, ph = parent[i // patches]
                assert 0.05 * ph - 1e-9 <= half  # s >= min_scale
                assert abs(cx - px) <= ph * np.tanh(1) + 1e-9 and abs(cy - py) <= ph * np.tanh(1) + 1e-9
        if layers >= 2:  # the frozen first patch of layer 2 is its whole input: layer 1's first patch
            np.testing.assert_allclose(rec["boxes"][2][0], rec["boxes"][1][0])


def test_a_step_reaches_the_spatial_transformers_through_the_fresh_reads(slides):
    torch.manual_seed(0)
    method = _magnet(layers=2, patches=2, sampler="bilinear", lr=1e-2)
    batch = _batch(slides)
    method.train()
    loss, logs = method._loss(batch)
    loss.backward()
    grads = [s.head.weight.grad if hasattr(s, "head") else next(s.parameters()).grad for s in method.stacks]
    # every stack but the frozen patch's (layer 2, patch 0 = stack index 2) gets a gradient
    assert grads[2] is None or float(grads[2].abs().sum()) == 0.0
    assert all(g is not None and float(g.abs().sum()) > 0 for i, g in enumerate(grads) if i != 2)
    assert {"ce", "aux1_ce", "aux3_ce", "paradoxical"} <= set(logs)
    assert logs["paradoxical"] >= 0


@pytest.mark.parametrize("name", SLIDE_METHODS)
def test_whole_slide_method_contract(name, slides):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hp = {**TINY, "lr": 1e-2, **({"aux_backbone": "test_resnet", "leaf_size": 64, "layers": 2}
                                      if name == "magnet" else {})}
        hp = {k: v for k, v in hp.items() if k in {f.name for f in METHODS[name].Hparams.__dataclass_fields__.values()}}
        for bad in ("class:1", "labels", "mask"):
            with pytest.raises(ValueError, match="does not support"):
                build_method(name, hp, Task(bad, 5))
        method = build_method(name, hp, Task("label", 2))
    batch = _batch(slides)
    before = [p.detach().clone() for p in method.parameters()]
    logs = method.step(batch)
    assert np.isfinite(logs["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, method.parameters()))
    probs = method.predict(batch)
    assert probs.shape == (4, 2)
    torch.testing.assert_close(probs.sum(1), torch.ones(4))
    metrics, pred = method.evaluate_batches([batch], "val")
    assert method.selection_metric in metrics
    assert {"val_auroc_macro", "val_auroc_itc", "val_pixels_read_per_slide", "val_pixels_ratio"} <= set(metrics)
    assert all(p > 0 for p in pred["pixels"])
