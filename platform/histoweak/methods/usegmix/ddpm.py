"""DDPM: a pixel-space denoising diffusion model of the user's tiles, the inpainting prior of USegMix (§2.2).

The paper fine-tunes a latent diffusion model on 78k tiles of seven organs; here a small ``diffusers.UNet2DModel``
is trained from scratch (or from a local diffusers UNet, ``weights``) on the tile table's training split through
the platform's normal ``fit`` (Ray Train), by ``jobs/train_inpainter.py``. The objective is DDPM's simplified
loss (Ho et al. 2020, eq. 14): images in [−1, 1] at ``sample_size``, a uniform timestep t, x_t from
``DDPMScheduler.add_noise``, and the MSE between the UNet's ε prediction and the noise. Labels are ignored, so any
target is accepted.

Evaluation is the same loss with a fixed generator (noise and timesteps drawn from seed ``EVAL_SEED``), so
``val_loss`` is comparable across epochs and checkpoints; selection takes its minimum. On test, a few samples
generated with DDIM are kept for ``test_figures``. The model is a denoiser, not a classifier: ``predict`` refuses.

``save_pretrained(path)`` exports the UNet as a diffusers model directory (and the noise schedule as
``scheduler_config.json`` beside it); ``usegmix.inpaint.DiffusionInpainter.from_pretrained`` loads that or the
histoweak checkpoint itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from histoweak.methods.base import Hparams, Method, RunInfo, Task, register_method

__all__ = ["DDPM", "unet_config"]


def unet_config(sample_size: int, block_out_channels: tuple[int, ...], layers_per_block: int) -> dict[str, Any]:
    """The ``UNet2DModel`` config of a ``ddpm`` run: RGB in and out, plain ResNet blocks, self-attention at the
    lowest resolution only (as DDPM's 16×16 attention), GroupNorm with the largest group count (≤ 32) that
    divides every width."""
    n = len(block_out_channels)
    down = ["DownBlock2D"] * (n - 1) + ["AttnDownBlock2D"]
    up = ["AttnUpBlock2D"] + ["UpBlock2D"] * (n - 1)
    return {"sample_size": sample_size, "in_channels": 3, "out_channels": 3, "layers_per_block": layers_per_block,
            "block_out_channels": tuple(block_out_channels), "down_block_types": tuple(down),
            "up_block_types": tuple(up), "norm_num_groups": math.gcd(32, *block_out_channels)}


@register_method("ddpm")
class DDPM(Method):
    @dataclass(frozen=True)
    class Hparams(Hparams):
        backbone: str = "unused"  # the UNet is the model; the field stays so generic configs validate
        weights: str | None = None  # a local diffusers UNet2DModel directory to start from (same architecture)
        lr: float = 2e-4
        weight_decay: float = 0.0
        sample_size: int = 64  # tiles are resized to sample_size² for training and inpainting
        block_out_channels: tuple[int, ...] = (32, 64, 64)  # a list from YAML/JSON is accepted
        layers_per_block: int = 1
        num_train_timesteps: int = 1000

        def __post_init__(self):
            def bad(key, why):
                raise ValueError(f"method 'ddpm': {key} {why}")

            channels = self.block_out_channels
            if isinstance(channels, (list, tuple)):
                object.__setattr__(self, "block_out_channels", tuple(int(c) for c in channels))
            else:
                bad("block_out_channels", f"must be a list of widths, got {channels!r}")
            if not self.block_out_channels or min(self.block_out_channels) < 1:
                bad("block_out_channels", f"must be positive widths, one per resolution, got {channels!r}")
            if math.gcd(32, *self.block_out_channels) < 4:
                bad("block_out_channels", f"{list(self.block_out_channels)}: widths need a common divisor >= 4 for "
                                          "GroupNorm (e.g. multiples of 32)")
            step = 2 ** (len(self.block_out_channels) - 1)
            if self.sample_size < 8 or self.sample_size % step:
                bad("sample_size", f"must be >= 8 and divisible by {step} (one halving per extra block), "
                                   f"got {self.sample_size}")
            if self.layers_per_block < 1:
                bad("layers_per_block", f"must be >= 1, got {self.layers_per_block}")
            if self.num_train_timesteps < 2:
                bad("num_train_timesteps", f"must be >= 2, got {self.num_train_timesteps}")

    generative = True
    selection_metric = "val_loss"
    selection_mode = "min"
    headline_metrics = ("test_loss",)
    #: seed of the noise and timesteps of ``evaluate_batches`` (the same draws every epoch)
    EVAL_SEED = 0
    #: samples generated for the test figure, and their DDIM steps
    FIGURE_SAMPLES = 4
    FIGURE_STEPS = 20

    @classmethod
    def supports(cls, task: Task) -> bool:
        return True  # labels are never read

    def _build(self) -> None:
        from diffusers import DDPMScheduler, UNet2DModel

        hp = self.hparams
        config = unet_config(hp.sample_size, hp.block_out_channels, hp.layers_per_block)
        if hp.weights:
            self.unet = UNet2DModel.from_pretrained(hp.weights, local_files_only=True)
            have = {k: self.unet.config[k] for k in ("sample_size", "block_out_channels", "layers_per_block")}
            want = {k: config[k] for k in have}
            if {k: (tuple(v) if isinstance(v, list) else v) for k, v in have.items()} != want:
                raise ValueError(f"method 'ddpm': the UNet in weights={hp.weights!r} has {have}; set these "
                                 f"hyperparameters to match (got {want})")
            self.weights_source = str(hp.weights)
        else:
            self.unet = UNet2DModel(**config)
            self.weights_source = "random"
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=hp.num_train_timesteps)

    # -- the model -------------------------------------------------------------------------------------------
    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float in [0, 1] -> (N, 3, s, s) in [−1, 1] at the model's ``sample_size`` s."""
        s = self.hparams.sample_size
        if images.shape[-2:] != (s, s):
            images = F.interpolate(images, (s, s), mode="bilinear", antialias=True, align_corners=False)
        return images * 2.0 - 1.0

    def forward(self, images: torch.Tensor, timesteps: torch.Tensor | int | None = None) -> torch.Tensor:
        """ε prediction (N, 3, s, s) for ``images`` (N, 3, H, W) in [0, 1] taken as x_t at ``timesteps``
        (default: the middle of the schedule)."""
        t = self.hparams.num_train_timesteps // 2 if timesteps is None else timesteps
        return self.unet(self.to_model_space(images), t).sample

    def _denoising_errors(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """(N,) per-image MSE of the ε prediction at a random timestep (noise and t from ``generator``, or from
        torch's global generator — seeded per worker by the training loop)."""
        x0 = self.to_model_space(images)
        n = x0.shape[0]
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype) if generator is not None \
            else torch.randn_like(x0)
        t = torch.randint(0, self.hparams.num_train_timesteps, (n,), generator=generator).to(x0.device)
        pred = self.unet(self.noise_scheduler.add_noise(x0, noise, t), t).sample
        return (pred.float() - noise.float()).square().flatten(1).mean(1)

    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return self._denoising_errors(batch["image"], None).mean(), {}

    @torch.no_grad()
    def predict(self, batch: dict) -> torch.Tensor:
        raise ValueError("method 'ddpm' is a denoising diffusion model of tiles, not a classifier: it has no class "
                         "probabilities to predict. Its metric is the denoising loss (evaluate_batches); to inpaint "
                         "with it use histoweak.methods.usegmix.inpaint.DiffusionInpainter.from_pretrained("
                         "<checkpoint>)")

    @torch.no_grad()
    def generate(self, n: int, steps: int = 20, seed: int = 0) -> np.ndarray:
        """(n, s, s, 3) uint8 images sampled with DDIM (η = 0, ``steps`` steps) from noise of seed ``seed``."""
        from diffusers import DDIMScheduler

        self.eval()
        cfg = self.noise_scheduler.config
        ddim = DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                             beta_end=cfg.beta_end, beta_schedule=cfg.beta_schedule, clip_sample=cfg.clip_sample)
        ddim.set_timesteps(steps)
        s = self.hparams.sample_size
        g = torch.Generator().manual_seed(int(seed))
        x = torch.randn((n, 3, s, s), generator=g).to(self.device)
        for t in ddim.timesteps:
            x = ddim.step(self.unet(x, t).sample, t, x, eta=0.0).prev_sample
        return _to_uint8(x)

    # -- evaluation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_batches(self, batches, prefix: str) -> tuple[dict[str, float], dict]:
        """``{prefix}_loss``: the mean denoising MSE over the split's images, with noise and timesteps drawn from
        a generator of seed ``EVAL_SEED`` (the same draws for the same batches, every call). On ``test``, also
        ``FIGURE_SAMPLES`` real images and as many DDIM samples for ``test_figures``."""
        self.eval()
        g = torch.Generator().manual_seed(self.EVAL_SEED)
        total, n, real = 0.0, 0, []
        for b in batches:
            images = b["image"].to(self.device)
            total += float(self._denoising_errors(images, g).double().sum())
            n += len(images)
            if prefix == "test" and sum(len(r) for r in real) < self.FIGURE_SAMPLES:
                real.append(_to_uint8(self.to_model_space(images[:self.FIGURE_SAMPLES])))
        if not n:
            return {}, {}
        pred: dict[str, Any] = {}
        if prefix == "test":  # once, for the best checkpoint's figure; validation stays a loss only
            pred = {"real": np.concatenate(real)[:self.FIGURE_SAMPLES],
                    "samples": self.generate(self.FIGURE_SAMPLES, self.FIGURE_STEPS, seed=self.EVAL_SEED)}
        return {f"{prefix}_loss": total / n}, pred

    @classmethod
    def test_figures(cls, pred: dict, run: RunInfo, class_names: list[str] | None) -> dict[str, Any]:
        """Real test tiles (at the model's size) above DDIM samples of the best checkpoint."""
        if "samples" not in pred:
            return {}
        import histoweak.figures  # noqa: F401  — selects matplotlib's headless backend
        import matplotlib.pyplot as plt

        rows = [("test tile", pred["real"]), (f"DDIM sample ({cls.FIGURE_STEPS} steps)", pred["samples"])]
        k = max(len(r) for _, r in rows)
        fig, axes = plt.subplots(2, k, figsize=(1.6 * k, 3.5), squeeze=False)
        for i, (title, images) in enumerate(rows):
            for j in range(k):
                ax = axes[i, j]
                if j < len(images):
                    ax.imshow(images[j])
                ax.set_xticks([])
                ax.set_yticks([])
            axes[i, 0].set_ylabel(title, fontsize=8)
        fig.suptitle("ddpm: test tiles and generated samples", fontsize=9)
        fig.tight_layout()
        return {"test_ddpm_samples.png": fig}

    # -- export ----------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        """Write the UNet as a diffusers model directory (``config.json`` + safetensors weights) and the noise
        schedule beside it (``scheduler_config.json``); returns ``path``."""
        p = Path(path)
        self.unet.save_pretrained(p, safe_serialization=True)
        self.noise_scheduler.save_pretrained(p)
        return p


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, 3, s, s) in [−1, 1] -> (N, s, s, 3) uint8."""
    return x.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
