"""The magnifying layer's pieces (histoweak.models.magnify): spatial sparsemax, the
pmf -> (s, t) reading, affine sampling, Linearized Multi-Sampling, the conv stack,
resize-and-pad."""

import math

import entmax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from histoweak.models.magnify import (
    SAMPLERS,
    InceptionStack,
    affine_grid,
    bilinear_sample,
    get_sampler,
    grid_coords,
    lms_sample,
    make_theta,
    resize_and_pad,
    spatial_sparsemax,
    theta_params,
)


def _sparsemax_np(z: np.ndarray) -> np.ndarray:
    """Sparsemax of a vector by sorting (Martins & Astudillo 2016, Alg. 1)."""
    zs = np.sort(z)[::-1]
    cs = np.cumsum(zs)
    k = np.arange(1, len(z) + 1)
    kz = k[1 + k * zs > cs][-1]
    tau = (cs[kz - 1] - 1) / kz
    return np.maximum(z - tau, 0)


def _mean_radius_uniform_square() -> float:
    """E||(u, v)|| for (u, v) uniform over [-1, 1]^2, by 2-D quadrature (not the closed form)."""
    from scipy import integrate

    val, _ = integrate.dblquad(lambda y, x: math.hypot(x, y), 0, 1, 0, 1)
    return val  # the four quadrants are alike, each of area 1 out of 4


# --- spatial sparsemax ----------------------------------------------------------------------


def test_spatial_sparsemax_is_a_sparse_pmf_per_map():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 12, 10, generator=g, dtype=torch.float64)
    logits[0, 4, 5] += 5.0  # a peaked map
    p = spatial_sparsemax(logits)
    assert p.shape == logits.shape
    assert torch.all(p >= 0)
    torch.testing.assert_close(p.sum(dim=(1, 2)), torch.ones(3, dtype=torch.float64))
    assert (p[0] == 0).float().mean() > 0.9  # the peaked map: most entries exactly 0
    assert p[0, 4, 5] == p[0].max()
    torch.testing.assert_close(p.reshape(3, -1), entmax.sparsemax(logits.reshape(3, -1), dim=-1))
    for i in range(3):
        np.testing.assert_allclose(p[i].numpy().ravel(), _sparsemax_np(logits[i].numpy().ravel()), atol=1e-12)


def test_spatial_sparsemax_rejects_a_batch_of_vectors():
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        spatial_sparsemax(torch.zeros(2, 5))


# --- grid coordinates and theta_params ------------------------------------------------------


def test_grid_coords_are_the_pixel_centres_affine_grid_uses():
    u, v = grid_coords(4, 6, dtype=torch.float64)
    ident = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]], dtype=torch.float64)
    ref = F.affine_grid(ident, [1, 1, 4, 6], align_corners=False)[0]
    torch.testing.assert_close(u, ref[..., 0])
    torch.testing.assert_close(v, ref[..., 1])
    assert u[0, 0] == -5 / 6 and v[0, 0] == -3 / 4


def test_single_pixel_mass_gives_its_centre_and_the_minimum_scale():
    h, w, i, j = 56, 56, 10, 40
    pmf = torch.zeros(1, h, w, dtype=torch.float64)
    pmf[0, i, j] = 1.0
    s, tx, ty = theta_params(pmf)
    u0, v0 = (2 * j + 1) / w - 1, (2 * i + 1) / h - 1
    assert s.item() == 0.05
    assert tx.item() == pytest.approx(math.tanh(u0), abs=1e-12)
    assert ty.item() == pytest.approx(math.tanh(v0), abs=1e-12)
    assert theta_params(pmf, min_scale=0.2)[0].item() == 0.2


