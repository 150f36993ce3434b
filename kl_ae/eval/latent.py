"""The latent report: what the KL term and the latent distribution of an autoencoder look like.

Two streaming accumulators, fed batch by batch inside an evaluation loop and mergeable across
processes (each has a flat float64 ``state_tensor()`` whose element-wise SUM over ranks is the
state of the union, so ``accelerator.reduce(stats.state_tensor().to(accelerator.device), "sum")``
followed by ``load_state_tensor`` merges them):

- :class:`LatentStats`: rate (KL to the prior), per-channel KL and posterior collapse, the moments
  of the aggregate posterior, the suggested scaling/shift factors and a moment-matched distance
  of the aggregate posterior from N(0, I).
- :class:`RobustnessStats` (one batch: :func:`decoder_robustness`): PSNR of decodes of noised
  latents, i.e. how gracefully the decoder handles latents a diffusion model gets slightly wrong.

Rate. For an encoder q(z|x) = N(mu, diag(sigma^2)) and the prior p(z) = N(0, I), the KL term of
the ELBO (Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014),
KL(q(z|x) || p(z)) = sum over latent elements of 0.5 (mu^2 + sigma^2 - 1 - log sigma^2), is the
*rate* R: the expected number of nats needed to transmit z with bits-back coding under the prior
(Hoffman & Johnson, "ELBO surgery", NIPS 2016 AABI workshop; Alemi et al., "Fixing a Broken
ELBO", ICML 2018). Reported in bits per image pixel: R / ln 2 / (H * W) (per pixel position,
not per RGB sub-pixel). It is what the latent would cost under the prior with an ideal
bits-back coder, a property of the encoder, not the size of any file; with the LDM kl_weight
of 1e-6 the training loss barely constrains it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kl_ae.eval.metrics import psnr_8bit

DEFAULT_ACTIVE_THRESHOLD_NATS = 0.01  # mean KL per element below this: the channel is collapsed
DEFAULT_SIGMAS = (0.1, 0.25, 0.5, 1.0)  # decoder-robustness noise levels, in latent std units


def kl_to_standard_normal(mean: Tensor, logvar: Tensor) -> Tensor:
    """Per-element KL(N(mean, exp(logvar)) || N(0, 1)) = 0.5 (mean^2 + var - 1 - logvar), in nats.

    mean, logvar: same shape (any), float. Returns that shape. ``logvar`` is used as given
    (diffusers' DiagonalGaussianDistribution has already clamped it to [-30, 20]).
    """
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)


class LatentStats:
    """Streaming statistics of posteriors and latent samples for :meth:`report`.

    Accumulated in float64 on ``device`` (CPU by default; each update moves its small latent
    batch there first): image and pixel counts; per channel the element count, the sum and
    sum of squares of z samples (the aggregate posterior q(z) = E_x q(z|x)), the summed KL of
    every latent element; and the C x C matrix of sums of z_c * z_d (channel correlations).

    Args:
        channels: latent channels C (``vae.config.latent_channels``); fixed so that every rank
            has a state tensor of the same length even before (or without) an update.
        image_hw: (H, W) of the images; may instead be given to each :meth:`update`.
        device: where the float64 accumulators live.
    """

    def __init__(self, channels: int, image_hw: tuple[int, int] | None = None,
                 device: torch.device | str = "cpu"):
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = channels
        self.image_hw = image_hw
        self._state = torch.zeros(self.state_size(channels), dtype=torch.float64, device=device)

    # --- state ------------------------------------------------------------------------------

    @staticmethod
    def state_size(channels: int) -> int:
        """Length of the state tensor: 3 counters + 3 per-channel sums x C + the C x C matrix."""
        return 3 + 3 * channels + channels * channels

    def _parts(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Views into the state: images, pixels, elements per channel, sum z (C), sum z^2 (C),
        sum KL (C), sum z z^T (C, C). In-place edits of the views edit the state."""
        c, s = self.channels, self._state
        return (s[0], s[1], s[2], s[3:3 + c], s[3 + c:3 + 2 * c], s[3 + 2 * c:3 + 3 * c],
                s[3 + 3 * c:].view(c, c))

    def state_tensor(self) -> Tensor:
        """A copy of the flat float64 state; summing it over ranks gives the merged state.

        Layout: [images, pixels (sum of H*W), latent elements per channel, sum z (C),
        sum z^2 (C), sum KL nats (C), sum z_c z_d (C*C, row-major)].
        """
        return self._state.clone()

    def load_state_tensor(self, state: Tensor) -> LatentStats:
        """Replace the state (e.g. by the ``accelerator.reduce(..., "sum")`` of all ranks)."""
        if state.shape != self._state.shape:
            raise ValueError(f"state of shape {tuple(state.shape)}, expected {tuple(self._state.shape)} "
                             f"for {self.channels} channels")
        self._state = state.detach().to(self._state.device, torch.float64).clone()
        return self

    @classmethod
    def from_state_tensor(cls, state: Tensor, image_hw: tuple[int, int] | None = None) -> LatentStats:
        """Rebuild from a state tensor; the channel count follows from its length."""
        c = round((-3 + math.sqrt(9 + 4 * (state.numel() - 3))) / 2)
        if c < 1 or cls.state_size(c) != state.numel():
            raise ValueError(f"{state.numel()} is not a LatentStats state length")
        return cls(c, image_hw, device=state.device).load_state_tensor(state)

    def merge(self, other: LatentStats) -> LatentStats:
        """Add ``other``'s counts and sums to this one (in place); returns self."""
        if other.channels != self.channels:
            raise ValueError(f"cannot merge {other.channels}-channel stats into {self.channels}-channel stats")
        self._state += other._state.to(self._state.device)
        return self

    # --- accumulation -----------------------------------------------------------------------

    @torch.no_grad()
    def update(self, posterior_mean: Tensor, posterior_logvar: Tensor, z_sample: Tensor,
               image_hw: tuple[int, int] | None = None) -> None:
        """Add one batch.

        posterior_mean, posterior_logvar: (B, C, h, w) parameters of q(z|x)
        (``posterior.mean``, ``posterior.logvar`` of diffusers' latent_dist);
        z_sample: (B, C, h, w) samples z ~ q(z|x) (``posterior.sample()``);
        image_hw: (H, W) of the batch's images (default: the constructor's).
        Raises ValueError on shape mismatches or when no image size is known.
        """
        hw = image_hw or self.image_hw
        if hw is None:
            raise ValueError("LatentStats needs the image size (H, W): pass image_hw to the constructor or update")
        if not (posterior_mean.shape == posterior_logvar.shape == z_sample.shape) or posterior_mean.dim() != 4:
            raise ValueError(
                f"posterior mean, logvar and z must be (B, C, h, w) of one shape, got "
                f"{tuple(posterior_mean.shape)}, {tuple(posterior_logvar.shape)}, {tuple(z_sample.shape)}"
            )
        b, c = posterior_mean.shape[:2]
        if c != self.channels:
            raise ValueError(f"latent has {c} channels, these stats were made for {self.channels}")
        dev = self._state.device
        mean, logvar, z = (t.detach().to(dev, torch.float64) for t in (posterior_mean, posterior_logvar, z_sample))
        zc = z.transpose(0, 1).reshape(c, -1)  # (C, B*h*w)
        images, pixels, elements, s_z, s_z2, s_kl, s_zz = self._parts()
        images += b
        pixels += b * hw[0] * hw[1]
        elements += zc.shape[1]
        s_z += zc.sum(1)
        s_z2 += zc.square().sum(1)
        s_kl += kl_to_standard_normal(mean, logvar).sum(dim=(0, 2, 3))
        s_zz += zc @ zc.T

    # --- the report -------------------------------------------------------------------------

    def report(self, active_threshold_nats: float = DEFAULT_ACTIVE_THRESHOLD_NATS) -> dict:
        """The latent report; lists are per channel. Raises ValueError before any update.

        Keys (KL in nats, rate in bits, z statistics in latent units):

        - images; latent_elements_per_channel (B*h*w summed over batches)
        - kl_nats_per_element: mean KL(q(z|x) || N(0,1)) over all latent elements;
          kl_nats_per_element_per_channel: the same per channel;
          kl_nats_per_image: the full KL term of one image (summed over C*h*w)
        - rate_bits_per_pixel: kl_nats_per_image / ln 2 / (H*W) (see the module docstring)
        - active_channels: channels whose mean KL per element exceeds active_threshold_nats
          (a channel with KL ~ 0 has q(z|x) = N(0, 1) for every x: it carries no information,
          i.e. posterior collapse); active_channel_indices; active_threshold_nats
        - z_mean, z_std: mean and (population) std of z samples over all elements;
          z_mean_per_channel, z_std_per_channel
        - scaling_factor = 1 / z_std and shift_factor = z_mean: the SD3/FLUX convention, defined
          as in ``kl_ae.export.compute_latent_factors`` (diffusion runs on (z - shift) * scale)
        - prior_kl_moment_matched_per_channel: KL(N(m_c, s_c^2) || N(0, 1)) =
          0.5 (m_c^2 + s_c^2 - 1 - log s_c^2) of each channel's moment-matched Gaussian, in nats
          per latent element; _mean and _sum over channels. A moment-matched approximation of the
          aggregate posterior's distance from the prior: 0 means mean 0 and std 1 per channel,
          not that q(z) is Gaussian (it ignores shape and cross-channel correlation).
          prior_kl_moment_matched_after_scaling_mean: the same after (z - shift_factor) *
          scaling_factor, what remains once the global factors are applied.
        - channel_correlation_mean_abs, channel_correlation_max_abs: mean and max |Pearson
          correlation| between pairs of channels (over all positions and images); 0 for C = 1.
        """
        images, pixels, elements, s_z, s_z2, s_kl, s_zz = (t.cpu() for t in self._parts())
        if images.item() == 0:
            raise ValueError("LatentStats.report() before any update")
        n = elements.item()
        m = s_z / n
        var = (s_z2 / n - m.square()).clamp_min(0.0)
        s = var.sqrt()
        kl_c = s_kl / n
        z_mean = (s_z.sum() / (n * self.channels)).item()
        z_std = max(s_z2.sum().item() / (n * self.channels) - z_mean**2, 0.0) ** 0.5
        prior_kl = kl_to_standard_normal(m, var.log())
        scale = 1.0 / z_std if z_std > 0 else math.nan
        scaled = kl_to_standard_normal((m - z_mean) * scale, (var * scale**2).log())
        active = [i for i, v in enumerate(kl_c.tolist()) if v > active_threshold_nats]
        return {
            "images": int(images.item()),
            "latent_elements_per_channel": int(n),
            "kl_nats_per_element": kl_c.mean().item(),
            "kl_nats_per_element_per_channel": kl_c.tolist(),
            "kl_nats_per_image": s_kl.sum().item() / images.item(),
            "rate_bits_per_pixel": s_kl.sum().item() / math.log(2) / pixels.item(),
            "active_channels": len(active),
            "active_channel_indices": active,
            "active_threshold_nats": active_threshold_nats,
            "z_mean": z_mean,
            "z_std": z_std,
            "z_mean_per_channel": m.tolist(),
            "z_std_per_channel": s.tolist(),
            "scaling_factor": scale,
            "shift_factor": z_mean,
            "prior_kl_moment_matched_per_channel": prior_kl.tolist(),
            "prior_kl_moment_matched_mean": prior_kl.mean().item(),
            "prior_kl_moment_matched_sum": prior_kl.sum().item(),
            "prior_kl_moment_matched_after_scaling_mean": scaled.mean().item(),
            **_correlations(s_zz / n - torch.outer(m, m), s),
        }


def _correlations(cov: Tensor, std: Tensor) -> dict[str, float]:
    """Mean and max |off-diagonal correlation| of a C x C covariance with per-channel std."""
    c = cov.shape[0]
    if c < 2:
        return {"channel_correlation_mean_abs": 0.0, "channel_correlation_max_abs": 0.0}
    corr = (cov / torch.outer(std, std).clamp_min(1e-30)).abs()
    off = corr[~torch.eye(c, dtype=torch.bool)]
    return {"channel_correlation_mean_abs": off.mean().item(), "channel_correlation_max_abs": off.max().item()}


# --- decoder robustness -------------------------------------------------------------------


def _sigma_key(prefix: str, sigma: float) -> str:
    return f"{prefix}_sigma_{sigma:g}"


class RobustnessStats:
    """PSNR of decode(z + sigma * eps * std_z) against x, accumulated over batches.

    z is the posterior MODE (deterministic), eps ~ N(0, I) is drawn once per batch and shared by
    all sigmas (common random numbers: the curve over sigma has less noise), and std_z is the
    per-channel std of the aggregate posterior, so sigma is in units of the latent's own
    spread and comparable across autoencoders with different latent scales (a latent with
    std 5 shrugs off absolute noise 0.1 that would swamp one with std 0.2).

    PSNR as in ``kl_ae.eval.metrics.psnr_8bit`` (8-bit rounded images, data range 1), averaged over
    images; sigma = 0 is the plain reconstruction (the reference). Also reported: PSNR of each
    noised decode against the sigma = 0 reconstruction, which isolates the decoder's
    sensitivity from its reconstruction error.

    Args:
        sigmas: noise levels in units of std_z; 0 is always added.
        latent_std: std_z, (C,) per channel or a float, e.g. ``LatentStats.report()
            ["z_std_per_channel"]`` from a pass over the same images. None: estimated once,
            from the first batch's posterior samples (over B*h*w elements per channel), then
            kept for all later batches; :attr:`latent_std` holds the value used.
        generator: for eps (and the first-batch samples). Under DDP seed it per rank.
    """

    def __init__(self, sigmas: tuple[float, ...] = DEFAULT_SIGMAS, latent_std: Tensor | list | float | None = None,
                 generator: torch.Generator | None = None):
        if any(s < 0 for s in sigmas):
            raise ValueError(f"sigmas must be >= 0, got {sigmas}")
        self.sigmas = tuple(sorted({0.0, *map(float, sigmas)}))
        self.latent_std = None if latent_std is None else torch.as_tensor(latent_std, dtype=torch.float32)
        self.latent_std_source = "given" if latent_std is not None else "first batch"
        self.generator = generator
        # [images, sum PSNR vs x per sigma, sum PSNR vs sigma-0 reconstruction per sigma]
        self._state = torch.zeros(1 + 2 * len(self.sigmas), dtype=torch.float64)

    def state_tensor(self) -> Tensor:
        """Flat float64 copy [images, sum PSNR vs x (per sigma), sum PSNR vs recon (per sigma)];
        the element-wise sum over ranks is the merged state."""
        return self._state.clone()

    def load_state_tensor(self, state: Tensor) -> RobustnessStats:
        if state.shape != self._state.shape:
            raise ValueError(f"state of shape {tuple(state.shape)}, expected {tuple(self._state.shape)}")
        self._state = state.detach().to("cpu", torch.float64).clone()
        return self

    def merge(self, other: RobustnessStats) -> RobustnessStats:
        if other.sigmas != self.sigmas:
            raise ValueError(f"cannot merge stats for sigmas {other.sigmas} into {self.sigmas}")
        self._state += other._state
        return self

    def _noise(self, z: Tensor) -> Tensor:
        dev = self.generator.device if self.generator is not None else z.device
        return torch.randn(z.shape, generator=self.generator, device=dev, dtype=torch.float32).to(z)

    @torch.no_grad()
    def update(self, vae, x: Tensor) -> None:
        """Add one batch. vae: a diffusers ``AutoencoderKL`` (put it in eval mode yourself);
        x: (B, 3, H, W) float in [-1, 1] on the model's device."""
        posterior = vae.encode(x).latent_dist
        z = posterior.mode()
        if self.latent_std is None:
            sample = posterior.mean + posterior.std * self._noise(z)
            self.latent_std = sample.transpose(0, 1).reshape(z.shape[1], -1).float().std(dim=1, correction=0).cpu()
        std = self.latent_std.to(z)
        if std.dim():
            if std.numel() != z.shape[1]:
                raise ValueError(f"latent_std has {std.numel()} values, the latent {z.shape[1]} channels")
            std = std.reshape(-1, 1, 1)
        eps = self._noise(z) * std
        recon = vae.decode(z).sample
        n = len(self.sigmas)
        self._state[0] += x.shape[0]
        for i, sigma in enumerate(self.sigmas):
            x_hat = recon if sigma == 0 else vae.decode(z + sigma * eps).sample
            self._state[1 + i] += psnr_8bit(x, x_hat).double().sum().cpu()
            self._state[1 + n + i] += psnr_8bit(recon, x_hat).double().sum().cpu()

    def report(self) -> dict[str, float]:
        """{"images": n, "psnr_sigma_{s}": mean dB vs x, "psnr_vs_recon_sigma_{s}": mean dB vs the
        sigma=0 reconstruction (s > 0 only; that at s = 0 is infinite by definition)}, s formatted
        with ``:g`` (psnr_sigma_0, psnr_sigma_0.1, ...). A mean is inf when an image's decode
        equals its reference after 8-bit rounding. Raises ValueError before any update."""
        n_img = self._state[0].item()
        if n_img == 0:
            raise ValueError("RobustnessStats.report() before any update")
        n = len(self.sigmas)
        out: dict[str, float] = {"images": int(n_img)}
        for i, sigma in enumerate(self.sigmas):
            out[_sigma_key("psnr", sigma)] = self._state[1 + i].item() / n_img
        for i, sigma in enumerate(self.sigmas):
            if sigma > 0:
                out[_sigma_key("psnr_vs_recon", sigma)] = self._state[1 + n + i].item() / n_img
        return out


def decoder_robustness(vae, x: Tensor, sigmas: tuple[float, ...] = DEFAULT_SIGMAS,
                       generator: torch.Generator | None = None,
                       latent_std: Tensor | list | float | None = None) -> dict[str, float]:
    """:class:`RobustnessStats` of one batch: PSNR (dB) of decode(mode + sigma * eps * std_z)
    against x for sigma = 0 (the plain reconstruction) and each of ``sigmas``, sigma in units
    of the per-channel latent std (from ``latent_std``, else estimated from this batch).

    vae: diffusers ``AutoencoderKL`` in eval mode; x: (B, 3, H, W) float in [-1, 1].
    Returns the dict of :meth:`RobustnessStats.report`.
    """
    stats = RobustnessStats(sigmas, latent_std=latent_std, generator=generator)
    stats.update(vae, x)
    return stats.report()
