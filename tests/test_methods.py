"""Contract tests over the method registry: every registered method builds, steps, predicts."""

import warnings

import numpy as np
import pytest
import torch

from histoweak.methods import METHODS, build_method
from histoweak.methods.base import Task


def _batch(n=4, size=32, n_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, n_classes, (n, size, size), generator=g)
    labels = torch.stack([(mask == c).flatten(1).any(1) for c in range(n_classes)], 1).float()
    labels[0, 1] = 0.0
    labels[1, 1] = 1.0
    return {"image": torch.rand(n, 3, size, size, generator=g), "mask": mask, "labels": labels,
            "label": torch.tensor([0, 1, 0, 1][:n]), "group": torch.arange(n) % 2}


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("target", ["class:1", "labels", "mask"])
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
    batch = _batch()
    if method.needs_balanced_stream:
        batch["balanced"] = _batch(seed=1)
    before = [p.detach().clone() for p in method.parameters()]
    logs = method.step(batch)
    assert np.isfinite(logs["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, method.parameters()))  # the step changed weights
    probs = method.predict(batch)
    assert torch.all((probs >= 0) & (probs <= 1))
    if task.target != "mask":
        assert probs.shape == (4, task.n_outputs)
    metrics, _ = method.evaluate_batches([batch], "val")
    assert method.selection_metric in metrics
    assert all(np.isfinite(v) or np.isnan(v) for v in metrics.values())


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
    with pytest.raises(ValueError, match=r"unknown method 'nope'; valid: \['erm'"):
        build_method("nope")
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['lrr'\]; valid: \[.*'lr'"):
        build_method("erm", {"lrr": 1})
    with pytest.raises(ValueError, match="class must be in 1..4"):
        Task("class:7", 5)
