"""Segmentation from classification labels (Ciga & Martel): architecture, the role rule, the subsets, the
class weights, and that classification patches' masks never reach the loss."""

import functools
import warnings

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from histoweak.data.schema import tile_keys
from histoweak.data.streaming import BalancedSampler
from histoweak.methods import build_method
from histoweak.methods.base import RunInfo, Task
from histoweak.methods.segcls import (ROLE_CLS, ROLE_IGNORED, ROLE_SEG, SegCls, class_weights, subsets,
                                      tile_roles)
from histoweak.slides.tiling import encode_image, tile_labels


def _segcls(**hp):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_method("segcls", {"backbone": "resnet18", "weights": None, **hp}, Task("mask", 4))


def test_architecture_follows_tables_a2_a3():
    m = _segcls(head="table_a3", upsample="nearest")  # the paper's text
    x = torch.rand(2, 3, 128, 128)
    feats = m.encoder(x)
    assert [f.shape for f in feats] == [(2, 256, 8, 8)]  # ResNet-18 to its third stage: 256 x 8 x 8
    conv, bn, relu, up, head = m.decoder
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.bias) == (256, 64, (3, 3), None)
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU) and up.scale_factor == 2
    assert (head.in_channels, head.out_channels, head.kernel_size, head.bias is not None) == (64, 4, (1, 1), True)
    low = m.segment_low(x)
    assert low.shape == (2, 4, 16, 16)  # the classifier's input: before the interpolation to 128
    out = m(x)
    assert out.shape == (2, 4, 128, 128)
    assert torch.equal(out, low.repeat_interleave(8, 2).repeat_interleave(8, 3))  # nearest interpolation
    pool, c1, bn2, relu2, c2, _ = m.classifier
    assert isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size == 1
    assert (c1.in_channels, c1.out_channels, c1.bias, c2.in_channels, c2.out_channels, c2.bias) == (4, 8, None, 8, 4, None)
    assert isinstance(bn2, nn.BatchNorm2d) and isinstance(relu2, nn.ReLU)
    m.eval()
    assert torch.allclose(m.classify(x), m.classifier(m.segment_low(x)))  # the classifier goes through the segmentation
    assert isinstance(m.optimizer, torch.optim.Adam) and m.optimizer.defaults["lr"] == 1e-4


def test_the_official_code_s_heads_and_bilinear_upsampling():
    """The defaults follow the authors' code: the image logits are each segmentation channel's max (``avgpool``:
    its mean), with no parameters; both interpolations are bilinear."""
    x = torch.rand(2, 3, 128, 128)
    m = _segcls().eval()
    assert m.hparams.head == "official" and m.hparams.upsample == "bilinear"
    assert not list(m.classifier.parameters()) and m.decoder[3].mode == "bilinear"
    low = m.segment_low(x)
    assert torch.allclose(m.classify(x), low.amax((2, 3)))
    ref = nn.functional.interpolate(low, size=(128, 128), mode="bilinear", align_corners=False)
    assert torch.allclose(m(x), ref)
    avg = _segcls(head="avgpool").eval()
    assert torch.allclose(avg.classify(x), avg.segment_low(x).mean((2, 3)))
    with pytest.raises(ValueError, match="head must be one of"):
        _segcls(head="maxpool")


def _label_channel_rises(m, x: torch.Tensor, label: torch.Tensor) -> np.ndarray:
    """Per patch: does one small step down the classification loss raise the label's own segmentation channel
    (its mean logit over the patch) more than the other channels'?"""
    m.train()
    before = m.segment_low(x).detach()
    loss = nn.functional.cross_entropy(m.classify(x), label)
    m.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in m.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad
    after = m.segment_low(x).detach()
    rise = (after - before).mean((2, 3))  # (N, C) mean change of each channel's logits
    own = rise.gather(1, label[:, None])[:, 0]
    others = (rise.sum(1) - own) / (rise.shape[1] - 1)
    return (own > others).numpy()


@pytest.mark.parametrize("head", ["official", "avgpool"])
def test_a_classification_step_raises_the_label_s_own_channel(head):
    """The mechanism of the paper: with the pooled heads, learning the image label raises the segmentation
    channel of that class on the patch, for every patch of a hand-made batch (the learned Table A.3 head
    need not: its output c is not tied to channel c)."""
    torch.manual_seed(0)
    m = _segcls(head=head)
    x = torch.rand(8, 3, 64, 64)
    label = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    for bn in [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]:
        bn.eval()  # batch statistics would couple the patches
    assert _label_channel_rises(m, x, label).all()


