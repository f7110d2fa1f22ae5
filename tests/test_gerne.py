"""GERNE: the fused loss's gradient, beta = 0, groups, balanced batch shares, config validation."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from histoweak import metrics as M
from histoweak.data.streaming import shares
from histoweak.methods import build_method
from histoweak.methods.base import GROUP_NAMES, Task, tissue_groups
from histoweak.methods.gerne import gerne_loss
from histoweak.train import TrainConfig

TASK = Task("class:1", 5)


def _batch(n: int, seed: int, size: int = 32, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(n, 5)
    labels[:, 1] = (torch.arange(n) % 3 == 0).float()
    return {"image": torch.rand(n, 3, size, size, generator=g, dtype=dtype), "labels": labels}


def _method(beta: float, backbone: str = "test_efficientnet", **hp):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights, on purpose
        return build_method("gerne", {"backbone": backbone, "weights": None, "beta": beta, **hp}, TASK)


def _grads(module) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


@pytest.mark.parametrize("beta", [-1.0, -0.5, 0.0, 0.7, 2.5])
def test_fused_gradient_equals_two_pass_extrapolation(beta):
    """One backward of (1+b) L_lb - b L_b equals g_lb + b (g_lb - g_b) from two backward passes (with BatchNorm)."""
    m = _method(beta).double()  # float64: the comparison is about algebra, not rounding
    b, lb = _batch(6, 1), _batch(8, 2)
    b["image"], lb["image"] = b["image"].double(), lb["image"].double()
    batch = {**b, "balanced": lb}
    m.train()
    m.zero_grad()
    loss, _ = m._loss(batch)
    loss.backward()
    fused = _grads(m)

    # Reference: the same forward (both batches through BatchNorm together), two separate backward passes.
    ref = copy.deepcopy(m)
    ref.zero_grad()
    logits = ref(torch.cat([b["image"], lb["image"]]))
    ce = torch.nn.CrossEntropyLoss()
    params = list(ref.parameters())
    loss_b = ce(logits[:6], TASK.targets(b))
    loss_lb = ce(logits[6:], TASK.targets(lb))
    g_b = torch.autograd.grad(loss_b, params, retain_graph=True, allow_unused=True)
    g_lb = torch.autograd.grad(loss_lb, params, allow_unused=True)
    n_checked = 0
    for f, gl, gb in zip(fused, g_lb, g_b):
        if gl is None:
            continue
        expected = gl + beta * (gl - gb)
        torch.testing.assert_close(f, expected, rtol=1e-7, atol=1e-10)
        n_checked += 1
    assert n_checked > 10
    assert loss.item() == pytest.approx(((1 + beta) * loss_lb - beta * loss_b).item(), rel=1e-5)


def test_gerne_loss_is_the_documented_combination():
    a, b = torch.tensor(2.0), torch.tensor(5.0)
    assert gerne_loss(a, b, 0.0).item() == 2.0
    assert gerne_loss(a, b, 1.0).item() == pytest.approx(2 * 2.0 - 5.0)
    assert gerne_loss(a, b, -1.0).item() == pytest.approx(5.0)  # beta = -1: the biased batch alone


def test_beta_zero_is_training_on_the_balanced_batch():
    """With a batch-independent network (GroupNorm), a beta = 0 step moves the weights exactly as ERM on B_lb."""
    gerne = _method(0.0, backbone="test_efficientnet_gn")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        erm = build_method("erm", {"backbone": "test_efficientnet_gn", "weights": None}, TASK)
    erm.load_state_dict(gerne.state_dict())
    gerne, erm = gerne.double(), erm.double()  # float64: Adam's first step divides by |g|, amplifying rounding
    b, lb = _batch(6, 3, dtype=torch.float64), _batch(8, 4, dtype=torch.float64)
    gerne.step({**b, "balanced": lb})
    erm.step(lb)
    for (name, p), q in zip(gerne.named_parameters(), erm.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_naive_two_pass_step_matches_fused_without_batch_statistics():
    fused, naive = _method(1.5, backbone="test_efficientnet_gn"), _method(1.5, backbone="test_efficientnet_gn", fused=False)
    naive.load_state_dict(fused.state_dict())
    fused, naive = fused.double(), naive.double()
    batch = {**_batch(6, 5, dtype=torch.float64), "balanced": _batch(8, 6, dtype=torch.float64)}
    lf, ln = fused.step(batch), naive.step(batch)
    assert lf["loss"] == pytest.approx(ln["loss"], rel=1e-5)
    for p, q in zip(fused.parameters(), naive.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_tissue_groups_hand_made():
    y = np.array([0, 0, 1, 1, 1, 0])
    r = np.array([0.02, 0.5, 0.05, 0.10, 0.9, 0.10])
    assert tissue_groups(y, r, 0.1).tolist() == [0, 1, 2, 3, 3, 1]  # r == tau is large tissue (eq. 5)
    assert tissue_groups(y, r, 0.03).tolist() == [0, 1, 3, 3, 3, 1]
    assert GROUP_NAMES[2] == "y=1, small tissue"
    with pytest.raises(ValueError, match="tau"):
        tissue_groups(y, r, 1.5)
    with pytest.raises(ValueError, match="binary"):
        tissue_groups(np.array([0, 2]), np.array([0.1, 0.2]), 0.1)
    # Task.groups takes y from the target class's presence in the multi-hot labels.
    labels = np.zeros((3, 5))
    labels[1, 1] = labels[2, 2] = 1  # tumour in tile 1 only; tile 2 has stroma
    batch = {"labels": labels, "tissue_ratio": np.array([0.5, 0.01, 0.5])}
    assert TASK.groups(batch, 0.1).tolist() == [1, 2, 1]
    with pytest.raises(ValueError, match="binary target"):
        Task("labels", 5).groups(batch, 0.1)


def test_worst_group_accuracy_hand_made():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 0, 1, 1, 1, 0, 0])
    groups = tissue_groups(y, np.array([0.5, 0.5, 0.01, 0.01, 0.5, 0.5, 0.01, 0.01]), 0.1)
    # groups: (0,large) 2/2, (0,small) 1/2, (1,large) 2/2, (1,small) 0/2
    assert M.worst_group_accuracy(y, pred, groups) == 0.0
    assert M.group_balanced_accuracy(y, pred, groups) == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    assert M.balanced_accuracy(y, pred) == pytest.approx((3 / 4 + 2 / 4) / 2)


def test_batch_shares_and_blend():
    assert shares(32, [1, 1, 1, 1]) == [8, 8, 8, 8]
    assert sum(shares(30, [1, 1, 1, 1])) == 30
    assert shares(10, [0.7, 0.1, 0.1, 0.1]) == [7, 1, 1, 1]
    assert shares(10, [0.97, 0.01, 0.01, 0.01]) == [10, 0, 0, 0]  # the data's own shares may leave a group out
    assert shares(7, [0.5, 0.25, 0.25, 0]) == [4, 2, 1, 0] or shares(7, [0.5, 0.25, 0.25, 0]) == [3, 2, 2, 0]
    with pytest.raises(ValueError, match="weights"):
        shares(8, [0, 0])
    counts = {0: 600, 1: 300, 2: 60, 3: 40}
    balanced = _method(1.0, blend=1.0).balanced_weights(counts)
    assert all(w == pytest.approx(0.25) for w in balanced.values())
    natural = _method(1.0, blend=0.0).balanced_weights(counts)
    assert [natural[g] for g in range(4)] == pytest.approx([0.6, 0.3, 0.06, 0.04])
    half = _method(1.0, blend=0.5).balanced_weights(counts)
    assert half[3] == pytest.approx(0.5 * 0.25 + 0.5 * 0.04)
    with pytest.raises(ValueError, match="blend"):
        _method(1.0, blend=1.5)


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="'group_tau'.*threshold"):
        TrainConfig(method="gerne")
    with pytest.raises(ValueError, match="'select'.*group_tau"):
        TrainConfig(method="erm", select="val_wga")
    with pytest.raises(ValueError, match="'group_tau'"):
        TrainConfig(method="erm", group_tau=2.0)
    with pytest.raises(ValueError, match="'group_tau'.*binary"):
        TrainConfig(method="erm", group_tau=0.1, target="labels")
    assert TrainConfig(method="gerne", group_tau=0.03, select="val_wga").group_tau == 0.03


def test_tune_gerne_smoke_sweep_logs_nested_runs_figures_and_table1(tmp_path, mlflow_server):
    """`jobs/tune_gerne.py --smoke-test --with-erm` against a real MLflow server, then `histoweak report --table1`."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    proc = subprocess.run([sys.executable, str(repo / "jobs" / "tune_gerne.py"), "--smoke-test", "--with-erm",
                           "--no-progress"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    for name, n_trials, method in (("gerne", 2, "gerne"), ("gerne-erm", 2, "erm")):
        exp = client.get_experiment_by_name(name)
        runs = client.search_runs([exp.experiment_id])
        parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(children) == n_trials
        assert any(a.path.startswith("group_counts_tau") for a in client.list_artifacts(parent.info.run_id))
        for c in children:
            assert c.info.status == "FINISHED" and c.data.params["method"] == method
            assert {"test_wga", "test_bca", "best_val_wga"} <= set(c.data.metrics)
            arts = {a.path for a in client.list_artifacts(c.info.run_id)}
            assert {"test_group_accuracy.png", "test_shortcut_analysis.png"} <= arts
    table = subprocess.run([sys.executable, "-m", "histoweak.cli", "report", "--table1"], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert any(line.startswith("GERNE") and "WGA" in line for line in lines)
    assert sum(line.startswith("ERM") for line in lines) == 2 and "WGA (tau=0.1)" in table.stdout
