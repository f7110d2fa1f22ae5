"""A sweep resumes only itself: same search space (after overrides), same data, same code.

Against a real finished sweep (Ray Tune + Ray Train on a local Ray, MLflow in SQLite), run through
`histoweak tune` as a user runs it.
"""

import contextlib
import io
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from mlflow.tracking import MlflowClient

from histoweak import tracking
from histoweak.cli import main
from histoweak.report import format_leaderboard
from histoweak.tune import leaderboard, load_search_space, plan_sweep

REPO = Path(__file__).resolve().parents[1]
NAME = "erm-ident"


def _space(path: Path, **changes) -> Path:
    raw = yaml.safe_load((REPO / "search_spaces" / "erm.yaml").read_text())
    raw.update(name=NAME, num_samples=1, scheduler={"type": "fifo"},
               train={"epochs": 1, "steps_per_epoch": 2, "batch_size": 8, "target": "class:1"})
    raw.update(changes)
    path.write_text(yaml.safe_dump(raw))
    return path


def _tune(*args: str, store: str) -> str:
    """`histoweak tune ...` in this process (Ray is already up); returns what it printed."""
    out = io.StringIO()
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = store
    try:
        with contextlib.redirect_stdout(out):
            code = main(["tune", *args, "--no-progress"])
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI") if old is None else os.environ.__setitem__("MLFLOW_TRACKING_URI", old)
    assert code == 0, out.getvalue()
    return out.getvalue()


def sweeps(store: str, name: str = NAME) -> dict[str, list]:
    """Top-level sweep runs of experiment ``name`` -> their child runs."""
    client = MlflowClient(store)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return {p.info.run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
            for p in runs if "mlflow.parentRunId" not in p.data.tags}


@pytest.fixture(scope="module")
def finished(tile_table, ray_local, tmp_path_factory):
    """One finished 1-trial sweep; returns its paths and the store it was recorded in."""
    d = tmp_path_factory.mktemp("ident")
    space, storage, store = _space(d / "space.yaml"), d / "rr", f"sqlite:///{d / 'a.db'}"
    printed = _tune(str(space), "--data", str(tile_table), "--storage", str(storage), store=store)
    assert "new sweep" in printed
    plan = plan_sweep(load_search_space(space), str(tile_table), storage)
    assert plan.resume
    return SimpleNamespace(dir=d, space=space, storage=storage, store=store, table=tile_table, sweep_dir=plan.directory)


def test_unchanged_rerun_resumes_and_runs_no_trial_twice(finished):
    before = sweeps(finished.store)
    printed = _tune(str(finished.space), "--data", str(finished.table), "--storage", str(finished.storage),
                    store=finished.store)
    assert "resuming sweep" in printed and finished.sweep_dir.name in printed
    after = sweeps(finished.store)
    assert list(after) == list(before)  # logged into its original sweep run
    assert [len(c) for c in after.values()] == [1]  # the trial was not run again
    assert len([p for p in (finished.sweep_dir).iterdir() if p.name.startswith("trial_")]) == 1


@pytest.fixture(scope="module")
def other_table(finished, tmp_path_factory):
    """The same tile table with one Parquet file fewer: other data."""
    other = tmp_path_factory.mktemp("other") / "tiles"
    shutil.copytree(finished.table, other)
    next(iter(sorted(other.rglob("*.parquet")))).unlink()
    return other


@pytest.mark.parametrize("change,differs", [
    ("override", "search space"), ("seeds", "search space"), ("edited_yaml", "search space"), ("data", "data")])
def test_any_change_is_a_new_sweep_that_says_what_differs(finished, other_table, change, differs, tmp_path):
    space, table = load_search_space(finished.space), str(finished.table)
    if change == "override":  # --set hparams.lr=1e-3
        space = space.with_overrides({"hparams.lr": 1e-3})
    elif change == "seeds":  # --seeds 2
        space = space.with_params({"train.seed": {"grid": [0, 1]}})
    elif change == "edited_yaml":
        space = load_search_space(_space(tmp_path / "space.yaml", params={
            "hparams.lr": {"loguniform": [1.0e-4, 3.0e-3]}, "hparams.weight_decay": {"choice": [0.0, 0.01]}}))
    else:
        table = str(other_table)
    plan = plan_sweep(space, table, finished.storage)
    assert not plan.resume and not plan.restart
    assert plan.directory != finished.sweep_dir and plan.directory.parent == finished.sweep_dir.parent
    assert f"not resuming {finished.sweep_dir.name}: its {differs}" in plan.message
    assert plan_sweep(load_search_space(finished.space), str(finished.table), finished.storage).resume


