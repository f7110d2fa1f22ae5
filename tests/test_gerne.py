"""GERNE: the fused loss's gradient, beta = 0, groups, balanced batch shares, config validation."""

from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import pytest
import torch

from histoweak import metrics as M
from histoweak.data.streaming import shares
from histoweak.methods import build_method
from histoweak.methods.base import GROUP_NAMES, Task, tissue_groups
from histoweak.methods.gerne import gerne_loss
from histoweak.report import format_table1, table1_cells
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


@pytest.mark.parametrize("batch_size, weights, expected", [
    # Largest remainder: quota q_i = batch_size * w_i / sum(w); every stream gets floor(q_i); the rows still
    # missing go, one each, to the largest remainders q_i - floor(q_i); equal remainders go to the earlier stream.
    (32, [1, 1, 1, 1], [8, 8, 8, 8]),  # quotas 8 each, no remainder
    (30, [1, 1, 1, 1], [8, 8, 7, 7]),  # quotas 7.5; floors 7 (28), 2 left, four tied .5 remainders: streams 0, 1
    (6, [1, 1, 1, 1], [2, 2, 1, 1]),  # quotas 1.5; floors 1 (4), 2 left, tie: streams 0, 1
    (5, [1, 1, 1, 1], [2, 1, 1, 1]),  # quotas 1.25; floors 1 (4), 1 left, tie: stream 0
    (10, [0.7, 0.1, 0.1, 0.1], [7, 1, 1, 1]),  # quotas 7, 1, 1, 1: exact
    (10, [0.97, 0.01, 0.01, 0.01], [10, 0, 0, 0]),  # quotas 9.7, .1, .1, .1; floors 9 (9), 1 left: .7 wins
    # quotas 3.5, 1.75, 1.75, 0; floors 3, 1, 1, 0 (5), 2 left: remainders .75, .75 beat .5 (rounding would give 4, 2, 2)
    (7, [0.5, 0.25, 0.25, 0], [3, 2, 2, 0]),
    (8, [5, 3, 1], [4, 3, 1]),  # quotas 4.44, 2.67, .89; floors 4, 2, 0 (6), 2 left: .89 then .67; not the largest weight
    (3, [1, 2, 0, 2], [1, 1, 0, 1]),  # quotas .6, 1.2, 0, 1.2; floors 0, 1, 0, 1 (2), 1 left: .6 beats the tied .2s
    (10, [0, 1, 1, 0, 1], [0, 4, 3, 0, 3]),  # quotas 0, 3.33, 3.33, 0, 3.33; 1 left, tie: stream 1; zero weights get 0
    (4, [0, 1, 0, 1, 1], [0, 2, 0, 1, 1]),  # quotas 0, 1.33, 0, 1.33, 1.33; 1 left, tie: stream 1
    (5, [0, 2, 0, 3], [0, 2, 0, 3]),  # exact quotas, zero-weight groups between
])
def test_batch_shares_are_largest_remainder(batch_size, weights, expected):
    assert shares(batch_size, weights) == expected


def test_batch_shares_and_blend():
    for bad in ([0, 0], [], [1, -1, 2]):
        with pytest.raises(ValueError, match="weights"):
            shares(8, bad)
    counts = {0: 600, 1: 300, 2: 60, 3: 40}
    balanced = _method(1.0, blend=1.0).stream_weights("balanced", counts)
    assert all(w == pytest.approx(0.25) for w in balanced.values())
    natural = _method(1.0, blend=0.0).stream_weights("balanced", counts)
    assert [natural[g] for g in range(4)] == pytest.approx([0.6, 0.3, 0.06, 0.04])
    half = _method(1.0, blend=0.5).stream_weights("balanced", counts)
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


