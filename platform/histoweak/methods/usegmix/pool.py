"""USegMix phase 1, the segment pool: anchor features, PCA per class, and the pool's Parquet files.

Paper §2.1, "Feature Representation": each anchor segment is cropped by its
bounding box, resized to 224 × 224 and passed through a feature extractor
(the paper: CTransPath; offline default here: ImageNet EfficientNet-Lite0);
the features of each class are reduced by PCA to p = 128, giving the class-c
pool ``P^c = {(alpha_i, f_i)}``.

Stages and files (a pool directory)::

    pool.parquet      one row per anchor segment (``POOL_SCHEMA``), PCA'd features
    _pca.npz          per class c: ``mean_<c>`` (D,), ``components_<c>`` (d_c, D), so a target segment's raw
                      feature is projected with its class's PCA (``Pool.project``)
    _manifest.json    written last (a pool without it is incomplete): parameters, dimensions, counts

``pool_rows_for_tile`` is the per-tile work (a Ray Data actor calls it);
its rows (raw features) go through ``pool_table`` into a raw table, and
``finish_pool`` fits the PCA per class and writes the pool.

Plain numpy / PyTorch / pyarrow; no Ray.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from histoweak.methods.usegmix.segment import BOX_FRAC, K_PROMPTS, N_SUPERPIXELS, Segmenter, anchor_segments

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "POOL_SCHEMA", "POOL_SCHEMA_VERSION", "ClassPCA", "Pool", "SegmentFeaturizer",
    "crop_resize", "finish_pool", "mask_bbox", "pca_per_class", "pool_rows_for_tile", "pool_table", "read_pool",
    "write_pool",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Paper §2.1: crops are resized to 224 × 224; features are reduced to p = 128 per class.
CROP_SIZE = 224
PCA_DIM = 128

POOL_SCHEMA_VERSION = 1
POOL_FILE, PCA_FILE, MANIFEST_FILE = "pool.parquet", "_pca.npz", "_manifest.json"

POOL_SCHEMA = pa.schema(
    [
        pa.field("segment_id", pa.string(), nullable=False),  # "<tile key>#<i>"
        pa.field("tile_key", pa.string(), nullable=False),  # histoweak.data.schema.tile_keys
        pa.field("split", pa.string(), nullable=False),
        pa.field("class", pa.int32(), nullable=False),
        pa.field("bbox", pa.list_(pa.int32()), nullable=False),  # x0, y0, x1, y1 in the tile, exclusive ends
        pa.field("area", pa.int64(), nullable=False),  # mask pixels
        pa.field("tile_height", pa.int32(), nullable=False),  # the source tile's shape, to rebuild full masks
        pa.field("tile_width", pa.int32(), nullable=False),
        pa.field("mask", pa.binary(), nullable=False),  # 1-bit PNG of the mask cropped to bbox
        pa.field("image", pa.binary(), nullable=False),  # RGB PNG of the tile cropped to bbox (phase 2 pastes it)
        pa.field("feature", pa.list_(pa.float32())),  # raw backbone feature (raw table) or PCA'd (pool)
    ],
    metadata={b"histoweak.usegmix_pool_version": str(POOL_SCHEMA_VERSION).encode()},
)


# --------------------------------------------------------------------------------------------------
# Crops and features
# --------------------------------------------------------------------------------------------------

def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)``, exclusive ends, of the True pixels of ``mask`` ((H, W) bool); ValueError if empty."""
    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        raise ValueError("mask_bbox: the mask is empty")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def crop_resize(image: np.ndarray, mask: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """The segment's bounding-box crop of ``image``, resized (bilinear, PIL) to ``size`` × ``size``.

    As in the paper ("cropped using its bounding box"), every pixel of the
    box is kept, including those outside the mask: the feature describes the
    segment in its context, and no fill colour is invented.

    Parameters
    ----------
    image : (H, W, 3) uint8
    mask : (H, W) bool, non-empty

    Returns
    -------
    (size, size, 3) uint8
    """
    from PIL import Image

    x0, y0, x1, y1 = mask_bbox(mask)
    crop = np.ascontiguousarray(np.asarray(image)[y0:y1, x0:x1])
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))


