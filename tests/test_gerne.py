"""GERNE: the step's gradient, beta = 0, groups, class-balanced batch shares, the beta bound, config validation."""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from histoweak import metrics as M
from histoweak.data.streaming import ShareSchedule, shares
from histoweak.methods import build_method
from histoweak.methods.base import GROUP_NAMES, RunInfo, Task, check_hparams, tissue_groups
from histoweak.methods.gerne import GERNE, batch_weights, beta_bound, gerne_loss, within_class_shares
from histoweak.report import format_table1, table1_cells
from histoweak.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]

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
def test_step_gradient_is_the_extrapolation_of_two_separate_passes(beta):
    """One backward of (1+b) L_lb - b L_b equals g_lb + b (g_lb - g_b), each gradient from its own forward pass
    (with BatchNorm: each batch normalised by its own statistics, as Alg. 1 computes the two losses)."""
    m = _method(beta).double()  # float64: the comparison is about algebra, not rounding
    b, lb = _batch(6, 1), _batch(8, 2)
    b["image"], lb["image"] = b["image"].double(), lb["image"].double()
    ref = copy.deepcopy(m)
    m.train()
    m.zero_grad()
    loss, _ = m._loss({**b, "balanced": lb})
    loss.backward()
    got = _grads(m)

    # Reference: two forward passes, two backward passes, the gradients combined by hand.
    ref.train()
    ce = torch.nn.CrossEntropyLoss()
    params = list(ref.parameters())
    loss_b = ce(ref(b["image"]), TASK.targets(b))
    g_b = torch.autograd.grad(loss_b, params, allow_unused=True)
    loss_lb = ce(ref(lb["image"]), TASK.targets(lb))
    g_lb = torch.autograd.grad(loss_lb, params, allow_unused=True)
    n_checked = 0
    for f, gl, gb in zip(got, g_lb, g_b):
        if gl is None:
            continue
        torch.testing.assert_close(f, gl + beta * (gl - gb), rtol=1e-7, atol=1e-10)
        n_checked += 1
    assert n_checked > 10
    assert loss.item() == pytest.approx(((1 + beta) * loss_lb - beta * loss_b).item(), rel=1e-5)
    # one forward of the concatenation (shared BatchNorm statistics) is another function: its gradient differs
    shared = copy.deepcopy(ref)
    shared.zero_grad()
    logits = shared(torch.cat([b["image"], lb["image"]]))
    gerne_loss(ce(logits[6:], TASK.targets(lb)), ce(logits[:6], TASK.targets(b)), beta).backward()
    assert any(not torch.allclose(p.grad, g, rtol=1e-4, atol=1e-8) for p, g in zip(shared.parameters(), got)
               if p.grad is not None)


def test_gerne_loss_is_the_documented_combination():
    a, b = torch.tensor(2.0), torch.tensor(5.0)
    assert gerne_loss(a, b, 0.0).item() == 2.0
    assert gerne_loss(a, b, 1.0).item() == pytest.approx(2 * 2.0 - 5.0)
    assert gerne_loss(a, b, -1.0).item() == pytest.approx(5.0)  # beta = -1: the biased batch alone


def test_beta_zero_is_training_on_the_balanced_batch():
    """With a batch-independent network (GroupNorm), a beta = 0 step moves the weights exactly as ERM on B_lb
    (both with GERNE's optimizer, the paper's SGD)."""
    gerne = _method(0.0, backbone="test_efficientnet_gn")
    assert isinstance(gerne.optimizer, torch.optim.SGD) and gerne.optimizer.defaults["weight_decay"] == 0.01
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        erm = build_method("erm", {"backbone": "test_efficientnet_gn", "weights": None, "optimizer": "sgd",
                                   "weight_decay": 0.01}, TASK)
    erm.load_state_dict(gerne.state_dict())
    gerne, erm = gerne.double(), erm.double()
    b, lb = _batch(6, 3, dtype=torch.float64), _batch(8, 4, dtype=torch.float64)
    gerne.step({**b, "balanced": lb})
    erm.step(lb)
    for (name, p), q in zip(gerne.named_parameters(), erm.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9, msg=name)


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