def _parse_table1(text: str) -> dict[tuple[str, str], dict[str, str]]:
    """The printed Table 1 as {(method label, eval. metric): {column header: cell}} (columns are 2+ spaces apart)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Method"))
    head = re.split(r"\s{2,}", lines[start].strip())
    rows = {}
    for line in lines[start + 1:]:
        if line.startswith("test accuracies"):
            break
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(head), line
        rows[(cells[0], cells[1])] = dict(zip(head[2:], cells[2:]))
    return rows


def _cell_values(cell: str) -> tuple[float, float | None] | None:
    """'-' -> None; '61.25' -> (61.25, None); '60.00 ± 14.14' -> (60.0, 14.14)."""
    if cell == "-":
        return None
    mean, _, std = cell.partition(" ± ")
    return float(mean), float(std) if std else None


def _expected_cell(fractions: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (ddof = 1) of test accuracies in percent; one seed: the value, no std."""
    v = 100 * np.asarray(fractions, float)
    return (float(v[0]), None) if len(v) == 1 else (float(v.mean()), float(v.std(ddof=1)))


def _same_cell(printed: tuple | None, expected: tuple | None) -> bool:
    if printed is None or expected is None:
        return printed is expected
    close = lambda a, b: abs(a - b) <= 0.005 + 1e-9  # printed with 2 decimals
    return close(printed[0], expected[0]) and (printed[1] is None) == (expected[1] is None) and (
        printed[1] is None or close(printed[1], expected[1]))


def test_table1_picks_the_best_mean_setting_and_prints_mean_and_std_over_seeds():
    """Hand-made runs as MLflow returns them (params are strings): which runs fill each cell, and its text."""
    def run(method, tau, seed, val, wga, bca, select="None", **swept):
        params = {"method": method, "group_tau": tau, "select": select, "swept.train.seed": str(seed),
                  "swept.train.group_tau": tau, **{f"swept.hparams.{k}": v for k, v in swept.items()}}
        sel = select if select != "None" else "val_wga"
        return {"params": params, "metrics": {f"best_{sel}": val, "test_wga": wga, "test_bca": bca}}

    runs = [
        # GERNE, tau 0.1: beta 1 has the best *mean* val WGA (0.7 > 0.65) though beta 2 has the best single run (0.9)
        run("gerne", "0.1", 0, 0.6, 0.5, 0.8, beta="1.0"), run("gerne", "0.1", 1, 0.8, 0.7, 0.9, beta="1.0"),
        run("gerne", "0.1", 0, 0.9, 0.1, 0.3, beta="2.0"), run("gerne", "0.1", 1, 0.4, 0.2, 0.4, beta="2.0"),
        run("gerne", "0.03", 0, 0.5, 0.25, 0.75, beta="1.0"),
        # ERM selected by val BCA at tau 0.1 (three seeds); by val WGA only at tau 0.03
        *(run("erm", "0.1", s, 0.7, w, b, select="val_bca", lr="0.001") for s, w, b in ((0, .2, .6), (1, .3, .7), (2, .4, .8))),
        run("erm", "0.03", 0, 0.3, 0.45, 0.55, select="val_wga", lr="0.0003"),
        # not Table 1 material: another method, and ERM without groups
        run("pscl", "0.1", 0, 0.9, 0.9, 0.9), run("erm", "None", 0, 0.9, 0.9, 0.9, select="val_bca"),
    ]
    cells, taus = table1_cells(runs)
    assert taus == [0.1, 0.03]
    printed = _parse_table1(format_table1(cells, taus))
    # By hand: GERNE/tau 0.1 = beta 1's seeds: WGA 50, 70 -> mean 60, std sqrt((10² + 10²) / 1) = 14.14;
    # BCA 80, 90 -> 85 ± sqrt(50) = 7.07. ERM/BCA: WGA 20, 30, 40 -> 30 ± sqrt(200 / 2) = 10; BCA 60, 70, 80 -> 70 ± 10.
    assert printed == {
        ("ERM", "BCA"): {"WGA (tau=0.1)": "30.00 ± 10.00", "BCA (tau=0.1)": "70.00 ± 10.00",
                         "WGA (tau=0.03)": "-", "BCA (tau=0.03)": "-"},
        ("ERM", "WGA"): {"WGA (tau=0.1)": "-", "BCA (tau=0.1)": "-", "WGA (tau=0.03)": "45.00", "BCA (tau=0.03)": "55.00"},
        ("GERNE", "WGA"): {"WGA (tau=0.1)": "60.00 ± 14.14", "BCA (tau=0.1)": "85.00 ± 7.07",
                           "WGA (tau=0.03)": "25.00", "BCA (tau=0.03)": "75.00"},
    }


