"""Learning-rate schedules (``histoweak.schedules``) against torch's schedulers stepped once per epoch."""

import pytest
import torch

from histoweak.schedules import apply_lr, check_schedule, lr_at
from histoweak.train import TrainConfig

BASE_LR = 1e-3


def _torch_lrs(make_scheduler, epochs: int) -> list[float]:
    """The lr of each epoch under a torch scheduler: read before the epoch's steps, ``scheduler.step()`` after."""
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    sched = make_scheduler(opt)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _ours(schedule, epochs: int, total: int | None = None) -> list[float]:
    return [lr_at(schedule, BASE_LR, e, total or epochs) for e in range(epochs)]


@pytest.mark.parametrize("epochs, eta_min", [(10, 0.0), (7, 1e-5), (1, 1e-4)])
def test_cosine_matches_cosine_annealing_lr(epochs, eta_min):
    ref = _torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs, eta_min=eta_min), epochs)
    assert _ours({"name": "cosine", "eta_min": eta_min}, epochs) == pytest.approx(ref, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("t0, t_mult, epochs", [(25, 1, 80), (3, 1, 11), (2, 2, 30), (3, 3, 40), (1, 2, 9)])
def test_cosine_restarts_matches_cosine_annealing_warm_restarts(t0, t_mult, epochs):
    """Across several restarts; (25, 1): the USegMix paper's T_0 = 25, eta_min = 1e-5 (§3.2)."""
    ref = _torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=t0, T_mult=t_mult,
                                                                                     eta_min=1e-5), epochs)
    got = _ours({"name": "cosine_restarts", "t0": t0, "t_mult": t_mult, "eta_min": 1e-5}, epochs)
    assert got == pytest.approx(ref, rel=1e-9, abs=1e-15)
    restarts = [e for e in range(1, epochs) if got[e] > got[e - 1]]
    assert restarts and all(got[e] == pytest.approx(BASE_LR) for e in restarts)  # back to the base lr


@pytest.mark.parametrize("epochs, power", [(10, 0.9), (6, 2.0), (5, 1.0)])
def test_poly_matches_polynomial_lr(epochs, power):
    ref = _torch_lrs(lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=epochs, power=power), epochs)
    assert _ours({"name": "poly", "power": power}, epochs) == pytest.approx(ref, rel=1e-9, abs=1e-15)


def test_poly_end_lr_by_hand():
    # (base - end) (1 - e / E)^p + end, e = 2 of E = 4, p = 0.5: (1e-3 - 1e-4) * sqrt(0.5) + 1e-4
    assert lr_at({"name": "poly", "power": 0.5, "end_lr": 1e-4}, 1e-3, 2, 4) == pytest.approx(
        9e-4 * 0.5 ** 0.5 + 1e-4)
    assert lr_at({"name": "poly", "end_lr": 1e-4}, 1e-3, 4, 4) == pytest.approx(1e-4)


def test_no_schedule_is_constant():
    assert _ours(None, 5) == [BASE_LR] * 5


def test_apply_lr_per_group_and_resumed_from_a_state_dict():
    """Every group from its own initial lr; a fresh optimizer loaded from a mid-run state dict schedules the
    same lr as the uninterrupted one."""
    sched = {"name": "cosine_restarts", "t0": 3, "eta_min": 1e-5}
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.Adam([{"params": [params[0]], "lr": 1e-3}, {"params": [params[1]], "lr": 1e-2}])
    for epoch in range(2):
        apply_lr(opt, sched, epoch, 6)
    state = opt.state_dict()  # a checkpoint after epoch 1
    apply_lr(opt, sched, 2, 6)
    want = [g["lr"] for g in opt.param_groups]
    assert want == pytest.approx([lr_at(sched, 1e-3, 2, 6), lr_at(sched, 1e-2, 2, 6)])
    fresh = torch.optim.Adam([{"params": [params[0]], "lr": 1e-3}, {"params": [params[1]], "lr": 1e-2}])
    fresh.load_state_dict(state)
    assert apply_lr(fresh, sched, 2, 6) == pytest.approx(want[0])
    assert [g["lr"] for g in fresh.param_groups] == pytest.approx(want)


@pytest.mark.parametrize("schedule, match", [
    ({"name": "step"}, r"key 'name': unknown 'step'; valid: \['cosine', 'cosine_restarts', 'poly'\]"),
    ({"eta_min": 0.0}, r"key 'name': unknown None"),
    ({"name": "cosine", "T_max": 3}, r"unknown key\(s\) \['T_max'\]; valid: \['eta_min', 'name'\]"),
    ({"name": "cosine_restarts"}, r"missing key\(s\) \['t0'\]"),
    ({"name": "cosine_restarts", "t0": 0}, r"key 't0': must be an integer >= 1"),
    ({"name": "cosine_restarts", "t0": 2.5}, r"key 't0': must be an integer >= 1"),
    ({"name": "cosine_restarts", "t0": 5, "t_mult": 0}, r"key 't_mult'"),
    ({"name": "cosine", "eta_min": -1.0}, r"key 'eta_min': must be >= 0"),
    ({"name": "cosine", "eta_min": "1e-5"}, r"key 'eta_min': must be a finite number"),
    ({"name": "poly", "power": 0}, r"key 'power': must be > 0"),
    ({"name": "poly", "end_lr": -0.1}, r"key 'end_lr'"),
    ("cosine", r"must be a mapping"),
])
def test_bad_schedules_name_the_key(schedule, match):
    with pytest.raises(ValueError, match=match):
        check_schedule(schedule)


def test_train_config_rejects_a_bad_schedule_on_load():
    with pytest.raises(ValueError, match=r"train config 'lr_schedule': lr schedule 'cosine_restarts': missing"):
        TrainConfig.from_dict({"lr_schedule": {"name": "cosine_restarts"}, "epochs": 3})
    cfg = TrainConfig.from_dict({"lr_schedule": {"name": "cosine_restarts", "t0": 25, "eta_min": 1e-5}})
    assert cfg.lr_schedule["t0"] == 25
