"""Pseudo-Supervised Contrastive Loss (PSCL): a supervised contrastive loss on feature-map pixels labelled by CAMs.

Thesis chapter 4, "Pseudo-Supervised Contrastive Loss (PSCL)": each pixel of
the encoder's last feature map takes the argmax of the class activation maps
(CAMs) as its pseudo-label, pixels whose largest activation is not above
``tau`` are dropped (eq. 4.6, 4.7), and the supervised contrastive loss of
Khosla et al. (2020) with cosine similarity is applied to the kept pixels
(eq. 4.8). The thesis computes it with ``pytorch_metric_learning.losses.SupConLoss``
(§5.1.2); this module gives the same value and gradient without the
``n_kept × n_kept`` similarity matrix, so it fits at 56×56 feature maps.

Pure PyTorch; no Ray.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["DEFAULT_CHUNK_SIZE", "DEFAULT_TAU", "DEFAULT_TEMPERATURE", "kept_pixel_labels", "pscl_loss"]

#: Confidence threshold on the largest CAM value (thesis §4.3.2, after eq. 4.6: "we set τ to 0.25").
DEFAULT_TAU = 0.25
#: Temperature of the contrastive softmax. The thesis states none; it uses pytorch-metric-learning's
#: ``SupConLoss`` (§5.1.2), whose default is 0.1.
DEFAULT_TEMPERATURE = 0.1
#: Anchor rows per chunk of the similarity matrix; it costs ``4 · chunk_size · n_kept`` bytes (float32).
DEFAULT_CHUNK_SIZE = 1024


def kept_pixel_labels(cams: torch.Tensor, tau: float = DEFAULT_TAU) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel pseudo-labels from CAMs, and which pixels are confident enough to keep (thesis eq. 4.6, 4.7).

    Parameters
    ----------
    cams : (N, K, h, w) float
        Class activation maps normalised to [0, 1]. Every channel is a class
        that can label a pixel, so a background channel, if the caller adds
        one, is simply one of the K.
    tau : float
        A pixel is kept when its largest CAM value is strictly greater than ``tau``.

    Returns
    -------
    labels : (N*h*w,) int64
        ``argmax_k cams`` (the first channel on ties) for kept pixels, -1 for the others.
        Pixels are in ``(n, i, j)`` row-major order, the order of
        ``features.permute(0, 2, 3, 1).reshape(-1, D)``.
    keep : (N*h*w,) bool
    """
    if cams.ndim != 4:
        raise ValueError(f"cams must be (N, K, h, w); got shape {tuple(cams.shape)}")
    top, labels = cams.detach().max(dim=1)
    keep = (top > tau).reshape(-1)
    labels = labels.reshape(-1).masked_fill(~keep, -1)
    return labels, keep


