"""Multi-GPU correctness without GPUs: gradient averaging across Ray Train workers, and the worker planner.

A. Every registered method, on every target it supports (whole-slide methods on a batch of 4 small slides): the gradient two Ray Train workers (gloo, CPU) average
   in ``Method.step``, each holding half of a batch (and half of every extra stream, e.g. GERNE's ``balanced``),
   equals the gradient of one process on the whole batch. One ``TorchTrainer`` run steps all methods.
   Tolerance: max |g_2 workers − g_1 process| <= 1e-5 · max |g_1 process|, over all parameters, in float32.
   BatchNorm (each worker normalises with its own batch statistics, as DDP without SyncBatchNorm) and dropout /
   drop-path (each worker draws its own masks) are put in eval mode by forward pre-hooks for the comparison: in
   training mode they differ between the two by design (see ``histoweak.train``'s docstring).
   Slow: Ray Train's start-up dominates.
B. ``histoweak.train.plan_workers`` over resource dicts, and over the resources a real Ray cluster with logical GPUs
   reports (in a subprocess: its own cluster, its own temp dir, never the session's Ray). The cluster test is
   slow; the unit tests are fast.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from histoweak.data.streaming import plan_resources
from histoweak.methods import METHODS, build_method
from histoweak.methods.base import Task, gather_across_workers, mean_across_workers
from histoweak.train import TrainConfig, WorkerPlan, plan_workers
from test_methods import _batch, _with_streams

TARGETS = ("class:1", "labels", "mask")
TINY = {"backbone": "test_resnet", "weights": None}  # timm's 0.37 M-parameter ResNet: strides 2..32, BatchNorm
SIZE = 64  # PSCL's last feature map is then 2×2: 16 pixels to contrast in a batch of 4
RTOL = 1e-5
#: variants with a gradient path of their own: PSCL's pixel sample (the same on every worker)
VARIANTS = {"pscl sampled": ("pscl", "labels", {"max_pixels": 8})}


#: whole-slide methods (a batch of slide paths, slide labels): deterministic settings (no random views of the
#: slide, MagNet's bilinear sampler: LMS draws its own auxiliary points in each process)
SLIDE_HPARAMS = {"magnet": {"aux_backbone": "test_resnet", "leaf_size": 64, "layers": 2, "patches": 2,
                            "sampler": "bilinear", "augment": False},
                 "attention_mil": {"tile": 64}, "mean_rgb": {}}


def _cases() -> dict[str, tuple[str, str, dict]]:
    cases = {f"{name} {target}": (name, target, {}) for name in sorted(METHODS) for target in TARGETS
             if not METHODS[name].generative  # its own noise and timesteps per process: no single-process twin
             if METHODS[name].supports(Task(target, 5))}
    slides = {f"{name} label": (name, "label", SLIDE_HPARAMS[name]) for name in sorted(METHODS)
              if METHODS[name].table == "slides"}
    return {**cases, **slides, **VARIANTS}


def _slide_batch(directory: Path) -> dict:
    """4 small pyramidal slides of blocky random colour with slide labels 0, 1, 0, 1."""
    import numpy as np

    from histoweak.data.synthetic import write_pyramid

    paths = []
    for i in range(4):
        rng = np.random.default_rng(i)
        img = np.kron((rng.random((24, 32, 3)) * 255).astype(np.uint8), np.ones((16, 16, 1), np.uint8))
        paths.append(str(write_pyramid(directory / f"slide{i}.tiff", img, mpp=0.5, compression="zlib")))
    return {"slide_id": [f"slide{i}" for i in range(4)], "path": paths, "label": torch.tensor([0, 1, 0, 1]),
            "size_class": ["negative", "macro", "negative", "micro"]}


# -- what both sides run: the driver for one process, each Ray Train worker for its half ---------------------------
def _deterministic(method: nn.Module) -> None:
    """BatchNorm, dropout and drop-path in eval mode at every forward (``Method.step`` calls ``train()`` first)."""
    import timm.layers

    kinds = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, timm.layers.DropPath,
             timm.layers.DropBlock2d)
    for module in method.modules():
        if isinstance(module, kinds):
            module.register_forward_pre_hook(lambda m, args: m.train(False) and None)


def _step_gradients(spec: dict, batch: dict) -> tuple[dict[str, torch.Tensor | None], dict[str, float]]:
    """The gradient ``method.step(batch)`` hands its optimizer (after ``average_gradients``), by parameter name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights, on purpose; replaced by the driver's just below
        method = build_method(spec["name"], spec["hparams"], Task(spec["target"], 5))
    method.load_state_dict(spec["state"])
    method.set_data_state(spec["data_state"])
    _deterministic(method)
    seen: dict[str, torch.Tensor | None] = {}
    step = method.optimizer.step

    def capture(*args, **kwargs):
        seen.update({k: None if p.grad is None else p.grad.detach().clone() for k, p in method.named_parameters()})
        return step(*args, **kwargs)

    method.optimizer.step = capture
    logs = method.step(batch)
    assert seen, f"{spec['name']}: the step never reached the optimizer"
    return seen, logs


