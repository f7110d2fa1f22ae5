"""The magnifying layer of MagNets (Dimitriou & Arandjelović, "Magnifying Networks for
images with billions of pixels", 2023, §3.1), in plain PyTorch.

One layer: ``resize_and_pad`` the input to 56×56 (and 112×112 for sampling),
run an ``InceptionStack`` to a 56×56 logit map, turn it into a probability
mass with ``spatial_sparsemax``, read the transformation (s, t_x, t_y) off the
mass with ``theta_params`` (eq. 1–3), build θ (eq. 4, ``make_theta``), and
sample the larger image on ``affine_grid(θ, size)`` with a sampler from
``SAMPLERS`` (``"bilinear"`` or ``"lms"``, Linearized Multi-Sampling).

Reading of "expected value → scale, expected L2 → translation"
----------------------------------------------------------------
The paper's sentence assigns the pmf's "expected value" to the scale s and the
"expected L2 operation over both the x-axis and y-axis" to the translations
(t_x, t_y). Taken literally it cannot give what eq. 4 needs: the expected
value of a 2-D position is two numbers, and one expected L2 norm is one
number, while θ needs one scale and two translations. We read it the other
way round, which does fit: the expectation of the position is *where* to look
(the translation), the expected L2 spread around it is *how wide* (the scale):

- the centre of mass c = (E_p[u], E_p[v]) over the pixel-centre coordinates
  (u along x, v along y, in [-1, 1], ``grid_coords``), and t = tanh(c)
  (eq. 2–3);
- s_raw = E_p[ ||(u, v) − c||_2 ] / k, where
  k = E||(u, v)|| for (u, v) uniform over [-1, 1]² = (√2 + asinh 1) / 3
  ≈ 0.7652, so a mass spread uniformly over a square window of half-side a
  gives s = a, and a mass uniform over the whole input gives s = 1 (the
  identity θ: the whole input); s = max(s_raw, 0.05) (eq. 1).

A single-pixel mass at the pixel centre (u0, v0) gives t = (tanh u0, tanh v0)
and s = 0.05. On a pixel grid the expectations are sums over pixel centres,
so a uniform 56×56 map gives s = 1 − 1.2e-4 (the midpoint rule's error
against the continuous k; 3e-5 at 112×112). Note that tanh shrinks the
centre of mass towards the middle (c = 0.5 gives t = 0.46): the translation is
not exactly where the mass is, as the paper's eq. 2–3 imply ("forces the
network to favour center extraction").

Samplers
--------
``bilinear_sample`` is ``F.grid_sample``. Its gradient with respect to the
grid is the slope between the four pixels around each grid point, whatever
the grid's spacing: zoomed in far (small s) it sees only pixel-level texture;
zoomed out it ignores everything between grid points. ``lms_sample``
(Jiang et al., ICCV 2019, "Linearized multi-sampling for differentiable image
transformation") keeps bilinear's forward value and image gradient, and takes
the grid gradient from a least-squares plane fitted to the image at random
auxiliary points around each grid point, spread over at least one input pixel
and at least the output pixel's footprint, so the gradient reflects the image
at the scale it is looked at.
"""

from __future__ import annotations

import math
from typing import Callable

import entmax
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SAMPLERS",
    "InceptionStack",
    "affine_grid",
    "bilinear_sample",
    "get_sampler",
    "grid_coords",
    "lms_sample",
    "make_theta",
    "resize_and_pad",
    "spatial_sparsemax",
    "theta_params",
]

# E||(u, v)||_2 for (u, v) uniform over [-1, 1]^2: twice the mean distance from
# the centre of a unit square to its points, (sqrt(2) + ln(1 + sqrt(2))) / 6.
_UNIFORM_MEAN_RADIUS = (math.sqrt(2.0) + math.asinh(1.0)) / 3.0


def spatial_sparsemax(logits: Tensor) -> Tensor:
    """Sparsemax over the H*W positions of each map (paper §3.1, "spatial sparsemax").

    Parameters
    ----------
    logits : (N, H, W) float

    Returns
    -------
    pmf : (N, H, W) float, non-negative, each map summing to 1, typically with
        most entries exactly 0 (``entmax.sparsemax`` on the flattened map)
    """
    if logits.dim() != 3:
        raise ValueError(f"spatial_sparsemax: logits must be (N, H, W), got shape {tuple(logits.shape)}")
    n, h, w = logits.shape
    return entmax.sparsemax(logits.reshape(n, h * w), dim=-1).reshape(n, h, w)


