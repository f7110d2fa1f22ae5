"""A capacity plan from measurements: what tiling and training 1k / 10k / 30k slides costs on the cluster of
``cluster.yaml``.

Measured here, per CPU core: tiles/s tiled (``tile_dataset`` on a synthetic pyramidal TIFF, Ray tasks on every
core, divided by the cores), tiles/s decoded (the stream's decode function, one thread), training images/s of
each registered method with its default backbone (``Method.step``, one thread, 224-px tiles); and Ray's
overheads on a loopback multi-node cluster (a node joining, a 2-worker Ray Train run's start-up, a task's
round trip). Everything else is an assumption, printed with the table: tiles per slide, the GPU's speed-up
over one CPU core, instance sizes and prices (AWS us-west-2 on-demand list prices; spot is often 60-70 %
less). Change them on the command line.

    python benchmarks/capacity.py [--quick] [--tiles-per-slide 10000] [--gpu-speedup 40] ...
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, bench_slide, report, timed  # noqa: E402

SLIDES = (1_000, 10_000, 30_000)
CLUSTERS = ((2, 1), (8, 4))  # (cpu_worker nodes, gpu_worker nodes), within cluster.yaml's max_workers


def tiling_rate(size: int) -> tuple[float, float, Path]:
    """(tiles/s per core, bytes per tile) of ``tile_dataset`` on a ``size``² slide, and the table it wrote."""
    import ray

    from histoweak._ray import init_ray
    from histoweak.data.tiling_job import discover_slides, tile_dataset
    from histoweak.slides.tiling import TilingParams

    path = bench_slide(size)
    init_ray()
    cores = ray.cluster_resources()["CPU"]
    out = Path(tempfile.mkdtemp(prefix="hw-capacity-"))
    params = TilingParams(tile_size=256, min_tissue=0.0, tiles_per_shard=64)
    tile_dataset(discover_slides(str(path)), out / "warm", params, ["background", "tissue"], progress=False)
    rep, seconds = timed(tile_dataset, discover_slides(str(path)), out / "t", params, ["background", "tissue"],
                         progress=False)
    size_bytes = sum(f.stat().st_size for f in (out / "t").rglob("*.parquet"))
    ray.shutdown()
    return rep.n_tiles / seconds / cores, size_bytes / rep.n_tiles, out / "t"


def _stream_efficiency() -> float:
    """The PNG stream's share of the decode ceiling from the last ``bench_streaming`` run, else 0.9."""
    import json

    try:
        rows = json.loads((RESULTS / "streaming.json").read_text())["rows"]
        return float(next(r["vs ceiling"] for r in rows if r["pipeline"].startswith("PNG: histoweak")))
    except (OSError, ValueError, KeyError, StopIteration):
        return 0.9


def decode_rate(table: Path) -> float:
    """Tiles/s decoded by the stream's decode function in one thread (the per-core ceiling of streaming)."""
    import pyarrow.parquet as pq

    from histoweak.data.streaming import decode_tiles

    tables = [pq.read_table(f, columns=["image", "label", "tissue_ratio"]) for f in sorted(table.rglob("*.parquet"))]
    n, t0 = 0, time.perf_counter()
    for t in tables:
        n += len(decode_tiles(t)["image"])
    return n / (time.perf_counter() - t0)


