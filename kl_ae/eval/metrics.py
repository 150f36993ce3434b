"""Per-image reconstruction metrics on 8-bit-rounded images: PSNR, SSIM and (optionally) LPIPS.

The protocol these implement is written out in :mod:`kl_ae.eval.evaluate`; training's periodic
evaluation, ``kl-ae eval``, ``kl-ae bench`` (autoencoders and codecs alike), tiling checks and the
latent report all score through these functions, so their numbers are comparable.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

SSIM_KERNEL_SIZE = 11  # Wang et al. 2004: 11x11 circular-symmetric gaussian window, sigma 1.5
SSIM_SIGMA = 1.5


def to_8bit(x: torch.Tensor) -> torch.Tensor:
    """x: float in [-1, 1] (values outside are clamped) -> same shape in [0, 1] on k/255."""
    return torch.round((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5) / 255.0


def psnr_8bit(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of 8-bit-rounded images, data range 1.0.

    x, x_hat: (B, 3, H, W) float in [-1, 1] -> (B,) float; +inf where the 8-bit images are equal.
    """
    return peak_signal_noise_ratio(
        to_8bit(x_hat), to_8bit(x), data_range=1.0, dim=(1, 2, 3), reduction="none"
    )


def ssim_8bit(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004, torchmetrics) of 8-bit-rounded images, data range 1.0.

    x, x_hat: (B, 3, H, W) float in [-1, 1], H and W >= 11 -> (B,) float, at most 1.
    """
    return structural_similarity_index_measure(
        to_8bit(x_hat),
        to_8bit(x),
        gaussian_kernel=True,
        sigma=SSIM_SIGMA,
        kernel_size=SSIM_KERNEL_SIZE,
        data_range=1.0,
        reduction="none",
    )


def image_metrics(
    x: torch.Tensor, x_hat: torch.Tensor, lpips: tuple[nn.Module, str] | None = None
) -> dict[str, torch.Tensor]:
    """All per-image metrics of one batch: {"psnr", "ssim"(, lpips name)} -> (B,) tensors.

    x, x_hat: (B, 3, H, W) float in [-1, 1]. lpips: (module, metric name) from ``build_lpips``;
    it sees the same 8-bit images as PSNR/SSIM, mapped back to [-1, 1].
    """
    out = {"psnr": psnr_8bit(x, x_hat), "ssim": ssim_8bit(x, x_hat)}
    if lpips is not None:
        module, name = lpips
        out[name] = module(to_8bit(x) * 2 - 1, to_8bit(x_hat) * 2 - 1).flatten()
    return out
