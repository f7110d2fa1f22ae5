"""Tile many slides in parallel with Ray tasks into one Parquet tile table, resumably.

Layout of a tiled dataset::

    <out>/<slide_id>/part-00000.parquet   one file per shard of ≤ tiles_per_shard tiles
    <out>/_manifest.json                  parameters, classes, per-slide status, counts, errors

Each shard is written atomically, so an interrupted run resumes by skipping
the shards already on disk. A slide that fails (corrupt, truncated,
unsupported, mask of the wrong size, no tissue) is recorded in the manifest
with its error and its partial output removed; every other slide finishes.

``<out>`` may be a local directory or a URI such as ``s3://bucket/tiles/x`` (see ``histoweak._storage``
for where credentials come from): the shard tasks upload their files there themselves, so every node
of a cluster needs access to it. Slides and masks stay local files (OpenSlide reads only local files):
on a cluster, every node must see them at the same path (a shared filesystem), or tile on one node.
"""

from __future__ import annotations

import csv
import glob as globmod
import hashlib
import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from histoweak import _storage
from histoweak.data.schema import SCHEMA_VERSION
from histoweak.slides.reader import SlideError
from histoweak.slides.tiling import SlidePlan, SlideSpec, TilingParams, plan_slide, tile_shard

__all__ = ["SLIDE_EXTENSIONS", "TilingReport", "discover_slides", "load_classes", "read_manifest", "tile_dataset"]

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide",
                    ".png", ".jpg", ".jpeg")
MANIFEST = "_manifest.json"


@dataclass
class TilingReport:
    out_dir: Path | str  # a local Path or a remote URI
    slides: dict[str, dict] = field(default_factory=dict)
    #: this run's wall time and its shard tasks' summed seconds per step (tasks_open, tasks_read, tasks_label,
    #: tasks_encode, tasks_write), as in the manifest
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def failures(self) -> dict[str, str]:
        return {k: v["error"] for k, v in self.slides.items() if v["status"] == "failed"}

    @property
    def n_tiles(self) -> int:
        return sum(v.get("n_tiles", 0) for v in self.slides.values())

    def summary_lines(self) -> list[str]:
        return [f"FAILED {sid}: {err}" for sid, err in self.failures.items()]


def load_classes(path: str | Path | None) -> list[str]:
    """Class names by index from ``classes.json`` (``{"0": "background", "1": "tumor", …}``)."""
    if path is None:
        return ["background", "tissue"]
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read classes ({exc})") from None
    try:
        idx = sorted((int(k), str(v)) for k, v in raw.items())
    except (AttributeError, ValueError):
        raise ValueError(f"{path}: must map class index (0 = background) to name") from None
    if [i for i, _ in idx] != list(range(len(idx))) or not idx:
        raise ValueError(f"{path}: class indices must be 0..N-1 with 0 = background, got {[i for i, _ in idx]}")
    return [name for _, name in idx]


def _default_mask(slide: Path, masks_dir: Path | None) -> str | None:
    if masks_dir is None:
        return None
    for ext in (".tiff", ".tif", ".png"):
        cand = masks_dir / f"{slide.stem}{ext}"
        if cand.is_file():
            return str(cand)
    return str(masks_dir / f"{slide.stem}.tiff")  # missing: reported when the slide is tiled


def discover_slides(source: str | Path, masks_dir: str | Path | None = None, split: str = "train") -> list[SlideSpec]:
    """Slides from a directory, a glob pattern, or a CSV (``slide_id,path[,mask_path,label,split]``).

    Relative paths in a CSV are relative to the CSV's directory. Raises
    ``ValueError`` (naming the file and row) on malformed input, before any work.
    """
    for where in (source, masks_dir):
        if where is not None and _storage.is_remote(where):
            raise ValueError(f"{where}: slides and masks must be local files (OpenSlide reads only local files); "
                             "copy them to a local or shared directory (the tile table itself may go to s3://…)")
    masks = Path(masks_dir) if masks_dir else None
    source = str(source)
    if source.endswith(".csv"):
        csv_path = Path(source)
        if not csv_path.is_file():
            raise ValueError(f"{csv_path}: slide list does not exist")
        base = csv_path.parent
        specs = []
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"slide_id", "path"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{csv_path}: missing column(s) {sorted(missing)}; have {reader.fieldnames}")
            for lineno, row in enumerate(reader, start=2):
                try:
                    path = base / row["path"] if not os.path.isabs(row["path"]) else Path(row["path"])
                    mask = row.get("mask_path") or None
                    if mask and not os.path.isabs(mask):
                        mask = str(base / mask)
                    elif not mask:
                        mask = _default_mask(path, masks)
                    label = row.get("label")
                    specs.append(SlideSpec(slide_id=row["slide_id"], path=str(path), mask_path=mask,
                                           label=int(label) if label not in (None, "") else None,
                                           split=row.get("split") or split))
                except (ValueError, TypeError) as exc:
                    raise ValueError(f"{csv_path}, line {lineno}: {exc}") from None
    else:
        p = Path(source)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in SLIDE_EXTENSIONS and f.is_file())
        else:
            files = sorted(Path(f) for f in globmod.glob(source) if Path(f).is_file())
        if masks:
            files = [f for f in files if f.parent.resolve() != masks.resolve()]
        specs = [SlideSpec(slide_id=f.stem, path=str(f), mask_path=_default_mask(f, masks), split=split) for f in files]
    if not specs:
        raise ValueError(f"{source}: no slides found")
    seen: dict[str, str] = {}
    for s in specs:
        if s.slide_id in seen:
            raise ValueError(f"{source}: duplicate slide_id {s.slide_id!r} ({seen[s.slide_id]} and {s.path})")
        seen[s.slide_id] = s.path
    return specs


