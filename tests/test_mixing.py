"""ERM's batch mixing baselines (timm's Mixup, CutMix, RandomErasing): what the model sees and the targets its loss
uses, recovered from the images the model was given (forward hooks observe the real step)."""

import random
import warnings

import numpy as np
import pytest
import torch

from histoweak.methods import build_method
from histoweak.methods.base import Task

N_CLASSES = 4


def _method(mix: str, n: int = 4, target: str = "multiclass", **hp):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random initialisation
        return build_method("erm", {"backbone": "test_resnet", "weights": None, "mix": mix, **hp},
                            Task(target, N_CLASSES))


def _batch(n: int, seed: int, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(seed)
    label = torch.arange(n) % N_CLASSES  # i and n-1-i differ for n in (4, 6)
    return {"image": 0.1 + 0.9 * torch.rand(n, 3, size, size, generator=g), "label": label,
            "labels": torch.nn.functional.one_hot(label, N_CLASSES).float()}


def _step_seen(method, batch) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(images the model saw, its logits, the step's loss) of one real ``step``."""
    seen = {}
    handle = method.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach().clone(),
                                                                          logits=out.detach().clone()))
    try:
        loss = method.step(batch)["loss"]
    finally:
        handle.remove()
    return seen["x"], seen["logits"], loss


def _soft_ce(logits, soft) -> float:
    return float(-(soft * torch.log_softmax(logits, 1)).sum(1).mean())


def _seed(s):
    np.random.seed(s)  # timm's Mixup draws lam and the box with numpy,
    random.seed(s)  # RandomErasing with Python's random module
    torch.manual_seed(s)


@pytest.mark.parametrize("n", [4, 5])
def test_mixup_makes_convex_combinations_with_the_targets_lam(n):
    _seed(0)
    method, batch = _method("mixup", mix_alpha=0.4), _batch(n, seed=1)
    original = batch["image"].clone()
    seen, logits, loss = _step_seen(method, batch)
    assert torch.equal(batch["image"], original)  # the loader's batch is not mixed in place
    m = n - n % 2  # an odd batch's last image stays as is
    x, flipped = original[:m], original[:m].flip(0)
    lam = ((seen[:m] - flipped) / (x - flipped))[(x - flipped).abs() > 0.05]  # solve seen = lam x + (1-lam) x'
    lam = float(lam.median())
    assert 0.0 < lam < 1.0
    torch.testing.assert_close(seen[:m], lam * x + (1 - lam) * flipped, atol=1e-5, rtol=0)
    if n % 2:
        assert torch.equal(seen[-1], original[-1])
    onehot = torch.nn.functional.one_hot(batch["label"], N_CLASSES).float()
    soft = onehot.clone()
    soft[:m] = lam * onehot[:m] + (1 - lam) * onehot[:m].flip(0)
    assert np.isfinite(loss) and loss == pytest.approx(_soft_ce(logits, soft), rel=1e-4)


@pytest.mark.parametrize("n", [6, 5])
def test_cutmix_pastes_a_box_of_the_flipped_batch_and_target_mass_is_its_area(n):
    boxes = 0
    method = _method("cutmix", n=n)
    for s in range(6):  # a draw may pick an empty box (lam near 1): then nothing changes and the mass is 0
        _seed(s)
        batch = _batch(n, seed=s)
        original = batch["image"].clone()
        seen, logits, loss = _step_seen(method, batch)
        m = n - n % 2
        x, flipped = original[:m], original[:m].flip(0)
        pasted = (seen[:m] == flipped).all(1) & (seen[:m] != x).any(1)  # (m, H, W)
        kept = (seen[:m] == x).all(1)
        assert bool((pasted | kept).all())  # every pixel is its own or the partner's
        assert all(torch.equal(pasted[0], p) for p in pasted)  # one box for the batch
        ys, xs = torch.nonzero(pasted[0], as_tuple=True)
        area = int(pasted[0].sum())
        if area:
            boxes += 1
            box = (int(ys.max() - ys.min()) + 1) * (int(xs.max() - xs.min()) + 1)
            assert box == area  # a filled rectangle
        if n % 2:
            assert torch.equal(seen[-1], original[-1])
        frac = area / pasted[0].numel()
        onehot = torch.nn.functional.one_hot(batch["label"], N_CLASSES).float()
        soft = onehot.clone()
        soft[:m] = (1 - frac) * onehot[:m] + frac * onehot[:m].flip(0)  # target mass of the pasted image = area
        assert np.isfinite(loss) and loss == pytest.approx(_soft_ce(logits, soft), rel=1e-4)
    assert boxes >= 3


def test_cutout_sets_a_box_to_zero_and_keeps_the_targets():
    _seed(0)
    method, batch = _method("cutout", cutout_prob=1.0), _batch(4, seed=2)
    original = batch["image"].clone()
    seen, logits, loss = _step_seen(method, batch)
    assert torch.equal(batch["image"], original)
    for i in range(4):
        zero = (seen[i] == 0).all(0)
        assert bool(((seen[i] == 0) == zero).all())  # all channels erased together
        assert torch.equal(seen[i][:, ~zero], original[i][:, ~zero])  # the rest untouched
        ys, xs = torch.nonzero(zero, as_tuple=True)
        assert len(ys) > 0 and (int(ys.max() - ys.min()) + 1) * (int(xs.max() - xs.min()) + 1) == len(ys)
        assert 0.02 * 32 * 32 * 0.5 <= len(ys) <= 32 * 32 / 3 * 1.5  # timm's default box: 2-33 % of the image
    ce = torch.nn.functional.cross_entropy(logits, batch["label"])  # hard targets, unchanged
    assert np.isfinite(loss) and loss == pytest.approx(float(ce), rel=1e-4)
    _seed(0)
    never, batch = _method("cutout", cutout_prob=0.0), _batch(4, seed=2)
    assert torch.equal(_step_seen(never, batch)[0], batch["image"])


def test_no_mix_sees_the_batch():
    method, batch = _method("none"), _batch(4, seed=3)
    assert torch.equal(_step_seen(method, batch)[0], batch["image"])


def test_bad_mix_settings_fail_naming_the_hyperparameter():
    with pytest.raises(ValueError, match=r"'mix' = 'mixup' mixes single-label targets; target 'labels' is multi"):
        _method("mixup", target="labels")
    with pytest.raises(ValueError, match=r"hyperparameter 'mix' = 'CutMix'; valid: \['none', 'cutout', 'mixup'"):
        _method("CutMix")
    with pytest.raises(ValueError, match=r"'mix_alpha' must be > 0"):
        _method("mixup", mix_alpha=0.0)
    with pytest.raises(ValueError, match=r"'cutout_prob' must be in \[0, 1\]"):
        _method("cutout", cutout_prob=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"method 'gerne': hyperparameter 'mix' = 'mixup' applies in ERM's loss"):
            build_method("gerne", {"backbone": "test_resnet", "weights": None, "mix": "mixup"}, Task("label", 2))
        build_method("gerne", {"backbone": "test_resnet", "weights": None}, Task("label", 2))  # default: no mixing
