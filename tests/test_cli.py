"""The `histoweak` commands and jobs as a user runs them: errors, synth, import, train --config, analyze, --set/--seeds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pyarrow.parquet as pq
import pytest

from histoweak.cli import build_parser, space_from_args
from histoweak.tune import n_trials

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "histoweak.cli"]


def _run(cmd, cwd, timeout=120, **env):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env={**os.environ, **env})


@pytest.mark.parametrize("cmd,message", [
    ([sys.executable, str(REPO / "jobs" / "tune_erm.py"), str(REPO / "search_spaces" / "erm.yaml"), "--data",
      "/missing/tiles", "--smoke-test"], "tune_erm: error: /missing/tiles: no such tile table"),
    ([sys.executable, str(REPO / "jobs" / "tune_gerne.py"), "--data", "/missing/tiles", "--smoke-test"],
     "tune_gerne: error: /missing/tiles: no such tile table"),
    ([*CLI, "train", "--data", "/missing/tiles", "--smoke-test"], "histoweak train: error: /missing/tiles: no such"),
    ([*CLI, "analyze", "--data", "/missing/tiles"], "histoweak analyze: error: /missing/tiles: no such"),
    ([*CLI, "tune", str(REPO / "search_spaces" / "erm.yaml"), "--data", "synthetic:nope"],
     "histoweak tune: error: --data synthetic:nope: unknown synthetic preset; valid: synthetic:camelyon"),
    ([*CLI, "tune", str(REPO / "search_spaces" / "erm.yaml"), "--data", "EMPTY"],
     "_manifest.json: not a histoweak tile table (no manifest)"),
    ([*CLI, "tile", "/missing/slides.csv", "OUT"], "histoweak tile: error: /missing/slides.csv"),
])
def test_a_wrong_path_is_one_error_line_and_exit_2_before_any_work(tmp_path, cmd, message):
    (tmp_path / "EMPTY").mkdir()
    proc = _run(cmd, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / ".cache").exists() and not (tmp_path / "mlruns.db").exists()  # nothing started


def test_set_and_seeds_build_the_swept_space():
    args = build_parser().parse_args(["tune", str(REPO / "search_spaces" / "erm.yaml"), "--smoke-test",
                                      "--set", "hparams.lr=1e-3", "--set", "train.epochs=5", "--seeds", "3"])
    space = space_from_args(args)
    assert space.hparams["lr"] == 1e-3 and "hparams.lr" not in space.params  # fixed, no longer swept
    assert space.train["epochs"] == 5 and space.train["steps_per_epoch"] == 2  # --set wins over smoke:
    assert space.params["train.seed"] == {"grid": [0, 1, 2]}
    assert n_trials(space) == 2 * 3  # smoke's num_samples x the seeds
    for bad, message in ((["--set", "hparams.lr"], "use <key>=<value>"), (["--set", "hparams.depth=3"], "depth"),
                         (["--seeds", "0"], "--seeds 0: must be >= 1")):
        args = build_parser().parse_args(["tune", str(REPO / "search_spaces" / "erm.yaml"), *bad])
        with pytest.raises(ValueError, match=message):
            space_from_args(args)


def test_synth_writes_slides_openslide_reads(tmp_path):
    proc = _run([*CLI, "synth", str(tmp_path / "s"), "--preset", "tiny", "--n-slides", "2", "--size", "1024"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = (tmp_path / "s" / "slides.csv").read_text().splitlines()
    assert rows[0].startswith("slide_id,path") and len(rows) == 3
    classes = json.loads((tmp_path / "s" / "classes.json").read_text())
    assert classes["0"] == "background" and len(classes) >= 3
    for line in rows[1:]:
        _, path, mask, _, _ = line.split(",")  # paths relative to the CSV
        slide = openslide.OpenSlide(tmp_path / "s" / path)
        assert slide.dimensions == (1024, 1024) and slide.level_count >= 2
        labels = np.unique(np.asarray(openslide.ImageSlide(str(tmp_path / "s" / mask)).read_region(
            (0, 0), 0, (1024, 1024)).convert("L")))
        assert set(labels) <= {int(k) for k in classes} and len(labels) >= 2  # a class-index mask


def test_import_through_the_cli(tmp_path):
    from test_sources import build

    build(tmp_path / "data", "luad-histoseg")
    proc = _run([*CLI, "import", "luad-histoseg", str(tmp_path / "data"), str(tmp_path / "out")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert pq.read_table(tmp_path / "out").num_rows == 6
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text())["source"] == "luad-histoseg"
    again = _run([*CLI, "import", "luad-histoseg", str(tmp_path / "nowhere"), str(tmp_path / "out2")], tmp_path)
    assert again.returncode == 2 and again.stderr.count("error:") == 1 and "nowhere" in again.stderr


@pytest.mark.slow  # 127 s on 2 cores: `make test-all` (room for USegMix's job in `make test`)
def test_train_with_config_and_smoke_test_then_analyze_its_checkpoint(tile_table, tmp_path):
    """`histoweak train --config cfg.yaml --smoke-test --verbose`, then `histoweak analyze --checkpoint` on its result."""
    from mlflow.tracking import MlflowClient

    from histoweak._ray import CONSOLE_ENV

    (tmp_path / "cfg.yaml").write_text("method: erm\nseed: 7\ngroup_tau: 0.1\nhparams: {weight_decay: 0.01}\n")
    env = {k: v for k, v in os.environ.items() if k not in CONSOLE_ENV}  # as in a fresh shell
    store = f"sqlite:///{tmp_path / 'm.db'}"
    proc = subprocess.run([*CLI, "train", "--config", str(tmp_path / "cfg.yaml"), "--smoke-test", "--verbose",
                           "--data", str(tile_table)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**env, "MLFLOW_TRACKING_URI": store})
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert "Execution plan of Dataset" in console and "Reporting training result" in console  # --verbose
    ckpt = Path(proc.stdout.split("best erm checkpoint: ")[1].split()[0])
    saved = json.loads((ckpt / "config.json").read_text())["train"]
    assert (saved["seed"], saved["group_tau"], saved["hparams"]["weight_decay"]) == (7, 0.1, 0.01)  # --config
    assert (saved["epochs"], saved["steps_per_epoch"], saved["batch_size"]) == (1, 2, 8)  # --smoke-test
    assert "test_wga" in proc.stdout  # groups from the config's group_tau

    out = tmp_path / "analysis"
    proc = _run([*CLI, "analyze", "--data", str(tile_table), "--tau", "0.1", "--checkpoint", str(ckpt),
                 "--out", str(out)], tmp_path, timeout=600, MLFLOW_TRACKING_URI=store)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # tiles per group, computed here from the table itself: group = 2 * [tumour present] + [tissue >= 0.1]
    t = pq.read_table(tile_table, columns=["split", "labels", "tissue_ratio"]).to_pydict()
    groups = 2 * (np.array(t["labels"])[:, 1] > 0) + (np.array(t["tissue_ratio"]) >= 0.1)
    for split in ("train", "val", "test"):
        line = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith(split))
        expected = [int(((np.array(t["split"]) == split) & (groups == g)).sum()) for g in range(4)]
        assert [int(v) for v in line.split()[1:5]] == expected, line
    wga = float(proc.stdout.split("test WGA ")[1].split(",")[0])
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("shortcut-analysis").experiment_id])
    assert run.data.metrics["test_wga"] == pytest.approx(wga, abs=1e-4)
    assert {p.name for p in out.iterdir()} == {"group_counts.png", "shortcut_analysis.png"}