@pytest.mark.parametrize("size,tol", [(112, 1e-4), (56, 2e-4)])
def test_uniform_mass_gives_the_whole_input(size, tol):
    """s = 1 up to the midpoint rule's error against the continuous k: 1.2e-4 at 56, 3e-5 at 112."""
    s, tx, ty = theta_params(spatial_sparsemax(torch.zeros(2, size, size, dtype=torch.float64)))
    torch.testing.assert_close(s, torch.ones(2, dtype=torch.float64), atol=tol, rtol=0)
    torch.testing.assert_close(tx, torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(ty, torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)


def test_scale_normaliser_is_the_mean_radius_of_the_square():
    """Uniform mass on a fine grid: the sum is a quadrature of E||(u, v)||, k is checked against scipy's."""
    k = _mean_radius_uniform_square()
    u, v = grid_coords(400, 400, dtype=torch.float64)
    assert torch.sqrt(u**2 + v**2).mean().item() == pytest.approx(k, rel=1e-5)
    s, _, _ = theta_params(torch.full((1, 400, 400), 1 / 400**2, dtype=torch.float64))
    assert s.item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("centre", [(0, 0), (14, -7)])
def test_mass_uniform_over_a_sub_square_gives_its_half_side(centre):
    """A 28x28-pixel window (half-side 0.5 in normalised units) of a 56x56 map, shifted by centre pixels."""
    logits = torch.full((1, 56, 56), -10.0, dtype=torch.float64)
    r0, c0 = 14 + centre[1], 14 + centre[0]
    logits[0, r0:r0 + 28, c0:c0 + 28] = 0.0
    pmf = spatial_sparsemax(logits)
    assert (pmf > 0).sum() == 28 * 28
    s, tx, ty = theta_params(pmf)
    assert s.item() == pytest.approx(0.5, rel=0.03)
    assert tx.item() == pytest.approx(math.tanh(centre[0] * 2 / 56), abs=1e-12)
    assert ty.item() == pytest.approx(math.tanh(centre[1] * 2 / 56), abs=1e-12)


def test_theta_params_constraints_and_gradient():
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(16, 20, 20, generator=g, dtype=torch.float64)).requires_grad_()
    logits.data[:8] *= 20  # peaked maps: tiny supports, s at the bound
    s, tx, ty = theta_params(spatial_sparsemax(logits))
    assert torch.all(s >= 0.05) and torch.any(s == 0.05) and torch.any(s > 0.05)
    assert torch.all(tx.abs() < math.tanh(1)) and torch.all(ty.abs() < math.tanh(1))
    (s + tx + ty).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[8:].abs().sum() > 0


def test_gradient_is_finite_for_a_one_pixel_mass():
    """The L2 distance has an infinite derivative at 0, i.e. at the centre of a one-pixel mass."""
    pmf = torch.zeros(1, 8, 8, dtype=torch.float64)
    pmf[0, 3, 3] = 1.0
    pmf.requires_grad_()
    s, tx, ty = theta_params(pmf, min_scale=0.0)
    (s + tx + ty).sum().backward()
    assert torch.isfinite(pmf.grad).all()


def test_make_theta_and_affine_grid():
    s, tx, ty = torch.tensor([0.5, 1.0]), torch.tensor([0.1, 0.0]), torch.tensor([-0.2, 0.0])
    theta = make_theta(s, tx, ty)
    torch.testing.assert_close(theta[0], torch.tensor([[0.5, 0, 0.1], [0, 0.5, -0.2]]))
    grid = affine_grid(theta, 7)
    u, v = grid_coords(7, 7)
    torch.testing.assert_close(grid[1], torch.stack([u, v], dim=-1))
    torch.testing.assert_close(grid[0], torch.stack([0.5 * u + 0.1, 0.5 * v - 0.2], dim=-1))
    with pytest.raises(ValueError, match="one length"):
        make_theta(s, tx, ty[:1])


# --- samplers --------------------------------------------------------------------------------


def test_get_sampler_names_the_valid_ones():
    assert get_sampler("lms") is lms_sample and get_sampler("bilinear") is bilinear_sample
    with pytest.raises(ValueError, match=r"'bicubic'.*\['bilinear', 'lms'\]"):
        get_sampler("bicubic")


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_top_left_quarter_is_sampled_exactly(name, dtype, atol):
    """s = 0.5, t = (-0.5, -0.5) at 56x56 on 112x112: output pixel centres land on input pixel centres.

    Exactly up to the rounding of F.affine_grid's coordinates (~2e-6 pixel in float32), not bitwise.
    """
    g = torch.Generator().manual_seed(2)
    image = torch.rand(2, 3, 112, 112, generator=g, dtype=dtype)
    theta = make_theta(*(torch.full((2,), x, dtype=dtype) for x in (0.5, -0.5, -0.5)))
    grid = affine_grid(theta, 56).requires_grad_()  # LMS takes its gradient path
    out = get_sampler(name)(image, grid)
    torch.testing.assert_close(out, image[..., :56, :56], atol=atol, rtol=0)
    torch.testing.assert_close(out, bilinear_sample(image, grid), atol=0, rtol=0)


