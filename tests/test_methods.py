"""Contract tests over the method registry: every registered method builds, steps, predicts, evaluates."""

import copy
import re
import warnings

import numpy as np
import pytest
import torch

from histoweak.methods import METHODS, build_method
from histoweak.methods.base import RunInfo, Task

#: metrics whose values are fractions, in [0, 1]: every metric a method's evaluation reports must be one of these
UNIT_METRICS = re.compile(r"acc|bca|f1_micro|f1_macro|auroc|wga|gba|miou|miou_fg|fwiou|pixel_acc|iou_\w+|coverage(_\w+)?")
#: metrics in [-1, 1] (agreement beyond chance)
SIGNED_METRICS = re.compile(r"kappa")
#: what the predictors (not the generative models) are built for
PREDICTORS = sorted(n for n in METHODS if not METHODS[n].generative)


def _batch(n=4, size=32, n_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, n_classes, (n, size, size), generator=g)
    labels = torch.stack([(mask == c).flatten(1).any(1) for c in range(n_classes)], 1).float()
    labels[0, 1] = 0.0
    labels[1, 1] = 1.0
    return {"image": torch.rand(n, 3, size, size, generator=g), "mask": mask, "labels": labels,
            "label": torch.tensor([0, 1, 0, 1][:n]), "group": torch.arange(n) % 2}


def _meta(columns):
    """The training split's metadata of a made-up table: 40 tiles of one or two classes, for ``data_plan``."""
    rng = np.random.default_rng(0)
    ratios = np.zeros((40, 5), np.float32)
    for i in range(40):
        a, b = rng.choice(5, 2, replace=False)
        ratios[i, a] = 1.0 if i % 2 else 0.6
        ratios[i, b] += 1.0 - ratios[i, a]
    return {"slide_id": np.asarray([f"s{i % 3}" for i in range(40)], object), "x": np.arange(40) * 128,
            "y": np.zeros(40, np.int64), "class_ratios": ratios, "label": np.full(40, -1),
            "labels": (ratios > 0).astype(np.float32), "tissue_ratio": 1 - ratios[:, 0]}


def _images(keys) -> np.ndarray:
    """The training tiles with ``keys`` (``RunInfo.images``): made-up 32-px images, one per key."""
    return np.random.default_rng(len(keys)).integers(0, 256, (len(keys), 32, 32, 3), np.uint8)


def _with_streams(method, batch: dict, seed: int, **batch_kw) -> dict:
    """``batch`` plus the extra batches the method's data plan draws beside it (e.g. GERNE's ``balanced``),
    made by ``_batch(**batch_kw)``."""
    plan = type(method).data_plan(method.hparams, RunInfo(method.task.target, method.task.n_classes, group_tau=0.5,
                                                          meta=_meta, images=_images))
    method.set_data_state(plan.state)
    for i, key in enumerate(plan.extra):
        batch[key] = _batch(seed=seed + 1 + i, **batch_kw)
    return batch


