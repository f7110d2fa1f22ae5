"""PSCL stage 1 and 2 on hand-made tensors: CAM normalisation, gating, eq. 4.9, the combined loss, the NR loss."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from pytorch_metric_learning.losses import SupConLoss

from histoweak.methods import build_method
from histoweak.methods.base import Task
from histoweak.methods.pscl import (SegmentationMetrics, gate_cams, noise_reduced_loss, normalise_cams,
                                    pseudo_labels_from_cams)


def test_cam_normalisation_relu_over_max():
    a = torch.tensor([[[[-1.0, 2.0], [4.0, 1.0]], [[-3.0, -1.0], [-2.0, -0.5]]]])  # (1, 2, 2, 2)
    cams = normalise_cams(a)
    assert cams[0, 0].tolist() == [[0.0, 0.5], [1.0, 0.25]]  # ReLU, then divided by the map's max (eq. 4.3)
    assert cams[0, 1].tolist() == [[0.0, 0.0], [0.0, 0.0]]  # an all-negative map stays zero, no NaN


def test_gating_by_class_score():
    cams = torch.ones(2, 3, 2, 2)
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.81, 0.95, 0.79]])
    gated = gate_cams(cams, scores, 0.8)
    assert gated[:, :, 0, 0].tolist() == [[1, 0, 0], [1, 1, 0]]  # kept only where score > 0.8 (eq. 4.4)


def test_pseudo_label_equation_hand_made():
    # classes 1..3; CAMs at 2x3 pixels
    cams = torch.zeros(1, 3, 2, 3)
    cams[0, 0] = torch.tensor([[0.9, 0.2, 0.1], [0.5, 0.1, 0.0]])
    cams[0, 1] = torch.tensor([[0.1, 0.8, 0.7], [0.6, 0.3, 0.0]])
    cams[0, 2] = torch.tensor([[0.0, 0.9, 0.2], [0.9, 0.2, 0.0]])  # class 3 is absent from the patch labels
    present = torch.tensor([[1, 1, 0]])
    bg = torch.tensor([[[False, False, False], [False, False, True]]])
    out = pseudo_labels_from_cams(cams, present, bg)
    # argmax over present classes, +1, zeroed on the background seed (eq. 4.9)
    assert out.tolist() == [[[1, 2, 2], [2, 2, 0]]]


def test_segmentation_metrics_match_hand_counts():
    seg = SegmentationMetrics(3)
    truth = np.array([[0, 0, 1, 1], [2, 2, 2, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 2, 0, 1]])
    seg.update(truth, pred)
    m = seg.result("val", ["background", "a", "b"])
    # IoU: class 0: 1/(2+2-1)=1/3; class 1: 3/(3+4-3)=3/4; class 2: 2/3
    assert m["val_iou_background"] == pytest.approx(1 / 3)
    assert m["val_iou_a"] == pytest.approx(3 / 4)
    assert m["val_miou"] == pytest.approx((1 / 3 + 3 / 4 + 2 / 3) / 3)
    assert m["val_miou_fg"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert m["val_fwiou"] == pytest.approx(2 / 8 * 1 / 3 + 3 / 8 * 3 / 4 + 3 / 8 * 2 / 3)


def _pscl(lam: float, **hp):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_method("pscl", {"backbone": "resnet18", "weights": None, "lam": lam, "max_pixels": None,
                                     "bg_min_size": 4, **hp}, Task("labels", 5))


def _batch(n=4, size=128):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(n, 3, size, size, generator=g) * 0.6
    images[:, :, :32, :] = 0.97  # a white band: the background seed
    labels = torch.zeros(n, 5)
    labels[:, 1] = 1
    labels[::2, 3] = 1
    return {"image": images, "labels": labels}


BG_MIN_SIZE = 25


def _glass_batch():
    """Two 128-px 8-bit tiles with white (glass) regions of known sizes and grey levels; background rule: grey > 200
    in 4-connected regions of at least BG_MIN_SIZE pixels."""
    rng = np.random.default_rng(4)
    rgb = rng.integers(20, 150, (2, 128, 128, 3), dtype=np.uint8)  # tissue: grey level at most 150
    rgb[0, :32] = 255  # a band of glass across the top: feature-map row 0
    rgb[0, 50:55, 50:55] = 255  # 25 px: exactly the minimum size, kept
    rgb[0, 50:54, 80:86] = 255  # 24 px: one short, removed
    rgb[0, 90:94, 20:24] = 255  # two 16-px squares touching only at a corner: separate regions under
    rgb[0, 94:98, 24:28] = 255  # 4-connectivity (both removed); one 32-px region under 8-connectivity
    rgb[0, 100:110, 60:70] = (255, 150, 255)  # pink: grey 193 (not background), though its channel mean is 220
    rgb[0, 100:108, 100:108] = 201  # just above the grey threshold: background
    rgb[0, 70:78, 100:108] = 199  # just below: tissue
    rgb[1, :, 96:] = 255  # a band of glass down the right: feature-map column 3
    rgb[1, 40:43, 40:43] = 255  # 9 px: removed
    rgb[1, 80:88, 20:28] = 200  # exactly the grey threshold: tissue (background is strictly above it)
    rgb[1, 10:20, 10:20] = (255, 190, 255)  # pale magenta: grey 217 (background by luminance), green 190 (not by rgb)
    labels = torch.zeros(2, 5)
    labels[0, [1, 3]] = 1
    labels[1, [1, 2]] = 1
    return rgb, {"image": torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255, "labels": labels}


def _background_by_skimage(rgb: np.ndarray, grey: float, min_size: int, mode: str = "rgb") -> np.ndarray:
    """The thesis's background seed (§4.3.2), computed with PIL's grey level (or every channel, mode "rgb") and
    scikit-image's labelling."""
    from PIL import Image
    from skimage.measure import label

    out = []
    for tile in rgb:
        if mode == "rgb":
            white = np.logical_and.reduce([tile[..., c] > grey for c in range(3)])
        else:
            white = np.asarray(Image.fromarray(tile).convert("L")) > grey  # ITU-R 601 luma, as OpenCV's RGB2GRAY
        regions = label(white, connectivity=1)
        big = np.bincount(regions.ravel()) >= min_size
        big[0] = False  # label 0: not white
        out.append(big[regions])
    return np.stack(out)