class SegmentFeaturizer:
    """Pooled backbone features of segment crops (``histoweak.models.backbones.create_backbone``, num_classes=0).

    Inputs are scaled to [0, 1] and normalised with ``mean``/``std``
    (ImageNet's by default); the model runs in eval mode without gradients,
    ``batch_size`` crops at a time.

    Parameters
    ----------
    backbone : timm model name
    weights : "imagenet" (offline weights), a state-dict path (e.g. a user's CTransPath-like timm model), or None
    device : torch device
    size : crop side the pool resizes segments to (paper: 224)
    """

    def __init__(self, backbone: str = "tf_efficientnet_lite0", weights: str | None = "imagenet", device: str = "cpu",
                 size: int = CROP_SIZE, batch_size: int = 32, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        import torch

        from histoweak.models.backbones import create_backbone

        self.model = create_backbone(backbone, weights, num_classes=0).to(device).eval()
        self.device = torch.device(device)
        self.backbone, self.weights_source = backbone, self.model.weights_source
        self.size, self.batch_size = int(size), int(batch_size)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    @property
    def dim(self) -> int:
        """D, the feature length."""
        return int(self.model.num_features)

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        """(N, h, w, 3) uint8 crops -> (N, D) float32 features."""
        import torch

        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[-1] != 3 or crops.dtype != np.uint8:
            raise ValueError(f"crops must be (N, h, w, 3) uint8; got shape {crops.shape}, dtype {crops.dtype}")
        out = np.zeros((len(crops), self.dim), dtype=np.float32)
        with torch.no_grad():
            for s in range(0, len(crops), self.batch_size):
                x = torch.from_numpy(crops[s:s + self.batch_size]).to(self.device).permute(0, 3, 1, 2).float() / 255
                out[s:s + len(x)] = self.model((x - self._mean) / self._std).float().cpu().numpy()
        return out


# --------------------------------------------------------------------------------------------------
# PCA per class
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClassPCA:
    """One class's PCA: ``f = (x - mean) @ components.T``, zero-padded to ``dim``.

    mean : (D,) float64; components : (d_c, D) float64, d_c <= dim; dim : output length.
    """

    mean: np.ndarray
    components: np.ndarray
    dim: int

    def transform(self, x: np.ndarray) -> np.ndarray:
        """(N, D) or (D,) raw features -> (N, dim) or (dim,) float32."""
        x = np.asarray(x, dtype=np.float64)
        single = x.ndim == 1
        x = x.reshape(-1, self.mean.shape[0]) if x.size else x.reshape(0, self.mean.shape[0])
        out = np.zeros((len(x), self.dim), dtype=np.float32)
        out[:, :len(self.components)] = (x - self.mean) @ self.components.T
        return out[0] if single else out


def pca_per_class(features: np.ndarray, classes: np.ndarray, dim: int = PCA_DIM,
                  seed: int = 0) -> tuple[np.ndarray, dict[int, ClassPCA]]:
    """PCA fitted on each class's features separately (paper §2.1), zero-padded to ``dim``.

    Class c with n_c segments keeps ``d_c = min(dim, n_c - 1, D)``
    components (scikit-learn ``PCA(n_components=d_c, random_state=seed)``):
    centred data of n_c rows has rank at most n_c - 1, so further components
    would be noise; a class with one segment keeps none (its feature is all
    zeros). Columns ``d_c … dim-1`` are zeros, so every row has length ``dim``.

    Parameters
    ----------
    features : (N, D) float
    classes : (N,) int
    dim : p (paper: 128)
    seed : random_state of scikit-learn's PCA (used by its randomized solver)

    Returns
    -------
    projected : (N, dim) float32
    params : class -> :class:`ClassPCA`; ``params[c].transform(x)`` projects a new class-c feature the same way
    """
    from sklearn.decomposition import PCA

    features = np.asarray(features, dtype=np.float64)
    classes = np.asarray(classes).astype(np.int64)
    if features.ndim != 2 or len(features) != len(classes):
        raise ValueError(f"features must be (N, D) with N = len(classes) = {len(classes)}; got {features.shape}")
    if dim < 1:
        raise ValueError(f"PCA dim must be >= 1, got {dim}")
    out = np.zeros((len(features), dim), dtype=np.float32)
    params: dict[int, ClassPCA] = {}
    for c in np.unique(classes):
        idx = np.flatnonzero(classes == c)
        x = features[idx]
        d = min(dim, len(idx) - 1, x.shape[1])
        if d < 1:
            pca = ClassPCA(mean=x.mean(0), components=np.zeros((0, x.shape[1])), dim=dim)
        else:
            fit = PCA(n_components=d, random_state=seed).fit(x)
            pca = ClassPCA(mean=fit.mean_.astype(np.float64), components=fit.components_.astype(np.float64), dim=dim)
        params[int(c)] = pca
        out[idx] = pca.transform(x)
    return out, params


def _save_pca(params: dict[int, ClassPCA], path: Path) -> None:
    arrays = {"classes": np.array(sorted(params), dtype=np.int64),
              "dim": np.array([next(iter(params.values())).dim if params else 0])}
    for c, p in params.items():
        arrays[f"mean_{c}"], arrays[f"components_{c}"] = p.mean, p.components
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_pca(path: Path) -> dict[int, ClassPCA]:
    with np.load(path) as z:
        dim = int(z["dim"][0])
        return {int(c): ClassPCA(mean=z[f"mean_{c}"], components=z[f"components_{c}"], dim=dim) for c in z["classes"]}


# --------------------------------------------------------------------------------------------------
# Rows, tables, the pool on disk
# --------------------------------------------------------------------------------------------------

def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")  # bool -> 1-bit PNG
    return buf.getvalue()


def _unpng(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def pool_rows_for_tile(image: np.ndarray, tile_key: str, split: str, label: int, segmenter: Segmenter,
                       featurizer: SegmentFeaturizer | None = None, n_superpixels: int = N_SUPERPIXELS,
                       k: int = K_PROMPTS, seed: Any = 0, box_frac: float = BOX_FRAC) -> list[dict]:
    """Phase 1 on one tile: its anchor segments as pool rows (``POOL_SCHEMA`` keys), features raw (before PCA).

    Parameters
    ----------
    image : (H, W, 3) uint8 tile
    tile_key : ``histoweak.data.schema.tile_keys`` of the tile; segment ids are ``"<tile_key>#<i>"``
    split, label : the tile's split and class
    segmenter : a ``segment.Segmenter`` (built once per worker)
    featurizer : features of the ``crop_resize``'d anchors; None leaves ``feature`` None
    n_superpixels, k, seed, box_frac : ``segment.anchor_segments``'s; give each tile its own seed

    Returns
    -------
    list of dicts, one per anchor, in superpixel order
    """
    image = np.asarray(image)
    result = anchor_segments(image, segmenter, n_superpixels=n_superpixels, k=k, seed=seed, box_frac=box_frac)
    feats = None
    if featurizer is not None and result.anchors:
        feats = featurizer(np.stack([crop_resize(image, m, featurizer.size) for m in result.anchors]))
    rows = []
    for i, m in enumerate(result.anchors):
        x0, y0, x1, y1 = mask_bbox(m)
        rows.append({
            "segment_id": f"{tile_key}#{i}", "tile_key": tile_key, "split": split, "class": int(label),
            "bbox": [x0, y0, x1, y1], "area": int(m.sum()), "tile_height": image.shape[0],
            "tile_width": image.shape[1], "mask": _png(m[y0:y1, x0:x1]), "image": _png(image[y0:y1, x0:x1]),
            "feature": None if feats is None else feats[i],
        })
    return rows


def pool_table(rows: Sequence[dict]) -> pa.Table:
    """Pool rows (``pool_rows_for_tile``'s, or with PCA'd features) as a ``POOL_SCHEMA`` table."""
    cols: dict[str, Any] = {f.name: [r[f.name] for r in rows] for f in POOL_SCHEMA if f.name != "feature"}
    feats = [None if r.get("feature") is None else np.asarray(r["feature"], dtype=np.float32) for r in rows]
    cols["feature"] = pa.array(feats, type=pa.list_(pa.float32()))
    return pa.Table.from_pydict(cols, schema=POOL_SCHEMA)


def _conform(table: pa.Table, where: str) -> pa.Table:
    """``table`` with ``POOL_SCHEMA``'s columns, order and types (writers may widen to large_list/large_binary)."""
    missing = [n for n in POOL_SCHEMA.names if n not in table.schema.names]
    if missing:
        raise ValueError(f"{where}: not a pool table, missing column(s) {missing}")
    return table.select(POOL_SCHEMA.names).cast(POOL_SCHEMA)


def _features(table: pa.Table, where: str) -> np.ndarray:
    col = table.column("feature").combine_chunks()
    if col.null_count:
        raise ValueError(f"{where}: {col.null_count} segment(s) have no feature (run pool_rows_for_tile with a "
                         "featurizer)")
    lengths = set(pa.compute.list_value_length(col).to_pylist())
    if len(lengths) > 1:
        raise ValueError(f"{where}: features of different lengths {sorted(lengths)}")
    d = lengths.pop() if lengths else 0
    return np.asarray(col.flatten(), dtype=np.float32).reshape(len(table), d)


def _replace_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_pool(rows: Sequence[dict] | pa.Table, directory: str | Path, manifest: dict | None = None,
               pca: dict[int, ClassPCA] | None = None) -> Path:
    """Write a pool directory: ``pool.parquet``, ``_pca.npz`` (when ``pca`` is given), ``_manifest.json`` last.

    Each file is written under a temporary name and renamed, and the manifest
    comes last, so a reader never sees a half-written pool.

    Parameters
    ----------
    rows : pool rows or a ``POOL_SCHEMA`` table, with the features to store (PCA'd for a pool)
    directory : created if missing
    manifest : the caller's parameters (segmenter, backbone, n_superpixels, k, …), stored under their keys;
        counts per class, the feature dimension and the PCA summary are added
    pca : the per-class PCA that produced the features (``pca_per_class``)
    """
    table = _conform(rows, str(directory)) if isinstance(rows, pa.Table) else pool_table(rows)
    feats = _features(table, str(directory))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _replace_write(directory / POOL_FILE, lambda p: pq.write_table(table, p, row_group_size=256))
    classes = np.asarray(table.column("class"), dtype=np.int64)
    info = dict(manifest or {})
    info.update({
        "schema_version": POOL_SCHEMA_VERSION,
        "n_segments": int(len(table)),
        "counts_per_class": {str(int(c)): int(n) for c, n in zip(*np.unique(classes, return_counts=True))},
        "feature_dim": int(feats.shape[1]),
        "pca_file": PCA_FILE if pca else None,
        "pca": {str(c): {"n_components": int(len(p.components)), "raw_dim": int(p.mean.shape[0])}
                for c, p in sorted((pca or {}).items())},
    })
    if pca:
        _save_pca(pca, directory / PCA_FILE)
    _replace_write(directory / MANIFEST_FILE, lambda p: Path(p).write_text(json.dumps(info, indent=2, default=str)))
    return directory


def finish_pool(raw: str | Path | pa.Table, directory: str | Path, dim: int = PCA_DIM, seed: int = 0,
                manifest: dict | None = None) -> Path:
    """Raw pool rows (a Parquet file or directory of them, or a table) -> PCA per class -> ``write_pool``."""
    table = _conform(raw if isinstance(raw, pa.Table) else pq.read_table(str(raw)), str(raw))
    if len(table) == 0:
        raise ValueError(f"{raw}: no segments to build a pool from")
    feats = _features(table, str(raw))
    projected, params = pca_per_class(feats, np.asarray(table.column("class")), dim=dim, seed=seed)
    col = pa.array(list(projected), type=pa.list_(pa.float32()))
    table = table.set_column(table.schema.get_field_index("feature"), POOL_SCHEMA.field("feature"), col)
    info = {**(manifest or {}), "raw_feature_dim": int(feats.shape[1]), "pca_dim": int(dim), "pca_seed": int(seed)}
    return write_pool(table, directory, info, params)


class _ClassSource:
    """``replace.SegmentSource`` over a pool: class-local index j is the j-th of ``Pool.by_class(c)``."""

    def __init__(self, pool: "Pool"):
        self._pool = pool

    def n(self, c: int) -> int:
        return len(self._pool.by_class(c))

    def features(self, c: int) -> np.ndarray:
        return self._pool.features[self._pool.by_class(c)]

    def crop(self, c: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        i = int(self._pool.by_class(c)[j])
        return self._pool.crop_image(i), self._pool.crop_mask(i)


@dataclass
class Pool:
    """A segment pool in memory (``read_pool``). Global index i = row i of ``pool.parquet``.

    Attributes
    ----------
    segment_ids, tile_keys, splits : (N,) str arrays
    classes : (N,) int32
    bboxes : (N, 4) int32 ``(x0, y0, x1, y1)``, exclusive ends
    areas : (N,) int64
    tile_shapes : (N, 2) int32 ``(H, W)`` of the source tiles
    features : (N, p) float32, PCA'd per class
    manifest : the pool's ``_manifest.json``
    pca : class -> :class:`ClassPCA` (empty if the pool was written without)
    """

    segment_ids: np.ndarray
    tile_keys: np.ndarray
    splits: np.ndarray
    classes: np.ndarray
    bboxes: np.ndarray
    areas: np.ndarray
    tile_shapes: np.ndarray
    features: np.ndarray
    masks_png: list[bytes] = field(repr=False)
    images_png: list[bytes] = field(repr=False)
    manifest: dict = field(default_factory=dict)
    pca: dict[int, ClassPCA] = field(default_factory=dict)
    _by_tile: dict[str, list[int]] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.segment_ids)

    def by_class(self, c: int) -> np.ndarray:
        """(N_c,) int64 global indices of the class-c segments, in pool order (the class-local order)."""
        return np.flatnonzero(self.classes == int(c))

    def features_by_class(self) -> dict[int, np.ndarray]:
        """class -> (N_c, p) features, rows in ``by_class(c)`` order."""
        return {int(c): self.features[self.by_class(c)] for c in np.unique(self.classes)}

    def segments_of(self, tile_key: str) -> list[int]:
        """Global indices of the segments cut from one tile ([] if none)."""
        if self._by_tile is None:
            self._by_tile = {}
            for i, k in enumerate(self.tile_keys):
                self._by_tile.setdefault(str(k), []).append(i)
        return list(self._by_tile.get(tile_key, []))

    def crop_mask(self, i: int) -> np.ndarray:
        """(h, w) bool, segment i inside its bbox."""
        return _unpng(self.masks_png[i]).astype(bool)

    def crop_image(self, i: int) -> np.ndarray:
        """(h, w, 3) uint8, the source tile inside segment i's bbox."""
        return _unpng(self.images_png[i])

    def mask(self, i: int, shape: tuple[int, int] | None = None) -> np.ndarray:
        """(H, W) bool, segment i in a full tile of ``shape`` (default: its source tile's)."""
        h, w = (int(v) for v in (self.tile_shapes[i] if shape is None else shape))
        x0, y0, x1, y1 = (int(v) for v in self.bboxes[i])
        if x1 > w or y1 > h:
            raise ValueError(f"segment {self.segment_ids[i]}: bbox {(x0, y0, x1, y1)} does not fit shape {(h, w)}")
        out = np.zeros((h, w), dtype=bool)
        out[y0:y1, x0:x1] = self.crop_mask(i)
        return out

    def project(self, features: np.ndarray, c: int) -> np.ndarray:
        """Raw feature(s) (D,) or (n, D) -> the class-c pool's feature space, (p,) or (n, p) float32."""
        if int(c) not in self.pca:
            raise ValueError(f"no PCA for class {c}; the pool has classes {sorted(self.pca)}")
        return self.pca[int(c)].transform(features)

    def source(self) -> _ClassSource:
        """The pool as ``replace.SegmentSource`` (``n(c)``, ``features(c)``, ``crop(c, j)``)."""
        return _ClassSource(self)


def read_pool(directory: str | Path) -> Pool:
    """Load a pool directory written by ``write_pool`` / ``finish_pool``."""
    directory = Path(directory)
    if not (directory / MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"{directory}: no {MANIFEST_FILE} — not a segment pool, or an unfinished one")
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    table = _conform(pq.read_table(directory / POOL_FILE), str(directory))
    n = len(table)

    def strings(name):
        return np.asarray(table.column(name).to_pylist(), dtype=object)

    bbox = np.asarray(table.column("bbox").combine_chunks().flatten(), dtype=np.int32).reshape(n, 4)
    return Pool(
        segment_ids=strings("segment_id"), tile_keys=strings("tile_key"), splits=strings("split"),
        classes=np.asarray(table.column("class"), dtype=np.int32), bboxes=bbox,
        areas=np.asarray(table.column("area"), dtype=np.int64),
        tile_shapes=np.stack([np.asarray(table.column("tile_height"), dtype=np.int32),
                              np.asarray(table.column("tile_width"), dtype=np.int32)], axis=1).reshape(n, 2),
        features=_features(table, str(directory)),
        masks_png=table.column("mask").to_pylist(), images_png=table.column("image").to_pylist(),
        manifest=manifest,
        pca=_load_pca(directory / PCA_FILE) if manifest.get("pca_file") else {},
    )