def test_batch_shares_are_class_balanced_with_within_class_blend():
    """Hand computation: 600/300 rows in class 0 (small/large tissue), 60/40 in class 1."""
    for bad in ([0, 0], [], [1, -1, 2]):
        with pytest.raises(ValueError, match="weights"):
            shares(8, bad)
    counts = {0: 600, 1: 300, 2: 60, 3: 40}
    assert within_class_shares(counts) == pytest.approx({0: 2 / 3, 1: 1 / 3, 2: 0.6, 3: 0.4})
    # B_b: p(y) = 1/2, each class's own shares
    biased = _method(1.0).stream_weights("", counts)
    assert [biased[g] for g in range(4)] == pytest.approx([1 / 3, 1 / 6, 0.3, 0.2])
    uniform = _method(0.0, c=1.0).stream_weights("balanced", counts)
    assert [uniform[g] for g in range(4)] == pytest.approx([0.25] * 4)
    # c = 0.5: (0.5 alpha + 0.25) / 2
    half = _method(1.0, c=0.5).stream_weights("balanced", counts)
    assert [half[g] for g in range(4)] == pytest.approx([(1 / 3 + 0.25) / 2, (1 / 6 + 0.25) / 2, 0.275, 0.225])
    assert batch_weights(counts, 0.0) == biased
    # a class with one group: that group is the whole class at any c
    assert batch_weights({0: 10, 1: 30, 3: 5}, 1.0) == pytest.approx({0: 0.25, 1: 0.25, 3: 0.5})
    with pytest.raises(ValueError, match="'gerne': c must be in"):
        _method(1.0, c=1.5)
    with pytest.raises(ValueError, match="unknown hyperparameter.*blend"):
        _method(1.0, blend=1.0)


def test_small_groups_get_their_share_over_batches():
    """A group owed under half a row per batch is drawn every few batches (never starved), on the long run at its
    share: 16 rows of class 1 in a batch of 32, of which 5 % small tissue = 0.8 rows per batch."""
    sched = ShareSchedule(32, [0.25, 0.25, 0.475, 0.025])
    rows = np.array([sched.next() for _ in range(400)])
    assert (rows.sum(1) == 32).all() and (rows >= 0).all()
    assert rows[:, 3].sum() == pytest.approx(0.025 * 32 * 400, abs=2)
    assert rows[0].tolist() == shares(32, [0.25, 0.25, 0.475, 0.025])  # the first batch is the plain rounding


def test_beta_bound_against_hand_computation():
    # class 0: alpha = 0.9 / 0.1, class 1: 0.2 / 0.8; A = 2. alpha_max = 0.9:
    # beta_max = 0.9 / (c (0.9 - 0.5)) - 1 = 2.25 / c - 1  -> c = 1: 1.25, c = 0.5: 3.5
    counts = {0: 900, 1: 100, 2: 20, 3: 80}
    assert beta_bound(counts, 1.0) == pytest.approx(1.25)
    assert beta_bound(counts, 0.5) == pytest.approx(3.5)
    assert beta_bound(counts, 0.0) == float("inf")
    assert beta_bound({0: 50, 1: 50, 2: 10, 3: 10}, 1.0) == float("inf")  # balanced within class: no bound
    # at the bound the over-represented group's effective weight alpha + k (1/A - alpha) is exactly 0
    k = 1.0 * (1.25 + 1)
    assert 0.9 + k * (0.5 - 0.9) == pytest.approx(0.0)


