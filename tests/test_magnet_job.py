"""MagNets on the platform: `jobs/tune_magnet.py --smoke-test` on a slide table, nested in MLflow with AUROC per
size class, pixels read and the zoom-path figure of every test slide, then `histoweak report --magnet`; a method
given the wrong kind of table fails before any work; Table 1's layout from hand-made runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from histoweak.report import format_magnet_table, magnet_cells

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slide_table(tmp_path_factory) -> Path:
    """8 small synthetic camelyon slides (both labels in every split) as a slide table."""
    from histoweak.data.slide_table import slide_table_from_csv
    from histoweak.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("camelyon")
    csv = synthesize(root / "slides", "camelyon", n_slides=8, size=1024)
    slide_table_from_csv(csv, root / "table", source="synthetic-camelyon")
    return root / "table"


@pytest.mark.slow  # 82 s on 2 cores: `make test-all` (with MagNet through Ray Train in test_distributed); test_magnet.py checks its steps
def test_smoke_job_sweeps_in_mlflow_with_auroc_pixels_and_zoom_paths(slide_table, tmp_path):
    from mlflow.tracking import MlflowClient

    from histoweak.data.slide_table import read_slide_table

    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "tune_magnet.py"), "--smoke-test", "--data",
                           str(slide_table), "--storage", str(tmp_path / "ray"), "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("magnet").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    trial = next(r for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert trial.data.tags["mlflow.parentRunId"] == parent.info.run_id and trial.info.status == "FINISHED"
    m = trial.data.metrics
    assert 0.0 <= m["test_auroc"] <= 1.0 and "test_auroc_macro_micro" in m
    # every test slide was read, and by less than the whole slide at level 0 (1024 x 1024 px) per read
    assert m["test_pixels_read_per_slide"] > 0 and m["test_tiling_pixels_per_slide"] > 0
    test_ids = {r["slide_id"] for r in read_slide_table(slide_table) if r["split"] == "test"}
    artifacts = {a.path for a in client.list_artifacts(trial.info.run_id)}
    assert {f"magnet_zoom_{s}.png" for s in test_ids} <= artifacts
    assert {"test_auroc_by_size_class.png", "test_pixels_read.png"} <= artifacts
    assert "slide_counts" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    report = subprocess.run([sys.executable, "-m", "histoweak.cli", "report", "--magnet"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    assert "2-layer MagNet (P = 2" in report.stdout and "Macro & Micro" in report.stdout


@pytest.mark.parametrize("method, want", [("erm", "a tile table"), ("magnet", "a slide table")])
def test_a_method_given_the_other_kind_of_table_fails_before_any_work(slide_table, tmp_path, method, want):
    """ERM on a slide table and MagNet on a tile table fail naming the table, before Ray starts."""
    from histoweak.train import check_table
    from histoweak.methods import METHODS

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    (tiles / "_manifest.json").write_text('{"classes": ["background", "tumor"]}')  # a tile table's manifest
    table = slide_table if method == "erm" else tiles
    with pytest.raises(ValueError, match=f"{table}: a (slides|tiles) table, but method '{method}' trains on {want}"):
        check_table(METHODS[method], str(table))


def test_table1_layout_from_runs():
    def run(method, seed_auc, **hp):
        return {"params": {"method": method, **{f"hparams.{k}": str(v) for k, v in hp.items()}},
                "metrics": {"test_auroc": seed_auc, "test_auroc_macro": 0.9, "test_auroc_micro": 0.6,
                            "test_auroc_itc": 0.5, "test_auroc_macro_micro": 0.75,
                            "test_pixels_read_per_slide": 2.0e5, "test_tiling_pixels_per_slide": 4.0e6,
                            "test_pixels_ratio": 20.0, "test_seconds_per_slide": 0.5}}

    runs = [run("magnet", 0.70, layers=3, patches=2, sampler="lms"), run("magnet", 0.80, layers=3, patches=2,
                                                                          sampler="lms"),
            run("mean_rgb", 0.55), run("erm", 0.9)]  # a tile method's run is not a row
    cells = magnet_cells(runs)
    assert set(cells) == {"3-layer MagNet (P = 2, lms)", "Mean RGB baseline"}
    table = format_magnet_table(cells).splitlines()
    assert table[0].split()[:4] == ["Model", "Macro", "Micro", "ITC"]
    assert table[1].startswith("Mean RGB baseline")  # baselines first, as in the paper
    # All: mean ± sample std of 70 and 80 = 75 ± 7 (std 7.07); the ratio column to one decimal
    assert "75 ± 7" in table[2] and "20.0 ± 0.0" in table[2] and "2e+05" in table[2]


def test_slides_command_writes_a_table_and_reports_the_slide_it_cannot_open(tmp_path):
    """`histoweak slides csv`: the readable slides are written, a garbage file is named with its problem, exit 1."""
    from histoweak.data.slide_table import read_slide_table
    from histoweak.data.synthetic import write_pyramid
    import numpy as np

    write_pyramid(tmp_path / "a.tiff", np.full((512, 512, 3), 200, np.uint8), mpp=0.5)
    (tmp_path / "b.tiff").write_bytes(b"not a slide" * 100)
    (tmp_path / "slides.csv").write_text("slide_id,path,label,split,size_class\n"
                                         "a,a.tiff,0,train,negative\nb,b.tiff,1,test,micro\n")
    proc = subprocess.run([sys.executable, "-m", "histoweak.cli", "slides", "csv", str(tmp_path / "table"), "--csv",
                           str(tmp_path / "slides.csv")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 slides ->" in proc.stdout and "b.tiff" in proc.stderr
    rows = read_slide_table(tmp_path / "table")
    assert [(r["slide_id"], r["width"], r["size_class"]) for r in rows] == [("a", 512, "negative")]