@pytest.mark.parametrize("mode", ["rgb", "luminance"])
def test_background_seed_is_colour_threshold_then_small_regions_removed(mode):
    m = _pscl(0.1, bg_min_size=BG_MIN_SIZE, bg_mode=mode)
    rgb, b = _glass_batch()
    expected = _background_by_skimage(rgb, 200, BG_MIN_SIZE, mode)
    # the hand-made regions land where they were meant to: the test exercises each side of each rule
    assert expected[0, :32].all() and expected[1, :, 96:].all()
    assert expected[0, 50:55, 50:55].all() and not expected[0, 50:54, 80:86].any()
    assert not expected[0, 90:98, 20:28].any()
    assert not expected[0, 100:110, 60:70].any() and expected[0, 100:108, 100:108].all()
    assert not expected[0, 70:78, 100:108].any() and not expected[1, 40:43, 40:43].any()
    assert not expected[1, 80:88, 20:28].any()
    assert expected[1, 10:20, 10:20].all() == (mode == "luminance")  # the pale magenta square: the two rules differ
    assert expected.sum() == 32 * 128 + 25 + 64 + 128 * 32 + (100 if mode == "luminance" else 0)
    seed = m.background(b["image"])
    assert seed.dtype == torch.bool and seed.shape == (2, 128, 128)
    np.testing.assert_array_equal(seed.numpy(), expected)