@pytest.mark.parametrize("name", PREDICTORS)
@pytest.mark.parametrize("target", ["class:1", "labels", "multiclass", "mask"])
def test_method_contract(name, target):
    torch.manual_seed(0)
    task = Task(target=target, n_classes=5)
    if not METHODS[name].supports(task):
        with pytest.raises(ValueError, match=f"does not support target '{target}'"):
            build_method(name, {"backbone": "resnet18", "weights": None}, task)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = build_method(name, {"backbone": "resnet18", "weights": None, "lr": 1e-2}, task)
    batch = _with_streams(method, _batch(), seed=0)
    before = [p.detach().clone() for p in method.parameters()]
    logs = method.step(batch)
    assert np.isfinite(logs["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, method.parameters()))  # the step changed weights
    probs = method.predict(batch)
    assert torch.all((probs >= 0) & (probs <= 1))  # NaN fails this too
    if task.target == "mask":
        assert probs.shape == (4, task.n_classes, 32, 32)  # per-pixel class probabilities at the tile's size
    else:
        assert probs.shape == (4, task.n_outputs)
    with torch.no_grad():
        logits = method(batch["image"])  # predict left the method in eval mode
    if task.multilabel:  # an independent probability per label
        torch.testing.assert_close(probs, torch.sigmoid(logits))
    else:  # a distribution over the classes (per pixel for masks)
        torch.testing.assert_close(probs.sum(1), torch.ones_like(probs.sum(1)))
        torch.testing.assert_close(probs, logits.softmax(1))
    metrics, _ = method.evaluate_batches([batch], "val")
    assert method.selection_metric in metrics
    for key, value in metrics.items():
        assert key.startswith("val_"), key
        if SIGNED_METRICS.fullmatch(key.removeprefix("val_")):
            assert -1.0 <= value <= 1.0, (key, value)
            continue
        assert UNIT_METRICS.fullmatch(key.removeprefix("val_")), \
            f"{key}: not a known metric; add its valid range to this test"
        assert 0.0 <= value <= 1.0, (key, value)  # every cell of this batch is defined: NaN fails too
    _assert_non_finite_step_refused(method, name)  # last: the NaN forward spoils BatchNorm's running statistics


@pytest.mark.parametrize("name", sorted(n for n in METHODS if METHODS[n].generative))
def test_generative_contract(name):
    """A generative model (USegMix's DDPM) steps, changes its weights, evaluates its selection metric (a loss,
    deterministic) and refuses to predict a target."""
    torch.manual_seed(0)
    method = build_method(name, {}, Task("class:1", 5))
    batch = _batch()
    before = [p.detach().clone() for p in method.parameters()]
    assert np.isfinite(method.step(batch)["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, method.parameters()))
    first, _ = method.evaluate_batches([batch], "val")
    again, _ = method.evaluate_batches([batch], "val")
    assert np.isfinite(first[method.selection_metric]) and first == again
    with pytest.raises(ValueError, match="not a classifier"):
        method.predict(batch)


def _build(name: str, task: Task, **hparams):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights, on purpose
        return build_method(name, {"backbone": "resnet18", "weights": None, **hparams}, task)


@pytest.mark.parametrize("name", [n for n in PREDICTORS if METHODS[n].supports(Task("class:1"))])
def test_binary_evaluate_on_hand_made_predictions(name):
    """Method.evaluate against values worked out by hand (8 tiles, 2 classes, 4 tissue groups)."""
    y = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.6, 0.7, 0.3, 0.45, 0.9, 0.4, 0.8])  # -> predictions 0 1 1 0 0 1 0 1
    probs = np.stack([1 - p1, p1], 1)
    groups = np.array([0, 0, 1, 1, 1, 2, 2, 3])  # consistent with y: groups 0, 1 have y = 0; 2, 3 have y = 1
    # Confusion: class 0 has 3 of 5 right (tiles 1, 2 wrong), class 1 has 2 of 3 (tile 6 wrong).
    #   acc = 5/8; BCA = (3/5 + 2/3) / 2 = 19/30
    #   F1: class 0 tp 3, fp 1, fn 2 -> 6/9; class 1 tp 2, fp 2, fn 1 -> 4/7; macro (2/3 + 4/7) / 2 = 13/21;
    #       micro (single-label) = accuracy = 5/8
    #   AUROC: positive scores .9, .4, .8 against negatives .1 .6 .7 .3 .45 win 5 + 2 + 5 of 15 pairs = 0.8
    #   groups: 0 -> 1/2, 1 -> 2/3, 2 -> 1/2, 3 -> 1/1; WGA = 1/2, GBA = (1/2 + 2/3 + 1/2 + 1) / 4 = 2/3
    expected = {"test_acc": 5 / 8, "test_bca": 19 / 30, "test_f1_macro": 13 / 21, "test_f1_micro": 5 / 8,
                "test_auroc": 0.8, "test_wga": 1 / 2, "test_gba": 2 / 3}
    method = _build(name, Task("class:1", 5))
    out = method.evaluate(y, probs, groups, prefix="test")
    assert {k: out.get(k) for k in expected} == pytest.approx(expected, abs=1e-12)
    for unset in (None, np.where(groups == 3, -1, groups)):  # no groups, or some tiles without one: no WGA/GBA
        out = method.evaluate(y, probs, unset, prefix="test")
        assert "test_wga" not in out and "test_gba" not in out
        assert out["test_bca"] == pytest.approx(19 / 30, abs=1e-12)


@pytest.mark.parametrize("name", [n for n in PREDICTORS if METHODS[n].supports(Task("labels", 4))])
def test_multilabel_evaluate_on_hand_made_predictions(name):
    """Method.evaluate for target "labels" (3 labels, threshold 0.5) against values worked out by hand."""
    targets = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [1, 0, 0]], np.float32)
    probs = np.array([[0.9, 0.2, 0.4], [0.1, 0.8, 0.3], [0.6, 0.3, 0.1], [0.3, 0.7, 0.2]])
    # predictions [1 0 0], [0 1 0], [1 0 0], [0 1 0]: only tile 1 has every label right -> acc (exact match) 1/4
    # label 0: t 1 0 1 1, p 1 0 1 0 -> tp 2 fn 1 fp 0 tn 1: BCA (2/3 + 1) / 2 = 5/6, F1 4/5
    # label 1: t 0 1 1 0, p 0 1 0 1 -> tp 1 fn 1 fp 1 tn 1: BCA 1/2, F1 2/4
    # label 2: t 1 0 0 0, p 0 0 0 0 -> tp 0 fn 1 fp 0 tn 3: BCA (0 + 1) / 2 = 1/2, F1 0
    # BCA = mean over labels (5/6 + 1/2 + 1/2) / 3 = 11/18; F1 macro (4/5 + 1/2 + 0) / 3 = 13/30;
    # F1 micro: tp 3, fp 1, fn 3 -> 6 / 10
    expected = {"val_acc": 1 / 4, "val_bca": 11 / 18, "val_f1_macro": 13 / 30, "val_f1_micro": 0.6}
    out = _build(name, Task("labels", 4)).evaluate(targets, probs)
    assert {k: out.get(k) for k in expected} == pytest.approx(expected, abs=1e-12)