def test_encoder_is_cut_at_stride_16_for_any_backbone():
    m = _segcls(backbone="tf_efficientnet_lite0")
    assert m.encoder(torch.rand(1, 3, 128, 128))[0].shape[-1] == 8
    with pytest.raises(ValueError, match="no stride-64 features"):
        _segcls(stride=64)


def _ratios(mask: np.ndarray, n: int = 4) -> np.ndarray:
    return tile_labels(mask, n)[1]


def test_role_rule_on_hand_made_masks():
    m = np.zeros((10, 10), np.uint8)
    dominant = m.copy()
    dominant[0, :9] = 2  # 91 % class 0, 9 % class 2: a classification patch of class 0 (dominance first)
    exactly90 = m.copy()
    exactly90[:1, :] = 3  # 90 % class 0
    two = m.copy()
    two[:6] = 1  # 40 / 60: exactly two classes -> segmentation
    three = two.copy()
    three[9, 9] = 3  # a third class, even one pixel -> ignored
    pure = np.full((10, 10), 3, np.uint8)
    ratios = np.stack([_ratios(a) for a in (dominant, exactly90, two, three, pure)] + [np.full(4, np.nan)] * 2)
    roles, label = tile_roles(ratios, np.array([-1, -1, -1, -1, -1, 2, -1]))
    assert roles.tolist() == [ROLE_CLS, ROLE_CLS, ROLE_SEG, ROLE_IGNORED, ROLE_CLS, ROLE_CLS, ROLE_IGNORED]
    assert label.tolist() == [0, 0, -1, -1, 3, 2, -1]  # no mask: the image label (BACH part A), else nothing


def test_subsets_are_nested_in_s_and_the_same_across_settings():
    keys = [f"s:{i:09d}:000000000" for i in range(300)]
    roles = np.array([ROLE_SEG, ROLE_CLS, ROLE_IGNORED] * 100)
    n_seg = n_cls = 100
    previous = set()
    for s in (1, 2.5, 5, 10, 25, 50, 100):
        seg = {st: subsets(keys, roles, s, st, seed=3) for st in ("S", "S+C", "S+C*")}
        assert seg["S"][0] == seg["S+C"][0] == seg["S+C*"][0]  # the same s % in every setting
        assert len(seg["S"][0]) == round(s / 100 * n_seg) and previous <= seg["S"][0]  # nested
        previous = seg["S"][0]
        assert seg["S"][1] == set()
        assert len(seg["S+C*"][1]) == n_cls
        assert len(seg["S+C"][1]) == n_cls - round(s / 100 * n_cls)  # the other (100 - s) %
        assert all(roles[int(k.split(":")[1])] == ROLE_SEG for k in seg["S"][0])
        assert all(roles[int(k.split(":")[1])] == ROLE_CLS for k in seg["S+C*"][1])
    assert subsets(keys, roles, 5, "S", seed=3)[0] != subsets(keys, roles, 5, "S", seed=4)[0]  # per seed
    assert subsets(list(reversed(keys)), roles[::-1], 5, "S", seed=3)[0] == subsets(keys, roles, 5, "S", seed=3)[0]


def test_class_weights_from_known_counts():
    w = class_weights(np.array([600, 300, 100, 0]))
    inv = np.array([1 / 600, 1 / 300, 1 / 100])
    assert w[:3] == pytest.approx(inv / inv.mean())
    assert w[3] == 0.0
    with pytest.raises(ValueError, match="no labelled pixels"):
        class_weights(np.zeros(3))