def test_loss_is_mlsm_plus_lambda_supcon_on_pixels_labelled_by_cams_and_background():
    lam, tau = 0.1, 0.5  # not the default 0.25: the method must use its own hyperparameter
    m = _pscl(lam, bg_min_size=BG_MIN_SIZE, tau=tau, gate=False)  # ungated: every class's CAM takes part
    rgb, b = _glass_batch()
    m.train()
    loss, logs = m._loss(b)

    with torch.no_grad():
        f = m.encoder(b["image"])[-1]  # (2, 512, 4, 4): one feature pixel per 32x32 block of the tile
        a = m.classifier(f)
    y = b["labels"][:, 1:]  # patch labels of classes 1..4 (background is not a patch label)
    x = a.mean((2, 3))
    mlsm = -(y * torch.nn.functional.logsigmoid(x) + (1 - y) * torch.nn.functional.logsigmoid(-x)).mean()
    # CAMs (eq. 4.3) by hand: ReLU, divided by each map's maximum
    relu = a.clamp_min(0)
    peak = relu.amax((2, 3), keepdim=True)
    cams = torch.where(peak > 0, relu / peak, torch.zeros_like(relu))
    # the background channel: a feature pixel is background when most of its 32x32 block is
    bg = torch.from_numpy(_background_by_skimage(rgb, 200, BG_MIN_SIZE)).float()
    bg = bg.reshape(2, 4, 32, 4, 32).mean((2, 4)) > 0.5
    assert bg[0, 0].all() and bg[1, :, 3].all() and bg.sum() == 8
    labelled = torch.cat([bg[:, None].float(), cams], 1)  # (2, 5, 4, 4): channel 0 is background
    top, pixel_label = labelled.max(1)
    kept = top > tau  # eq. 4.6-4.7
    emb = f.permute(0, 2, 3, 1)[kept]
    labels = pixel_label[kept]
    assert 0 < (~kept).sum() and (labels == 0).sum() == 8  # some pixels dropped; background pixels all kept
    assert len(labels.unique()) >= 3  # background and at least two classes take part
    supcon = SupConLoss(temperature=0.1)(emb, labels)
    assert supcon.item() > 0

    assert logs["loss_cls"] == pytest.approx(mlsm.item(), rel=1e-5)
    assert logs["loss_pscl"] == pytest.approx(supcon.item(), rel=1e-5)
    assert loss.item() == pytest.approx((mlsm + lam * supcon).item(), rel=1e-5)

    m0 = _pscl(0.0, bg_min_size=BG_MIN_SIZE)  # lambda = 0: the CAM baseline, classification loss only
    loss0, logs0 = m0._loss(b)
    x0 = m0(b["image"]).detach()
    mlsm0 = -(y * torch.nn.functional.logsigmoid(x0) + (1 - y) * torch.nn.functional.logsigmoid(-x0)).mean()
    assert loss0.item() == pytest.approx(mlsm0.item(), rel=1e-5) and "loss_pscl" not in logs0


def test_gated_loss_contrasts_only_classes_scored_above_the_threshold():
    """Eq. 4.4-4.6 with the gate on (the default): the pixel labels come from CAMs of classes whose sigmoid score is
    above 0.8; a class scored below has no CAM, so none of its pixels is kept, however strong its map."""
    m = _pscl(0.1, bg_min_size=BG_MIN_SIZE)
    assert m.hparams.gate and m.hparams.feature_level == -1 and m.hparams.bg_mode == "rgb"
    with torch.no_grad():  # class 1 scored ~0.98 on every tile, classes 2-4 ~0.5 (their maps partly positive)
        m.classifier.bias.copy_(torch.tensor([4.0, 0.0, 0.0, 0.0]))
    rgb, b = _glass_batch()
    m.train()
    loss, logs = m._loss(b)
    with torch.no_grad():
        f = m.encoder(b["image"])[-1]
        a = m.classifier(f)
    scores = torch.sigmoid(a.mean((2, 3)))
    assert (scores[:, 0] > 0.8).all() and (scores[:, 1:] <= 0.8).all()
    relu = a.clamp_min(0)
    peak = relu.amax((2, 3), keepdim=True)
    cams = torch.where(peak > 0, relu / peak, torch.zeros_like(relu))
    assert (cams[:, 1:].amax((2, 3)) == 1).all()  # ungated, each of classes 2-4 would peak at 1 somewhere
    cams[:, 1:] = 0  # gated out: scores not above 0.8
    bg = torch.from_numpy(_background_by_skimage(rgb, 200, BG_MIN_SIZE)).float()
    bg = bg.reshape(2, 4, 32, 4, 32).mean((2, 4)) > 0.5
    top, pixel_label = torch.cat([bg[:, None].float(), cams], 1).max(1)
    kept = top > m.hparams.tau
    labels = pixel_label[kept]
    assert set(labels.unique().tolist()) == {0, 1}  # background and class 1 only
    expected = SupConLoss(temperature=0.1)(f.permute(0, 2, 3, 1)[kept], labels)
    assert logs["loss_pscl"] == pytest.approx(expected.item(), rel=1e-5)
    ungated = _pscl(0.1, bg_min_size=BG_MIN_SIZE, gate=False)
    ungated.load_state_dict(m.state_dict())
    assert ungated._loss(b)[1]["loss_pscl"] != pytest.approx(logs["loss_pscl"], rel=1e-3)  # the gate changed the pixels