def _ramp_image(n, size, a, b, dtype=torch.float64):
    u, v = grid_coords(size, size, dtype=dtype)
    return (a * u + b * v)[None, None].expand(n, 2, size, size).contiguous()


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("s0", [0.05, 0.3])
def test_gradient_on_a_linear_ramp_is_its_slope(name, s0):
    """I = a*x + b*y: the mean of the output has d/dtx = a, d/dty = b, d/ds = 0 (grid centred)."""
    a, b = 1.7, -0.6
    image = _ramp_image(3, 112, a, b)
    s = torch.full((3,), s0, dtype=torch.float64, requires_grad=True)
    tx = torch.tensor([0.1, -0.3, 0.4], dtype=torch.float64, requires_grad=True)
    ty = torch.tensor([-0.2, 0.5, 0.0], dtype=torch.float64, requires_grad=True)
    out = get_sampler(name)(image, affine_grid(make_theta(s, tx, ty), 56))
    torch.testing.assert_close(out, bilinear_sample(image, affine_grid(make_theta(s, tx, ty), 56)))
    out.mean(dim=(1, 2, 3)).sum().backward()
    torch.testing.assert_close(tx.grad, torch.full_like(tx, a), atol=1e-6, rtol=0)
    torch.testing.assert_close(ty.grad, torch.full_like(ty, b), atol=1e-6, rtol=0)
    torch.testing.assert_close(s.grad, torch.zeros_like(s), atol=1e-6, rtol=0)


def _textured_ramp(n, size, a, c, pattern):
    u, _ = grid_coords(size, size, dtype=torch.float64)
    i = torch.arange(size)
    sign = {"checkerboard": (i[:, None] + i[None, :]) % 2, "stripes": (i[None, :] + 0 * i[:, None]) % 2}[pattern]
    return (a * u + c * (2 * sign - 1))[None, None].expand(n, 1, size, size).contiguous()


