"""Inpainting the seams of a segment replacement (USegMix phase 2, §2.2), behind one interface.

Every backend keeps the contract of ``Inpainter.inpaint``: pixels outside the mask come back unchanged, bit for
bit (the base class recomposes the backend's output with the input, so no backend can break it).

- ``ClassicalInpainter("biharmonic")``: scikit-image's ``inpaint_biharmonic`` — the CPU default;
  ``"telea"``: OpenCV's Telea fast marching (needs OpenCV, imported on use).
- ``DiffusionInpainter``: RePaint (Lugmayr et al., CVPR 2022) with an ε-prediction ``diffusers.UNet2DModel``
  (the paper's LDM plays this role; ours works in pixel space at the model's sample size), DDIM steps, and
  optionally the manifold-constraint gradient of MCG (Chung et al., NeurIPS 2022), as the paper does. What
  diffusers gives is reused: ``RePaintScheduler`` — its ``step`` is the DDIM update (Song et al. 2021, eq. 12,
  with ``eta``) followed by RePaint's replacement of the known region by the forward-noised original, its
  ``undo_step`` re-noises x_{t-1} -> x_t, its ``set_timesteps`` lays out the jump schedule. Only the loop is
  written here (the deprecated ``RePaintPipeline``'s loop, plus the MCG correction and the resizing).

``build_inpainter(name, model, **opts)`` builds one by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["INPAINTERS", "ClassicalInpainter", "DiffusionInpainter", "Inpainter", "build_inpainter"]


class Inpainter:
    """Base class: fills the masked pixels of an RGB image; subclasses implement ``_fill``."""

    name: ClassVar[str] = "?"

    def inpaint(self, image: np.ndarray, mask: np.ndarray, seed: int = 0) -> np.ndarray:
        """Fill ``mask`` in ``image``.

        Parameters
        ----------
        image : (H, W, 3) uint8.
        mask : (H, W) bool, True where pixels are to be filled (their values in ``image`` are ignored).
        seed : for stochastic backends (the same seed gives the same output).

        Returns
        -------
        (H, W, 3) uint8: ``image`` where ``mask`` is False, exactly; the backend's fill where it is True.
        """
        image, mask = np.asarray(image), np.asarray(mask)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"inpaint: image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        if mask.shape != image.shape[:2]:
            raise ValueError(f"inpaint: mask {mask.shape} does not match the image {image.shape[:2]}")
        mask = mask.astype(bool)
        if not mask.any():
            return image.copy()
        if mask.all():
            raise ValueError("inpaint: the mask covers the whole image; nothing is left to inpaint from")
        filled = np.clip(np.rint(np.asarray(self._fill(image, mask, seed), np.float64)), 0, 255).astype(np.uint8)
        return np.where(mask[..., None], filled, image)

    def _fill(self, image: np.ndarray, mask: np.ndarray, seed: int) -> np.ndarray:
        """(H, W, 3) values in [0, 255] (any float or int dtype); only the masked pixels are used."""
        raise NotImplementedError


class ClassicalInpainter(Inpainter):
    """Classical inpainting: ``"biharmonic"`` (scikit-image) or ``"telea"`` (OpenCV, if installed).

    Deterministic: ``seed`` is ignored. ``radius`` is Telea's neighbourhood in pixels.
    """

    METHODS: ClassVar[tuple[str, ...]] = ("biharmonic", "telea")

    def __init__(self, method: str = "biharmonic", radius: int = 3):
        if method not in self.METHODS:
            raise ValueError(f"classical inpainter: unknown method {method!r}; valid: {list(self.METHODS)}")
        if method == "telea":
            try:
                import cv2  # noqa: F401
            except ImportError:
                raise ImportError("classical inpainter 'telea' needs OpenCV (pip install opencv-python-headless); "
                                  "'biharmonic' needs only scikit-image") from None
        self.method, self.radius = method, int(radius)
        self.name = method

    def _fill(self, image: np.ndarray, mask: np.ndarray, seed: int) -> np.ndarray:
        if self.method == "telea":
            import cv2

            return cv2.inpaint(image, mask.astype(np.uint8), self.radius, cv2.INPAINT_TELEA)
        from skimage.restoration import inpaint_biharmonic

        # split_into_regions: one small sparse system per seam instead of one for the whole image (same result)
        return 255.0 * inpaint_biharmonic(image / 255.0, mask, split_into_regions=True, channel_axis=-1)


class DiffusionInpainter(Inpainter):
    """RePaint inpainting with an ε-prediction ``UNet2DModel``, DDIM steps, optional MCG.

    Parameters
    ----------
    model : ``diffusers.UNet2DModel`` predicting ε, 3 channels in and out, trained on images in [−1, 1].
    scheduler_steps : DDIM steps from T to 0 (the paper uses 500 with its LDM).
    jump_length, jump_n_sample : RePaint's resampling: every ``jump_length`` steps, go back up ``jump_length``
        steps (re-noise) and down again, ``jump_n_sample - 1`` times (1: no resampling). Model evaluations
        ≈ ``scheduler_steps · jump_n_sample``.
    mcg : apply the manifold-constraint gradient correction (see ``_step``).
    mcg_weight : its step size λ.
    device : torch device of the model.
    eta : DDIM's noise scale (0: deterministic steps; 1: DDPM's).
    scheduler : ``diffusers.RePaintScheduler`` carrying the model's noise schedule (betas); default: diffusers'
        linear schedule with 1000 training steps — ``DDPMScheduler``'s default, which the ``ddpm`` method trains with.

    Notes
    -----
    The model works at its ``sample_size``: the image is resized to it (bilinear, antialiased) and back, and the
    mask is reduced so that a model pixel is unknown when any image pixel it covers is masked (max pooling) —
    nearest-neighbour resizing could drop a 1–2 px seam entirely. The output is recomposed with the input at
    full resolution (``Inpainter.inpaint``), so known pixels stay exact; the filled pixels carry the model's
    resolution.
    """

    name = "diffusion"

    def __init__(self, model, scheduler_steps: int = 50, jump_length: int = 10, jump_n_sample: int = 2,
                 mcg: bool = False, mcg_weight: float = 1.0, device: str | torch.device = "cpu", *,
                 eta: float = 0.0, scheduler=None):
        from diffusers import RePaintScheduler

        cfg = model.config
        if cfg.in_channels != 3 or cfg.out_channels != 3:
            raise ValueError(f"diffusion inpainter: the model must map 3 channels to 3 (an RGB ε-prediction "
                             f"UNet), got {cfg.in_channels} -> {cfg.out_channels}")
        if scheduler_steps < 1 or jump_length < 1 or jump_n_sample < 1:
            raise ValueError(f"diffusion inpainter: scheduler_steps, jump_length and jump_n_sample must be >= 1, got "
                             f"{scheduler_steps}, {jump_length}, {jump_n_sample}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"diffusion inpainter: eta must be in [0, 1], got {eta}")
        self.model = model.to(device).eval()
        self.scheduler = scheduler or RePaintScheduler(num_train_timesteps=1000)
        if not isinstance(self.scheduler, RePaintScheduler):
            raise TypeError(f"diffusion inpainter: scheduler must be a diffusers RePaintScheduler, got "
                            f"{type(self.scheduler).__name__} (RePaintScheduler.from_config(its config) converts it)")
        self.steps, self.jump_length, self.jump_n_sample = int(scheduler_steps), int(jump_length), int(jump_n_sample)
        self.eta, self.mcg, self.mcg_weight = float(eta), bool(mcg), float(mcg_weight)
        self.device = torch.device(device)
        size = cfg.sample_size
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    # -- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, **opts) -> "DiffusionInpainter":
        """Load from a local directory: a histoweak checkpoint of the ``ddpm`` method (``state.pt`` +
        ``config.json``, as ``jobs/train_inpainter.py`` writes), or a diffusers directory — a ``UNet2DModel``
        (``config.json`` + weights, e.g. from ``DDPM.save_pretrained``, optionally with ``scheduler_config.json``
        beside it) or a pipeline (``unet/`` and ``scheduler/`` subfolders, e.g. google/ddpm-*). Never downloads.

        ``opts`` are the constructor's (``scheduler_steps``, ``mcg``, …).
        """
        from diffusers import RePaintScheduler, UNet2DModel

        from histoweak.checkpoint import STATE_FILE

        p = Path(path)
        if (p / STATE_FILE).is_file():
            from histoweak.train import load_trained  # imported here: it needs Ray, the rest of this module does not

            method, saved = load_trained(p)
            if not hasattr(method, "unet"):
                raise ValueError(f"diffusion inpainter: {p} is a checkpoint of method {method.name!r}; "
                                 "train one with method 'ddpm' (jobs/train_inpainter.py)")
            return cls(method.unet, scheduler=_repaint_scheduler(method.noise_scheduler.config), **opts)
        if (p / "unet" / "config.json").is_file():
            unet_dir, scheduler_files = p / "unet", [p / "scheduler" / "scheduler_config.json"]
        elif (p / "config.json").is_file():
            unet_dir, scheduler_files = p, [p / "scheduler_config.json"]
        else:
            raise FileNotFoundError(f"diffusion inpainter: {p} is neither a histoweak checkpoint (state.pt) nor a "
                                    "diffusers UNet2DModel directory (config.json) or pipeline (unet/config.json)")
        model = UNet2DModel.from_pretrained(unet_dir, local_files_only=True)
        found = next((f for f in scheduler_files if f.is_file()), None)
        scheduler = _repaint_scheduler(RePaintScheduler.load_config(found.parent)) if found else None
        return cls(model, scheduler=scheduler, **opts)

    # -- the loop --------------------------------------------------------------------------------------------
    def _fill(self, image: np.ndarray, mask: np.ndarray, seed: int) -> np.ndarray:
        h, w = mask.shape
        # masked pixels take the mean known colour first: resizing mixes neighbours into the known model pixels
        # at the mask's rim, and what is to be replaced must not leak into them
        image = np.where(mask[..., None], image[~mask].mean(0), image)
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)  # (1, 3, H, W) in [-1, 1]
        m = torch.from_numpy(mask)[None, None].float()
        if (h, w) != self.size:
            x = F.interpolate(x, self.size, mode="bilinear", antialias=True, align_corners=False)
            m = F.adaptive_max_pool2d(m, self.size)
        known = (1.0 - m).to(self.device)
        y = x.to(self.device, self.model.dtype)
        out = self.sample(y, known, seed)
        if (h, w) != self.size:
            out = F.interpolate(out, (h, w), mode="bilinear", align_corners=False)
        return out[0].permute(1, 2, 0).add(1.0).mul(127.5).cpu().numpy()

    @torch.no_grad()
    def sample(self, y: torch.Tensor, known: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """RePaint at the model's resolution.

        Parameters
        ----------
        y : (N, 3, s, s) float in [−1, 1], the images (their unknown pixels are ignored).
        known : (N, 1, s, s) float, 1 where ``y`` is known, 0 where it is to be generated.
        seed : seed of the torch generator (initial noise, DDIM/RePaint noise, resampling jumps).

        Returns
        -------
        (N, 3, s, s) float in [−1, 1].
        """
        sched = self.scheduler
        g = torch.Generator("cpu").manual_seed(int(seed))
        # timesteps stay on the CPU: the scheduler indexes its CPU tables with them; the UNet moves them itself
        sched.set_timesteps(self.steps, self.jump_length, self.jump_n_sample)
        sched.eta = self.eta
        x = torch.randn(y.shape, generator=g).to(self.device, y.dtype)
        t_last = sched.timesteps[0] + 1
        for t in sched.timesteps:
            if t < t_last:  # down: x_t -> x_{t-1}
                x = self._step(x, t, y, known, g)
            else:  # a resampling jump up: x_{t-1} -> x_t
                x = sched.undo_step(x, t_last, g)
            t_last = t
        return x.clamp(-1.0, 1.0)

    def _step(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, known: torch.Tensor,
              g: torch.Generator) -> torch.Tensor:
        """One RePaint step: DDIM x_t -> x_{t-1} on the unknown region, the forward-noised ``y`` on the known one.

        With MCG (Chung et al. 2022, eq. 13 with their step size α = λ / ‖W(y − x̂_0)‖, Appendix), before the
        known region is replaced the unknown region moves by

            −λ · ∇_{x_t} ‖known ⊙ (y − x̂_0(x_t))‖₂² / ‖known ⊙ (y − x̂_0(x_t))‖₂,

        with x̂_0(x_t) = (x_t − √(1 − ᾱ_t) ε_θ(x_t, t)) / √ᾱ_t (Tweedie's estimate, not clipped, so the gradient
        does not vanish where the early estimates leave [−1, 1]): the generated pixels are pulled towards values
        whose denoised estimate agrees with the known pixels. Without the normalisation the squared norm's gradient
        scales with 1/√ᾱ_t and the image size, and blows up at large t. The correction is applied to the unknown
        region only (the known one is replaced right after, as in MCG's projection step).
        """
        sched = self.scheduler
        if not self.mcg:
            eps = self.model(x, t).sample
            return sched.step(eps, t, x, y, known, generator=g).prev_sample
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            eps = self.model(x_in, t).sample
            a = sched.alphas_cumprod[int(t)].to(x.device, x.dtype)
            x0 = (x_in - (1.0 - a).sqrt() * eps) / a.sqrt()
            sq = (known * (y - x0)).square().sum()
            grad, = torch.autograd.grad(sq, x_in)
        prev = sched.step(eps.detach(), t, x, y, known, generator=g).prev_sample
        return prev - self.mcg_weight * (1.0 - known) * grad / sq.detach().sqrt().clamp_min(1e-12)


def _repaint_scheduler(config):
    """A ``RePaintScheduler`` with the noise schedule of a DDPM/DDIM scheduler ``config`` (ε-prediction only)."""
    from diffusers import RePaintScheduler

    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(f"diffusion inpainter: the model predicts {prediction!r}; RePaint here needs 'epsilon'")
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "clip_sample")
    return RePaintScheduler(**{k: config[k] for k in keys if config.get(k) is not None})


INPAINTERS = ("biharmonic", "telea", "diffusion")


def build_inpainter(name: str, model: str | None = None, **opts) -> Inpainter:
    """An inpainter by name.

    Parameters
    ----------
    name : ``"biharmonic"``, ``"telea"`` (classical; option ``radius``) or ``"diffusion"`` (options of
        ``DiffusionInpainter``: ``scheduler_steps``, ``jump_length``, ``jump_n_sample``, ``eta``, ``mcg``,
        ``mcg_weight``, ``device``).
    model : for ``"diffusion"``, the local directory ``DiffusionInpainter.from_pretrained`` loads; unused otherwise.
    opts : the backend's options. Options of the other backend are ignored, so one settings dict serves every
        backend (``mcg`` means nothing to biharmonic); a name no backend knows is an error.
    """
    import inspect

    known = {"classical": set(inspect.signature(ClassicalInpainter).parameters) - {"method"},
             "diffusion": set(inspect.signature(DiffusionInpainter).parameters) - {"model", "scheduler"}}
    unknown = sorted(set(opts) - known["classical"] - known["diffusion"])
    if unknown:
        raise ValueError(f"inpainter {name!r}: unknown option(s) {unknown}; valid: classical "
                         f"{sorted(known['classical'])}, diffusion {sorted(known['diffusion'])}")
    if name in ClassicalInpainter.METHODS:
        return ClassicalInpainter(name, **{k: v for k, v in opts.items() if k in known["classical"]})
    if name == "diffusion":
        if not model:
            raise ValueError("inpainter 'diffusion' needs a model: a histoweak 'ddpm' checkpoint or a diffusers "
                             "UNet2DModel directory")
        return DiffusionInpainter.from_pretrained(model, **{k: v for k, v in opts.items() if k in known["diffusion"]})
    raise ValueError(f"unknown inpainter {name!r}; valid: {list(INPAINTERS)}")