def train_rates(batch: int, steps: int) -> dict[str, float]:
    """Training images/s of every registered method with its default backbone, one thread, ``batch`` tiles of
    224 px (random pixels: the cost does not depend on them)."""
    import numpy as np
    import torch

    from histoweak.methods import METHODS, build_method
    from histoweak.methods.base import RunInfo, Task, check_hparams

    torch.set_num_threads(1)
    n_classes, size = 4, 224
    rng = np.random.default_rng(0)
    ratios = np.zeros((64, n_classes), np.float32)  # tiles of one class, and of two (segcls's two roles)
    for i, c in enumerate(rng.integers(1, n_classes, 64)):
        ratios[i, c] = 1.0 if i % 2 else rng.uniform(0.3, 0.7)
        ratios[i, 0] = 1.0 - ratios[i, c]
    meta = {"slide_id": np.asarray([f"s{i % 4}" for i in range(64)], object), "x": np.arange(64) * size,
            "y": np.zeros(64, np.int64), "class_ratios": ratios, "labels": (ratios > 0.1).astype(np.float32),
            "label": (ratios[:, 1] > 0.25).astype(np.int64), "tissue_ratio": 1 - ratios[:, 0]}
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, n_classes, (batch, size, size), generator=g)
    data = {"image": torch.rand(batch, 3, size, size, generator=g), "mask": mask,
            "labels": torch.stack([(mask == c).flatten(1).any(1) for c in range(n_classes)], 1).float(),
            "label": torch.randint(0, 2, (batch,), generator=g), "group": torch.arange(batch) % 4}
    out = {}
    for name, cls in sorted(METHODS.items()):
        target = next(t for t in ("class:1", "labels", "mask") if cls.supports(Task(t, n_classes)))
        hparams = check_hparams(cls.Hparams, {"weights": None}, name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # random weights: the cost is the same
                method = build_method(name, {"weights": None}, Task(target, n_classes))
        except ValueError as exc:  # e.g. a second stage that starts from a first stage's checkpoint
            print(f"capacity: {name} not measured: {exc}"[:200])
            continue
        plan = cls.data_plan(hparams, RunInfo(target, n_classes, group_tau=0.5, seed=0, batch_size=batch,
                                              meta=lambda cols: {c: meta[c] for c in cols},
                                              images=lambda keys: np.random.default_rng(0).integers(
                                                  0, 256, (len(keys), size, size, 3), np.uint8)))
        method.set_data_state(plan.state)
        step = {**data, **{key: dict(data) for key in plan.extra}}
        method.step(step)  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            method.step(step)
        out[f"{name} ({hparams.backbone})"] = batch * steps / (time.perf_counter() - t0)
    torch.set_num_threads(os.cpu_count() or 1)
    return out


def ray_overheads() -> dict[str, float]:
    """Seconds for a worker node to join a loopback cluster, for a 2-worker Ray Train run (one worker per node,
    nothing to train) from ``fit()`` to its end, and per task round trip across nodes."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from histoweak.local_cluster import loopback_multinode

    with loopback_multinode(workers=0, dashboard=False) as cluster:
        _, join = timed(cluster.add_node, num_cpus=1, node_ip_address="127.0.0.1")
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")
        try:
            @ray.remote(num_cpus=0.01, scheduling_strategy="SPREAD")
            def noop():
                return 0

            ray.get([noop.remote() for _ in range(20)])
            _, tasks = timed(lambda: ray.get([noop.remote() for _ in range(500)]))
            storage = tempfile.mkdtemp(prefix="hw-capacity-train-")
            trainer = TorchTrainer(lambda: None, scaling_config=ray.train.ScalingConfig(
                num_workers=2, resources_per_worker={"CPU": 0.5}, placement_strategy="SPREAD"),
                run_config=ray.train.RunConfig(name="overhead", storage_path=storage))
            _, train = timed(trainer.fit)
            shutil.rmtree(storage, ignore_errors=True)
        finally:
            ray.shutdown()
    return {"node_join_s": join, "train_startup_s": train, "task_ms": 1000 * tasks / 500}


def plan(rates: dict, a: argparse.Namespace) -> list[dict]:
    """Wall time and cost per (slides, cluster); see the module docstring for what is measured and assumed."""
    rows = []
    gpu_img_s = rates["train_img_s_core"] * a.gpu_speedup  # per GPU
    for slides in SLIDES:
        tiles = slides * a.tiles_per_slide
        for n_cpu, n_gpu in CLUSTERS:
            tile_h = tiles / (n_cpu * a.cpu_node_cores * rates["tile_s_core"]) / 3600
            # training: every GPU consumes gpu_img_s; decoding uses the GPU nodes' CPUs (one per GPU worker
            # kept for its loop) and the CPU nodes'
            want = n_gpu * a.gpus_per_node * gpu_img_s
            decode = (n_gpu * (a.gpu_node_cores - a.gpus_per_node) + n_cpu * a.cpu_node_cores) * rates["decode_s_core"]
            got = min(want, decode)
            train_h = a.epochs * tiles / got / 3600 + rates["train_startup_s"] / 3600
            overhead_h = rates["node_join_s"] / 3600 + a.node_boot_minutes / 60
            cost = ((tile_h + overhead_h) * (n_cpu * a.cpu_node_price + a.head_price)
                    + (train_h + overhead_h) * (n_gpu * a.gpu_node_price + a.head_price))
            rows.append({"slides": slides, "tiles": tiles, "cpu nodes": n_cpu, "gpu nodes": n_gpu,
                         "tiling h": tile_h, "train h": train_h,
                         "bottleneck": "decode (CPU)" if decode < want else "GPU",
                         "cost $": cost, "tiles TB": tiles * rates["bytes_per_tile"] / 1e12})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller slide, fewer steps")
    ap.add_argument("--tiles-per-slide", type=int, default=10_000,
                    help="tissue tiles of 256 px at 20x per slide (TCGA diagnostic slides: roughly 5k-20k)")
    ap.add_argument("--epochs", type=float, default=1.0, help="passes over every tile")
    ap.add_argument("--gpu-speedup", type=float, default=40.0,
                    help="training images/s of one A10G over one CPU core (assumed; measure yours)")
    ap.add_argument("--method", default="erm", help="the method whose rate the plan trains at")
    ap.add_argument("--cpu-node-cores", type=int, default=16, help="m5.4xlarge")
    ap.add_argument("--gpu-node-cores", type=int, default=48, help="g5.12xlarge")
    ap.add_argument("--gpus-per-node", type=int, default=4, help="g5.12xlarge")
    ap.add_argument("--cpu-node-price", type=float, default=0.768, help="$/h, m5.4xlarge on-demand")
    ap.add_argument("--gpu-node-price", type=float, default=5.672, help="$/h, g5.12xlarge on-demand")
    ap.add_argument("--head-price", type=float, default=0.384, help="$/h, m5.2xlarge on-demand")
    ap.add_argument("--node-boot-minutes", type=float, default=5.0,
                    help="EC2 launch, image pull and setup_commands per scale-up (assumed)")
    ap.add_argument("--stream-efficiency", type=float, default=_stream_efficiency(),
                    help="share of the bare decode rate the Ray Data stream delivers (default: bench_streaming's "
                         "last 'vs ceiling' for PNG tiles in results/streaming.json, else 0.9)")
    a = ap.parse_args(argv)

    tile_s_core, bytes_per_tile, table = tiling_rate(2048 if a.quick else 4096)
    decode_s_core = decode_rate(table) * a.stream_efficiency  # what the stream delivers of the decode ceiling
    shutil.rmtree(table.parent, ignore_errors=True)
    train = train_rates(batch=8 if a.quick else 16, steps=2 if a.quick else 4)
    overheads = ray_overheads()
    key = next(k for k in train if k.startswith(f"{a.method} ("))
    rates = {"tile_s_core": tile_s_core, "decode_s_core": decode_s_core, "bytes_per_tile": bytes_per_tile,
             "train_img_s_core": train[key], **overheads}
    report("capacity_rates", [{"measured": k, "value": v} for k, v in
                              [("tiles/s tiled per core (256 px, PNG)", tile_s_core),
                               ("tiles/s streamed per core (decode x stream efficiency)", decode_s_core),
                               ("bytes per tile", bytes_per_tile),
                               *[(f"train images/s per core: {k}", v) for k, v in train.items()],
                               ("worker node joins the cluster, s", overheads["node_join_s"]),
                               ("2-worker Ray Train run start-up and teardown, s", overheads["train_startup_s"]),
                               ("task round trip across nodes, ms", overheads["task_ms"])]])
    rows = plan(rates, a)
    report("capacity_plan", rows, {
        "assumed": f"{a.tiles_per_slide} tiles/slide, {a.epochs:g} epoch(s) of {key}, one A10G = {a.gpu_speedup:g} "
                   f"CPU cores of training, nodes m5.4xlarge ({a.cpu_node_cores} cores, ${a.cpu_node_price}/h) and "
                   f"g5.12xlarge ({a.gpus_per_node} GPUs, {a.gpu_node_cores} cores, ${a.gpu_node_price}/h), head "
                   f"${a.head_price}/h, {a.node_boot_minutes:g} min per scale-up; on-demand prices",
        "bottleneck": "decode (CPU) when the GPU nodes' and CPU nodes' cores cannot decode as fast as the GPUs train"})
    return {"rates": rates, "plan": rows}


if __name__ == "__main__":
    main()