def test_tune_gerne_smoke_sweep_logs_nested_runs_figures_and_table1(tmp_path, mlflow_server):
    """`jobs/tune_gerne.py --smoke-test --with-erm` against a real MLflow server, then `histoweak report --table1`."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    # group_tau pinned to 0.1 (GERNE's smoke would draw 0.1 or 0.03 per trial): both GERNE trials then compete
    # for the one GERNE cell at tau = 0.1, the column the ERM rows fill too.
    # one GERNE trial (the choice among several settings per cell is test_table1_picks_the_best_mean_setting_...)
    proc = subprocess.run([sys.executable, str(repo / "jobs" / "tune_gerne.py"), "--smoke-test", "--with-erm",
                           "--set", "train.group_tau=0.1", "--set", "num_samples=1", "--no-progress"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    finished = []
    for name, n_trials, method in (("gerne", 1, "gerne"), ("gerne-erm", 2, "erm")):
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
        finished += [c for c in children if c.info.status == "FINISHED"]
    table = subprocess.run([sys.executable, "-m", "histoweak.cli", "report", "--table1"], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    printed = _parse_table1(table.stdout)

    # The cells recomputed from the runs on the server. A row (method, selection metric) and a column tau take
    # the FINISHED runs with that method, threshold and selection metric (GERNE selects by val WGA); runs with
    # the same hyperparameters are seeds of one setting; the setting with the best mean validation score
    # (each run's best epoch, from its metric history) fills the cell with 100 x its runs' test WGA / BCA.
    def best_val(run, metric: str) -> float:
        return max(m.value for m in client.get_metric_history(run.info.run_id, metric))

    taus = sorted({float(r.data.params["group_tau"]) for r in finished}, reverse=True)
    assert taus == [0.1]
    assert set(printed) == {("ERM", "BCA"), ("ERM", "WGA"), ("GERNE", "WGA")}
    for (label, metric), row in printed.items():
        method, sel = label.lower(), f"val_{metric.lower()}"
        assert set(row) == {f"{m} (tau={t:g})" for t in taus for m in ("WGA", "BCA")}
        for tau in taus:
            settings: dict = {}
            for r in finished:
                p = r.data.params
                run_sel = p["select"] if p["select"] != "None" else {"gerne": "val_wga", "erm": "val_bca"}[p["method"]]
                if p["method"] == method and float(p["group_tau"]) == tau and run_sel == sel:
                    hp = tuple(sorted((k, v) for k, v in p.items() if k.startswith("hparams.")))
                    settings.setdefault(hp, []).append(r)
            assert settings, (label, metric, tau)  # the smoke sweeps fill every cell
            cell = (_cell_values(row[f"WGA (tau={tau:g})"]), _cell_values(row[f"BCA (tau={tau:g})"]))
            means = {hp: np.mean([best_val(r, sel) for r in rs]) for hp, rs in settings.items()}
            # equal means (likely after two steps) leave the choice open: any of the tied settings is right
            allowed = [(_expected_cell([r.data.metrics["test_wga"] for r in settings[hp]]),
                        _expected_cell([r.data.metrics["test_bca"] for r in settings[hp]]))
                       for hp in settings if means[hp] == max(means.values())]
            assert any(_same_cell(cell[0], w) and _same_cell(cell[1], b) for w, b in allowed), (label, metric, tau, row, allowed)
