"""Storage every node sees: tile tables, Ray Tune/Train storage and MLflow artifacts on S3.

Against a real S3 API server on 127.0.0.1 (moto's server mode) and a real MLflow server whose artifacts
go to it, driven through `histoweak tile` and `histoweak tune` in processes of their own, as a user
runs them: the credentials and the endpoint reach them (and their Ray workers) only through the
environment.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from histoweak.cli import main

from test_sweep_identity import sweeps
from _s3 import ACCESS_KEY, SECRET_KEY, driver_env, start_mlflow_s3, start_s3

REPO = Path(__file__).resolve().parents[1]
HISTOWEAK = str(Path(sys.executable).parent / "histoweak")
SWEEP = "erm-s3"


@pytest.fixture
def s3_server(tmp_path):
    """moto's S3 server on 127.0.0.1 with the bucket ``histoweak``; stopped at the end."""
    s3 = start_s3(tmp_path)
    yield s3
    s3.server.stop()


def _run(cmd: list[str], env: dict, cwd: Path, timeout: float = 600) -> str:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, \
        f"{' '.join(cmd[:3])} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def _space(path: Path) -> Path:
    raw = yaml.safe_load((REPO / "search_spaces" / "erm.yaml").read_text())
    raw.update(name=SWEEP, num_samples=1, scheduler={"type": "fifo"},
               train={"epochs": 1, "steps_per_epoch": 2, "batch_size": 8, "target": "class:1"})
    path.write_text(yaml.safe_dump(raw))
    return path


def _rows(table) -> dict[str, dict]:
    """Tile key -> row, images and masks decoded to pixels."""
    from PIL import Image

    out = {}
    for row in table.to_pylist():
        for col in ("image", "mask"):
            if row[col] is not None:
                row[col] = np.asarray(Image.open(io.BytesIO(row[col])))
        out[f"{row['slide_id']}:{row['x']}:{row['y']}"] = row
    return out


def _assert_same_tiles(s3, prefix: str, local: Path) -> None:
    keys = [k for k in s3.keys(prefix + "/") if k.endswith(".parquet")]
    assert [k[len(prefix) + 1:] for k in keys] == sorted(str(p.relative_to(local)) for p in local.rglob("*.parquet"))
    fs = s3.filesystem()
    remote = _rows(pq.ParquetDataset([f"{s3.bucket}/{k}" for k in keys], filesystem=fs).read())
    here = _rows(pq.ParquetDataset(sorted(str(p) for p in local.rglob("*.parquet"))).read())
    assert remote.keys() == here.keys() and len(here) > 20
    for key, row in here.items():
        for col, value in row.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(remote[key][col], value, err_msg=f"{key} {col}")
            else:
                assert remote[key][col] == value, (key, col)