def grid_coords(h: int, w: int, device=None, dtype=None) -> tuple[Tensor, Tensor]:
    """Normalised pixel-centre coordinates, as ``F.affine_grid``/``grid_sample`` use them with
    ``align_corners=False``: pixel j of a row of w has u = (2j + 1) / w − 1.

    Returns
    -------
    u : (H, W) float, the x (width) coordinate, in (-1, 1)
    v : (H, W) float, the y (height) coordinate, in (-1, 1)
    """
    if h < 1 or w < 1:
        raise ValueError(f"grid_coords: h and w must be >= 1, got {h}x{w}")
    xs = (torch.arange(w, device=device, dtype=dtype or torch.get_default_dtype()) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=device, dtype=dtype or torch.get_default_dtype()) * 2 + 1) / h - 1
    v, u = torch.meshgrid(ys, xs, indexing="ij")
    return u, v


def theta_params(pmf: Tensor, min_scale: float = 0.05) -> tuple[Tensor, Tensor, Tensor]:
    """The constrained transformation parameters (s, t_x, t_y) of a spatial pmf (eq. 1–3).

    c = (E_p[u], E_p[v]); t = tanh(c); s = max(E_p[||(u, v) − c||] / k, min_scale)
    with k = (√2 + asinh 1) / 3 (see the module docstring for this reading).

    Parameters
    ----------
    pmf : (N, H, W) float, non-negative, each map summing to 1
    min_scale : the lower bound on s (eq. 1); the gradient flows where s_raw > min_scale

    Returns
    -------
    s, tx, ty : each (N,) float; s >= min_scale, |t| < tanh(1)
    """
    if pmf.dim() != 3:
        raise ValueError(f"theta_params: pmf must be (N, H, W), got shape {tuple(pmf.shape)}")
    u, v = grid_coords(pmf.shape[1], pmf.shape[2], device=pmf.device, dtype=pmf.dtype)
    cu = (pmf * u).sum(dim=(1, 2))
    cv = (pmf * v).sum(dim=(1, 2))
    d2 = (u - cu[:, None, None]) ** 2 + (v - cv[:, None, None]) ** 2
    # sqrt has an infinite derivative at 0, reached at the centre of mass of a
    # one-pixel mass: take it only where d2 > 0, so the gradient stays finite.
    positive = d2 > 0
    dist = torch.where(positive, torch.sqrt(torch.where(positive, d2, torch.ones_like(d2))), torch.zeros_like(d2))
    s_raw = (pmf * dist).sum(dim=(1, 2)) / _UNIFORM_MEAN_RADIUS
    return torch.clamp(s_raw, min=min_scale), torch.tanh(cu), torch.tanh(cv)