def _shard_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


#: parameters added after tables were first written: left out of the key while unset, so those tables resume
_LATER_PARAMS = ("mpp", "magnification", "tile_um", "assume_mpp")


def _params_key(params: TilingParams, classes: list[str], source: str) -> str:
    p = {k: v for k, v in params.to_dict().items() if not (k in _LATER_PARAMS and v is None)}
    blob = json.dumps({"params": p, "classes": classes, "source": source}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_manifest(out_dir: str | Path) -> dict:
    """The ``_manifest.json`` of a tile table (a local directory or a URI); ``OSError``/``ValueError`` as read."""
    return json.loads(_storage.read_text(_storage.join(out_dir, MANIFEST)))


def _write_manifest(out: _storage.Location, data: dict) -> None:
    _storage.write_text(_storage.join(out, MANIFEST), json.dumps(data, indent=2, default=str))


def _finished_shards(slide_dir: _storage.Location) -> dict[str, int]:
    """Rows of each shard already written under ``slide_dir`` (one listing, then only the Parquet footers)."""
    fs, _ = _storage.filesystem(slide_dir)
    done = {}
    for info in _storage.list_dir(slide_dir):
        if info.is_file and info.base_name.startswith("part-") and info.base_name.endswith(".parquet"):
            with fs.open_input_file(info.path) as f:
                done[info.base_name] = pq.ParquetFile(f).metadata.num_rows
    return done


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SlideError):
        return str(exc)
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _plan_task(spec: SlideSpec, params: TilingParams):
    try:
        return "ok", plan_slide(spec, params)
    except Exception as exc:  # noqa: BLE001 — every failure is reported per slide, the others go on
        return "failed", f"{spec.path}: {exc}" if not isinstance(exc, SlideError) else _describe(exc)


def _shard_task(spec, params, plan, index, out_path, n_classes, source):
    seconds: dict[str, float] = {}
    try:
        with _storage.staged_output(out_path) as local:  # remote: written here, uploaded whole when done
            n = tile_shard(spec, params, plan, index, local, n_classes, source, seconds)
        return "ok", (n, seconds)
    except Exception as exc:  # noqa: BLE001
        msg = _describe(exc)
        return "failed", msg if msg.startswith(spec.path) else f"{spec.path}: {msg}"


