"""PSCL stage 1 and 2 on hand-made tensors: CAM normalisation, gating, eq. 4.9, the combined loss, the NR loss."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from histoweak.methods import build_method
from histoweak.methods.base import Task
from histoweak.methods.pscl import (SegmentationMetrics, gate_cams, noise_reduced_loss, normalise_cams,
                                    pseudo_labels_from_cams)
from histoweak.methods.pscl_loss import pscl_loss


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


def test_loss_is_mlsm_plus_lambda_pscl_with_background_channel():
    m = _pscl(0.1)
    b = _batch()
    m.train()
    loss, logs = m._loss(b)
    logits, a, f = m._activations(b["image"])
    mlsm = torch.nn.MultiLabelSoftMarginLoss()(logits, b["labels"][:, 1:])
    bg = m.background(b["image"])[:, None].float()
    bg = torch.nn.functional.adaptive_avg_pool2d(bg, a.shape[-2:]) > 0.5
    assert bg.any(), "the white band must seed background on the feature map"
    cams = torch.cat([bg.float(), normalise_cams(a).detach()], 1)
    expected = mlsm + 0.1 * pscl_loss(f, cams, tau=0.25)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert logs["loss_pscl"] > 0
    m0 = _pscl(0.0)
    loss0, _ = m0._loss(b)
    assert loss0.item() == pytest.approx(torch.nn.MultiLabelSoftMarginLoss()(m0(b["image"]), b["labels"][:, 1:]).item(),
                                         rel=1e-5)


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


def test_noise_reduced_loss_weights_by_confidence():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4))
    zero = noise_reduced_loss(logits, target, torch.zeros(2, 3, 4, 4))
    assert zero.item() == 0.0  # no confidence, no penalty
    conf = torch.full((2, 3, 4, 4), 1 / 3)
    loss = noise_reduced_loss(logits, target, conf)
    loss.backward()
    assert loss.item() > 0 and logits.grad.abs().sum() > 0


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
