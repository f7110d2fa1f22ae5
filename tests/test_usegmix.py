"""USegMix on the platform: the trial's training rows (originals + the first n synthetic tiles per class), the
search space's `before:` section, derived tables through Ray Data, the DDPM trained by Ray Train and used to
inpaint, and `jobs/tune_usegmix.py --smoke-test` end to end in MLflow, then `histoweak report --usegmix`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from histoweak.methods.base import RunInfo, TableSlice

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def grades_table(tmp_path_factory) -> Path:
    """The embedded ordinal-grade dataset, small: 8 / 4 / 4 tiles per class and split, in BN-WD-MD-PD order."""
    from histoweak.data.sources import convert_source
    from histoweak.data.synthetic_grades import GRADES, write_grade_dataset

    root = tmp_path_factory.mktemp("grades")
    write_grade_dataset(root / "images", n_train=8, n_val=4, n_test=4, size=64, seed=1)
    convert_source("folder", root / "images", root / "tiles", classes=list(GRADES))
    return root / "tiles"


def _synthetic_table(path: Path, per_class: int, n_classes: int = 4) -> Path:
    from histoweak.data.schema import SCHEMA

    path.mkdir(parents=True)
    rows = [{"slide_id": f"usegmix-c{c}", "source": "usegmix", "split": "train", "x": r, "y": 0, "level": 0,
             "downsample": 1.0, "size": 8, "image": b"", "mask": None, "labels": None, "label": c,
             "tissue_ratio": 1.0, "class_ratios": None, "group": None, "mpp": None}
            for c in range(n_classes) for r in range(per_class)]
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path / "part.parquet", row_group_size=5)
    (path / "_manifest.json").write_text(json.dumps({"counts": {"per_class": {c: per_class for c in range(n_classes)}}}))
    return path


def test_data_plan_adds_the_first_n_synthetic_tiles_per_class(tmp_path):
    from histoweak.data.streaming import _read_decode_fn
    from histoweak.methods.usegmix import USegMix

    table = _synthetic_table(tmp_path / "synth", per_class=6)
    run = RunInfo("multiclass", 4)
    assert USegMix.data_plan(USegMix.Hparams(synthetic_per_class=0), run).more_train == ()
    plan = USegMix.data_plan(USegMix.Hparams(synthetic_per_class=4, synthetic_table=str(table)), run)
    assert plan.more_train == (TableSlice(str(table), "x", 4),) and plan.state["synthetic_rows"] == 16
    # the read filter the stream applies to that slice, run as a Ray Data task would (no Ray needed)
    units = pa.Table.from_pylist([{"path": str(table / "part.parquet"), "start": 0, "stop": 5, "column": "x",
                                   "below": 4.0}])
    rows = pa.concat_tables(list(_read_decode_fn(["label", "split"], ["train"], decode=False)(units)))
    assert rows.column_names == ["label", "split"]  # the filter column is not passed on
    assert sorted(rows.column("label").to_pylist()) == sorted([0, 1, 2, 3] * 4)
    with pytest.raises(ValueError, match="fewer than 7 synthetic tiles"):
        USegMix.data_plan(USegMix.Hparams(synthetic_per_class=7, synthetic_table=str(table)), run)
    with pytest.raises(ValueError, match="needs hparams.synthetic_table"):
        USegMix.data_plan(USegMix.Hparams(synthetic_per_class=2), run)


@pytest.mark.parametrize("before,message", [
    ({"segmenter": "nope"}, r"'before': segmenter 'nope': valid \['classical', 'litemedsam', 'sam'\]"),
    ({"segmenter": "sam"}, r"segmenter sam needs segmenter_weights"),
    ({"inpainter": "diffusion"}, r"inpainter diffusion needs inpainter_model"),
    ({"count": 0}, r"count must be an integer >= 1"),
    ({"ratio": [0.5, 0.2]}, r"ratio must be \[low, high\]"),
    ({"prompt": 3}, r"'before.prompt': unknown; valid: \[.*'prompts'"),
])
def test_bad_before_section_fails_naming_the_key(tmp_path, before, message):
    import yaml

    from histoweak.tune import load_search_space

    raw = yaml.safe_load((REPO / "search_spaces" / "usegmix.yaml").read_text())
    raw["before"] = {**raw["before"], **before}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=message):
        load_search_space(path)


class _Echo:
    """A derived-table mapper: one row per input item, tagged with its part."""

    def __init__(self, scale: int):
        self.scale = scale

    def __call__(self, batch: dict) -> pa.Table:
        return pa.table({"part": [f"p{int(v)}" for v in batch["v"]], "w": [int(v) * self.scale for v in batch["v"]]})


def test_derive_table_writes_one_file_per_part(ray_local, tmp_path):
    import ray.cloudpickle

    from histoweak.data.streaming import derive_table

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module

    n = derive_table([{"v": v} for v in range(3)], tmp_path / "out", _Echo, {"scale": 10}, batch_size=1,
                     part_column="part", concurrency=2)
    assert n == 3 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p0.parquet", "p1.parquet", "p2.parquet"]
    assert pq.read_table(tmp_path / "out" / "p2.parquet").column("w").to_pylist() == [20]
    n = derive_table([{"v": v} for v in range(4)], tmp_path / "one.parquet", _Echo, {"scale": 1}, concurrency=1)
    assert n == 4 and sorted(pq.read_table(tmp_path / "one.parquet").column("w").to_pylist()) == [0, 1, 2, 3]


def test_ddpm_trained_by_ray_train_inpaints_only_inside_the_mask(ray_local, grades_table, tmp_path):
    """The inpainter's DDPM goes through the platform's `fit` like any method; its checkpoint loads as a
    diffusion inpainter that changes the masked pixels and none other."""
    from histoweak.methods.usegmix.inpaint import DiffusionInpainter
    from histoweak.train import TrainConfig, fit

    cfg = TrainConfig(method="ddpm", target="label", epochs=2, steps_per_epoch=2, batch_size=4, augment=False,
                      hparams={"sample_size": 32, "block_out_channels": [16, 32, 32]}, name="ddpm-test",
                      storage_path=str(tmp_path / "ray"))
    out = fit(cfg, str(grades_table), 4)
    assert np.isfinite(out.best["val_loss"]) and np.isfinite(out.test["test_loss"])
    inpainter = DiffusionInpainter.from_pretrained(out.checkpoint, scheduler_steps=3, jump_length=1, jump_n_sample=1)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[20:40, 10:30] = True
    result = inpainter.inpaint(image, mask, seed=0)
    assert np.array_equal(result[~mask], image[~mask])
    assert not np.array_equal(result[mask], image[mask])


def test_smoke_job_builds_pool_and_synthetic_tiles_then_sweeps_in_mlflow(grades_table, tmp_path):
    """`jobs/tune_usegmix.py --smoke-test` (classical segmenter, biharmonic inpainting): the pool and the
    synthetic tiles made once by Ray Data before the trial, figures and rates on the sweep's run, the trial
    trained on originals + 4 synthetic tiles per class; then `histoweak report --usegmix`."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "tune_usegmix.py"), "--smoke-test", "--data",
                           str(grades_table), "--storage", str(tmp_path / "ray"), "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("usegmix").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    trial = next(r for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert {"usegmix_phase1.png", "usegmix_phase2.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.metrics["usegmix_pool_segments"] > 0 and parent.data.metrics["usegmix_synthesis_images_per_s"] > 0
    synth = Path(parent.data.params["before.synthetic_table"])
    assert trial.info.status == "FINISHED" and trial.data.params["data.synthetic_rows"] == "16"
    assert {"test_acc", "test_f1_macro", "test_kappa"} <= set(trial.data.metrics)
    # the synthetic table: 4 tiles per class, ranked 0..3, with provenance of a real target tile of that class
    rows = pq.read_table(synth, columns=["slide_id", "x", "label", "provenance", "split"]).to_pylist()
    assert sorted((r["label"], r["x"]) for r in rows) == [(c, x) for c in range(4) for x in range(4)]
    targets = pq.read_table(grades_table, columns=["slide_id", "label", "split"]).to_pylist()
    by_slide = {t["slide_id"]: t["label"] for t in targets if t["split"] == "train"}
    for r in rows:
        prov = json.loads(r["provenance"])
        assert r["split"] == "train" and prov["backend"] == "biharmonic"
        assert by_slide[prov["target_tile"].split(":")[0]] == r["label"]
        assert prov["replaced"] and (not prov["ok"] or 0.3 <= prov["new_area_ratio"] <= 1.0)
        # replacements come from other tiles (a segment's own copy in the pool is at distance 0 from it)
        assert all(new.split("#")[0] != prov["target_tile"] for _, new in prov["replaced"]), prov
    report = subprocess.run([sys.executable, "-m", "histoweak.cli", "report", "--usegmix"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    assert "tf_efficientnet_lite0" in report.stdout and "Kappa" in report.stdout
