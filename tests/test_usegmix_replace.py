"""USegMix phase 2: eq. 1, the affine paste, the new-area ratio loop, the inpainters' contract, the DDPM method."""

from __future__ import annotations

import dataclasses
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

import histoweak.methods.usegmix.ddpm  # noqa: F401  — registers "ddpm"
from histoweak.methods.base import Task, build_method
from histoweak.methods.usegmix.inpaint import ClassicalInpainter, DiffusionInpainter, build_inpainter
from histoweak.methods.usegmix.replace import ReplacementSampler, new_area_ratio, paste, synthesize

TINY = {"sample_size": 32, "block_out_channels": [32, 32], "layers_per_block": 1}  # a list, as YAML gives it



# -- eq. 1 ---------------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_eq1_probabilities_and_weight_updates_by_hand():
    # target at the origin; pool distances D = 1, 2, 5
    sampler = ReplacementSampler({2: np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])}, seed=0)
    f_t = np.zeros(2)
    e = math.exp
    z = e(-1) + e(-2) + e(-5)
    np.testing.assert_allclose(sampler.probabilities(2, f_t), [e(-1) / z, e(-2) / z, e(-5) / z], rtol=1e-12)
    np.testing.assert_array_equal(sampler.weights(2), [1, 1, 1])
    sampler.use(2, 0)  # w = (2, 1, 1): exponents -2, -2, -5
    z = 2 * e(-2) + e(-5)
    np.testing.assert_allclose(sampler.probabilities(2, f_t), [e(-2) / z, e(-2) / z, e(-5) / z], rtol=1e-12)
    # excluded segments get 0 and the rest renormalise
    np.testing.assert_allclose(sampler.probabilities(2, f_t, exclude={1}), [e(-2) / (e(-2) + e(-5)), 0.0,
                                                                            e(-5) / (e(-2) + e(-5))], rtol=1e-12)
    # a committed draw adds one to the drawn segment's weight, an uncommitted one changes nothing
    for _ in range(5):
        before = sampler.weights(2)
        j = sampler.draw(2, f_t)
        np.testing.assert_array_equal(sampler.weights(2), before + np.eye(3)[j])
    before = sampler.weights(2)
    sampler.draw(2, f_t, commit=False)
    np.testing.assert_array_equal(sampler.weights(2), before)
    with pytest.raises(ValueError, match=r"no pool segments of class 7; classes: \[2\]"):
        sampler.probabilities(7, f_t)
    with pytest.raises(ValueError, match="every one of the 3 class-2 segments is excluded"):
        sampler.draw(2, f_t, exclude={0, 1, 2})