def _part(batch: dict, rank: int, world: int) -> dict:
    """Rank ``rank``'s contiguous share of every tensor of ``batch`` and of its extra streams."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, dict):
            out[key] = _part(value, rank, world)
        else:
            n = len(value) // world
            out[key] = value[rank * n:(rank + 1) * n]
    return out


def _worker_loop(config: dict) -> None:
    import ray.train
    import torch.distributed as dist

    t0 = time.perf_counter()
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    torch.set_num_threads(1)  # two workers on two cores
    out = {"backend": dist.get_backend(), "world": dist.get_world_size(), "grads": {}, "logs": {}}
    for case, spec in config["specs"].items():
        out["grads"][case], out["logs"][case] = _step_gradients(spec, _part(spec["batch"], rank, world))
    # the helpers on their own, with a different number of rows per worker: rank r holds r + 1 rows
    x = torch.arange(3.0 * (rank + 1), dtype=torch.float64).reshape(rank + 1, 3).add(10 * rank).requires_grad_()
    gathered = gather_across_workers(x)
    (gathered * torch.arange(1.0, 1 + gathered.numel(), dtype=torch.float64).reshape(gathered.shape)).sum().backward()
    out["gather"] = (gathered.detach(), x.grad, mean_across_workers(torch.tensor(rank + 1.0)))
    out["seconds"] = time.perf_counter() - t0
    torch.save(out, Path(config["out"]) / f"rank{rank}.pt")


def _specs(directory: Path) -> dict[str, dict]:
    specs = {}
    slides = _slide_batch(directory)
    for case, (name, target, hparams) in _cases().items():
        hp = {**TINY, **hparams}
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            method = build_method(name, hp, Task(target, 5))
        if METHODS[name].table == "slides":
            specs[case] = {"name": name, "target": target, "hparams": hp, "state": method.state_dict(),
                           "data_state": {}, "batch": slides}
            continue
        batch = _with_streams(method, _batch(n=4, size=SIZE), seed=0, n=4, size=SIZE)
        # the second half's masks lose classes 1 and 2: the halves differ in class mix, as real batches do, so a
        # batch-wide normaliser left per worker shows (SegCls's weight sum: 1e-1 off, 1e-4 with uniform masks)
        rest = batch["mask"][2:]
        batch["mask"][2:] = torch.where((rest == 1) | (rest == 2), 0, rest)
        specs[case] = {"name": name, "target": target, "hparams": hp, "state": method.state_dict(),
                       "data_state": getattr(method, "data_state", {}), "batch": batch}
    return specs


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a if a[k] is not None)


def _scale(g: dict) -> float:
    return max(float(v.abs().max()) for v in g.values() if v is not None)


@pytest.mark.slow  # 78-144 s measured on the shared 2-core machine (Ray Train's start-up is most of it)
def test_two_workers_average_the_gradient_of_the_whole_batch_for_every_method(ray_local, tmp_path):
    import ray.train
    from ray import cloudpickle
    from ray.train.torch import TorchTrainer

    specs = _specs(tmp_path)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/ by name
    out = tmp_path / "grads"
    out.mkdir()
    trainer = TorchTrainer(
        _worker_loop, train_loop_config={"specs": specs, "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name=f"grad-{uuid.uuid4().hex[:8]}", storage_path=str(tmp_path / "ray"),
                                       failure_config=ray.train.FailureConfig(max_failures=0)))
    t0 = time.perf_counter()
    trainer.fit()
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    print(f"\nTorchTrainer run, {len(specs)} cases on 2 workers: {time.perf_counter() - t0:.1f} s, of which the "
          f"workers' steps {max(r['seconds'] for r in ranks):.1f} s")
    assert [(r["backend"], r["world"]) for r in ranks] == [("gloo", 2), ("gloo", 2)]
    rows = torch.tensor([[0.0, 1, 2], [10, 11, 12], [13, 14, 15]], dtype=torch.float64)  # rank 0's row, rank 1's two
    weights = torch.arange(1.0, 10, dtype=torch.float64).reshape(3, 3)  # the loss: sum(weights * gathered)
    for r, rank_out in enumerate(ranks):
        gathered, grad, mean = rank_out["gather"]
        assert torch.equal(gathered, rows)
        # each worker's rows get the sum of both workers' (identical) loss gradients: 2 × weights; averaging halves it
        assert torch.equal(grad, 2 * weights[[0]] if r == 0 else 2 * weights[1:])
        assert mean.item() == 1.5

    for case, spec in specs.items():
        full, logs = _step_gradients(spec, spec["batch"])
        half, _ = _step_gradients(spec, _part(spec["batch"], 0, 2))
        g0, g1 = ranks[0]["grads"][case], ranks[1]["grads"][case]
        assert g0.keys() == full.keys()
        assert [k for k, v in g0.items() if v is None] == [k for k, v in full.items() if v is None], case
        for k in g0:  # the all-reduced gradient is the same on both workers, bit for bit
            assert (g0[k] is None and g1[k] is None) or torch.equal(g0[k], g1[k]), (case, k)
        scale, diff = _scale(full), _max_diff(g0, full)
        print(f"{case:16s} max|g| {scale:.3e}  max|diff| {diff:.2e} = {diff / scale:.1e} max|g|  "
              f"(one worker's half alone: {_max_diff(half, full) / scale:.1e} max|g|)  {logs}")
        assert diff <= RTOL * scale, f"{case}: distributed gradient off by {diff:.3g} (max |g| {scale:.3g})"
        # the comparison can fail: the gradient of half the batch is far from the whole batch's
        assert _max_diff(half, full) > 100 * RTOL * scale, case
        if "loss_pscl" in logs:  # the contrastive term is in play (a zero loss would compare nothing)
            assert logs["loss_pscl"] > 0 and ranks[0]["logs"][case]["loss_pscl"] == pytest.approx(logs["loss_pscl"],
                                                                                                rel=1e-5), case


# -- B. the worker planner ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("resources, expected", [
    ({"CPU": 2.0, "memory": 8e9}, WorkerPlan(False, 1, {"CPU": 0.75}, plan_resources(2, 1))),
    ({"CPU": 8.0, "GPU": 1.0}, WorkerPlan(True, 1, {"GPU": 1, "CPU": 1}, None)),
    ({"CPU": 32.0, "GPU": 4.0}, WorkerPlan(True, 4, {"GPU": 1, "CPU": 1}, None)),
    # two GPU nodes of 4 GPUs and 16 CPUs, plus a CPU-only node of 16: one worker per GPU of the whole cluster;
    # the 16 + 2 × 12 CPUs the workers leave are Ray Data's, uncapped
    ({"CPU": 48.0, "GPU": 8.0, "node:10.0.0.1": 1.0, "node:10.0.0.2": 1.0}, WorkerPlan(True, 8, {"GPU": 1, "CPU": 1}, None)),
], ids=["0 GPUs", "1 GPU", "4 GPUs", "2 nodes x 4 GPUs"])
def test_plan_workers_from_cluster_resources(resources, expected):
    assert plan_workers(TrainConfig(), resources) == expected
    assert plan_workers(TrainConfig(), resources, cpu_share=4.0) == (  # a sweep's CPU share matters on CPUs only
        expected if expected.use_gpu else WorkerPlan(False, 1, {"CPU": plan_resources(4, 1).cpus_per_worker},
                                                     plan_resources(4, 1)))


def test_plan_workers_follows_the_config():
    gpus = {"CPU": 32.0, "GPU": 4.0}
    assert plan_workers(TrainConfig(num_workers=2), gpus) == WorkerPlan(True, 2, {"GPU": 1, "CPU": 1}, None)
    cpu = plan_workers(TrainConfig(use_gpu=False, num_workers=2), gpus)  # CPU workers on a GPU cluster
    assert cpu == WorkerPlan(False, 2, {"CPU": plan_resources(32, 2).cpus_per_worker}, plan_resources(32, 2))
    assert cpu.resources_per_worker["CPU"] * 2 + cpu.data.data_cpus <= 32
    # use_gpu on a cluster that shows no GPU yet (an autoscaler adds them on demand): GPU workers all the same
    assert plan_workers(TrainConfig(use_gpu=True), {"CPU": 4.0}) == WorkerPlan(True, 1, {"GPU": 1, "CPU": 1}, None)
    assert plan_workers(TrainConfig(num_workers=2), {"CPU": 2.0}) == WorkerPlan(False, 2, {"CPU": 0.25},
                                                                            plan_resources(2, 2))
    with pytest.raises(ValueError, match="at least 1.5 CPUs"):
        plan_workers(TrainConfig(), {"CPU": 1.0})


def test_a_cpu_worker_fits_on_one_node_and_trials_share_the_gpus():
    # a head and two worker nodes of 1 CPU: the total alone would give the worker 1.25 CPUs, which no node has,
    # and it would never start
    assert plan_workers(TrainConfig(), {"CPU": 3.0}).resources_per_worker == {"CPU": 1.25}
    assert plan_workers(TrainConfig(), {"CPU": 3.0}, node_cpus=1.0).resources_per_worker == {"CPU": 0.5}
    assert plan_workers(TrainConfig(), {"CPU": 2.0}, node_cpus=2.0) == plan_workers(TrainConfig(), {"CPU": 2.0})
    # a sweep running 4 trials at once on 8 GPUs: 2 workers (GPUs) per trial, not 8 each
    assert plan_workers(TrainConfig(), {"CPU": 96.0, "GPU": 8.0}, gpu_share=2.0).num_workers == 2
    assert plan_workers(TrainConfig(num_workers=8), {"CPU": 96.0, "GPU": 8.0}, gpu_share=2.0).num_workers == 8


_CLUSTER_SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    import torch
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group, placement_group_table
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    from histoweak.train import TrainConfig, plan_workers

    node = {"node_ip_address": "127.0.0.1", "include_dashboard": False, "object_store_memory": 80 * 1024 ** 2}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "num_cpus": 2})  # a CPU node: Ray Data's
    for _ in range(2):  # two GPU nodes with 2 logical GPUs each (no CUDA behind them)
        cluster.add_node(**node, num_cpus=2, num_gpus=2)
    cluster.connect()
    try:
        resources = ray.cluster_resources()
        plan = plan_workers(TrainConfig(), resources)
        # the plan fits the cluster: Ray reserves one bundle per worker, as Ray Train's placement group does
        pg = placement_group([plan.resources_per_worker] * plan.num_workers, strategy="PACK")
        ray.get(pg.ready(), timeout=60)

        @ray.remote
        def where():
            return ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()

        placed = ray.get([where.options(num_cpus=1, num_gpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=i)).remote() for i in range(plan.num_workers)], timeout=120)
        gpu_nodes = [n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU")]
        print(json.dumps({"resources": {k: v for k, v in resources.items() if k in ("CPU", "GPU")},
                          "plan": [plan.use_gpu, plan.num_workers, plan.resources_per_worker, plan.data],
                          "placed": [[n, [str(g) for g in ids]] for n, ids in placed], "gpu_nodes": gpu_nodes,
                          "cuda_initialized": torch.cuda.is_initialized()}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


@pytest.mark.slow  # 31-57 s measured on the shared 2-core machine: three Ray nodes and four task workers start
@pytest.mark.cluster
def test_plan_workers_on_a_real_cluster_with_logical_gpus():
    """A separate Ray cluster (a CPU head, two nodes of 2 logical GPUs) in a subprocess with its own RAY_TMPDIR:
    the session's Ray (``ray_local``) and other users' ``ray.init()`` never see it, nor it them."""
    tmp = tempfile.mkdtemp(prefix="hwgpu-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", _CLUSTER_SCRIPT], env=env, capture_output=True, text=True,
                              timeout=300)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ncluster with logical GPUs: {time.perf_counter() - t0:.1f} s")
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["resources"] == {"CPU": 6.0, "GPU": 4.0}
    assert out["plan"] == [True, 4, {"GPU": 1, "CPU": 1}, None]  # one worker per GPU of both nodes
    assert sorted(n for n, _ in out["placed"]) == sorted(out["gpu_nodes"] * 2)  # two workers on each GPU node
    assert len({(n, tuple(g)) for n, g in out["placed"]}) == 4 and all(len(g) == 1 for _, g in out["placed"])
    assert out["cuda_initialized"] is False
