"""What ``kl-ae eval`` measures beyond pixels: the latent report and rFID, fed from the eval loop.

:class:`LatentProbe` is called with every batch's images, posterior and reconstruction by the
evaluation loop (:mod:`kl_ae.eval.evaluate`); at the end it merges its statistics over processes and
returns the report sections. The formulas are in :mod:`kl_ae.eval.latent` and :mod:`kl_ae.eval.fid`.
"""

from __future__ import annotations

import math

import torch

from kl_ae.eval.diffusability import DiffusabilityStats, format_diffusability
from kl_ae.eval.fid import RFID, FIDWeightsError
from kl_ae.eval.latent import LatentStats, RobustnessStats

# decoder robustness costs 5 decodes per image, the equivariance figures 2: measured on the first ones
ROBUSTNESS_IMAGES = 32


class LatentProbe:
    """Accumulates the latent report (and rFID when its weights exist) during an evaluation.

    Args:
        channels: latent channels of the autoencoder.
        device: where images and statistics live.
        seed: posterior samples and robustness noise (add the rank under several processes).
        rfid_weights: Inception weights file, None for the default location, "none" to skip.
    """

    def __init__(self, channels: int, device: torch.device, seed: int = 0, rfid_weights: str | None = None):
        generator = torch.Generator(device=device).manual_seed(seed)
        self.generator = generator
        self.latent = LatentStats(channels)
        self.robustness = RobustnessStats(generator=generator)
        self.diffusability = DiffusabilityStats()
        self.robustness_images = 0
        self.rfid, self.rfid_skipped = None, None
        if rfid_weights == "none":
            self.rfid_skipped = "rFID: skipped (disabled)"
        else:
            try:
                self.rfid = RFID(rfid_weights, device=device)
            except FIDWeightsError as err:
                self.rfid_skipped = str(err)

    def __call__(self, vae, x: torch.Tensor, posterior, x_hat: torch.Tensor) -> None:
        """One batch: x, x_hat (B, 3, H, W) in [-1, 1]; posterior: diffusers' DiagonalGaussianDistribution."""
        sample = posterior.mean + posterior.std * torch.randn(
            posterior.mean.shape, generator=self.generator, device=self.generator.device).to(posterior.mean)
        self.latent.update(posterior.mean, posterior.logvar, sample, image_hw=tuple(x.shape[-2:]))
        if self.robustness_images < ROBUSTNESS_IMAGES:
            self.robustness.update(vae, x)
            self.diffusability.update(vae, x, posterior.mode())
            self.robustness_images += x.shape[0]
        if self.rfid is not None:
            self.rfid.update(x, x_hat)

    def report(self, distributed: bool = False) -> dict:
        """``{"latent": {...}, "rfid": ... | "rfid_skipped": reason}``; with ``distributed``
        every process must call it (the statistics are summed over ranks)."""
        if distributed:
            from accelerate.utils import reduce

            for stats in (self.latent, self.robustness, self.diffusability):
                device = self.generator.device
                stats.load_state_tensor(reduce(stats.state_tensor().to(device), reduction="sum"))
        latent = self.latent.report()
        latent["decoder_robustness"] = {
            **{k: _finite(v) for k, v in self.robustness.report().items()},
            "sigma_unit": "per-channel std of the aggregate posterior; z = posterior mode",
        }
        out = {"latent": latent, "diffusability": self.diffusability.report()}
        if self.rfid is not None:
            out.update(self.rfid.report())
        else:
            out["rfid_skipped"] = self.rfid_skipped
        return out


def _finite(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def format_latent(report: dict) -> list[str]:
    """Plain-text lines for the latent report and rFID sections of an eval report."""
    lines = []
    lat = report.get("latent")
    if lat:
        shift = lat["shift_factor"]
        lines += [
            f"latent: KL {lat['kl_nats_per_element']:.4g} nats/element, rate "
            f"{lat['rate_bits_per_pixel']:.4g} bits/pixel, active channels {lat['active_channels']}/"
            f"{len(lat['z_mean_per_channel'])} (KL > {lat['active_threshold_nats']:g} nats)",
            f"latent z: mean {lat['z_mean']:.4g}, std {lat['z_std']:.4g}; suggested scaling_factor "
            f"{lat['scaling_factor']:.5g}, shift_factor {shift:.5g}; moment-matched KL of q(z) to "
            f"N(0, I): {lat['prior_kl_moment_matched_mean']:.4g} nats/channel",
        ]
        rob = lat["decoder_robustness"]
        sig = [k for k in rob if k.startswith("psnr_sigma_")]
        lines.append("decoder robustness (PSNR dB of decode(z + sigma*std*eps)): " + ", ".join(
            f"sigma {k.removeprefix('psnr_sigma_')}: {rob[k]:.2f}" if rob[k] is not None else
            f"sigma {k.removeprefix('psnr_sigma_')}: inf" for k in sig) + f" over {rob['images']} images")
    lines += format_diffusability(report)
    if "rfid" in report:
        lines.append(f"rFID: {report['rfid']:.3f} over {report['rfid_images']} images"
                     + (f" ({report['rfid_note']})" if "rfid_note" in report else ""))
    elif report.get("rfid_skipped"):
        lines.append(report["rfid_skipped"] if report["rfid_skipped"].startswith("rFID")
                     else f"rFID: skipped: {report['rfid_skipped']}")
    return lines