def test_grad_ratio_is_the_ratio_of_the_two_gradient_norms_on_the_encoder():
    import copy

    m = _pscl(0.5, bg_min_size=BG_MIN_SIZE, gate=False)
    ref = copy.deepcopy(m)
    _, b = _glass_batch()
    m.train()
    m.on_epoch_start(0, 1)
    loss, logs = m._loss(b)
    loss.backward()  # the graph survives the measurement
    assert "pscl_grad_ratio" in logs and "pscl_grad_ratio" not in m._loss(b)[1]  # once per epoch

    def encoder_grad_norm(which: str) -> float:
        """One term's gradient on the encoder, from a backward pass of that term alone in a fresh copy."""
        net = copy.deepcopy(ref)
        net.train()
        net._measure_ratio = False
        net.zero_grad()
        total, _ = net._loss(b)  # loss_cls + lam * loss_pscl
        cls = net.criterion(net(b["image"]), net.task.targets(b))
        (cls if which == "cls" else total - cls).backward()
        return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in net.encoder.parameters() if p.grad is not None)))

    expected = encoder_grad_norm("pscl") / encoder_grad_norm("cls")
    assert logs["pscl_grad_ratio"] == pytest.approx(expected, rel=1e-4)
    assert 0 < expected


def test_pseudo_labels_are_gated_by_patch_labels_and_background():
    m = _pscl(0.1)
    b = _batch()
    p = m.pseudo_labels(b)
    assert p.shape == (4, 128, 128)
    assert (p[:, :32, :] == 0).all()  # the white band is background
    assert set(p[1].unique().tolist()) <= {0, 1}  # tile 1 has only class 1
    assert set(p[0].unique().tolist()) <= {0, 1, 3}


def test_pscl_only_supports_patch_labels_and_validates():
    with pytest.raises(ValueError, match="does not support target 'class:1'"):
        build_method("pscl", {"weights": None}, Task("class:1", 5))
    with pytest.raises(ValueError, match="tau"):
        _pscl(0.1, tau=1.5)
    with pytest.raises(ValueError, match="noise-reduced loss needs a stage-1"):
        build_method("pscl-seg", {"backbone": "resnet18", "weights": None, "loss": "nr"}, Task("mask", 5))


def _noise_reduced_loss_by_hand(logits, target, cams, gumbel, tau):
    """Eq. 4.10-4.11 in plain Python: per pixel, c_i = CAM_i / Σ CAM, P = softmax((logits + g) / tau),
    L = -Σ_i c_i (y_i log P_i + (1 - y_i) log(1 - P_i)); the mean over pixels."""
    n, k, h, w = len(logits), len(logits[0]), len(logits[0][0]), len(logits[0][0][0])
    total = 0.0
    for b in range(n):
        for r in range(h):
            for c in range(w):
                z = [(logits[b][i][r][c] + gumbel[b][i][r][c]) / tau for i in range(k)]
                e = [math.exp(v) for v in z]
                p = [v / sum(e) for v in e]
                cam_sum = sum(cams[b][i][r][c] for i in range(k))
                for i in range(k):
                    y = 1.0 if target[b][r][c] == i else 0.0
                    conf = cams[b][i][r][c] / cam_sum
                    total -= conf * (y * math.log(p[i]) + (1 - y) * math.log(1 - p[i]))
    return total / (n * h * w)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_noise_reduced_loss_equals_hand_computation_with_the_same_gumbel_noise(tau):
    # 1 image, 2 classes, 2x2 pixels; float64, because with a sharp softmax (tau = 0.5) float32's 1 - P
    # keeps only a few digits, and this compares the formula, not the rounding
    logits = torch.tensor([[[[2.0, -1.0], [0.5, 0.0]],
                            [[-1.0, 1.5], [0.5, 3.0]]]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[[0, 1], [1, 0]]])
    cams = torch.tensor([[[[0.9, 0.2], [0.5, 0.6]],
                          [[0.3, 0.6], [0.5, 0.2]]]], dtype=torch.float64)
    confidence = cams / cams.sum(1, keepdim=True)  # eq. 4.10

    torch.manual_seed(11)
    loss = noise_reduced_loss(logits, target, confidence, tau=tau)
    # the Gumbel(0, 1) noise drawn from the global generator as torch.nn.functional.gumbel_softmax draws it:
    # -log(E), E ~ Exp(1), one draw per logit, in the logits' dtype
    torch.manual_seed(11)
    gumbel = -torch.empty_like(logits).exponential_().log()

    expected = _noise_reduced_loss_by_hand(logits.tolist(), target.tolist(), cams.tolist(), gumbel.tolist(), tau)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    without_noise = _noise_reduced_loss_by_hand(logits.tolist(), target.tolist(), cams.tolist(),
                                                torch.zeros_like(gumbel).tolist(), tau)
    assert abs(without_noise - expected) > 0.05 * expected  # the noise matters: the comparison above can fail
    loss.backward()
    assert logits.grad.abs().sum() > 0
    assert noise_reduced_loss(logits, target, torch.zeros_like(cams)).item() == 0.0  # no confidence, no penalty


