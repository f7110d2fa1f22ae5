"""Multi-node runs on one machine: a head and two worker nodes (``ray.cluster_utils.Cluster``), every port on
127.0.0.1. Tiling spreads over the nodes; a 2-worker Ray Train run has its workers on different nodes and
checkpoints in shared storage; losing a whole worker node mid-run costs a restart from the last checkpoint,
not the run; a sweep whose driver is restarted resumes from shared storage.

Drivers run as subprocesses with ``RAY_ADDRESS`` set, as ``ray job submit`` would run them. The cluster lives
in a helper process (``loopback_multinode``), so this process's own Ray (the session's ``ray_local``) is
untouched and these tests run in any order with the others.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from histoweak._ray import LOOPBACK_ENV
from histoweak.local_cluster import cluster_pids, loopback_multinode

from _net import is_loopback, listening, wait_for

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def multinode():
    """A head (1 CPU, dashboard) and two worker nodes (1 CPU each) on 127.0.0.1."""
    with loopback_multinode(workers=2) as cluster:
        yield cluster


def _env(cluster, **extra) -> dict:
    return {**os.environ, **LOOPBACK_ENV, "RAY_ADDRESS": cluster.address, **extra}


def _tasks_by_node(cluster, func_name: str) -> dict[str, int]:
    from ray.util.state import list_tasks

    tasks = list_tasks(address=f"http://{cluster.webui_url}", filters=[("func_or_class_name", "=", func_name)],
                       detail=True, limit=10000, raise_on_missing_output=False)
    out: dict[str, int] = {}
    for t in tasks:
        if t.state == "FINISHED":
            out[t.node_id] = out.get(t.node_id, 0) + 1
    return out


_DRIVER = textwrap.dedent("""
    import json, sys
    from histoweak import tracking
    from histoweak._ray import init_ray
    from histoweak.train import MlflowMetricsCallback, TrainConfig, fit

    values, table, uri, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    init_ray()
    run_id = tracking.parent_run("multinode", values["name"], {}, {}, uri)
    outcome = fit(TrainConfig.from_dict(values), table, 2, callbacks=[MlflowMetricsCallback(run_id, uri)])
    with open(out, "w") as f:
        json.dump({"run_id": run_id, "metrics": outcome.metrics, "checkpoint": outcome.checkpoint,
                   "test": outcome.test}, f)