def make_theta(s: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    """θ = [[s, 0, t_x], [0, s, t_y]] (eq. 4), isotropic scaling and translation.

    Parameters
    ----------
    s, tx, ty : each (N,) float

    Returns
    -------
    theta : (N, 2, 3) float
    """
    if not (s.dim() == tx.dim() == ty.dim() == 1 and s.shape == tx.shape == ty.shape):
        raise ValueError(f"make_theta: s, tx, ty must be (N,) of one length, got "
                         f"{tuple(s.shape)}, {tuple(tx.shape)}, {tuple(ty.shape)}")
    zero = torch.zeros_like(s)
    return torch.stack([torch.stack([s, zero, tx], dim=-1), torch.stack([zero, s, ty], dim=-1)], dim=1)


def affine_grid(theta: Tensor, size: int) -> Tensor:
    """The size×size sampling grid of θ (``F.affine_grid``, ``align_corners=False``).

    Parameters
    ----------
    theta : (N, 2, 3) float
    size : output side in pixels

    Returns
    -------
    grid : (N, size, size, 2) float, (x, y) in the input's normalised coordinates
    """
    if theta.dim() != 3 or theta.shape[1:] != (2, 3):
        raise ValueError(f"affine_grid: theta must be (N, 2, 3), got shape {tuple(theta.shape)}")
    return F.affine_grid(theta, [theta.shape[0], 1, size, size], align_corners=False)


def _check_sample_args(name: str, image: Tensor, grid: Tensor) -> None:
    if image.dim() != 4:
        raise ValueError(f"{name}: image must be (N, C, H, W), got shape {tuple(image.shape)}")
    if grid.dim() != 4 or grid.shape[-1] != 2 or grid.shape[0] != image.shape[0]:
        raise ValueError(f"{name}: grid must be (N, Ho, Wo, 2) with the image's N = {image.shape[0]}, "
                         f"got shape {tuple(grid.shape)}")


def bilinear_sample(image: Tensor, grid: Tensor) -> Tensor:
    """Bilinear sampling (``F.grid_sample``, zeros outside, ``align_corners=False``).

    Parameters
    ----------
    image : (N, C, H, W) float
    grid : (N, Ho, Wo, 2) float, (x, y) normalised to [-1, 1]

    Returns
    -------
    (N, C, Ho, Wo) float
    """
    _check_sample_args("bilinear_sample", image, grid)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _local_spacing(grid: Tensor) -> Tensor:
    """(N, Ho, Wo) distance between a grid point and its neighbours: the larger of the
    steps to the next point along the output's width and along its height (the last
    row/column reuse the step before them; 0 along a side of length 1)."""
    steps = []
    for dim in (1, 2):
        if grid.shape[dim] > 1:
            d = torch.diff(grid, dim=dim).norm(dim=-1)
            steps.append(torch.cat([d, d.narrow(dim, d.shape[dim] - 1, 1)], dim=dim))
        else:
            steps.append(grid.new_zeros(grid.shape[:-1]))
    return torch.maximum(steps[0], steps[1])


def lms_sample(image: Tensor, grid: Tensor, n_aux: int = 8, generator: torch.Generator | None = None) -> Tensor:
    """Linearized Multi-Sampling (Jiang et al., ICCV 2019).

    The value is the bilinear sample at the grid points, and so is the gradient
    with respect to the image. The gradient with respect to the grid is the
    slope A of a least-squares plane I ≈ a0 + A·(p − p̄) fitted, per grid point
    and channel, to the image sampled (bilinear, detached) at ``n_aux`` points
    p = grid + ε, ε ~ N(0, diag(σx², σy²)) drawn afresh for every grid point
    and call, with σ = max(one input pixel, the local grid spacing) along each
    axis: the fit covers at least the output pixel's footprint, which is what
    makes the gradient independent of the zoom. Written as

        out = bilinear(image, grid.detach()) + Σ_xy A.detach() * (grid − grid.detach())

    whose second term is 0 in value and has gradient A with respect to grid.

    The fit has a free intercept (the plane through the auxiliary samples'
    mean), not one pinned at the grid point's own value: pixel-level texture
    at the grid point then does not tilt the plane. Auxiliary points beyond
    the image read the zero padding, so within a few σ of the border the plane
    includes the step to black (whole-input views, s ≈ 1, are such a case).

    Parameters
    ----------
    image : (N, C, H, W) float
    grid : (N, Ho, Wo, 2) float, (x, y) normalised to [-1, 1]
    n_aux : auxiliary points per grid point (>= 3: a plane has three parameters)
    generator : for the auxiliary offsets (on the grid's device); None uses the global RNG

    Returns
    -------
    (N, C, Ho, Wo) float, equal to ``bilinear_sample(image, grid)``
    """
    _check_sample_args("lms_sample", image, grid)
    if n_aux < 3:
        raise ValueError(f"lms_sample: n_aux must be >= 3 to fit a plane, got {n_aux}")
    g = grid.detach()
    out = F.grid_sample(image, g, mode="bilinear", padding_mode="zeros", align_corners=False)
    if not (torch.is_grad_enabled() and grid.requires_grad):
        return out
    n, c, h_in, w_in = image.shape
    _, h_out, w_out, _ = g.shape
    with torch.no_grad():
        spacing = _local_spacing(g)
        pixel = g.new_tensor([2.0 / w_in, 2.0 / h_in])  # one input pixel along x and y
        sigma = torch.maximum(spacing[..., None], pixel)  # (N, Ho, Wo, 2)
        eps = torch.randn((n, h_out, w_out, n_aux, 2), generator=generator, device=g.device, dtype=g.dtype)
        offsets = eps * sigma[..., None, :]
        aux = (g[..., None, :] + offsets).reshape(n, h_out, w_out * n_aux, 2)
        vals = F.grid_sample(image.detach(), aux, mode="bilinear", padding_mode="zeros", align_corners=False)
        vals = vals.reshape(n, c, h_out, w_out, n_aux)
        # Centred least squares: A = M^-1 b with M = dXᵀdX (2×2), b = dXᵀdI.
        dx = offsets - offsets.mean(dim=-2, keepdim=True)  # (N, Ho, Wo, n_aux, 2)
        di = vals - vals.mean(dim=-1, keepdim=True)  # (N, C, Ho, Wo, n_aux)
        m = dx.transpose(-1, -2) @ dx  # (N, Ho, Wo, 2, 2)
        b = torch.einsum("nhwkd,nchwk->nchwd", dx, di)  # (N, C, Ho, Wo, 2)
        m00, m01, m11 = m[..., 0, 0], m[..., 0, 1], m[..., 1, 1]
        det = m00 * m11 - m01 * m01
        # A tiny ridge keeps a near-collinear draw of offsets from producing huge slopes.
        det = det + 1e-9 * (m00 + m11) ** 2
        inv = torch.stack([torch.stack([m11, -m01], -1), torch.stack([-m01, m00], -1)], -2) / det[..., None, None]
        slope = torch.einsum("nhwde,nchwe->nchwd", inv, b)  # (N, C, Ho, Wo, 2)
    return out + (slope * (grid - g)[:, None]).sum(dim=-1)


SAMPLERS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"bilinear": bilinear_sample, "lms": lms_sample}