def _keyed_batches(n_batches=4, n=3, size=32):
    """Batches of tiles with keys (slide, x, y), 8-bit images, masks and patch labels; tiles and keys all distinct."""
    g = torch.Generator().manual_seed(2)
    out = []
    for i in range(n_batches):
        images = torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255
        images[:, :, :8, :] = 247 / 255  # a white band: the background seed
        labels = torch.zeros(n, 5, dtype=torch.uint8)
        labels[:, 1] = 1
        labels[::2, 2] = 1
        out.append({"image": images, "mask": torch.randint(0, 5, (n, size, size), generator=g), "labels": labels,
                    "slide_id": [f"slide{(i * n + j) % 3}" for j in range(n)],
                    "x": torch.tensor([1000 * (3 - i) + j for j in range(n)]), "y": torch.tensor([7] * n)})
    return out


def _stage1_and_stage2(tmp_path):
    from histoweak.checkpoint import save_checkpoint

    hp = {"backbone": "resnet18", "lam": 0.1, "max_pixels": None, "bg_min_size": 4}
    stage1 = _pscl(0.1)  # the same hyperparameters as hp
    save_checkpoint(tmp_path / "stage1", stage1.state_dict(), stage1.optimizer.state_dict(), 0, None,
                    {"train": {"method": "pscl", "target": "labels", "hparams": hp}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stage2 = build_method("pscl-seg", {"stage1": str(tmp_path / "stage1"), "decoder_width": 16}, Task("mask", 5))
    return stage1.eval(), stage2


def test_both_stages_picture_the_same_fixed_tiles_whatever_the_batch_order(tmp_path):
    from histoweak.methods.pscl import FIGURE_TILES

    stage1, stage2 = _stage1_and_stage2(tmp_path)
    batches = _keyed_batches()
    truth = {f"{s}:{int(x):09d}:{int(y):09d}": m
             for b in batches for s, x, y, m in zip(b["slide_id"], b["x"], b["y"], b["mask"])}
    smallest = sorted(truth)[:FIGURE_TILES]
    for order in (batches, batches[1::2] + batches[::2]):
        _, s1 = stage1.evaluate_batches(order, "test")
        _, s2 = stage2.evaluate_batches(order, "test")
        assert s1["key"] == smallest and s2["key"] == smallest
        for key, mask in zip(s2["key"], s2["mask"]):
            assert (mask == truth[key].numpy()).all()  # each field follows its tile
        assert [p.shape for p in s2["pred"]] == [(32, 32)] * FIGURE_TILES
    # stage 2 shows stage 1's pseudo-labels of those tiles (eq. 4.9), computed with the stage-1 checkpoint
    for p1, p2 in zip(s1["pseudo"], s2["pseudo"]):
        assert (p1 == p2).all()


def test_stage2_figure_has_a_row_per_tile_and_four_columns(tmp_path):
    from histoweak.figures import stage2_prediction_figure

    _, stage2 = _stage1_and_stage2(tmp_path)
    _, samples = stage2.evaluate_batches(_keyed_batches(), "test")
    names = ["background", "tumour", "stroma", "necrosis", "lymphocytes"]
    fig = stage2_prediction_figure(samples, names, "test tiles")
    assert len(fig.axes) == 6 * 4
    assert [ax.get_title() for ax in fig.axes[:4]] == ["image", "ground truth", "stage-1 pseudo-label",
                                                       "stage-2 prediction"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == names
    no_stage1 = stage2_prediction_figure({k: v for k, v in samples.items() if k != "pseudo"}, names)
    assert len(no_stage1.axes) == 6 * 3