def test_data_plan_counts_and_weights_from_the_chosen_patches():
    rng = np.random.default_rng(0)
    masks = []
    for i in range(60):
        m = np.zeros((8, 8), np.uint8)
        if i % 3 == 0:
            m[:, : 2 + i % 5] = 1 + i % 3  # two classes: segmentation
        elif i % 3 == 1:
            m[:] = 1 + i % 3  # one class: classification
        else:
            m[:3], m[5:, :3] = 1, 2  # three classes: ignored
        masks.append(m)
    meta = {"slide_id": np.asarray(["a"] * 60, object), "x": np.arange(60), "y": np.zeros(60, int),
            "class_ratios": np.stack([_ratios(m) for m in masks]), "label": np.full(60, -1)}
    images = {k: rng.integers(0, 256, (8, 8, 3), np.uint8) for k in tile_keys(meta["slide_id"], meta["x"], meta["y"])}
    asked = []

    def read(keys):
        asked.append(set(keys))
        return np.stack([images[k] for k in sorted(keys)])

    hp = SegCls.Hparams(backbone="resnet18", weights=None, setting="S+C", s=50)
    plan = SegCls.data_plan(hp, RunInfo("mask", 4, seed=0, batch_size=4, meta=lambda cols: meta, images=read))
    assert plan.state["n_seg_pool"] == 20 and plan.state["n_cls_pool"] == 20 and plan.state["n_ignored"] == 20
    assert plan.state["n_seg"] == 10 and plan.state["n_cls"] == 10
    assert plan.steps_per_epoch == 5  # the whole segmentation pool per epoch, whatever s
    chosen = plan.main.strata(meta) == 0
    assert chosen.sum() == 10
    counts = sum(np.bincount(m.ravel(), minlength=4) for m, c in zip(masks, chosen) if c)
    assert plan.state["class_weights"] == pytest.approx(class_weights(counts).tolist())
    cls = plan.extra["cls"].strata(meta)
    assert ((cls >= 0).sum(), set(cls[cls >= 0])) == (10, {1, 2, 3} & set(cls[cls >= 0]))
    for i in np.flatnonzero(cls >= 0):
        assert (masks[i] == cls[i]).all()  # a classification patch's label is its (only) class
    assert plan.extra["cls"].hidden == ("mask",)
    # the input statistics: over the tiles the run trains on (its 10 segmentation and 10 classification patches)
    keys = tile_keys(meta["slide_id"], meta["x"], meta["y"])
    used = {k for k, a, b in zip(keys, chosen, cls >= 0) if a or b}
    assert asked == [used]
    pixels = np.stack([images[k] for k in used]).reshape(-1, 3) / 255.0
    assert plan.state["input_mean"] == pytest.approx(pixels.mean(0), abs=1e-6)
    assert plan.state["input_std"] == pytest.approx(pixels.std(0), abs=1e-6)
    only_s = SegCls.data_plan(SegCls.Hparams(setting="S", s=50, normalize=False), RunInfo("mask", 4, meta=lambda c: meta))
    assert "cls" not in only_s.extra and "input_mean" not in only_s.state


def _raw_table(poison: bool) -> pa.Table:
    """Encoded rows: 8 segmentation tiles (two classes) and 8 classification tiles (one class), 32 px; with
    ``poison`` every classification tile's mask holds 255 (an index cross-entropy would reject)."""
    rng = np.random.default_rng(1)
    rows = []
    for i in range(16):
        img = rng.integers(0, 255, (32, 32, 3), np.uint8)
        m = np.zeros((32, 32), np.uint8)
        if i < 8:
            m[:, : 8 + i] = 1 + i % 3
        else:
            m[:] = 1 + i % 3
        ratios = _ratios(m)
        if poison and i >= 8:
            m[:] = 255
        rows.append({"image": encode_image(img), "mask": encode_image(m), "slide_id": "a", "x": i, "y": 0,
                     "class_ratios": ratios.tolist(), "label": -1, "labels": (ratios > 0).astype(float).tolist(),
                     "tissue_ratio": 1.0})
    return pa.Table.from_pylist(rows)


def test_classification_masks_never_reach_the_loss():
    """Poisoned masks on every classification patch: the sampler leaves the column out, so training is identical."""
    meta_of = lambda t: {**{k: np.asarray(t.column(k).to_pylist()) for k in ("slide_id", "x", "y")},  # noqa: E731
                         "class_ratios": np.asarray(t.column("class_ratios").to_pylist(), np.float64),
                         "label": np.full(t.num_rows, -1)}
    weights = []
    for poison in (False, True):
        table = _raw_table(poison)
        hp = SegCls.Hparams(backbone="resnet18", weights=None, setting="S+C*", s=100, normalize=False)
        plan = SegCls.data_plan(hp, RunInfo("mask", 4, batch_size=4, meta=lambda cols, t=table: meta_of(t)))
        torch.manual_seed(0)
        m = _segcls(setting="S+C*", s=100, normalize=False)
        m.set_data_state(plan.state)
        main = BalancedSampler(table, plan.main.strata, seed=0).batches(4, {0: 1.0})
        cls_s = BalancedSampler(table, plan.extra["cls"].strata, seed=1, hidden=plan.extra["cls"].hidden)
        cls = cls_s.batches(4, m.stream_weights("cls", cls_s.counts))
        for _ in range(3):
            batch = next(main)
            batch["cls"] = next(cls)
            assert "mask" not in batch["cls"]
            m.step(batch)
        weights.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_a_poisoned_mask_would_have_reached_the_loss_without_the_hidden_column():
    """The control: the same poisoned rows drawn with the mask column make the pixel loss fail."""
    table = _raw_table(True)
    cls = BalancedSampler(table, functools.partial(lambda meta: np.where(np.asarray(meta["x"]) >= 8, 0, -1)), seed=1)
    batch = next(cls.batches(4, {0: 1.0}))
    assert (batch["mask"] == 255).all()
    m = _segcls()
    with pytest.raises((IndexError, RuntimeError)):
        m.step({"image": batch["image"], "mask": batch["mask"]})


