"""Segmentation from classification labels (Ciga & Martel): architecture, the role rule, the subsets, the
class weights, and that classification patches' masks never reach the loss."""

import functools
import warnings

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

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
    m = _segcls()
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
    hp = SegCls.Hparams(backbone="resnet18", weights=None, setting="S+C", s=50)
    plan = SegCls.data_plan(hp, RunInfo("mask", 4, seed=0, batch_size=4, meta=lambda cols: meta))
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
    assert "cls" not in SegCls.data_plan(SegCls.Hparams(setting="S", s=50), RunInfo("mask", 4, meta=lambda c: meta)).extra


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
        hp = SegCls.Hparams(backbone="resnet18", weights=None, setting="S+C*", s=100)
        plan = SegCls.data_plan(hp, RunInfo("mask", 4, batch_size=4, meta=lambda cols, t=table: meta_of(t)))
        torch.manual_seed(0)
        m = _segcls(setting="S+C*", s=100)
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