def test_tiles_sweep_checkpoints_and_figures_round_trip_through_s3(s3_server, synth_dir, tile_table, ray_local,
                                                                    tmp_path, monkeypatch):
    """Tile into S3, sweep with --storage s3://… logging to an MLflow server whose artifacts go to S3, rerun."""
    s3 = s3_server
    mlflow = start_mlflow_s3(tmp_path, s3)  # starts while the slides are tiled
    ray_tmp = Path(tempfile.mkdtemp(prefix="hw-s3-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    work = tmp_path / "work"
    work.mkdir()
    env = driver_env(s3, ray_tmp, mlflow.url)
    tiles, storage = s3.uri("tiles", "tiny"), s3.uri("ray-results")
    try:
        t0 = time.time()
        printed = _run([HISTOWEAK, "tile", str(synth_dir / "slides.csv"), tiles, "--tile-size", "128",
                        "--min-tissue", "0.3", "--tiles-per-shard", "16", "--source", "tiny", "--no-progress"],
                       env, work)
        t_tile = time.time() - t0
        assert f"-> {tiles} (manifest: {tiles}/_manifest.json)" in printed
        assert "tiles/tiny/_manifest.json" in s3.keys("tiles/")
        _assert_same_tiles(s3, "tiles/tiny", tile_table)  # the conftest table: the same slides tiled locally

        mlflow.wait_ready()
        cmd = [HISTOWEAK, "tune", str(_space(tmp_path / "space.yaml")), "--data", tiles, "--storage", storage,
               "--no-progress"]
        t0 = time.time()
        printed = _run(cmd, env, work)
        t_sweep = time.time() - t0
        assert "new sweep" in printed, printed
        (parent, children), = sweeps(mlflow.url, SWEEP).items()
        (child,) = children
        assert child.info.status == "FINISHED"

        # Ray Train's checkpoints are objects under the storage prefix, and the run records where
        best = child.data.tags["best_checkpoint"]
        assert best.startswith(f"{storage}/{SWEEP}-") and "/trials/" in best, best
        keys = s3.keys("ray-results/")
        assert f"{best[len(s3.uri()) + 1:]}/state.pt" in keys
        sweep_dir = best[:best.index("/trials/")]
        assert f"{sweep_dir[len(s3.uri()) + 1:]}/histoweak_sweep.json" in keys

        # the trial's figures went through the MLflow server into the bucket
        figures = [k for k in s3.keys("mlflow/") if k.endswith(".png")]
        assert any(k.endswith(f"{child.info.run_id}/artifacts/test_confusion_matrix.png") for k in figures), figures
        assert all(s3.read(k).startswith(b"\x89PNG") for k in figures)
        assert not list((work).rglob("*.png")) and not (tmp_path / "mlartifacts").exists()

        # the same command again resumes from S3: no trial runs twice. In this process, on the session's Ray
        # (about 20 s less than a driver of its own): a resume that runs no trial needs no Ray worker, only the
        # driver reads S3; a trial run again would fail on workers without the bucket's settings, and show.
        t0 = time.time()
        with monkeypatch.context() as m:
            for key, value in env.items():
                if key.startswith(("AWS_", "MLFLOW_TRACKING_URI")):
                    m.setenv(key, value)
            m.chdir(work)
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                assert main(cmd[1:]) == 0, printed.getvalue()
            printed = printed.getvalue()
        t_resume = time.time() - t0
        assert "resuming sweep" in printed and f"{sweep_dir}" in printed, printed
        after = sweeps(mlflow.url, SWEEP)
        assert list(after) == [parent] and [len(c) for c in after.values()] == [1]
        trials = f"{sweep_dir[len(s3.uri()) + 1:]}/trials/"
        trial_dirs = {k[len(trials):].split("/")[0] for k in s3.keys(trials)} - {""}  # "": pyarrow's directory marker
        assert trial_dirs == {child.info.run_name}

        # no credentials in anything written: the bucket's objects, MLflow's store, the driver's directory
        written = [s3.read(k) for k in s3.keys()] + [p.read_bytes() for p in (tmp_path / "mlflow.db", *work.rglob("*"))
                                                     if p.is_file()]
        for secret in (ACCESS_KEY, SECRET_KEY):
            assert not [b for b in written if secret.encode() in b], secret
        print(f"\nS3 round trip: tile {t_tile:.1f} s, sweep {t_sweep:.1f} s, resume {t_resume:.1f} s")
    finally:
        mlflow.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_credentials_in_a_location_are_refused_before_any_work(tmp_path):
    """Locations are recorded (manifest, sweep file, MLflow tags): one carrying a secret is refused, unechoed."""
    from histoweak import _storage
    from histoweak.data.tiling_job import tile_dataset
    from histoweak.slides.tiling import TilingParams
    from histoweak.tune import _store_key, load_search_space, plan_sweep

    space = load_search_space(_space(tmp_path / "space.yaml"))
    for uri in (f"s3://{ACCESS_KEY}:{SECRET_KEY}@bucket/tiles", f"s3://bucket/tiles?secret_key={SECRET_KEY}"):
        for attempt in (lambda: tile_dataset([], uri, TilingParams(), ["background", "tissue"], progress=False),
                        lambda: plan_sweep(space, str(tmp_path), uri),
                        lambda: plan_sweep(space, uri, tmp_path / "rr")):
            with pytest.raises(ValueError, match="credentials and options do not belong") as err:
                attempt()
            assert SECRET_KEY not in str(err.value) and ACCESS_KEY not in str(err.value)
    assert not (tmp_path / "rr").exists()
    assert _storage.check_location("s3://bucket/tiles/") == "s3://bucket/tiles"
    # the sweep file keys MLflow stores by their URI: a password in it stays out of the file
    assert _store_key(f"https://user:{SECRET_KEY}@mlflow.example.org:5000/x") == "https://mlflow.example.org:5000/x"
    assert _store_key("sqlite:////tmp/mlruns.db") == "sqlite:////tmp/mlruns.db"


@pytest.mark.slow  # a Train run whose worker is killed, restarted from its checkpoint in S3; then a rerun
def test_killed_worker_resumes_from_its_checkpoint_in_s3_and_a_rerun_trains_nothing(s3_server, tile_table, tmp_path):
    import pyarrow.fs as pafs
    from mlflow.tracking import MlflowClient

    s3 = s3_server
    mlflow = start_mlflow_s3(tmp_path, s3)
    ray_tmp = Path(tempfile.mkdtemp(prefix="hw-s3-", dir="/tmp"))
    marker = tmp_path / "killed"
    space = _space(tmp_path / "space.yaml")
    raw = yaml.safe_load(space.read_text())
    raw["train"].update(epochs=2, max_failures=1,
                        worker_env={"HISTOWEAK_FAULT_KILL_AT_EPOCH": "1", "HISTOWEAK_FAULT_MARKER": str(marker)})
    space.write_text(yaml.safe_dump(raw))
    pafs.copy_files(str(tile_table), f"{s3.bucket}/tiles/tiny", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3.filesystem())
    try:
        mlflow.wait_ready()
        cmd = [HISTOWEAK, "tune", str(space), "--data", s3.uri("tiles", "tiny"), "--storage", s3.uri("ray-results"),
               "--no-progress"]
        _run(cmd, driver_env(s3, ray_tmp, mlflow.url), tmp_path)
        assert marker.exists()  # the worker process really was killed (SIGKILL) at epoch 1
        (_, (child,)), = sweeps(mlflow.url, SWEEP).items()
        assert child.info.status == "FINISHED"
        client = MlflowClient(mlflow.url)
        # restarted from epoch 0's checkpoint, downloaded from S3: epoch 0 ran once, epoch 1 after the restart
        assert [m.value for m in client.get_metric_history(child.info.run_id, "resumed_from_epoch")][-1] == 1
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_bca")] == [0, 1]
        assert child.data.tags["best_checkpoint"].startswith(s3.uri("ray-results") + "/")
        # rerun by a driver of its own, as a user reruns it: resumed from S3, nothing trained again
        assert "resuming sweep" in _run(cmd, driver_env(s3, ray_tmp, mlflow.url), tmp_path)
        assert [len(c) for c in sweeps(mlflow.url, SWEEP).values()] == [1]
    finally:
        mlflow.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow  # a tiling driver of its own
def test_tiling_into_s3_resumes_and_removes_a_failed_slides_objects(s3_server, synth_dir, tile_table, tmp_path):
    """The tiling job's resume and cleanup on S3: finished shards are skipped (not uploaded again), a missing
    one is tiled, and a failed slide leaves no object behind (here: one from an earlier run)."""
    import csv

    import pyarrow.fs as pafs

    s3 = s3_server
    pafs.copy_files(str(tile_table), f"{s3.bucket}/tiles/tiny", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3.filesystem())
    client = s3.client()
    shards = [k for k in s3.keys("tiles/tiny/") if k.endswith(".parquet")]
    victim = shards[1]
    client.delete_object(Bucket=s3.bucket, Key=victim)  # as if the run had been interrupted before this shard
    client.put_object(Bucket=s3.bucket, Key="tiles/tiny/truncated/part-00000.parquet", Body=b"from an earlier run")
    stamps = {o["Key"]: o["LastModified"] for o in client.list_objects_v2(Bucket=s3.bucket)["Contents"]}
    with open(synth_dir / "slides.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    data = (synth_dir / rows[0]["path"]).read_bytes()  # the CSV's paths are relative to its directory
    (tmp_path / "truncated.tiff").write_bytes(data[: len(data) // 2])
    with open(tmp_path / "slides.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for row in rows:
            w.writerow({**row, "path": str(synth_dir / row["path"]), "mask_path": str(synth_dir / row["mask_path"])})
        w.writerow({**{k: "" for k in rows[0]}, "slide_id": "truncated", "path": str(tmp_path / "truncated.tiff"),
                    "split": "train"})
    ray_tmp = Path(tempfile.mkdtemp(prefix="hw-s3-", dir="/tmp"))
    try:
        proc = subprocess.run([HISTOWEAK, "tile", str(tmp_path / "slides.csv"), s3.uri("tiles", "tiny"),
                               "--classes", str(synth_dir / "classes.json"), "--tile-size", "128", "--min-tissue",
                               "0.3", "--tiles-per-shard", "16", "--source", "tiny", "--no-progress"],
                              env=driver_env(s3, ray_tmp, "sqlite:///unused.db"), cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 1 and "FAILED truncated:" in proc.stderr, proc.stdout + proc.stderr
    after = {o["Key"]: o["LastModified"] for o in client.list_objects_v2(Bucket=s3.bucket)["Contents"]}
    assert victim in after and not [k for k in after if k.startswith("tiles/tiny/truncated/")]
    assert all(after[k] == stamps[k] for k in shards if k != victim)  # finished shards were not uploaded again
    manifest = json.loads(s3.read("tiles/tiny/_manifest.json"))
    assert manifest["counts"] == {"slides": 4, "ok": 3, "failed": 1, "pending": 0,
                                  "tiles": pq.read_table(tile_table).num_rows}
    _assert_same_tiles(s3, "tiles/tiny", tile_table)