""")


def _start_train(cluster, tmp_path, table, epochs: int, trace: Path, **config) -> tuple[subprocess.Popen, dict]:
    values = {"method": "erm", "name": "mn-train", "epochs": epochs, "batch_size": 8, "steps_per_epoch": 3,
              "num_workers": 2, "placement_strategy": "SPREAD", "storage_path": str(tmp_path / "shared"),
              "hparams": {"backbone": "tf_efficientnet_lite0", "weights": None},
              "worker_env": {"HISTOWEAK_WORKER_TRACE": str(trace)}, **config}
    files = {"out": tmp_path / "outcome.json", "uri": f"sqlite:///{tmp_path / 'mlruns.db'}"}
    (tmp_path / "driver.py").write_text(_DRIVER)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), json.dumps(values), str(table),
                             files["uri"], str(files["out"])], cwd=tmp_path, env=_env(cluster),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc, files


def _trace(trace: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(trace.glob("rank*.jsonl")) for line in f.read_text().splitlines()]


def _tile(cluster, tmp_path, synth_dir) -> Path:
    out = tmp_path / "tiles"
    done = subprocess.run([sys.executable, "-m", "histoweak.cli", "tile", str(synth_dir / "slides.csv"), str(out),
                           "--tile-size", "128", "--min-tissue", "0.3", "--tiles-per-shard", "8", "--no-progress"],
                          env=_env(cluster), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


def test_tiling_and_a_two_worker_run_spread_over_nodes(multinode, synth_dir, tmp_path):
    """Tiling's shard tasks run on more than one node; a 2-worker Train run streams from Ray Data with its
    workers on different nodes, reports every epoch and checkpoints into shared storage; nothing listens beyond
    loopback."""
    table = _tile(multinode, tmp_path, synth_dir)
    by_node = _tasks_by_node(multinode, "_shard_task")
    assert len(by_node) >= 2, f"tiling ran on {len(by_node)} node(s): {by_node}"

    trace = tmp_path / "trace"
    proc, files = _start_train(multinode, tmp_path, table, epochs=2, trace=trace)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    lines = _trace(trace)
    nodes = {line["rank"]: line["node_id"] for line in lines}
    assert set(nodes) == {0, 1} and nodes[0] != nodes[1], f"workers on nodes {nodes}"
    # data-parallel: both ranks stepped on rows, the same weights after every epoch
    for epoch in (0, 1):
        sums = {line["rank"]: line["param_checksum"] for line in lines if line["epoch"] == epoch}
        assert sums[0] == pytest.approx(sums[1], rel=1e-12), sums
        assert all(line["rows"] for line in lines if line["epoch"] == epoch)
    outcome = json.loads(files["out"].read_text())
    assert outcome["metrics"]["epoch"] == 1 and Path(outcome["checkpoint"], "state.pt").is_file()
    assert Path(outcome["checkpoint"]).is_relative_to(tmp_path / "shared")
    assert "test_bca" in outcome["test"]

    ours = cluster_pids(multinode.temp)
    seen = listening(ours)
    assert seen and all(is_loopback(ip) for _, ip, _ in seen), seen


@pytest.mark.slow
def test_a_run_survives_the_loss_of_a_whole_worker_node(multinode, synth_dir, tmp_path):
    """Kill the node of one Train worker mid-run (all its processes, as a lost spot instance): Ray Train restarts
    the worker group from the last checkpoint (on a replacement node, as the autoscaler would start one), the run
    finishes, and its per-epoch metrics in MLflow are whole: every epoch once."""
    from mlflow.tracking import MlflowClient

    table = _tile(multinode, tmp_path, synth_dir)
    trace = tmp_path / "trace"
    epochs = 4
    proc, files = _start_train(multinode, tmp_path, table, epochs=epochs, trace=trace, name="mn-loss")
    client = MlflowClient(files["uri"])

    def first_epoch_recorded():  # logged after Ray Train registered the epoch's checkpoint
        exp = client.get_experiment_by_name("multinode")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return proc.poll() is not None or any(client.get_metric_history(r.info.run_id, "train_loss") for r in runs), None

    wait_for(first_epoch_recorded, "the run's first epoch and checkpoint", timeout=400, interval=1)
    assert proc.poll() is None, proc.stdout.read()[-4000:]
    rank1 = [line["node_id"] for line in _trace(trace) if line["rank"] == 1]
    victim = next(n for n in multinode.worker_nodes if n.node_id == rank1[-1])
    t_kill = time.monotonic()
    multinode.remove_node(victim, allow_graceful=False)
    multinode.add_node(num_cpus=1, node_ip_address="127.0.0.1")  # the replacement the autoscaler would launch
    out, _ = proc.communicate(timeout=900)
    recovered = time.monotonic() - t_kill
    assert proc.returncode == 0, out[-4000:]
    outcome = json.loads(files["out"].read_text())
    m = outcome["metrics"]
    assert m["epoch"] == epochs - 1 and m["resumed_from_epoch"] >= 1, m
    history = client.get_metric_history(outcome["run_id"], "train_loss")
    steps = sorted(h.step for h in history)
    # an epoch cut short by the loss was never reported; it ran again after the restart
    assert steps == list(range(epochs)), steps
    print(f"\nnode loss: run finished {recovered:.0f} s after the kill, resumed from epoch {m['resumed_from_epoch']}")


@pytest.mark.slow
def test_a_sweep_whose_driver_is_restarted_resumes_from_shared_storage(multinode, synth_dir, tmp_path):
    """Kill a sweep's driver while its second trial runs on the cluster; the same command again resumes it
    (``Tuner.restore`` from the shared storage): the finished trial does not run again."""
    import yaml

    table = _tile(multinode, tmp_path, synth_dir)
    hold = tmp_path / "hold"
    hold.mkdir()
    raw = yaml.safe_load((REPO / "search_spaces" / "erm.yaml").read_text())
    raw.update(name="mn-sweep", num_samples=2, scheduler={"type": "fifo"}, max_concurrent_trials=1,
               train={"epochs": 1, "steps_per_epoch": 2, "batch_size": 8, "target": "class:1",
                      "worker_env": {"HISTOWEAK_HOLD_DIR": str(hold)}})
    raw["hparams"]["weights"] = None
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw))
    env = _env(multinode, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlruns.db'}")
    cmd = [sys.executable, str(REPO / "jobs" / "tune_erm.py"), str(space), "--data", str(table), "--no-progress",
           "--storage", str(tmp_path / "shared")]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    wait_for(lambda: (first.poll() is not None or len(list(hold.glob("started-*"))) >= 2, None),
             "the second trial started", timeout=600)
    assert first.poll() is None, first.stdout.read()[-4000:]
    os.killpg(first.pid, signal.SIGKILL)  # the driver is lost, not interrupted politely
    first.wait()
    (hold / "release").touch()
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming sweep" in again.stdout
    starts = {p.name: len(p.read_text().splitlines()) for p in hold.glob("started-*")}
    # the first trial ran once (before the kill); the second started before the kill and again after it
    assert sorted(starts.values()) == [1, 2], starts
    assert "2 trials with results" in again.stdout, again.stdout[-2000:]