def tile_dataset(slides: list[SlideSpec], out_dir: str | Path, params: TilingParams, classes: list[str],
                 source: str = "dataset", progress: bool = True, max_in_flight: int | None = None) -> TilingReport:
    """Tile ``slides`` into ``out_dir`` with Ray tasks (one per slide to plan, one per shard to tile).

    Call ``histoweak._ray.init_ray()`` first (or run inside ``ray job submit``). ``out_dir``: a local
    directory or a URI (``s3://bucket/prefix``) that the Ray workers, which write the shards, can reach.

    Raises
    ------
    ValueError
        If ``out_dir`` holds a dataset tiled with other parameters, or is a URI with credentials in it
        (before any work).
    """
    import ray
    from tqdm.auto import tqdm

    out = _storage.resolve(out_dir)  # a remote URI with credentials in it fails here, before any work
    if not _storage.is_remote(out):
        out.mkdir(parents=True, exist_ok=True)
    key = _params_key(params, classes, source)
    previous = None
    if _storage.exists(_storage.join(out, MANIFEST)):
        previous = read_manifest(out)
        if previous.get("params_key") != key:
            raise ValueError(f"{_storage.join(out, MANIFEST)}: this directory was tiled with other parameters "
                             f"({previous.get('params')}); use a new output directory")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "classes": classes,
        "params": params.to_dict(),
        "params_key": key,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "slides": {},
    }
    report = TilingReport(out)
    n_classes = len(classes)
    # SPREAD: Ray's default keeps short tasks on the driver's node while it has a free CPU (measured: 16 of 16
    # shards on one of three nodes); tiling is bound by CPU and disk on each node, so use them all
    plan_remote = ray.remote(num_cpus=1, max_retries=1, scheduling_strategy="SPREAD")(_plan_task)
    shard_remote = ray.remote(num_cpus=1, max_retries=1, scheduling_strategy="SPREAD")(_shard_task)
    max_in_flight = max_in_flight or max(4, int(ray.cluster_resources().get("CPU", 2)) * 4)

    specs = {s.slide_id: s for s in slides}
    entry = {s.slide_id: {"path": s.path, "mask_path": s.mask_path, "split": s.split, "label": s.label,
                          "status": "pending", "n_tiles": 0, "shards": 0, "error": None} for s in slides}
    pending_specs = list(slides)
    running: dict = {}  # ObjectRef -> (kind, slide_id, shard or None)
    plans: dict[str, SlidePlan] = {}
    shards_left: dict[str, int] = {}
    failed: set[str] = set()
    bar = tqdm(total=len(slides), unit="slide", desc="tiling", disable=not progress, dynamic_ncols=True)
    task_seconds: dict[str, float] = {}  # summed over this run's shard tasks: open, read, label, encode, write
    start = time.perf_counter()

    def finish_slide(sid: str) -> None:
        e = entry[sid]
        if sid in failed:
            e["status"] = "failed"
            _storage.remove_tree(_storage.join(out, sid))
            e["n_tiles"] = 0
        else:
            e["status"] = "ok"
        bar.update(1)
        bar.set_postfix(tiles=sum(v["n_tiles"] for v in entry.values()), failed=len(failed))

    def submit_some() -> None:
        while pending_specs and len(running) < max_in_flight:
            s = pending_specs.pop(0)
            running[plan_remote.remote(s, params)] = ("plan", s.slide_id, None)

    try:
        submit_some()
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            ref = done[0]
            kind, sid, shard = running.pop(ref)
            try:
                status, value = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 — a crashed worker fails this slide only
                status, value = "failed", f"{specs[sid].path}: worker failed ({type(exc).__name__}: {exc})"
            e = entry[sid]
            if status == "failed":
                if e["error"] is None:
                    e["error"] = value
                failed.add(sid)
            if kind == "plan":
                if status == "failed":
                    finish_slide(sid)
                else:
                    plan = value
                    plans[sid] = plan
                    groups = plan.shards(params.tiles_per_shard)
                    res = plan.resolution
                    e.update(shards=len(groups), candidates=plan.candidates, dimensions=list(plan.dimensions),
                             mpp=plan.mpp, mpp_assumed=res.mpp_assumed, level_read=res.level, scale=res.scale,
                             tile_mpp=res.mpp)
                    shards_left[sid] = 0
                    plan_ref = ray.put(plan)  # shipped once, shared by the slide's shard tasks
                    done = _finished_shards(_storage.join(out, sid))  # finished in an earlier run
                    for i, idx in enumerate(groups):
                        path = _storage.join(out, sid, _shard_name(i))
                        if _shard_name(i) in done:
                            e["n_tiles"] += done[_shard_name(i)]
                            continue
                        shards_left[sid] += 1
                        running[shard_remote.remote(specs[sid], params, plan_ref, idx, str(path), n_classes, source)] = (
                            "shard", sid, i)
                    if shards_left[sid] == 0:
                        finish_slide(sid)
            else:
                if status == "ok":
                    n, seconds = value
                    e["n_tiles"] += n
                    for k, v in seconds.items():
                        task_seconds[k] = task_seconds.get(k, 0.0) + v
                shards_left[sid] -= 1
                if shards_left[sid] == 0:
                    plans.pop(sid, None)
                    finish_slide(sid)
            submit_some()
    finally:
        bar.close()
        manifest["slides"] = entry
        manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        manifest["seconds"] = {"wall": round(time.perf_counter() - start, 3),
                               **{f"tasks_{k}": round(v, 3) for k, v in task_seconds.items()}}
        manifest["counts"] = {
            "slides": len(entry),
            "ok": sum(e["status"] == "ok" for e in entry.values()),
            "failed": sum(e["status"] == "failed" for e in entry.values()),
            "pending": sum(e["status"] == "pending" for e in entry.values()),
            "tiles": sum(e["n_tiles"] for e in entry.values()),
        }
        if previous:  # keep slides tiled earlier but not listed this time
            for sid, e in previous.get("slides", {}).items():
                manifest["slides"].setdefault(sid, e)
        _write_manifest(out, manifest)
    report.slides = entry
    report.seconds = manifest["seconds"]
    return report