def pscl_loss(
    features: torch.Tensor,
    cams: torch.Tensor,
    tau: float = DEFAULT_TAU,
    temperature: float = DEFAULT_TEMPERATURE,
    max_pixels: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PSCL: supervised contrastive loss over the feature-map pixels the CAMs label confidently.

    Thesis eq. 4.6–4.8. Pixels are labelled and filtered by
    :func:`kept_pixel_labels`; their features are L2-normalised; for every
    kept anchor *i* with at least one positive (another kept pixel with its
    label), its loss is

        ℓ_i = −1/|P(i)| Σ_{p∈P(i)} log( exp(z_i·z_p / t) / Σ_{a≠i} exp(z_i·z_a / t) ),

    with *a* over all other kept pixels, and the loss is the mean of ℓ_i
    over the anchors where ℓ_i > 0. This is exactly
    ``pytorch_metric_learning.losses.SupConLoss(temperature=t)`` (cosine
    similarity, ``AvgNonZeroReducer``) applied to the kept features and
    labels, which the thesis uses: eq. 4.8 writes a mean over all kept
    pixels, but §5.2.2 ("an average non-zero reducer") confirms this one.
    Anchors without a positive have ℓ_i = 0 and so drop out of the mean
    (in exact arithmetic they are the only anchors with ℓ_i = 0).

    Only the denominators need the similarity matrix. It is built
    ``chunk_size`` anchor rows at a time with a per-row log-sum-exp, and
    rebuilt chunk by chunk in backward instead of being stored, so memory is
    one ``chunk_size × n_kept`` matrix plus O(n_kept · D), never n_kept².
    The positive terms come from per-class sums of the features. Compute
    is still quadratic in n_kept (four ``chunk × D × n_kept`` matrix
    products per chunk, forward and backward); ``max_pixels`` caps it.
    Not twice differentiable.

    Parameters
    ----------
    features : (N, D, h, w) float
        The encoder's last feature map. Gradients flow into it.
    cams : (N, K, h, w) float
        CAMs in [0, 1] at the resolution of ``features`` (interpolate them
        first). The caller decides whether a background channel is one of
        the K; the thesis includes one by default (§4.3.2, background
        seeding; §5.2.2 ablates it). Not differentiated through.
    tau : float
        Keep pixels whose largest CAM value is > ``tau`` (thesis: 0.25).
    temperature : float
        Softmax temperature *t* (0.1, SupConLoss's default; the thesis names no other).
    max_pixels : int or None
        If more than ``max_pixels`` pixels are kept, the loss is computed on
        ``max_pixels`` of them drawn uniformly at random without replacement,
        so it is a random estimate of the full loss, reproducible with
        ``generator``. None uses every kept pixel.
    chunk_size : int
        Anchor rows of the similarity matrix computed at once.
    generator : torch.Generator or None
        A CPU generator for the ``max_pixels`` sample.

    Returns
    -------
    loss : () float
        float32, or float64 for float64 features. A zero that is still
        connected to ``features`` (gradient 0) when fewer than two pixels
        are kept, no kept pixel has a positive, all kept pixels share one
        label (SupConLoss's rule: no negatives, no loss), or no anchor's
        loss is positive.
    """
    if features.ndim != 4:
        raise ValueError(f"features must be (N, D, h, w); got shape {tuple(features.shape)}")
    if cams.ndim != 4 or cams.shape[0] != features.shape[0] or cams.shape[2:] != features.shape[2:]:
        raise ValueError(
            f"cams must be (N, K, h, w) matching features (N, D, h, w) = {tuple(features.shape)}; "
            f"got {tuple(cams.shape)} — interpolate the CAMs to the feature map first"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    if max_pixels is not None and max_pixels < 2:
        raise ValueError(f"max_pixels must be >= 2 or None; got {max_pixels}")

    dtype = torch.promote_types(features.dtype, torch.float32)
    zero = features.sum().to(dtype) * 0
    labels, keep = kept_pixel_labels(cams, tau)
    idx = keep.nonzero().squeeze(1)
    if max_pixels is not None and idx.numel() > max_pixels:
        idx = idx[torch.randperm(idx.numel(), generator=generator)[:max_pixels].to(idx.device)]
    labels = labels[idx]
    if idx.numel() < 2 or labels.unique().numel() < 2:  # SupConLoss needs a negative pair as well as a positive one
        return zero

    d = features.shape[1]
    # mixed precision would round cosine/t (up to ±1/t) too coarsely for the softmax
    with torch.autocast(features.device.type, enabled=False):
        z = F.normalize(features.permute(0, 2, 3, 1).reshape(-1, d)[idx].to(dtype), dim=1)
        log_denominator = _OffDiagonalLogSumExp.apply(z, temperature, chunk_size)
        # Σ_{p∈P(i)} z_i·z_p = z_i·(sum of z over i's class) − z_i·z_i: the positive terms cost O(n·D), not O(n²)
        counts = torch.bincount(labels)
        class_sums = z.new_zeros(counts.numel(), d).index_add(0, labels, z)
        n_pos = counts[labels] - 1
        pos_sim = ((z * class_sums[labels]).sum(dim=1) - (z * z).sum(dim=1)) / temperature
        losses = torch.where(n_pos > 0, log_denominator - pos_sim / n_pos.clamp(min=1), 0)
    losses = losses[losses > 0]
    return losses.mean() if losses.numel() else zero


class _OffDiagonalLogSumExp(torch.autograd.Function):
    """lse_i = log Σ_{j≠i} exp(z_i·z_j / t) for (n, D) z, computed ``chunk_size`` rows of z zᵀ at a time.

    Backward recomputes each chunk instead of storing it, so memory is one
    (chunk_size, n) matrix in either pass; every elementwise step is in place.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, temperature: float, chunk_size: int) -> torch.Tensor:
        lse = z.new_empty(z.shape[0])
        for start, stop, s in _similarity_rows(z, temperature, chunk_size):
            top = s.amax(dim=1, keepdim=True)
            lse[start:stop] = s.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))
        ctx.save_for_backward(z, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lse: torch.Tensor):
        z, lse = ctx.saved_tensors
        grad = torch.zeros_like(z)
        weight = grad_lse / ctx.temperature
        for start, stop, s in _similarity_rows(z, ctx.temperature, ctx.chunk_size):
            # ∂lse_i/∂s_ij is the softmax over j ≠ i (0 on the diagonal, where s is −inf); s_ij = z_i·z_j / t
            w = s.sub_(lse[start:stop, None]).exp_().mul_(weight[start:stop, None])
            grad[start:stop].addmm_(w, z)
            grad.addmm_(w.T, z[start:stop])
        return grad, None, None


def _similarity_rows(z: torch.Tensor, temperature: float, chunk_size: int):
    """Yields (start, stop, z[start:stop] zᵀ / t) with −inf on the diagonal, one chunk of rows at a time."""
    for start in range(0, z.shape[0], chunk_size):
        stop = min(start + chunk_size, z.shape[0])
        s = (z[start:stop] / temperature) @ z.T
        s.diagonal(offset=start).fill_(float("-inf"))
        yield start, stop, s