def _translations(n, s0, seed):
    g = torch.Generator().manual_seed(seed)
    lim = 1 - s0 - 0.15  # the patch and LMS's auxiliary points stay off the zero padding
    return [(torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * lim for _ in range(2)]


def _per_pixel_tx_errors(image, base, a, seed):
    """RMS over pixels and images of d out_p / d tx_p - a per sampler, tx_p a translation
    added to output pixel p's grid point alone (out_p depends on it only, so one backward
    of the sum gives them all)."""
    errors = {}
    for name, sampler in SAMPLERS.items():
        shift = torch.zeros(base.shape[:-1], dtype=base.dtype, requires_grad=True)
        grid = base + torch.stack([shift, torch.zeros_like(shift)], dim=-1)
        kwargs = {"generator": torch.Generator().manual_seed(seed)} if name == "lms" else {}
        sampler(image, grid, **kwargs).sum().backward()
        errors[name] = (shift.grad - a).pow(2).mean().sqrt().item()
    return errors


def test_lms_per_pixel_gradient_follows_the_ramp_through_pixel_texture():
    """Ramp (slope 1) plus a pixel-level checkerboard (±0.1, 5.6 ramp steps) seen at s = 0.05.

    Bilinear's d out_p / d tx is the slope between the 4 pixels around p, i.e.
    the checkerboard's ±11; LMS's is a plane fitted over >= 1 pixel around p.
    Per pixel, because a downstream network weights the output pixels unevenly
    (the mean over the patch is the next test).
    """
    n, s0, a = 32, 0.05, 1.0
    image = _textured_ramp(n, 112, a, 0.1, "checkerboard")
    tx, ty = _translations(n, s0, seed=3)
    base = affine_grid(make_theta(torch.full((n,), s0, dtype=torch.float64), tx, ty), 56)
    errors = _per_pixel_tx_errors(image, base, a, seed=4)
    assert errors["lms"] < errors["bilinear"] / 4, errors  # measured: 0.95 vs 6.5


def test_lms_patch_gradient_follows_the_ramp_through_stripes():
    """The same at the scale of the patch: d mean(out) / d tx on a ramp plus pixel-level columns
    (±0.1) at s = 0.05. Bilinear's gradients telescope to a finite difference across the patch
    (5.6 pixels), which the stripes still swing; LMS's fits smooth them out. (A 2-D checkerboard
    averages itself out along y here, and so is no test of the patch-level gradient.)"""
    n, s0, a = 32, 0.05, 1.0
    image = _textured_ramp(n, 112, a, 0.1, "stripes")
    errors = {}
    for name, sampler in SAMPLERS.items():
        tx, ty = _translations(n, s0, seed=5)
        tx.requires_grad_()
        grid = affine_grid(make_theta(torch.full((n,), s0, dtype=torch.float64), tx, ty), 56)
        kwargs = {"generator": torch.Generator().manual_seed(6)} if name == "lms" else {}
        sampler(image, grid, **kwargs).mean(dim=(1, 2, 3)).sum().backward()
        errors[name] = (tx.grad - a).pow(2).mean().sqrt().item()
    assert errors["lms"] < errors["bilinear"] / 5, errors  # measured: 0.029 vs 0.65


def test_lms_image_gradient_is_bilinears():
    g = torch.Generator().manual_seed(7)
    image = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64)
    theta = make_theta(torch.tensor([0.3, 0.8], dtype=torch.float64), torch.tensor([0.2, -0.1], dtype=torch.float64),
                       torch.tensor([0.0, 0.1], dtype=torch.float64))
    w = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64)
    grads = []
    for sampler in (bilinear_sample, lms_sample):
        img = image.clone().requires_grad_()
        grid = affine_grid(theta, 16).requires_grad_()
        (sampler(img, grid) * w).sum().backward()
        grads.append(img.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_lms_auxiliary_spread_follows_the_grid_spacing():
    """Zoomed out (s = 0.5, 14x14 on 448x448: grid spacing 16 input pixels), LMS spreads its
    auxiliary points over the spacing, so a plane fitted across ~16x16 checkerboard cells
    averages the texture away; bilinear's gradient sees only its 4 neighbours (and here the
    same phase of the checkerboard at every grid point). With the spread held at one input
    pixel LMS's error would be ~3.9, bilinear / 7: the ratio asserted needs the wider fit."""
    n, a = 16, 1.0
    image = _textured_ramp(n, 448, a, 0.1, "checkerboard")
    g = torch.Generator().manual_seed(8)
    tx, ty = ((torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * 0.15 for _ in range(2))
    base = affine_grid(make_theta(torch.full((n,), 0.5, dtype=torch.float64), tx, ty), 14)
    errors = _per_pixel_tx_errors(image, base, a, seed=9)
    assert errors["lms"] < errors["bilinear"] / 30, errors  # measured: 0.23 vs 26


def test_lms_without_grid_gradient_is_bilinear():
    image = torch.rand(1, 3, 20, 20)
    grid = affine_grid(make_theta(torch.tensor([0.4]), torch.tensor([0.1]), torch.tensor([0.2])), 9)
    assert torch.equal(lms_sample(image, grid), bilinear_sample(image, grid))
    with pytest.raises(ValueError, match="n_aux"):
        lms_sample(image, grid.requires_grad_(), n_aux=2)


# --- the conv stack and resize-and-pad ------------------------------------------------------


def test_inception_stack_starts_at_the_whole_input():
    torch.manual_seed(0)
    net = InceptionStack()
    x = torch.rand(2, 3, 56, 56)
    logits = net(x)
    assert logits.shape == (2, 56, 56)
    assert torch.all(logits == 0)
    s, tx, ty = theta_params(spatial_sparsemax(logits))
    torch.testing.assert_close(s, torch.ones(2), atol=2e-4, rtol=0)
    assert torch.all(tx.abs() < 1e-6) and torch.all(ty.abs() < 1e-6)
    # The zero head still learns: its gradient is not zero.
    (s + tx).sum().backward()
    assert net.head.weight.grad.abs().sum() > 0


def test_inception_stack_shapes_for_other_widths_and_kernels():
    net = InceptionStack(in_channels=1, width=4, kernels=(3, 5))
    assert net(torch.rand(3, 1, 20, 28)).shape == (3, 20, 28)


@pytest.mark.parametrize("hw,bands", [((50, 100), (14, 14)), ((30, 100), (19, 20))])
def test_resize_and_pad_wide_image(hw, bands):
    h, w = hw
    image = torch.ones(1, 3, h, w)
    out = resize_and_pad(image, 56)
    assert out.shape == (1, 3, 56, 56)
    top, bottom = bands
    assert torch.all(out[:, :, :top] == 0) and torch.all(out[:, :, 56 - bottom:] == 0)
    torch.testing.assert_close(out[:, :, top:56 - bottom], torch.ones(1, 3, 56 - top - bottom, 56))


def test_resize_and_pad_tall_image_content_is_the_resized_image():
    from torchvision.transforms.functional import resize

    g = torch.Generator().manual_seed(10)
    image = torch.rand(2, 3, 200, 100, generator=g)
    out = resize_and_pad(image, 56)
    assert torch.all(out[..., :14] == 0) and torch.all(out[..., 42:] == 0)
    torch.testing.assert_close(out[..., 14:42], resize(image, [56, 28], antialias=True))