def test_eq1_draw_frequencies_follow_the_probabilities_and_state_pickles():
    rng = np.random.default_rng(1)
    sampler = ReplacementSampler({0: rng.normal(size=(4, 3))}, seed=3)
    f_t = rng.normal(size=3)
    p = sampler.probabilities(0, f_t)
    n = 4000
    counts = np.bincount([sampler.draw(0, f_t, commit=False) for _ in range(n)], minlength=4)
    assert np.all(np.abs(counts / n - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-9)  # 4 standard errors
    clone = pickle.loads(pickle.dumps(sampler))
    assert [clone.draw(0, f_t) for _ in range(20)] == [sampler.draw(0, f_t) for _ in range(20)]
    np.testing.assert_array_equal(clone.weights(0), sampler.weights(0))


def test_eq1_is_stable_at_large_distances():
    # exp(-w D) underflows to 0 for every segment at D ~ 1e4; shifting by the largest exponent keeps the ratios
    sampler = ReplacementSampler({0: np.array([[1e4], [1e4 + 1.0], [1e4 + 3.0]])})
    p = sampler.probabilities(0, np.zeros(1))
    z = 1 + math.exp(-1) + math.exp(-3)
    np.testing.assert_allclose(p, [1 / z, math.exp(-1) / z, math.exp(-3) / z], rtol=1e-12)


# -- paste -----------------------------------------------------------------------------------------------------
def _square_and_disk():
    image = np.full((40, 40, 3), 90, np.uint8)
    square = np.zeros((40, 40), bool)
    square[10:30, 8:28] = True  # bbox rows 10..29, cols 8..27: 20 x 20
    yy, xx = np.mgrid[:11, :11]
    disk = (yy - 5) ** 2 + (xx - 5) ** 2 <= 25  # bbox 11 x 11 (the crop itself)
    crop = np.zeros((11, 11, 3), np.uint8)
    crop[disk] = (200, 50, 50)
    crop[~disk] = (0, 0, 255)  # must never be pasted
    return image, square, crop, disk


def test_paste_maps_the_disk_onto_the_square_bbox():
    image, square, crop, disk = _square_and_disk()
    out, pasted, seam = paste(image, square, crop, disk, band=0)
    # independently: the pixel whose centre (y + 1/2, x + 1/2) lands, scaled by 11/20 from the square's corner,
    # in crop pixel floor(.) (no ties: (y - 9.5) * 11/20 is never an integer)
    expected = np.zeros((40, 40), bool)
    ys, xs = np.arange(10, 30), np.arange(8, 28)
    iy = np.floor((ys + 0.5 - 10) * 11 / 20).astype(int)
    ix = np.floor((xs + 0.5 - 8) * 11 / 20).astype(int)
    expected[10:30, 8:28] = disk[iy[:, None], ix[None, :]]
    np.testing.assert_array_equal(pasted, expected)
    np.testing.assert_array_equal(seam, square & ~expected)  # band 0: just the uncovered rest of the square
    assert (out[pasted] == (200, 50, 50)).all()  # interior of a constant region: bilinear keeps it
    assert (out[square & ~pasted] == 255).all()  # eliminated, white until inpainted
    np.testing.assert_array_equal(out[~square], image[~square])


def test_paste_seam_band_is_the_pixels_within_band_of_the_pasted_boundary():
    image, square, crop, disk = _square_and_disk()
    _, pasted, seam = paste(image, square, crop, disk, band=2)
    # Euclidean distance to the other side of the pasted boundary <= 2, on either side
    near = np.where(pasted, ndi.distance_transform_edt(pasted), ndi.distance_transform_edt(~pasted)) <= 2
    np.testing.assert_array_equal(seam, (square & ~pasted) | near)


def test_paste_scales_content_with_the_affine_map():
    # a horizontal ramp crop, fully masked, onto a 20 x 20 square: bilinear sampling at the mapped coordinate
    image = np.zeros((40, 40, 3), np.uint8)
    square = np.zeros((40, 40), bool)
    square[10:30, 8:28] = True
    crop = np.repeat((10 * np.arange(11, dtype=np.uint8))[None, :, None], 3, axis=2).repeat(11, axis=0)
    out, pasted, _ = paste(image, square, crop, np.ones((11, 11), bool), band=0)
    np.testing.assert_array_equal(pasted, square)
    c = np.clip((np.arange(8, 28) + 0.5 - 8) * 11 / 20 - 0.5, 0, 10)  # crop column at each output column
    np.testing.assert_array_equal(out[15, 8:28, 0], np.rint(10 * c).astype(np.uint8))  # no ties: 10c = 5.5x - 2.25


# -- the new-area ratio loop -----------------------------------------------------------------------------------
class _Pool:
    """A made-up class-0 pool: ellipses of random size and colour in their bounding-box crops."""

    def __init__(self, n=12, p=4, seed=0):
        rng = np.random.default_rng(seed)
        self.feats = rng.normal(size=(n, p))
        self.crops = []
        for _ in range(n):
            h, w = rng.integers(6, 16, 2)
            yy, xx = np.mgrid[:h, :w]
            m = ((yy + 0.5 - h / 2) / (h / 2)) ** 2 + ((xx + 0.5 - w / 2) / (w / 2)) ** 2 <= 1
            self.crops.append(((rng.random((h, w, 3)) * 255).astype(np.uint8), m))

    def n(self, c):
        return len(self.crops)

    def features(self, c):
        return self.feats

    def crop(self, c, j):
        return self.crops[j]


def _blocks(size, step):
    """Segments of a target image: a grid of step x step squares with a 1 px gap."""
    segs = []
    for r in range(0, size, step):
        for c in range(0, size, step):
            m = np.zeros((size, size), bool)
            m[r:r + step - 1, c:c + step - 1] = True
            segs.append(m)
    return segs


def test_synthesize_keeps_the_new_area_ratio_in_range():
    pool = _Pool()
    image = (np.random.default_rng(5).random((48, 48, 3)) * 255).astype(np.uint8)
    segs = _blocks(48, 8)  # 36 segments of 7 x 7
    feats = np.random.default_rng(6).normal(size=(len(segs), 4))
    sampler = ReplacementSampler({0: pool.features(0)}, seed=0)
    for seed, ratio in ((0, (0.3, 1.0)), (1, (0.3, 0.36)), (2, (0.5, 0.6))):
        w0 = sampler.weights(0).sum()
        s = synthesize(image, segs, feats, 0, pool, sampler, ClassicalInpainter(), np.random.default_rng(seed),
                       ratio=ratio, band=1)
        assert s.ok and ratio[0] <= s.ratio <= ratio[1], (ratio, s.ratio)
        assert s.ratio == new_area_ratio(s.changed) == s.changed.mean()
        np.testing.assert_array_equal(s.image[~s.changed], image[~s.changed])  # only the new area is new
        np.testing.assert_array_equal(s.image[~s.seam], s.before[~s.seam])  # inpainting touched only the seam
        targets = [i for i, _ in s.replaced]
        assert len(set(targets)) == len(targets)  # each target segment at most once
        assert sampler.weights(0).sum() - w0 == len(s.replaced)  # one use per replacement, none for skipped


def test_synthesize_reports_an_unreachable_ratio():
    pool = _Pool()
    image = np.full((48, 48, 3), 128, np.uint8)
    sampler = ReplacementSampler({0: pool.features(0)}, seed=0)
    # four quadrants of 24 x 24 (25 % each): one replacement is ~27 % with its seam, two overshoot 0.35
    quads = _blocks(48, 24)
    s = synthesize(image, quads, np.zeros((4, 4)), 0, pool, sampler, ClassicalInpainter(), np.random.default_rng(0),
                   ratio=(0.3, 0.35), band=1)
    assert not s.ok and len(s.replaced) == 1 and len(s.skipped) == 3 and s.ratio < 0.3
    # too few small segments to reach 30 %
    s = synthesize(image, _blocks(48, 8)[:3], np.zeros((3, 4)), 0, pool, sampler, ClassicalInpainter(),
                   np.random.default_rng(0))
    assert not s.ok and len(s.replaced) == 3 and s.ratio < 0.3
    with pytest.raises(ValueError, match=r"ratio must be \(low, high\)"):
        synthesize(image, quads, np.zeros((4, 4)), 0, pool, sampler, ClassicalInpainter(), np.random.default_rng(0),
                   ratio=(0.5, 0.4))


def test_synthesize_never_draws_the_target_images_own_segments():
    """A target segment's own copy in the pool is at distance 0: eq. 1 favours it over any other (exp(−w·0) = 1
    whatever w), so without ``own`` it wins most draws; with ``own`` it is never drawn."""
    pool = _Pool()
    image = (np.random.default_rng(5).random((48, 48, 3)) * 255).astype(np.uint8)
    segs = _blocks(48, 24)  # four quadrants: two replacements reach 30 %
    pool.feats = pool.feats * 10  # distances between different segments ~ 10s: exp(-w·D) ~ 0
    feats = pool.features(0)[[0, 1, 2, 0]]  # the target's segments are pool segments 0, 1, 2 (its own copies)
    draws = {True: [], False: []}
    for exclude_own in (False, True):
        sampler = ReplacementSampler({0: pool.features(0)}, seed=0)
        for seed in range(5):
            s = synthesize(image, segs, feats, 0, pool, sampler, ClassicalInpainter(), np.random.default_rng(seed),
                           band=1, own={0, 1, 2} if exclude_own else frozenset())
            draws[exclude_own] += [j for _, j in s.replaced]
    assert sum(j in (0, 1, 2) for j in draws[False]) >= 0.8 * len(draws[False])  # 4th quadrant: 0 may be used
    assert draws[True] and not any(j in (0, 1, 2) for j in draws[True])


# -- inpainting --------------------------------------------------------------------------------------------------
def _tiny_ddpm(**hp):
    torch.manual_seed(0)
    return build_method("ddpm", {**TINY, **hp}, Task("class:1"))


@pytest.fixture(scope="module")
def ddpm():
    return _tiny_ddpm()


def _image_and_mask(size):
    rng = np.random.default_rng(size)
    image = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    mask = np.zeros((size, size), bool)
    mask[size // 4: size // 2, size // 5: 3 * size // 4] = True
    mask[size - 8:size - 6, 3:size - 3] = True  # a 2 px seam
    return image, mask


def _inpainters(ddpm):
    out = {"biharmonic": ClassicalInpainter("biharmonic")}
    for mcg in (False, True):
        out[f"diffusion mcg={mcg}"] = DiffusionInpainter(ddpm.unet, scheduler_steps=3, jump_length=1,
                                                         jump_n_sample=2, mcg=mcg)
    return out


@pytest.mark.parametrize("size", [32, 48])  # the model's size, and resized to it and back
def test_inpainting_leaves_pixels_outside_the_mask_unchanged(ddpm, size):
    image, mask = _image_and_mask(size)
    scrambled = image.copy()
    scrambled[mask] = 255 - scrambled[mask]
    for name, inpainter in _inpainters(ddpm).items():
        out = inpainter.inpaint(image, mask, seed=3)
        assert out.dtype == np.uint8 and out.shape == image.shape
        np.testing.assert_array_equal(out[~mask], image[~mask], err_msg=name)
        # the masked pixels' own values are never read
        np.testing.assert_array_equal(inpainter.inpaint(scrambled, mask, seed=3), out, err_msg=name)


def test_biharmonic_fills_a_linear_ramp_exactly():
    # a biharmonic fill reproduces any linear function of the coordinates
    y, x = np.mgrid[:32, :32]
    image = np.stack([4 * x + 50, 3 * y + 40, 2 * x + 2 * y + 30], -1).astype(np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[10:20, 8:24] = True
    out = build_inpainter("biharmonic").inpaint(image, mask)
    assert np.abs(out.astype(int) - image.astype(int)).max() <= 1


def test_diffusion_mcg_moves_only_the_unknown_region_and_differs_from_plain(ddpm):
    image, mask = _image_and_mask(32)
    plain, mcg = (DiffusionInpainter(ddpm.unet, scheduler_steps=3, jump_length=10, jump_n_sample=1, mcg=m,
                                     mcg_weight=5.0).inpaint(image, mask, seed=0) for m in (False, True))
    assert not np.array_equal(plain[mask], mcg[mask])
    np.testing.assert_array_equal(plain[~mask], mcg[~mask])


def test_unknown_inpainter_and_missing_opencv_fail_clearly():
    with pytest.raises(ValueError, match=r"unknown inpainter 'nope'; valid: \['biharmonic', 'telea', 'diffusion'\]"):
        build_inpainter("nope")
    with pytest.raises(ValueError, match="needs a model"):
        build_inpainter("diffusion")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['steps'\]; valid: .*'scheduler_steps'"):
        build_inpainter("biharmonic", steps=50)
    # one settings dict for every backend: diffusion's options mean nothing to biharmonic
    assert build_inpainter("biharmonic", scheduler_steps=50, mcg=True).name == "biharmonic"
    try:
        import cv2  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs OpenCV"):
            build_inpainter("telea")


# -- the ddpm method ---------------------------------------------------------------------------------------------
def test_ddpm_steps_evaluates_deterministically_and_refuses_predict():
    m = _tiny_ddpm(lr=1e-3)
    assert m.hparams.block_out_channels == (32, 32)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(4, 3, 40, 40, generator=g), "label": torch.tensor([0, 1, 0, 1])}
    before = [p.detach().clone() for p in m.parameters()]
    logs = [m.step(batch) for _ in range(2)]
    assert all(np.isfinite(l["loss"]) for l in logs)
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
    batches = [batch, {"image": torch.rand(3, 3, 40, 40, generator=g)}]
    first, _ = m.evaluate_batches(batches, "val")
    second, _ = m.evaluate_batches(batches, "val")
    assert first == second and set(first) == {"val_loss"}
    # the same number by hand: DDPM's forward process x_t = sqrt(abar) x0 + sqrt(1 - abar) eps with the same draws
    g, errs = torch.Generator().manual_seed(m.EVAL_SEED), []
    abar = m.noise_scheduler.alphas_cumprod
    with torch.no_grad():
        for b in batches:
            x0 = torch.nn.functional.interpolate(b["image"], (32, 32), mode="bilinear", antialias=True) * 2 - 1
            eps = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, 1000, (len(x0),), generator=g)
            a = abar[t].view(-1, 1, 1, 1)
            pred = m.unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t).sample
            errs.append(((pred - eps) ** 2).flatten(1).mean(1))
    assert first["val_loss"] == pytest.approx(torch.cat(errs).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="not a classifier"):
        m.predict(batch)
    with pytest.raises(ValueError, match="sample_size must be >= 8 and divisible by 2"):
        build_method("ddpm", {**TINY, "sample_size": 33})


def test_ddpm_export_and_checkpoint_load_into_the_same_inpainter(ddpm, tmp_path):
    from histoweak.checkpoint import save_checkpoint
    from histoweak.train import TrainConfig

    image, mask = _image_and_mask(40)
    opts = {"scheduler_steps": 3, "jump_length": 1, "jump_n_sample": 2}
    reference = DiffusionInpainter(ddpm.unet, **opts).inpaint(image, mask, seed=7)
    exported = ddpm.save_pretrained(tmp_path / "unet")
    from_dir = build_inpainter("diffusion", str(exported), **opts).inpaint(image, mask, seed=7)
    np.testing.assert_array_equal(from_dir, reference)
    # a histoweak checkpoint as train_loop_per_worker writes it
    train = dataclasses.asdict(TrainConfig(method="ddpm", hparams=dict(TINY)))
    save_checkpoint(tmp_path / "ckpt", ddpm.state_dict(), ddpm.optimizer.state_dict(), 0, 0.5,
                    {"train": train, "n_classes": 5})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_ckpt = DiffusionInpainter.from_pretrained(tmp_path / "ckpt", **opts).inpaint(image, mask, seed=7)
    np.testing.assert_array_equal(from_ckpt, reference)