def get_sampler(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The sampler registered under ``name`` in ``SAMPLERS``."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; valid: {sorted(SAMPLERS)}") from None


class InceptionStack(nn.Module):
    """Three stacked inception-style layers and a 1×1 conv to one logit per pixel (paper §3.1,
    "Convolutional layers").

    Each layer runs parallel convolutions with the given kernel
    sizes, ``width`` channels each and 'same' padding, concatenates them and
    applies a ReLU. No BatchNorm: a magnifying layer sees batches of a few
    patches.

    Forward: (N, C, H, W) image -> (N, H, W) logits at the input resolution.
    """

    def __init__(self, in_channels: int = 3, width: int = 8, kernels: tuple[int, ...] = (1, 3, 5, 7)):
        super().__init__()
        if not kernels or width < 1:
            raise ValueError(f"InceptionStack: need kernels and width >= 1, got kernels={kernels}, width={width}")
        self.layers = nn.ModuleList()
        channels = in_channels
        for _ in range(3):
            self.layers.append(nn.ModuleList(nn.Conv2d(channels, width, k, padding="same") for k in kernels))
            channels = width * len(kernels)
        # No bias: sparsemax is shift-invariant, so a bias would never change the mass and its gradient, exactly
        # 0 in theory, would be float noise (which differs between one process and two workers).
        self.head = nn.Conv2d(channels, 1, 1, bias=False)
        # Zero weights: an untrained layer outputs a constant map, whose
        # sparsemax is the uniform mass, i.e. s ≈ 1, t = 0: it first looks at the
        # whole input rather than at a random spot. The head's own gradient is
        # non-zero (its input features are not), so training moves it off zero
        # at the first step, and the layers below follow.
        nn.init.zeros_(self.head.weight)

    def forward(self, x: Tensor) -> Tensor:
        for branches in self.layers:
            x = F.relu(torch.cat([conv(x) for conv in branches], dim=1))
        return self.head(x)[:, 0]


def resize_and_pad(image: Tensor, size: int) -> Tensor:
    """Resize the longer side to ``size`` (bilinear, antialiased) and pad the shorter side
    symmetrically with black to ``size`` (paper §3.1, "Resize and pad"). An odd padding puts
    the extra row/column after the image (bottom/right).

    Parameters
    ----------
    image : (N, C, H, W) float
    size : output side in pixels

    Returns
    -------
    (N, C, size, size) float
    """
    if image.dim() != 4:
        raise ValueError(f"resize_and_pad: image must be (N, C, H, W), got shape {tuple(image.shape)}")
    if size < 1:
        raise ValueError(f"resize_and_pad: size must be >= 1, got {size}")
    h, w = image.shape[-2:]
    long_side = max(h, w)
    new_h = max(1, round(h * size / long_side))
    new_w = max(1, round(w * size / long_side))
    out = F.interpolate(image, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(out, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