def test_beta_beyond_its_bound_is_refused_before_training():
    meta = {"labels": np.zeros((1100, 5)), "tissue_ratio": np.r_[np.full(900, 0.01), np.full(100, 0.5),
                                                                  np.full(20, 0.01), np.full(80, 0.5)]}
    meta["labels"][1000:, 1] = 1
    run = RunInfo(target="class:1", n_classes=5, group_tau=0.1, batch_size=32, meta=lambda cols: meta)
    hp = lambda **kw: check_hparams(GERNE.Hparams, {"backbone": "test_efficientnet", "weights": None, **kw}, "gerne")
    plan = GERNE.data_plan(hp(beta=1.2, c=1.0), run)
    assert plan.state["beta_max"] == pytest.approx(1.25) and plan.state["group_count_0"] == 900
    assert plan.steps_per_epoch == 1100 // 32 and set(plan.extra) == {"balanced"} and plan.main is not None
    with pytest.raises(ValueError, match=r"beta 1.3 is beyond its bound 1.250 at c = 1 .*group_tau 0.1"):
        GERNE.data_plan(hp(beta=1.3, c=1.0), run)
    # a sweep: the grid loses the values past the smallest bound over its c values (c = 1: 1.25), saying so
    swept = GERNE.check_sweep({"train.group_tau": 0.1}, {"hparams.beta": {"grid": [0.0, 1.0, 2.0, 3.0]},
                                                         "hparams.c": {"grid": [0.5, 1.0]}},
                              lambda train: run)
    assert swept["hparams.beta"] == {"grid": [0.0, 1.0]}
    assert GERNE.check_sweep({}, {"hparams.beta": {"uniform": [0.0, 5.0]}, "hparams.c": {"grid": [0.5]}},
                             lambda train: run)["hparams.beta"] == {"uniform": [0.0, pytest.approx(3.5)]}
    with pytest.raises(ValueError, match="every swept beta"):
        GERNE.check_sweep({"hparams.c": 1.0}, {"hparams.beta": {"choice": [2.0, 3.0]}}, lambda train: run)


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
                  "swept.train.group_tau": tau, **{f"swept.hparams.{k}": v for k, v in swept.items()},
                  "hparams.c": "0.5", **{f"hparams.{k}": v for k, v in swept.items()}}
        sel = select if select != "None" else "val_wga"
        return {"params": params, "metrics": {f"best_{sel}": val, "test_wga": wga, "test_bca": bca}}

    runs = [
        # GERNE, tau 0.1: beta 1 has the best *mean* val WGA (0.7 > 0.65) though beta 2 has the best single run (0.9)
        run("gerne", "0.1", 0, 0.6, 0.5, 0.8, beta="1.0"), run("gerne", "0.1", 1, 0.8, 0.7, 0.9, beta="1.0"),
        run("gerne", "0.1", 0, 0.9, 0.1, 0.3, beta="2.0"), run("gerne", "0.1", 1, 0.4, 0.2, 0.4, beta="2.0"),
        run("gerne", "0.03", 0, 0.5, 0.25, 0.75, beta="1.0"),
        # resampling (c = 1, beta = 0): its own row, and a GERNE setting too (its mean val WGA 0.5 loses to beta 1's)
        *(run("gerne", "0.1", s, 0.5, w, 0.6, beta="0.0", c="1.0") for s, w in ((0, 0.3), (1, 0.5))),
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
        # WGA 30, 50 -> 40 ± sqrt(200) = 14.14; BCA 60, 60 -> 60 ± 0
        ("Resampling", "WGA"): {"WGA (tau=0.1)": "40.00 ± 14.14", "BCA (tau=0.1)": "60.00 ± 0.00",
                                "WGA (tau=0.03)": "-", "BCA (tau=0.03)": "-"},
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
    assert set(printed) == {("ERM", "BCA"), ("ERM", "WGA"), ("Resampling", "WGA"), ("GERNE", "WGA")}
    resampled = [r for r in finished if r.data.params["method"] == "gerne"
                 and float(r.data.params["hparams.c"]) == 1.0 and float(r.data.params["hparams.beta"]) == 0.0]
    if not resampled:  # this sweep drew no c = 1, beta = 0 trial: the resampling row is empty
        assert set(printed.pop(("Resampling", "WGA")).values()) == {"-"}
    for (label, metric), row in printed.items():
        method, sel = label.lower(), f"val_{metric.lower()}"
        assert set(row) == {f"{m} (tau={t:g})" for t in taus for m in ("WGA", "BCA")}
        for tau in taus:
            settings: dict = {}
            for r in finished:
                p = r.data.params
                run_sel = p["select"] if p["select"] != "None" else {"gerne": "val_wga", "erm": "val_bca"}[p["method"]]
                resampling = p["method"] == "gerne" and float(p["hparams.c"]) == 1.0 and float(p["hparams.beta"]) == 0.0
                if (p["method"] == method or (method == "resampling" and resampling)) and float(p["group_tau"]) == tau \
                        and run_sel == sel:
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


def test_sweep_keeps_only_betas_inside_the_bound_of_its_data(tile_table, capsys):
    """``run_sweep``'s check before any trial: gerne.yaml's beta choices past the smallest Eq. 9 bound over its
    c and tau choices are dropped, the bound computed here from ``report.group_counts`` (another reader)."""
    from histoweak.report import group_counts
    from histoweak.tune import check_sweep_data, load_search_space

    space = load_search_space(str(REPO / "search_spaces" / "gerne.yaml"))
    betas = space.params["hparams.beta"]["choice"]
    bound = min(beta_bound(group_counts(str(tile_table), "class:1", 5, tau)["train"], c)
                for tau in space.params["train.group_tau"]["choice"] for c in space.params["hparams.c"]["choice"])
    checked = check_sweep_data(space, str(tile_table), 5)
    assert checked.params["hparams.beta"] == {"choice": [b for b in betas if b <= bound]}
    assert 0.0 in checked.params["hparams.beta"]["choice"]  # beta = 0 is never past the bound
    out = capsys.readouterr().out
    assert ("dropped: beyond the bound" in out) == (max(betas) > bound)
    assert checked.params["hparams.lr"] == space.params["hparams.lr"]  # the rest of the space is untouched