def _assert_non_finite_step_refused(method, name: str) -> None:
    """A step on a batch whose loss is NaN raises naming the method and moves neither weights nor optimizer state."""
    bad = _batch(seed=2)
    bad["image"][0, 0, 0, 0] = float("nan")  # one NaN pixel: the loss is NaN (BatchNorm spreads it over the batch)
    bad = _with_streams(method, bad, seed=2)
    assert method.optimizer.state  # a step was taken: AdamW's moments would move weights even at zero gradient
    weights = [p.detach().clone() for p in method.parameters()]
    optimizer = copy.deepcopy(method.optimizer.state_dict()["state"])
    with pytest.raises(FloatingPointError, match=re.escape(f"method {name!r}: non-finite loss")):
        method.step(bad)
    for (key, p), before in zip(method.named_parameters(), weights):
        assert torch.equal(p, before), key  # bitwise; NaN is never equal
    after = method.optimizer.state_dict()["state"]
    assert after.keys() == optimizer.keys()
    for i, state in optimizer.items():
        assert all(torch.equal(torch.as_tensor(after[i][k]), torch.as_tensor(v)) for k, v in state.items()), i


def test_erm_loss_is_cross_entropy_of_its_logits():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = build_method("erm", {"backbone": "resnet18", "weights": None}, Task("class:1"))
    b = _batch()
    loss, _ = m._loss(b)
    logits = m(b["image"])
    y = (b["labels"][:, 1] > 0).long()
    ref = -torch.log_softmax(logits, 1)[torch.arange(4), y].mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_unknown_names_fail_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown method 'nope'; valid: \['attention_mil', 'ddpm', 'erm'"):
        build_method("nope")
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['lrr'\]; valid: \[.*'lr'"):
        build_method("erm", {"lrr": 1})
    with pytest.raises(ValueError, match="class must be in 1..4"):
        Task("class:7", 5)
