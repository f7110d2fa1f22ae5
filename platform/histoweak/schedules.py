"""Learning-rate schedules as pure functions of the epoch: ``TrainConfig.lr_schedule`` for any method.

A schedule is a small mapping, validated by ``check_schedule``::

    {"name": "cosine", "eta_min": 0.0}                                  # over the run's epochs
    {"name": "cosine_restarts", "t0": 25, "t_mult": 1, "eta_min": 1e-5}  # SGDR; USegMix §3.2
    {"name": "poly", "power": 0.9, "end_lr": 0.0}                       # polynomial decay; PSCL thesis

``lr_at(schedule, base_lr, epoch, epochs)`` is the learning rate of epoch ``epoch`` (0-based) in closed form,
the value torch's ``CosineAnnealingLR(T_max=epochs)``, ``CosineAnnealingWarmRestarts`` and
``PolynomialLR(total_iters=epochs)`` reach after ``epoch`` epoch-wise ``step()`` calls (``tests/test_schedules.py``).
Stepped per epoch, as the USegMix paper steps its scheduler. Closed form, not a scheduler object with state: a run
resumed from a checkpoint at epoch e gets exactly the learning rate of an uninterrupted run, with nothing to
save. ``apply_lr`` sets it on an optimizer.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

__all__ = ["SCHEDULES", "apply_lr", "check_schedule", "lr_at"]

#: schedule name -> {key: default (None = required)}, besides "name"
SCHEDULES: dict[str, dict[str, Any]] = {
    "cosine": {"eta_min": 0.0},
    "cosine_restarts": {"t0": None, "t_mult": 1, "eta_min": 0.0},
    "poly": {"power": 0.9, "end_lr": 0.0},
}


def check_schedule(schedule: Mapping[str, Any] | None) -> None:
    """Raise ``ValueError`` naming the bad key (and the valid ones) unless ``schedule`` is None or valid."""
    if schedule is None:
        return
    if not isinstance(schedule, Mapping):
        raise ValueError(f"lr schedule must be a mapping with a 'name', got {schedule!r}")
    name = schedule.get("name")
    if name not in SCHEDULES:
        raise ValueError(f"lr schedule key 'name': unknown {name!r}; valid: {sorted(SCHEDULES)}")
    keys = SCHEDULES[name]
    unknown = sorted(set(schedule) - set(keys) - {"name"})
    if unknown:
        raise ValueError(f"lr schedule {name!r}: unknown key(s) {unknown}; valid: {sorted(['name', *keys])}")
    missing = sorted(k for k, default in keys.items() if default is None and k not in schedule)
    if missing:
        raise ValueError(f"lr schedule {name!r}: missing key(s) {missing}")
    values = {**keys, **schedule}

    def bad(key, why):
        raise ValueError(f"lr schedule {name!r} key {key!r}: {why}, got {values[key]!r}")

    def number(key):
        v = values[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            bad(key, "must be a finite number")
        return v

    for key in ("eta_min", "end_lr"):
        if key in keys and number(key) < 0:
            bad(key, "must be >= 0")
    if name == "poly" and number("power") <= 0:
        bad("power", "must be > 0")
    for key in ("t0", "t_mult"):
        if key in keys and (isinstance(values[key], bool) or not isinstance(values[key], int) or values[key] < 1):
            bad(key, "must be an integer >= 1 (epochs)" if key == "t0" else "must be an integer >= 1")


def lr_at(schedule: Mapping[str, Any] | None, base_lr: float, epoch: int, epochs: int) -> float:
    """The learning rate of 0-based ``epoch`` of a run of ``epochs`` epochs starting at ``base_lr``.

    - None: ``base_lr`` (constant).
    - cosine: ``eta_min + (base_lr - eta_min) (1 + cos(pi epoch / epochs)) / 2`` (Loshchilov & Hutter 2017,
      one cycle over the run; torch's ``CosineAnnealingLR(T_max=epochs)``).
    - cosine_restarts: the same within each cycle, restarting at ``base_lr``; cycle i lasts ``t0 * t_mult^i``
      epochs (SGDR; torch's ``CosineAnnealingWarmRestarts(T_0=t0, T_mult=t_mult)`` stepped per epoch).
      USegMix §3.2: Adam, lr 1e-3, ``eta_min`` 1e-5, ``t0`` 25.
    - poly: ``(base_lr - end_lr) (1 - epoch / epochs)^power + end_lr`` (the PSCL thesis' polynomial decay,
      as mmseg's ``PolyLR``; with ``end_lr = 0`` torch's ``PolynomialLR(total_iters=epochs)``).

    Parameters
    ----------
    schedule : a mapping ``check_schedule`` accepts, or None
    base_lr : the learning rate at epoch 0
    epoch : 0-based epoch, >= 0
    epochs : the run's epochs, >= 1 (cosine and poly span them; cosine_restarts ignores it)
    """
    check_schedule(schedule)
    if epoch < 0 or epochs < 1:
        raise ValueError(f"lr_at: need epoch >= 0 and epochs >= 1, got epoch {epoch}, epochs {epochs}")
    if schedule is None:
        return float(base_lr)
    s = {**SCHEDULES[schedule["name"]], **schedule}
    if s["name"] == "poly":
        frac = 1.0 - min(epoch, epochs) / epochs
        return float((base_lr - s["end_lr"]) * frac ** s["power"] + s["end_lr"])
    if s["name"] == "cosine":
        t_cur, t_i = epoch, epochs
    else:
        t0, mult = s["t0"], s["t_mult"]
        if mult == 1:
            t_cur, t_i = epoch % t0, t0
        else:  # cycle n starts at epoch t0 (mult^n - 1) / (mult - 1); integer arithmetic, no log rounding
            n, start, t_i = 0, 0, t0
            while epoch >= start + t_i:
                n, start, t_i = n + 1, start + t_i, t_i * mult
            t_cur = epoch - start
    eta_min = s["eta_min"]
    return float(eta_min + (base_lr - eta_min) * (1.0 + math.cos(math.pi * t_cur / t_i)) / 2.0)


def apply_lr(optimizer: torch.optim.Optimizer, schedule: Mapping[str, Any] | None, epoch: int, epochs: int) -> float:
    """Set every parameter group's ``lr`` to ``lr_at(schedule, group["initial_lr"], epoch, epochs)``.

    ``initial_lr`` is recorded in each group on the first call (as torch's schedulers do) and travels with the
    optimizer's state dict, so a resumed run schedules from the same base. Returns the first group's lr.
    """
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = lr_at(schedule, group["initial_lr"], epoch, epochs)
    return float(optimizer.param_groups[0]["lr"])
