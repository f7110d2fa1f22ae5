"""Whole-slide segmentation with any segmentation checkpoint (``histoweak predict``).

    checkpoint directory, or MLflow run (tag ``best_checkpoint``)  -> model (target "mask")
    slides -> an overlapping grid at the checkpoint's tiling level, tissue tiles only
    Ray Data: tile positions -> read regions (map_batches, tasks; each slide opened once per batch)
                             -> class probabilities (map_batches, model actor(s), batched)
    driver: blend the tiles of each slide into a (C, H, W) probability map -> class-index mask
    OUT/<slide_id>_mask.tiff, <slide_id>_overlay.png, <slide_id>.geojson; metrics against ground truth
    MLflow: one run per call, experiment ``predict``

The model sees the batches it saw in training: ``image`` (N, 3, T, T) float in [0, 1]
(``streaming.TorchCollate``), plus the tiles' keys as in the tile table: ``x``, ``y`` (top-left
corner, level-0 pixels) and ``downsample`` (level-0 pixels per tile pixel).

A slide that cannot be read (or whose outputs cannot be written) is reported by name with its
problem; the other slides finish.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from histoweak.slides.reader import SlideError, SlideReader
from histoweak.slides.resolution import Resolution, read_scaled
from histoweak.slides.tiling import SlideSpec, TilingParams

__all__ = ["BEST_CHECKPOINT_TAG", "EXPERIMENT", "PredictReport", "SlideResult", "Stitcher", "blend_window",
           "covering_grid", "load_segmentation_model", "predict_slides", "resolve_checkpoint", "tiling_params", "tissue_tiles"]

#: the MLflow experiment of ``predict_slides``' runs
EXPERIMENT = "predict"
#: the tag of a trial's MLflow run that holds its best checkpoint's directory
BEST_CHECKPOINT_TAG = "best_checkpoint"
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_OVERLAY_SIZE = 1024  # longer side of the overlay's thumbnail


# -- checkpoint -> model ------------------------------------------------------------------------------
def resolve_checkpoint(run_or_dir: str | Path) -> Path:
    """The checkpoint directory named by ``run_or_dir``: that directory, or the directory an MLflow run's
    ``best_checkpoint`` tag holds (store: ``histoweak.tracking.tracking_uri()``).

    Raises
    ------
    ValueError
        Naming what was given and what is missing: no such directory (and not a run id), no such run,
        a run without the tag, or a tag pointing to a directory that does not exist.
    """
    given = str(run_or_dir)
    path = Path(given).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ValueError(f"checkpoint {given}: a file, not a checkpoint directory (state.pt + config.json)")
    if not _RUN_ID.fullmatch(given):
        raise ValueError(f"checkpoint {given}: no such directory, and not an MLflow run id (32 hex digits)")
    from histoweak.tracking import run_tag, tracking_uri

    uri = tracking_uri()
    try:
        name, tagged = run_tag(given, BEST_CHECKPOINT_TAG, uri)
    except ValueError:
        raise ValueError(f"checkpoint {given}: no such directory, and no MLflow run {given} in {uri}") from None
    if not tagged:
        raise ValueError(f"MLflow run {given} ({name}) in {uri} has no tag {BEST_CHECKPOINT_TAG!r}: "
                         "give the checkpoint directory instead")
    if not Path(tagged).is_dir():
        raise ValueError(f"MLflow run {given} ({name}): its {BEST_CHECKPOINT_TAG!r} tag points to "
                         f"{tagged}, which is not a directory here")
    return Path(tagged).resolve()


def load_segmentation_model(checkpoint: str | Path):
    """A segmentation checkpoint directory -> (its model, weights loaded, in eval mode; the run's saved config).

    Loading is ``histoweak.train.load_trained`` (only ``histoweak.checkpoint.load_checkpoint`` opens the files).

    Raises
    ------
    ValueError
        Naming the checkpoint: unsafe or unreadable files, a config without the training loop's keys, a
        method not registered here, or a model trained for a target other than "mask" (naming its method).
    """
    from histoweak.methods import METHODS
    from histoweak.methods.base import Task
    from histoweak.train import load_trained

    try:
        model, saved = load_trained(checkpoint)
    except KeyError as exc:
        raise ValueError(f"{Path(checkpoint) / 'config.json'}: missing {exc}; not a checkpoint of histoweak's "
                         "training loop") from None
    except ValueError as exc:
        raise ValueError(str(exc) if str(checkpoint) in str(exc) else f"checkpoint {checkpoint}: {exc}") from None
    task = model.task
    if task.target != "mask":
        able = sorted(n for n, cls in METHODS.items() if cls.supports(Task("mask", task.n_classes)))
        raise ValueError(f"checkpoint {checkpoint}: method {model.name!r} was trained for target {task.target!r}, "
                         f"not 'mask' (per-pixel classes); predict needs a segmentation checkpoint "
                         f"(methods for 'mask': {', '.join(able)})")
    return model, saved


# -- the grid -------------------------------------------------------------------------------------------
def tiling_params(config: dict, tile_size: int | None = None, stride: int | None = None,
                  level: int | None = None, mpp: float | None = None, magnification: float | None = None,
                  assume_mpp: float | None = None) -> TilingParams:
    """Prediction tiling: the checkpoint's ``config["tiling"]`` (else ``TilingParams``' defaults), then the overrides.

    A checkpoint trained on tiles at an mpp predicts at that mpp, each slide read from its own pyramid
    (``slides.resolution``); ``level``, ``mpp`` or ``magnification`` replaces the saved resolution, and
    ``tile_size`` a saved ``tile_um``. ``stride`` defaults to ``tile_size - tile_size // 4`` (a quarter of a
    tile of overlap), not the training stride: overlap is what lets blending hide the tiles' borders.
    """
    saved = config.get("tiling") or {}
    names = {f.name for f in fields(TilingParams)}
    base = {k: v for k, v in saved.items() if k in names and k != "stride"}
    if level is not None or mpp is not None or magnification is not None:
        for k in ("level", "mpp", "magnification", "tile_um"):
            base.pop(k, None)
    if tile_size is not None:
        base.pop("tile_um", None)
    base.update({k: v for k, v in dict(tile_size=tile_size, level=level, mpp=mpp, magnification=magnification,
                                       assume_mpp=assume_mpp).items() if v is not None})
    params = TilingParams(**base, stride=stride)  # validates (errors name the key)
    if stride is None:
        params = replace(params, stride=params.tile_size - params.tile_size // 4)
    elif stride > params.tile_size:
        raise ValueError(f"tiling parameter 'stride': {stride} is larger than the tile size {params.tile_size} "
                         "(it would leave gaps between tiles)")
    return params


def covering_grid(width: int, height: int, tile_size: int, stride: int) -> np.ndarray:
    """Top-left corners of tiles that cover a ``width`` x ``height`` image: every ``stride`` pixels, plus a
    last tile flush with the right and bottom edges (a single tile at 0 when the image is smaller).

    Returns
    -------
    (n, 2) int64
        (x, y) in row-major order.
    """
    def starts(n: int) -> np.ndarray:
        if n <= tile_size:
            return np.zeros(1, np.int64)
        s = np.arange(0, n - tile_size + 1, stride, dtype=np.int64)
        return s if s[-1] == n - tile_size else np.append(s, n - tile_size)

    yy, xx = np.meshgrid(starts(height), starts(width), indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def tissue_tiles(reader: SlideReader, params: TilingParams) -> tuple[np.ndarray, int]:
    """Tiles of the covering grid at the slide's resolution (``params.resolution``) that hold any tissue, and the
    grid's size.

    Tissue is detected at about ``params.tissue_downsample`` with ``params.tissue_method`` (as in tiling).

    Returns
    -------
    positions : (n, 2) int64
        Top-left corners in output pixels (of ``params.level`` when predicting by level).
    candidates : int
        Tiles in the whole grid.
    """
    from histoweak.slides.tiling import box_fraction
    from histoweak.slides.tissue import tissue_mask

    res = params.resolution(reader)
    lw, lh = res.dimensions(reader)
    ds = res.downsample
    grid = covering_grid(lw, lh, params.tile_size, params.step)
    boxes = np.concatenate([grid, grid + params.tile_size], axis=1).astype(float) * ds
    tlevel = reader.level_for_downsample(params.tissue_downsample)
    if reader.level_downsamples[tlevel] < params.tissue_downsample * 0.999 and not reader.is_pyramidal:
        tlevel = 0
    rgb = reader.read_level(tlevel) if reader.is_pyramidal or max(reader.dimensions) <= 4096 else reader.thumbnail(4096)
    fg = tissue_mask(rgb, params.tissue_method, params.tissue_min_size)
    return grid[box_fraction(fg, boxes, reader.dimensions[0] / rgb.shape[1]) > 0], len(grid)


# -- stitching ------------------------------------------------------------------------------------------
def blend_window(tile_size: int, overlap: int) -> np.ndarray:
    """(T, T) float32 blending weights: 1 inside, falling linearly over the ``overlap`` pixels at each edge.

    Along an axis the weight at distance d (0 at the edge) from the nearer edge is min((d + 1) / (overlap + 1), 1),
    so two tiles overlapping by ``overlap`` pixels cross-fade with weights summing to 1, and every pixel,
    edges included, keeps a positive weight. ``overlap`` 0 gives a flat window.
    """
    i = np.arange(tile_size)
    w = np.minimum((np.minimum(i, tile_size - 1 - i) + 1) / (max(overlap, 0) + 1), 1.0)
    return np.outer(w, w).astype(np.float32)


class Stitcher:
    """Blends overlapping tile probabilities into one slide's (C, H, W) probability map and class mask.

    Each tile adds ``window * probs`` to a sum and ``window`` to a weight (``blend_window``); the map is
    the sum over the weight, so a model that predicts the same vector at a pixel from every tile (a
    constant model, or one that depends only on the absolute position) is reproduced there, seams
    included. Pixels no tile covered (no tissue) are background (class 0).

    Memory: a (C, H, W) float32 sum and an (H, W) float32 weight, 4 (C + 1) H W bytes per slide being
    stitched (``mask`` adds no map of that size; ``probabilities`` adds one) — 6 MB for 5 classes at
    512², 2.4 GB at 10 000² pixels, 60 GB at 50 000² (a 40x slide's level 0): predict large slides at a
    coarser level; a tiled, on-disk accumulator would lift the limit.

    Parameters
    ----------
    n_classes, width, height : the map's size (pixels of the predicted level)
    tile_size, overlap : as in ``blend_window``
    """

    def __init__(self, n_classes: int, width: int, height: int, tile_size: int, overlap: int):
        self.sum = np.zeros((n_classes, height, width), np.float32)
        self.weight = np.zeros((height, width), np.float32)
        self.window = blend_window(tile_size, overlap)

    def add(self, probs: np.ndarray, x: int, y: int) -> None:
        """Add one tile's ``probs`` (C, T, T) with its top-left corner at (``x``, ``y``) (clipped to the map)."""
        h, w = min(probs.shape[1], self.weight.shape[0] - y), min(probs.shape[2], self.weight.shape[1] - x)
        if h <= 0 or w <= 0:
            return
        win = self.window[:h, :w]
        self.sum[:, y:y + h, x:x + w] += win * probs[:, :h, :w]
        self.weight[y:y + h, x:x + w] += win

    def probabilities(self) -> np.ndarray:
        """(C, H, W) float32: the blended probabilities; 1 for class 0 where no tile was added."""
        out = np.divide(self.sum, self.weight, out=np.zeros_like(self.sum), where=self.weight > 0)
        out[0][self.weight == 0] = 1.0
        return out

    def mask(self) -> np.ndarray:
        """(H, W) uint8 class indices: the argmax of ``probabilities`` (that of the sum: the weight is positive);
        0 where no tile was added."""
        return np.where(self.weight > 0, self.sum.argmax(0), 0).astype(np.uint8)


# -- Ray Data stages ------------------------------------------------------------------------------------
def _read_tiles(batch: dict[str, np.ndarray], tile_size: int,
                stain_reference: dict | None = None) -> dict[str, np.ndarray]:
    """Ray Data stage: RGB tiles (N, T, T, 3) uint8 of a batch of positions at their slide's resolution
    (``slides.resolution.read_scaled``), each slide opened once, Macenko-normalised to ``stain_reference`` when
    the model was trained so (``TrainConfig.stain_norm``).

    A slide that fails to open or read sets ``error`` (its message naming the file) on its rows.
    """
    n = len(batch["x"])
    images = np.full((n, tile_size, tile_size, 3), 255, np.uint8)
    errors = np.array([""] * n, dtype=object)
    for path in dict.fromkeys(batch["path"].tolist()):
        rows = np.flatnonzero(batch["path"] == path)
        try:
            i0 = rows[0]
            res = Resolution(float(batch["downsample"][i0]), int(batch["level"][i0]), float(batch["level_downsample"][i0]))
            with SlideReader(path) as reader:
                for i in rows:
                    images[i] = read_scaled(reader, (int(batch["x"][i]), int(batch["y"][i])), (tile_size, tile_size), res)
        except SlideError as exc:
            errors[rows] = str(exc)
    if stain_reference:
        from histoweak.data.stain import normalize_images

        images = normalize_images(images, stain_reference)[0]
    out = {k: batch[k] for k in ("slide_id", "x", "y", "downsample", "col", "row")}
    return {**out, "image": images, "error": errors}


class _Segmenter:
    """Ray Data stage (one actor per GPU, else one): the model's class probabilities (N, C, T, T) of tiles."""

    def __init__(self, model_box: list):
        import ray
        import torch

        from histoweak.data.streaming import TorchCollate

        self.model = ray.get(model_box[0])
        device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        self.model.to(device).eval()
        self.device = torch.device(device)
        self.collate = TorchCollate()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from histoweak.methods.base import to_device

        ok = batch["error"] == ""
        t = batch["image"].shape[1]
        probs = np.zeros((len(ok), self.model.task.n_classes, t, t), np.float32)
        if ok.any():
            inputs = self.collate({k: np.ascontiguousarray(batch[k][ok]) for k in ("image", "x", "y", "downsample")})
            p = self.model.predict(to_device(inputs, self.device))
            if tuple(p.shape[1:]) != probs.shape[1:]:
                raise ValueError(f"method {self.model.name!r}: predict gave {tuple(p.shape)} for {int(ok.sum())} tiles "
                                 f"of {t}px, expected (N, {probs.shape[1]}, {t}, {t}) class probabilities")
            probs[ok] = p.float().cpu().numpy()
        return {**{k: batch[k] for k in ("slide_id", "col", "row", "error")}, "probs": probs}


# -- the job ----------------------------------------------------------------------------------------------
@dataclass
class SlideResult:
    """One slide's outcome: ``status`` ok / failed (with ``error``), its output files and metrics."""

    slide_id: str
    path: str
    status: str = "pending"
    error: str | None = None
    tiles: int = 0
    outputs: dict[str, str] = field(default_factory=dict)  # mask, overlay, geojson -> path
    metrics: dict[str, float] = field(default_factory=dict)  # f1_macro, f1_micro, miou (with ground truth)


@dataclass
class PredictReport:
    out_dir: Path
    checkpoint: Path
    method: str
    params: TilingParams
    run_id: str
    slides: dict[str, SlideResult] = field(default_factory=dict)

    @property
    def failures(self) -> dict[str, str]:
        return {k: v.error or "" for k, v in self.slides.items() if v.status == "failed"}

    @property
    def mean_metrics(self) -> dict[str, float]:
        """Each metric averaged over the slides that have it (those with ground truth)."""
        keys = dict.fromkeys(k for s in self.slides.values() for k in s.metrics)
        return {k: float(np.mean([s.metrics[k] for s in self.slides.values() if k in s.metrics])) for k in keys}

    def summary_lines(self) -> list[str]:
        """One line per failed slide, naming it and its problem."""
        return [f"FAILED {sid}: {err}" for sid, err in self.failures.items()]

    def result_lines(self) -> list[str]:
        """For a person: how many slides were segmented, where the files went, each slide's metrics and the mean."""
        ok = [s for s in self.slides.values() if s.status == "ok"]
        lines = [f"{len(ok)}/{len(self.slides)} slides segmented with {self.method} ({self.checkpoint}) -> "
                 f"{self.out_dir.resolve()}"]
        for s in ok:
            m = "  ".join(f"{k} {v:.4f}" for k, v in s.metrics.items())
            lines.append(f"  {s.slide_id}: {s.tiles} tiles" + (f"  {m}" if m else ""))
        if self.mean_metrics:
            lines.append("  mean: " + "  ".join(f"{k} {v:.4f}" for k, v in self.mean_metrics.items()))
        return lines


@dataclass
class _Plan:
    spec: SlideSpec
    width: int  # at the predicted resolution
    height: int
    resolution: Resolution
    positions: np.ndarray  # (n, 2) output pixels

    @property
    def downsample(self) -> float:
        return self.resolution.downsample

    @property
    def mpp(self) -> float | None:  # of level 0
        return self.resolution.slide_mpp


def _plan(spec: SlideSpec, params: TilingParams) -> _Plan:
    with SlideReader(spec.path) as reader:
        positions, _ = tissue_tiles(reader, params)
        res = params.resolution(reader)
        w, h = res.dimensions(reader)
        return _Plan(spec, int(w), int(h), res, positions)


def _resize_nearest(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    if labels.shape == (height, width):
        return labels
    return np.asarray(Image.fromarray(labels).resize((width, height), Image.Resampling.NEAREST))


def _scores(plan: _Plan, mask: np.ndarray, n_classes: int) -> dict[str, float]:
    """Pixel F1 (macro, micro) and mIoU of ``mask`` against the slide's ground truth at the mask's resolution."""
    from histoweak import metrics as M
    from histoweak.slides.reader import MaskReader

    with SlideReader(plan.spec.path) as reader:
        dims = reader.dimensions
    truth, _ = MaskReader(plan.spec.mask_path, dims).read(plan.downsample)
    truth = _resize_nearest(truth, plan.width, plan.height)
    return M.segmentation_scores(M.confusion_matrix(truth, mask, n_classes))


def _write_outputs(plan: _Plan, mask: np.ndarray, class_names: list[str], out: Path, run_id: str, uri: str,
                   title: str) -> dict[str, str]:
    import matplotlib.pyplot as plt

    from histoweak import figures, tracking
    from histoweak.data.synthetic import write_pyramid
    from histoweak.slides.annotations import mask_to_geojson

    sid = plan.spec.slide_id
    paths = {"mask": out / f"{sid}_mask.tiff", "overlay": out / f"{sid}_overlay.png", "geojson": out / f"{sid}.geojson"}
    write_pyramid(paths["mask"], mask, mpp=plan.mpp * plan.downsample if plan.mpp else None)
    with SlideReader(plan.spec.path) as reader:
        thumb = reader.thumbnail(_OVERLAY_SIZE)
    fig = figures.overlay_figure(thumb, mask, class_names, title=f"{sid}: {title}")
    fig.savefig(paths["overlay"], dpi=100)
    tracking.log_figure(run_id, fig, f"overlays/{sid}_overlay.png", uri)
    plt.close(fig)
    geo = mask_to_geojson(mask, class_names, plan.downsample)
    tmp = paths["geojson"].with_name(f".{paths['geojson'].name}.tmp")
    tmp.write_text(json.dumps(geo))
    tmp.replace(paths["geojson"])
    return {k: str(v) for k, v in paths.items()}


def predict_slides(checkpoint: str | Path, slides: str | Path, out_dir: str | Path, masks_dir: str | Path | None = None,
                   tile_size: int | None = None, stride: int | None = None, level: int | None = None,
                   mpp: float | None = None, magnification: float | None = None, assume_mpp: float | None = None,
                   batch_size: int = 16, address: str | None = None, progress: bool = True) -> PredictReport:
    """Segment whole slides with a segmentation checkpoint; write masks, overlays, GeoJSON and metrics.

    Everything the user gives is checked before Ray starts. Then ``histoweak._ray.init_ray(address)``
    and one Ray Data pipeline over the tissue tiles of all slides; each slide is stitched, written and
    scored as soon as its last tile is back, so at most a few slides' accumulators (``Stitcher``) are
    in memory at once.

    Parameters
    ----------
    checkpoint : a checkpoint directory or an MLflow run id (``resolve_checkpoint``); its target must be "mask"
    slides : directory, glob or slides.csv (``histoweak.data.tiling_job.discover_slides``)
    out_dir : where ``<slide_id>_mask.tiff``, ``<slide_id>_overlay.png`` and ``<slide_id>.geojson`` go
    masks_dir : ground-truth masks named after the slides (a CSV's ``mask_path`` also counts): pixel metrics
    tile_size, stride, level, mpp, magnification, assume_mpp : override the checkpoint's tiling (``tiling_params``)
    batch_size : tiles per model call
    address : Ray cluster (default: ``RAY_ADDRESS``, else a local Ray); with GPUs, one model actor per GPU

    Returns
    -------
    PredictReport
        Per slide: status, error, outputs, metrics; the MLflow run id.
    """
    from histoweak import tracking
    from histoweak.data.tiling_job import discover_slides

    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    ckpt = resolve_checkpoint(checkpoint)
    model, config = load_segmentation_model(ckpt)
    params = tiling_params(config, tile_size, stride, level, mpp, magnification, assume_mpp)
    specs = discover_slides(slides, masks_dir)
    n_classes = model.task.n_classes
    if n_classes > 256:
        raise ValueError(f"checkpoint {ckpt}: {n_classes} classes do not fit a uint8 mask")
    names = list(config.get("class_names") or [])
    if len(names) != n_classes:  # an older checkpoint, or a tile table without class names
        names = ["background", *(f"class {c}" for c in range(1, n_classes))]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    uri = tracking.tracking_uri()
    from_run = _RUN_ID.fullmatch(str(checkpoint)) is not None
    run_id = tracking.parent_run(
        EXPERIMENT, f"{ckpt.parent.name}/{ckpt.name}",
        {"checkpoint": str(ckpt), "method": model.name, "tile_size": params.tile_size, "level": params.level,
         "mpp": params.target_mpp, "assume_mpp": params.assume_mpp,
         "stride": params.step, "batch_size": batch_size, "slides": str(slides), "n_slides": len(specs)},
        {"checkpoint": str(ckpt), **({"checkpoint_run": str(checkpoint)} if from_run else {})}, uri)
    report = PredictReport(out, ckpt, model.name, params, run_id,
                           {s.slide_id: SlideResult(s.slide_id, s.path) for s in specs})
    status = "FAILED"
    try:
        _run(model, params, specs, names, report, batch_size, address, progress, uri, config.get("stain_reference"))
        status = "FINISHED"
    finally:
        mean = report.mean_metrics
        tracking.log_metrics(run_id, {**{f"mean.{k}": v for k, v in mean.items()},
                                      "n_failed": len(report.failures), "n_tiles": sum(s.tiles for s in report.slides.values())},
                             uri=uri)
        tracking.end_run(run_id, status, uri)
    return report


def _run(model, params: TilingParams, specs: list[SlideSpec], names: list[str], report: PredictReport,
         batch_size: int, address: str | None, progress: bool, uri: str, stain_reference: dict | None) -> None:
    from tqdm.auto import tqdm

    from histoweak import tracking
    from histoweak._ray import init_ray

    def fail(sid: str, exc: BaseException) -> None:
        res = report.slides[sid]
        res.status = "failed"
        res.error = str(exc) if isinstance(exc, SlideError) else f"{res.path}: {type(exc).__name__}: {exc}"

    where = f"{params.target_mpp:g} µm/px" if params.target_mpp else f"level {params.level}"
    title = f"{model.name}, {where}, {params.tile_size}px tiles"

    def finish(plan: _Plan, stitcher: Stitcher | None) -> None:
        sid, res = plan.spec.slide_id, report.slides[plan.spec.slide_id]
        mask = stitcher.mask() if stitcher is not None else np.zeros((plan.height, plan.width), np.uint8)
        try:
            res.outputs = _write_outputs(plan, mask, names, report.out_dir, report.run_id, uri, title)
        except Exception as exc:  # noqa: BLE001 — an unwritable output fails this slide, the rest go on
            for suffix in ("_mask.tiff", "_overlay.png", ".geojson"):
                (report.out_dir / f"{sid}{suffix}").unlink(missing_ok=True)
            fail(sid, exc)
            return
        res.status = "ok"
        if plan.spec.mask_path:
            try:
                res.metrics = _scores(plan, mask, len(names))
            except Exception as exc:  # noqa: BLE001 — e.g. an unreadable ground truth (its message names the file)
                fail(sid, exc)
                res.error = f"prediction written, but no metrics: {res.error}"
                return
            tracking.log_metrics(report.run_id, {f"{sid}.{k}": v for k, v in res.metrics.items()}, uri=uri)

    plans: dict[str, _Plan] = {}
    for spec in specs:
        try:
            plans[spec.slide_id] = _plan(spec, params)
        except Exception as exc:  # noqa: BLE001 — a corrupt or unreadable slide fails alone
            fail(spec.slide_id, exc)
    rows = [{"slide_id": sid, "path": p.spec.path, "col": int(c), "row": int(r), "x": int(round(c * p.downsample)),
             "y": int(round(r * p.downsample)), "downsample": p.downsample, "level": p.resolution.level,
             "level_downsample": p.resolution.level_downsample}
            for sid, p in plans.items() for c, r in p.positions]
    remaining = {sid: len(p.positions) for sid, p in plans.items()}
    for sid, n in remaining.items():
        report.slides[sid].tiles = n
        if n == 0:  # no tissue: all background
            finish(plans[sid], None)
    if not rows:
        return

    init_ray(address)
    import ray

    stitchers: dict[str, Stitcher] = {}
    overlap = params.tile_size - params.step
    model_box = [ray.put(model.cpu().eval())]
    gpus = int(ray.cluster_resources().get("GPU", 0))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch_size)))
    ds = ds.map_batches(_read_tiles, fn_kwargs={"tile_size": params.tile_size,
                                                   "stain_reference": stain_reference},
                        batch_size=batch_size, batch_format="numpy", udf_modifying_row_count=False)
    ds = ds.map_batches(_Segmenter, fn_constructor_args=(model_box,), batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=max(gpus, 1)), udf_modifying_row_count=False,
                        **({"num_gpus": 1} if gpus else {"num_cpus": 1}))
    bar = tqdm(total=len(rows), unit="tile", desc="predict", disable=not progress, dynamic_ncols=True)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i, sid in enumerate(batch["slide_id"].tolist()):
                plan, res = plans[sid], report.slides[sid]
                if batch["error"][i] and res.status != "failed":
                    res.status, res.error = "failed", str(batch["error"][i])
                    stitchers.pop(sid, None)
                if res.status != "failed":
                    if sid not in stitchers:
                        stitchers[sid] = Stitcher(len(names), plan.width, plan.height, params.tile_size, overlap)
                    stitchers[sid].add(batch["probs"][i], int(batch["col"][i]), int(batch["row"][i]))
                remaining[sid] -= 1
                if remaining[sid] == 0 and res.status != "failed":
                    finish(plan, stitchers.pop(sid))
            bar.update(len(batch["slide_id"]))
            bar.set_postfix(slides=sum(s.status == "ok" for s in report.slides.values()), failed=len(report.failures))
    finally:
        bar.close()