def test_code_version_follows_the_package_source(tmp_path):
    pkg = Path(tracking.__file__).parent
    copy = tmp_path / "histoweak"
    shutil.copytree(pkg, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert tracking.code_version(copy) == tracking.code_version()
    (copy / "metrics.py").write_text((copy / "metrics.py").read_text() + "\n# changed\n")
    assert tracking.code_version(copy) != tracking.code_version()


def test_dataset_hash_is_computed_from_the_table(finished, other_table, tmp_path):
    h = tracking.dataset_hash(finished.table)
    assert h != "unknown" and h == tracking.dataset_hash(str(finished.table) + "/")
    assert h == tracking.dataset_hash(Path(finished.table).as_uri())  # the same table through a URI
    assert tracking.dataset_hash(other_table) != h
    same = tmp_path / "same"
    shutil.copytree(finished.table, same)
    assert tracking.dataset_hash(same) == h  # content, not location
    assert tracking.dataset_hash(tmp_path / "missing") == "unknown"


@pytest.mark.slow  # trains one more trial; the decision itself is tested in the default suite
def test_other_data_runs_a_new_sweep_on_that_data(finished, other_table):
    before = sweeps(finished.store)
    printed = _tune(str(finished.space), "--data", str(other_table), "--storage", str(finished.storage),
                    store=finished.store)
    assert f"not resuming {finished.sweep_dir.name}: its data differs" in printed
    after = sweeps(finished.store)
    new = [rid for rid in after if rid not in before]
    assert len(new) == 1 and len(after[new[0]]) == 1
    run = MlflowClient(finished.store).get_run(new[0])
    assert run.data.tags["dataset"] == str(other_table)
    assert run.data.tags["dataset_hash"] == tracking.dataset_hash(other_table)
    assert after[new[0]][0].info.status == "FINISHED"


def test_other_store_gets_the_finished_trials_from_ray_records(finished):
    store_b = f"sqlite:///{finished.dir / 'b.db'}"
    before_a = sweeps(finished.store)
    printed = _tune(str(finished.space), "--data", str(finished.table), "--storage", str(finished.storage),
                    store=store_b)
    assert "resuming sweep" in printed and finished.store in printed and store_b in printed
    assert {k: len(v) for k, v in sweeps(finished.store).items()} == {k: len(v) for k, v in before_a.items()}
    (parent, children), = sweeps(store_b).items()
    assert len(children) == 1  # copied, not rerun: a rerun trial would log a run of its own
    child = children[0]
    assert child.data.tags["copied_from_store"] == finished.store
    assert child.info.status == "FINISHED"
    assert math.isfinite(child.data.metrics["test_bca"]) and "best_val_bca" in child.data.metrics
    assert "swept.hparams.lr" in child.data.params
    history = MlflowClient(store_b).get_metric_history(child.info.run_id, "val_bca")
    assert [m.step for m in history] == [0]
    assert "leaderboard.csv" in {a.path for a in MlflowClient(store_b).list_artifacts(parent)}


@pytest.mark.slow  # trains one more trial; the decision itself is tested in the default suite
def test_restart_runs_the_same_sweep_afresh(finished):
    before = sweeps(finished.store)
    printed = _tune(str(finished.space), "--data", str(finished.table), "--storage", str(finished.storage),
                    "--restart", store=finished.store)
    assert f"--restart: starting sweep {finished.sweep_dir.name} afresh" in printed
    after = sweeps(finished.store)
    new = [rid for rid in after if rid not in before]
    assert len(new) == 1 and len(after[new[0]]) == 1
    assert "copied_from_store" not in after[new[0]][0].data.tags  # trained again


def _result(trial_id, score, **config):
    return SimpleNamespace(metrics={"trial_id": trial_id, "best_val_loss": score, "test_bca": 0.5},
                           config=config, path=f"/x/trial_{trial_id}_0")


def test_leaderboard_ranks_nan_last_in_either_mode():
    from histoweak.tune import SearchSpace

    grid = [_result("a", float("nan")), _result("b", 0.3), _result("c", 0.1)]
    for mode, order in (("min", ["trial_c", "trial_b", "trial_a"]), ("max", ["trial_b", "trial_c", "trial_a"])):
        space = SearchSpace(name="s", method="erm", metric="val_loss", mode=mode)
        assert [r["trial"] for r in leaderboard(grid, space)] == order


def test_leaderboard_fits_100_columns_and_keeps_the_values():
    swept = [f"swept.hparams.param_{i}" for i in range(12)]
    rows = [{"trial": f"trial_abcde_0000{i}", **{k: 0.123456789 * (i + 1) for k in swept},
             "best_val_bca": 0.9 - i / 10, "test_bca": 0.8, "test_wga": 0.7} for i in range(3)]
    text = format_leaderboard(rows, "best_val_bca", swept, ("test_bca", "test_wga", "test_auroc"))
    lines = text.splitlines()
    assert max(map(len, lines)) <= 100
    header = lines[0].split()
    assert header[:2] == ["#", "trial"] and "best_val_bca" in header  # the score is never dropped
    assert "test_auroc" not in header  # no run has it
    assert lines[1].split()[1] == "abcde_00000" and lines[1].split()[header.index("best_val_bca")] == "0.9"
    assert lines[-1].startswith("(") and "more column" in lines[-1]
