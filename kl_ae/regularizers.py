"""The 2025-2026 regularizers beyond LDM's loss, as pure functions: EQ-VAE's equivariance term,
noise-robust decoding's latent noise, and the discriminator's R1 and LeCam penalties.

Sources (formulas, not code): EQ-VAE, Kouzelis et al. 2025, arXiv 2502.09509 (decode tau(z), match
tau(x); tau a downscale or a rotation by a multiple of 90 degrees); sigma-VAE (NextStep-1) and
l-DeTok (arXiv 2507.15856): the decoder reconstructs from a noise-corrupted latent; R1:
Mescheder et al. 2018 / StyleGAN2, gamma / 2 * E ||grad_x D(x)||^2 on real images; LeCam: Tseng et
al. 2021, ||D(x) - a_fake||^2 + ||D(G(z)) - a_real||^2 with moving-average anchors a.

Random choices draw from torch's global RNG (restored by a checkpoint), so a resumed run draws
the same transforms and noise as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kl_ae.losses import reconstruction_loss


@dataclass(frozen=True)
class EqTransform:
    """One EQ-VAE transform tau: ``kind`` 'scale' (``value``: the factor) or 'rot90' (``value``:
    quarter turns, 1-3, counter-clockwise as torch.rot90)."""

    kind: str
    value: float

    def latent(self, z: torch.Tensor) -> torch.Tensor:
        """tau(z) for z (B, C, h, w): bilinear antialiased downscale to round(h * factor) (at least
        1), or a rotation."""
        if self.kind == "rot90":
            return torch.rot90(z, int(self.value), dims=(-2, -1))
        return _downscale(z, self.latent_size(z.shape[-2:]))

    def latent_size(self, hw) -> tuple[int, int]:
        return tuple(max(1, round(s * self.value)) for s in hw)

    def image(self, x: torch.Tensor, factor: int) -> torch.Tensor:
        """tau(x) for x (B, 3, H, W) whose latent is ``factor`` times smaller: the same rotation, or
        the downscale to the transformed latent's size times ``factor``."""
        if self.kind == "rot90":
            return torch.rot90(x, int(self.value), dims=(-2, -1))
        h, w = self.latent_size((x.shape[-2] // factor, x.shape[-1] // factor))
        return _downscale(x, (h * factor, w * factor))


def _downscale(t: torch.Tensor, size) -> torch.Tensor:
    """Bilinear, antialiased resize to ``size``, computed in float32 (torch has no antialiased
    bf16 kernel on the CPU), returned in ``t``'s dtype."""
    return F.interpolate(t.float(), size=tuple(size), mode="bilinear", antialias=True,
                         align_corners=False).to(t.dtype)


def draw_eq_transform(transforms: list[str], scales: list[float], probability: float) -> EqTransform | None:
    """With ``probability``, a transform drawn uniformly from ``transforms`` (a scale uniformly
    from ``scales``, a rotation from 1-3 quarter turns); else None. Draws from torch's global RNG
    on the CPU (the same number of draws every call)."""
    apply, kind_u, value_u = torch.rand(3).tolist()
    if apply >= probability:
        return None
    kind = transforms[min(int(kind_u * len(transforms)), len(transforms) - 1)]
    if kind == "rot90":
        return EqTransform("rot90", 1 + min(int(value_u * 3), 2))
    return EqTransform("scale", scales[min(int(value_u * len(scales)), len(scales) - 1)])


def equivariance_loss(target: torch.Tensor, eq_reconstruction: torch.Tensor, l1_weight: float = 1.0,
                      l2_weight: float = 0.0) -> torch.Tensor:
    """EQ-VAE's term: the pixel loss of decode(tau(z)) against tau(x), reduced as LDM's NLL (sum
    over C*H*W, mean over the batch) so that its weight compares with the NLL's.

    target: tau(x), (B, 3, H', W') in [-1, 1]; eq_reconstruction: (B, 3, H', W'). Returns a 0-dim
    float32 tensor."""
    rec = reconstruction_loss(target, eq_reconstruction, None, 0.0, l1_weight, l2_weight)
    return rec.sum() / rec.shape[0]


def noisy_latent(z: torch.Tensor, max_strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """z + s * std(z) * eps with eps ~ N(0, I) and s ~ U[0, max_strength] per image; std(z) over
    the whole batch, detached (the noise is relative to the latent's scale, which the KL weight
    of 1e-6 leaves free). Returns (noisy z, s of shape (B,))."""
    s = torch.rand(z.shape[0], device=z.device, dtype=torch.float32) * max_strength
    eps = torch.randn_like(z)
    return z + (s.view(-1, 1, 1, 1) * z.detach().float().std()).to(z.dtype) * eps, s


def r1_penalty(logits_real: torch.Tensor, real: torch.Tensor, gamma: float) -> torch.Tensor:
    """gamma / 2 * mean over the batch of ||grad_x sum D(x)||^2 (summed over pixels), with a graph
    for the discriminator's backward (create_graph). ``real`` must require grad and
    ``logits_real`` depend on it. Returns a 0-dim float32 tensor."""
    (grad,) = torch.autograd.grad(logits_real.float().sum(), real, create_graph=True)
    return 0.5 * gamma * grad.float().square().sum(dim=(1, 2, 3)).mean()


def lecam_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, anchor_real: torch.Tensor,
               anchor_fake: torch.Tensor) -> torch.Tensor:
    """mean((D(x) - a_fake)^2) + mean((D(x_hat) - a_real)^2) over the patch logits (Tseng et al.
    2021, eq. 3 with the means of the two sets as anchors). Returns a 0-dim float32 tensor."""
    return ((logits_real.float() - anchor_fake).square().mean()
            + (logits_fake.float() - anchor_real).square().mean())


def update_anchor(anchor: torch.Tensor, logits: torch.Tensor, decay: float) -> None:
    """In place: anchor = decay * anchor + (1 - decay) * mean(logits) (no gradient)."""
    with torch.no_grad():
        anchor.mul_(decay).add_((1.0 - decay) * logits.detach().float().mean())
