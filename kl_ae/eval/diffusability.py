"""The diffusability report of ``kl-ae eval``: is this latent getting easier to diffuse?

Two figures next to the latent report's decoder robustness (kl_ae.eval.latent.RobustnessStats):

- **High-frequency energy share** (Skorokhodov et al. 2025, "Improving the Diffusability of
  Autoencoders", arXiv 2502.14831): of each image's and each latent channel's power spectrum
  (mean removed, 2-D FFT), the share of energy at radial frequencies above half the Nyquist
  frequency (sqrt(fx^2 + fy^2) > 0.25 cycles per sample). The paper finds SD-style latents carry
  more high-frequency energy than the images they encode, and that cutting it (a smoother
  latent) speeds up the diffusion model trained on it. Lower is better; the images' share is
  the reference a latent should not exceed by much.
- **Equivariance error** (EQ-VAE, Kouzelis et al. 2025, arXiv 2502.09509): PSNR of
  decode(tau(z)) against tau(x), z the posterior mode, for tau = downscale by 2 (latent and image,
  bilinear with antialiasing) and rotation by 90 degrees. A latent whose decoder commutes with
  these transforms scores close to the plain reconstruction's PSNR; higher is better.

PSNR as kl_ae.eval.metrics.psnr_8bit (8-bit rounded, data range 1), averaged over images; as
for the reconstruction's PSNR (kl_ae.eval.evaluate), a mean over an infinite PSNR (decode(tau(z))
equal to tau(x) after 8-bit rounding) is written null, with ``..._infinite`` giving the count.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kl_ae.eval.metrics import psnr_8bit

HIGH_FREQUENCY = 0.25  # cycles per sample: half the Nyquist frequency (0.5)
EQ_TRANSFORMS = (("scale", 0.5), ("rot90", 1))


def high_frequency_energy(signal: Tensor) -> tuple[Tensor, Tensor]:
    """(energy above HIGH_FREQUENCY, total energy) of the power spectra of ``signal`` (B, C, H, W),
    each 2-D map's mean removed, summed over the batch and channels (float64 scalars)."""
    x = signal.double()
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs().square()
    fy = torch.fft.fftfreq(x.shape[-2], device=x.device, dtype=torch.float64)
    fx = torch.fft.fftfreq(x.shape[-1], device=x.device, dtype=torch.float64)
    radius = (fy[:, None].square() + fx[None, :].square()).sqrt()
    return power[..., radius > HIGH_FREQUENCY].sum(), power.sum()


class DiffusabilityStats:
    """Accumulates the report over batches; :meth:`state_tensor` / :meth:`load_state_tensor`
    (element-wise sums) merge processes."""

    def __init__(self):
        # [images, image high, image total, latent high, latent total, sum PSNR per EQ transform,
        #  count of infinite PSNRs per EQ transform]
        self._state = torch.zeros(5 + 2 * len(EQ_TRANSFORMS), dtype=torch.float64)

    def state_tensor(self) -> Tensor:
        return self._state.clone()

    def load_state_tensor(self, state: Tensor) -> "DiffusabilityStats":
        self._state = state.detach().to("cpu", torch.float64).clone()
        return self

    @torch.no_grad()
    def update(self, vae, x: Tensor, z: Tensor) -> None:
        """One batch: x (B, 3, H, W) in [-1, 1], z its posterior mode (B, c, h, w); vae: a diffusers
        AutoencoderKL in eval mode (decodes the transformed latents)."""
        from kl_ae.regularizers import EqTransform

        factor = x.shape[-1] // z.shape[-1]
        image_high, image_total = high_frequency_energy(x)
        latent_high, latent_total = high_frequency_energy(z)
        psnrs, infinite = [], []
        for kind, value in EQ_TRANSFORMS:
            tau = EqTransform(kind, value)
            decoded = vae.decode(tau.latent(z)).sample.float().clamp(-1, 1)
            psnr = psnr_8bit(tau.image(x.float(), factor), decoded).double().cpu()
            psnrs.append(psnr.sum())
            infinite.append(torch.isinf(psnr).sum().double())
        self._state += torch.stack([torch.tensor(float(x.shape[0]), dtype=torch.float64), image_high.cpu(),
                                    image_total.cpu(), latent_high.cpu(), latent_total.cpu(), *psnrs, *infinite])

    def report(self) -> dict:
        images, ih, it, lh, lt, *rest = self._state.tolist()
        psnr, infinite = rest[:len(EQ_TRANSFORMS)], rest[len(EQ_TRANSFORMS):]
        return {
            "images": int(images),
            "high_frequency_share_images": ih / it if it else None,
            "high_frequency_share_latent": lh / lt if lt else None,
            "high_frequency_cutoff": "radial frequency > 0.25 cycles/sample (half the Nyquist frequency)",
            **{f"equivariance_psnr_{kind}_{value:g}": (p / images if images and not n_inf else None)
               for (kind, value), p, n_inf in zip(EQ_TRANSFORMS, psnr, infinite)},
            **{f"equivariance_psnr_{kind}_{value:g}_infinite": int(n_inf)
               for (kind, value), n_inf in zip(EQ_TRANSFORMS, infinite) if n_inf},
            "equivariance": "PSNR dB of decode(tau(z_mode)) against tau(x): scale_0.5 = downscale by 2, "
                            "rot90_1 = rotation by 90 degrees; compare with the reconstruction's PSNR",
        }


def format_diffusability(report: dict) -> list[str]:
    """Plain-text lines of the report's "diffusability" section (empty without one)."""
    d = report.get("diffusability")
    if not d or not d.get("images"):
        return []

    def share(key: str) -> str:  # None: no energy at all once each map's mean is removed (flat images)
        return "n/a (flat)" if d[key] is None else f"{d[key]:.3f}"

    return [
        f"diffusability: high-frequency energy share (> half Nyquist) latent {share('high_frequency_share_latent')} "
        f"vs images {share('high_frequency_share_images')} (lower is smoother); equivariance PSNR "
        + ", ".join(f"{k.removeprefix('equivariance_psnr_')}: {v:.2f} dB" for k, v in d.items()
                    if k.startswith("equivariance_psnr_") and not k.endswith("_infinite") and v is not None)
        + f" over {d['images']} images"
    ]