@pytest.mark.slow  # 171 s on 2 cores: `make test-all`; GERNE's smoke sweep keeps a sampled-stream run in `make test`
def test_smoke_sweep_of_the_job_nested_in_mlflow_then_fig5(tile_table, tmp_path):
    """``jobs/tune_segcls.py --smoke-test``: S, S+C, S+C* at s = 5 % as trials nested in the sweep's MLflow run,
    each with its subsets (the same segmentation patches, the setting's classification patches), pixel
    metrics and sample predictions; then ``histoweak report --fig5`` draws and logs Fig. 5 and Table D.5."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from histoweak.data.streaming import read_split_meta

    repo = Path(__file__).resolve().parents[1]
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    proc = subprocess.run([sys.executable, str(repo / "jobs" / "tune_segcls.py"), "--smoke-test", "--data",
                           str(tile_table), "--storage", str(tmp_path / "ray"), "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("segcls")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.params["hparams.setting"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(parents) == 1 and sorted(children) == ["S", "S+C", "S+C*"]
    meta = read_split_meta(str(tile_table), "train", ["class_ratios", "label"])
    roles, _ = tile_roles(meta["class_ratios"], meta["label"])
    n_seg, n_cls = int((roles == ROLE_SEG).sum()), int((roles == ROLE_CLS).sum())
    expected_cls = {"S": 0, "S+C": n_cls - round(0.05 * n_cls), "S+C*": n_cls}
    for setting, run in children.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        p = run.data.params
        assert (int(p["data.n_seg"]), int(p["data.n_cls"])) == (max(1, round(0.05 * n_seg)), expected_cls[setting])
        for k in ("test_f1_micro", "test_f1_macro", "test_miou", "best_val_f1_macro"):
            assert 0.0 <= run.data.metrics[k] <= 1.0, (setting, k)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "test_predictions.png" in artifacts  # s = 5 % <= 10 %: Fig. C.10's samples
    report = subprocess.run([sys.executable, "-m", "histoweak.cli", "report", "--fig5", "--out",
                             str(tmp_path / "fig5.png")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    assert (tmp_path / "fig5.png").stat().st_size > 10_000
    rows = [line.split() for line in report.stdout.splitlines() if line.startswith(("S ", "S+C ", "S+C* "))]
    assert len(rows) == 9  # three settings x (F1 micro, F1 macro, mIoU)
    f1_macro_s = next(r for r in rows if r[0] == "S" and r[2] == "macro")
    assert float(f1_macro_s[3]) == pytest.approx(100 * children["S"].data.metrics["test_f1_macro"], abs=0.051)
    assert {"fig5.png", "table_d5.csv"} <= {a.path for a in client.list_artifacts(parents[0].info.run_id)}


def test_classification_patches_enter_the_pixel_loss_with_a_constant_mask():
    """``cls_pixel_loss``: the pixel loss is one class-weighted mean over the segmentation batch's pixels and the
    classification patches' pixels, each of the latter labelled with its patch's class (the authors'
    ``label * ones`` mask); off, the classification patches only enter the image loss."""
    torch.manual_seed(0)
    m = _segcls(normalize=False).eval()  # eval: BatchNorm uses its running statistics, the same in every pass
    w = torch.tensor([0.5, 1.0, 2.0, 0.0])  # class 3 absent from the segmentation patches: weight 0
    m.pixel_weights.copy_(w)
    seg_x, cls_x = torch.rand(2, 3, 64, 64), torch.rand(3, 3, 64, 64)
    seg_y = torch.randint(0, 3, (2, 64, 64))
    label = torch.tensor([1, 2, 3])
    batch = {"image": seg_x, "mask": seg_y, "cls": {"image": cls_x, "group": label}}
    with torch.no_grad():
        loss, logs = m._loss(batch)
        # by hand: every pixel's weighted cross-entropy from log-softmax, one mean over both batches' weights
        images = torch.cat([seg_x, cls_x])
        target = torch.cat([seg_y, label.view(-1, 1, 1).expand(-1, 64, 64)])
        nll = -m(images).log_softmax(1).gather(1, target[:, None])[:, 0]
        pixel = (w[target] * nll).sum() / w[target].sum()
        image_loss = nn.functional.cross_entropy(m.segment_low(cls_x).amax((2, 3)), label)  # the official head
    assert logs["loss_seg"] == pytest.approx(float(pixel), rel=1e-5)
    assert logs["loss_cls"] == pytest.approx(float(image_loss), rel=1e-5)
    assert float(loss) == pytest.approx(float(pixel + image_loss), rel=1e-5)

    off = _segcls(normalize=False, cls_pixel_loss=False).eval()
    off.load_state_dict(m.state_dict())
    with torch.no_grad():
        _, logs_off = off._loss(batch)
        seg_only = (w[seg_y] * -off(seg_x).log_softmax(1).gather(1, seg_y[:, None])[:, 0]).sum() / w[seg_y].sum()
    assert logs_off["loss_seg"] == pytest.approx(float(seg_only), rel=1e-5)
    assert logs_off["loss_seg"] != pytest.approx(logs["loss_seg"], rel=1e-3)


def test_input_normalisation_round_trips_through_a_checkpoint_and_predict(tmp_path):
    """The training tiles' statistics set by the data state are buffers of the model: a checkpoint carries them
    and the model ``histoweak predict`` loads standardises its inputs exactly as in training."""
    from histoweak.checkpoint import save_checkpoint
    from histoweak.predict import load_segmentation_model

    torch.manual_seed(0)
    state = {"input_mean": [0.7, 0.5, 0.6], "input_std": [0.1, 0.2, 0.0], "class_weights": [1.0, 1.0, 1.0, 1.0]}
    m = _segcls()
    m.set_data_state(state)
    x = torch.rand(2, 3, 64, 64)
    m.eval()
    mean, std = torch.tensor([0.7, 0.5, 0.6]).view(1, 3, 1, 1), torch.tensor([0.1, 0.2, 1.0]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = m.decoder(m.encoder((x - mean) / std)[0])  # a constant channel (std 0) is only shifted
        assert torch.allclose(m.segment_low(x), expected, atol=1e-6)
        probs = m.predict({"image": x})
    config = {"train": {"method": "segcls", "target": "mask", "hparams": {"backbone": "resnet18", "weights": None}},
              "n_classes": 4, "class_names": ["a", "b", "c", "d"], "data_state": state}
    save_checkpoint(tmp_path / "ckpt", m.state_dict(), m.optimizer.state_dict(), 0, None, config)
    loaded, _ = load_segmentation_model(tmp_path / "ckpt")
    assert torch.equal(loaded.input_mean, mean) and torch.equal(loaded.input_std, std)
    assert torch.allclose(loaded.predict({"image": x}), probs, atol=1e-6)
    plain = _segcls(normalize=False).eval()
    plain.load_state_dict(m.state_dict())
    plain.input_mean.zero_(), plain.input_std.fill_(1.0)
    assert not torch.allclose(plain.predict({"image": x}), probs, atol=1e-3)  # the statistics matter


def test_a_class_at_one_percent_of_the_pool_is_drawn_at_its_share():
    """segcls draws both batches as the data is (weights = row counts): a class holding 1 % of the classification
    patches gets 0.2 rows of a batch of 20 — under half a row, which per-batch rounding would give none for ever;
    over many batches it is drawn at its share (within two rows), and every class at its own."""
    rows = []
    counts = {0: 60, 1: 1, 2: 24, 3: 15}  # 100 classification patches
    for cls, n in counts.items():
        for _ in range(n):
            rows.append({"image": encode_image(np.zeros((8, 8, 3), np.uint8)), "slide_id": "a", "x": len(rows), "y": 0,
                         "label": cls})
    table = pa.Table.from_pylist(rows)
    sampler = BalancedSampler(table, lambda meta: np.asarray(meta["label"]), seed=0)
    weights = _segcls().stream_weights("cls", sampler.counts)
    drawn = np.zeros(4)
    for batch in sampler.batches(20, weights, n_batches=500):
        drawn += np.bincount(batch["group"].numpy(), minlength=4)
    expected = np.array([counts[c] for c in range(4)]) / 100 * 20 * 500
    assert np.abs(drawn - expected).max() <= 2
    assert drawn[1] == pytest.approx(100, abs=2)  # 1 % of 10,000 rows
