"""Two jobs on one machine, each with its own local Ray: neither joins, guesses or waits for the other.

Ray processes that call the State API without an address (Ray Train's placement-group cleaner among them)
find their cluster through RAY_ADDRESS, else by scanning the machine for GCS processes; with two local Rays
that scan fails, and a trial stopped by ASHA then kept its CPUs for good. ``init_ray`` addresses its local Ray
fully (``histoweak._ray``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from histoweak._ray import LOOPBACK_ENV

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.cluster

_PROBE = textwrap.dedent("""
    import json
    import ray
    from histoweak._ray import init_ray

    init_ray(num_cpus=1)

    @ray.remote(num_cpus=0)
    class Probe:  # as Ray Train's placement-group cleaner does: the State API, no address given
        def ask(self):
            from ray.util.state import get_actor
            me = ray.get_runtime_context().get_actor_id()
            return {"state": get_actor(me).state, "gcs": ray.get_runtime_context().gcs_address}

    out = ray.get(Probe.remote().ask.remote())
    out["driver_gcs"] = ray.get_runtime_context().gcs_address
    print(json.dumps(out))
""")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, **LOOPBACK_ENV, **extra}


def test_a_job_beside_another_local_ray_finds_its_own(ray_local, tmp_path):
    """With another local Ray on the machine (this test session's), a job's own Ray processes still resolve
    their cluster through the State API: the one the job started, not an error and not the other."""
    other = ray_local.get_runtime_context().gcs_address
    (tmp_path / "probe.py").write_text(_PROBE)
    done = subprocess.run([sys.executable, str(tmp_path / "probe.py")], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["state"] == "ALIVE" and seen["gcs"] == seen["driver_gcs"] != other, seen


_OPEN_STORE = textwrap.dedent("""
    import sys, time
    from histoweak import tracking

    uri, start = sys.argv[1], float(sys.argv[2])
    while time.time() < start:  # every process opens the new store at the same moment
        time.sleep(0.001)
    print(len(tracking._client(uri).search_experiments()))
""")


def test_jobs_that_create_one_new_mlflow_store_at_once_all_open_it(tmp_path):
    """Three jobs started together in one directory (one new `mlruns.db`): MLflow alone races in its schema
    migration and all but one die (measured: "Online migration expected to match one row"); all three open it."""
    import time

    (tmp_path / "open.py").write_text(_OPEN_STORE)
    uri, start = f"sqlite:///{tmp_path / 'mlruns.db'}", time.time() + 8
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "open.py"), uri, str(start)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip() == "1", err[-2000:]  # the Default experiment, made once


def _sweep(tmp_path: Path, name: str, args: list[str]) -> subprocess.Popen:
    work = tmp_path / name
    work.mkdir()
    env = _env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlruns.db'}", HISTOWEAK_HOME=str(tmp_path / "home"))
    return subprocess.Popen([sys.executable, *args, "--no-progress", "--storage", str(work / "results")], cwd=work,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.mark.slow
def test_two_sweeps_started_together_both_finish_with_their_own_records(tmp_path):
    """The issue's reproduction: an ERM sweep whose ASHA schedule stops trials, and the GERNE smoke sweep,
    started together from two shells (each its own local Ray, one new MLflow store): both exit 0, every trial
    of each is recorded and scored in its own experiment (measured before the fix: the ERM sweep stayed at
    1/3 trials until killed). 182 s here."""
    from mlflow.tracking import MlflowClient

    erm = _sweep(tmp_path, "erm", [str(REPO / "jobs" / "tune_erm.py"), str(REPO / "search_spaces" / "erm.yaml"),
                                   "--set", "num_samples=3", "--set", "train.epochs=2", "--set",
                                   "train.steps_per_epoch=2", "--set", "train.batch_size=8", "--set",
                                   "scheduler.max_t=1", "--data", "synthetic:tiny"])
    gerne = _sweep(tmp_path, "gerne", [str(REPO / "jobs" / "tune_gerne.py"), "--smoke-test"])
    outs = {}
    for name, proc in (("erm", erm), ("gerne", gerne)):
        try:
            outs[name], _ = proc.communicate(timeout=1200)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            pytest.fail(f"the {name} sweep hung: {proc.communicate()[0][-3000:]}")
        assert proc.returncode == 0, f"{name}: {outs[name][-3000:]}"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    trials = {}
    for exp in client.search_experiments():
        runs = client.search_runs([exp.experiment_id])
        trials[exp.name] = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(trials.get("erm-lr-wd", [])) == 3, {k: len(v) for k, v in trials.items()}
    gerne_exp = [name for name in trials if name.startswith("gerne")]
    assert len(gerne_exp) == 1 and trials[gerne_exp[0]], trials.keys()
    # ASHA stopped the ERM trials (KILLED, the next one then got their CPUs); every trial was scored on test
    assert any(r.info.status == "KILLED" for r in trials["erm-lr-wd"])
    for name, runs in trials.items():
        assert all(r.info.status in ("FINISHED", "KILLED") for r in runs), (name, [r.info.status for r in runs])
        assert all(any(k.startswith("test_") for k in r.data.metrics) for r in runs), name
    ids = {name: {r.info.run_id for r in runs} for name, runs in trials.items()}
    assert not ids["erm-lr-wd"] & ids[gerne_exp[0]]
