"""The LDM first-stage loss as pure functions (no state, no logging).

Sources: CompVis/latent-diffusion ``ldm/modules/losses/contperceptual.py``
(``LPIPSWithDiscriminator``) and taming-transformers ``taming/modules/losses/vqperceptual.py``
(``hinge_d_loss``, ``vanilla_d_loss``, ``adopt_weight``, ``calculate_adaptive_weight``).
The autoencoder objective assembled from these functions is

    nll_loss(reconstruction_loss(x, x_hat, lpips), logvar)
      + kl_weight * kl_loss(posterior)
      + adaptive_generator_weight(...) * disc_factor_at(step, ...) * generator_loss(D(x_hat))

and the discriminator objective ``disc_factor_at(step, ...) * discriminator_loss(D(x), D(x_hat.detach()))``.

The training step (kl_ae.step) works on named :class:`Term` s: :func:`autoencoder_terms` gives the
nll and KL (a new regularizer is one more entry there), the step adds the generator term ``g``
after disc_start, :func:`total` sums them for the log, and :func:`surrogate` gives a loss with the
same gradient that backpropagates LPIPS and D once; both read the same dict, so a term cannot be
logged without being trained.

Every function returns float32, also when its inputs come from bf16/fp16 autocast regions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# LDM/taming constants of the adaptive weight (calculate_adaptive_weight).
_ADAPTIVE_EPS = 1e-4  # keeps the ratio finite when the generator gradient vanishes
_ADAPTIVE_MAX = 1e4  # upper clamp of the ratio


def reconstruction_loss(
    x: torch.Tensor,
    x_hat: torch.Tensor,
    perceptual: nn.Module | None = None,
    perceptual_weight: float = 1.0,
    l1_weight: float = 1.0,
    l2_weight: float = 0.0,
) -> torch.Tensor:
    """Per-pixel reconstruction loss
    ``l1_weight * |x - x_hat| + l2_weight * (x - x_hat)^2 + perceptual_weight * LPIPS(x, x_hat)``.

    The defaults (L1 only) are LDM's; a squared-error term (MSE) is what PSNR measures and what
    several first stages train on alone or next to L1 (e.g. the SD sd-vae-ft-mse decoder:
    "L1 + LPIPS" then "MSE + 0.1 LPIPS").

    Source: LDM contperceptual.py, ``rec_loss`` in ``LPIPSWithDiscriminator.forward``: the
    per-image LPIPS value of shape (B, 1, 1, 1) is broadcast onto every pixel and channel of the
    L1 map, so after :func:`nll_loss` sums over C*H*W it weighs C*H*W times its own value.

    Args:
        x: (B, 3, H, W) float in [-1, 1], the input images.
        x_hat: (B, 3, H, W) float in [-1, 1], the reconstructions (may be bf16/fp16).
        perceptual: module ``(x, y) -> (B, 1, 1, 1)`` taking [-1, 1] images (see
            :func:`kl_ae.perceptual.build_lpips`), or None for L1 only.
        perceptual_weight: multiplier of the perceptual term; 0 skips the perceptual forward.
        l1_weight: multiplier of the absolute error (LDM: 1).
        l2_weight: multiplier of the squared error (LDM: 0); its term is skipped when 0.

    Returns:
        (B, 3, H, W) float32, no reduction.

    Autocast is switched off inside: L1 and LPIPS run in float32, because LPIPS is a
    difference of unit-normalised features that bf16's 8-bit mantissa quantises coarsely once
    reconstructions are close to their inputs.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x32, x_hat32 = x.float(), x_hat.float()
        diff = x32 - x_hat32
        rec = l1_weight * diff.abs()  # x * 1.0 is exact: the LDM default is unchanged bit for bit
        if l2_weight != 0:
            rec = rec + l2_weight * diff.square()
        if perceptual is not None and perceptual_weight != 0:
            p = perceptual(x32, x_hat32).float()
            if p.dim() != 4 or p.shape[1:] != (1, 1, 1) or p.shape[0] != x.shape[0]:
                raise ValueError(f"perceptual module must return (B, 1, 1, 1), got {tuple(p.shape)}")
            rec = rec + perceptual_weight * p
    return rec


def nll_loss(rec: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Gaussian/Laplace-style NLL with a single learned scale: ``sum(rec / exp(logvar) + logvar) / B``.

    Source: LDM contperceptual.py (``nll_loss = rec_loss / exp(logvar) + logvar``, then
    ``sum(nll_loss) / nll_loss.shape[0]``).

    Reduction: SUM over C*H*W, MEAN over the batch. This fixes the meaning of ``kl_weight``:
    :func:`kl_loss` is likewise summed over the latent C*h*w, so LDM's kl_weight=1e-6 is the ratio
    of two per-image sums. Averaging this term over pixels instead (and keeping the KL summed)
    would make the same kl_weight C*H*W times stronger.

    Args:
        rec: (B, C, H, W) per-pixel loss from :func:`reconstruction_loss`.
        logvar: scalar tensor (0-dim), the log-variance; LDM keeps it at 0 (not optimised).

    Returns:
        0-dim float32 tensor.
    """
    rec = rec.float()
    logvar = logvar.float()
    return torch.sum(rec / torch.exp(logvar) + logvar) / rec.shape[0]


def kl_loss(posterior) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) = ``0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2)``, mean over the batch.

    Source: LDM ``DiagonalGaussianDistribution.kl`` (ldm/modules/distributions) and
    contperceptual.py (``sum(kl) / kl.shape[0]``).

    Reduction: SUM over the latent C*h*w, MEAN over the batch (see :func:`nll_loss` on kl_weight).

    Args:
        posterior: diffusers ``DiagonalGaussianDistribution`` with ``mean`` and ``logvar`` of shape
            (B, C, h, w); its logvar is already clamped to [-30, 20]. A deterministic posterior
            has zero KL by convention (as in diffusers/LDM).

    Returns:
        0-dim float32 tensor.
    """
    mean = posterior.mean.float()
    if getattr(posterior, "deterministic", False):
        return mean.new_zeros(())
    logvar = posterior.logvar.float()
    kl = 0.5 * (mean.pow(2) + torch.exp(logvar) - 1.0 - logvar)
    return kl.sum() / mean.shape[0]


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss ``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))``.

    Source: taming vqperceptual.py ``hinge_d_loss`` (used by LDM). Reduction: mean over all
    patch logits (B, 1, h, w) of each set. Returns a 0-dim float32 tensor; 1.0 when both sets
    of logits are 0 (the "stuck at 1.0" value of an untrained discriminator).
    """
    loss_real = F.relu(1.0 - logits_real.float()).mean()
    loss_fake = F.relu(1.0 + logits_fake.float()).mean()
    return 0.5 * (loss_real + loss_fake)


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating (BCE) discriminator loss ``0.5 * (mean(softplus(-real)) + mean(softplus(fake)))``.

    Source: taming vqperceptual.py ``vanilla_d_loss``. Reduction: mean over all patch logits
    (B, 1, h, w) of each set. Returns a 0-dim float32 tensor (log 2 when all logits are 0).
    """
    loss_real = F.softplus(-logits_real.float()).mean()
    loss_fake = F.softplus(logits_fake.float()).mean()
    return 0.5 * (loss_real + loss_fake)


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """Dispatch to :func:`hinge_d_loss` (``kind='hinge'``, LDM default) or :func:`vanilla_d_loss`
    (``'vanilla'``). Raises ValueError for any other ``kind``."""
    if kind == "hinge":
        return hinge_d_loss(logits_real, logits_fake)
    if kind == "vanilla":
        return vanilla_d_loss(logits_real, logits_fake)
    raise ValueError(f"discriminator loss kind must be 'hinge' or 'vanilla', got {kind!r}")


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator (autoencoder) adversarial loss ``-mean(logits_fake)``.

    Source: LDM contperceptual.py ``g_loss = -torch.mean(logits_fake)``; LDM uses this form
    with both discriminator losses. Reduction: mean over all patch logits (B, 1, h, w).
    Returns a 0-dim float32 tensor.
    """
    return -logits_fake.float().mean()


def adaptive_generator_weight(
    nll: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    disc_weight: float = 0.5,
) -> torch.Tensor:
    """Balance of the adversarial term: ``clamp(|grad nll| / (|grad g| + 1e-4), 0, 1e4) * disc_weight``.

    Source: taming vqperceptual.py / LDM contperceptual.py ``calculate_adaptive_weight`` (VQGAN,
    Esser et al. 2021, eq. 7). Gradients are taken w.r.t. ``last_layer`` (decoder.conv_out.weight)
    with ``torch.autograd.grad(..., retain_graph=True)``: the graph survives for the later
    backward and nothing is accumulated into any ``.grad``.

    Args:
        nll: 0-dim loss from :func:`nll_loss` (LDM passes the NLL without the KL term).
        g_loss: 0-dim loss from :func:`generator_loss`.
        last_layer: the parameter both gradients are measured on; both losses must depend on it.
        disc_weight: multiplier (LDM: 0.5).

    Returns:
        0-dim detached float32 tensor in [0, 1e4 * disc_weight].

    Raises:
        RuntimeError: from autograd when a loss does not require grad (e.g. under no_grad);
            the caller decides what to do then (LDM falls back to 0 in eval).
    """
    (nll_grad,) = torch.autograd.grad(nll, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    return adaptive_weight_from_grads(nll_grad, g_grad, disc_weight)


def adaptive_weight_from_grads(nll_grad: torch.Tensor, g_grad: torch.Tensor, disc_weight: float = 0.5) -> torch.Tensor:
    """:func:`adaptive_generator_weight` from the two gradients w.r.t. the last layer, however
    they were obtained (the training step chains them from the reconstruction's gradients so that
    LPIPS and D are backpropagated once per step). Same formula, constants and return value."""
    ratio = torch.linalg.vector_norm(nll_grad.float()) / (torch.linalg.vector_norm(g_grad.float()) + _ADAPTIVE_EPS)
    return (torch.clamp(ratio, 0.0, _ADAPTIVE_MAX) * disc_weight).detach()


def disc_factor_at(step: int, disc_start: int, factor: float = 1.0, ramp_steps: int = 0) -> float:
    """``factor`` from optimizer step ``disc_start`` on, 0.0 before it; with ``ramp_steps`` > 0
    it rises linearly instead: ``factor * min(1, (step - disc_start + 1) / ramp_steps)``.

    Source: taming vqperceptual.py ``adopt_weight`` (``weight = value`` while
    ``global_step < threshold``, value 0), which switches on at full strength. The linear ramp is
    kl-ae's option: a GAN switched on at once into a short run pulls the young autoencoder away
    from its reconstruction optimum in one step. Multiplies both adversarial losses; what it
    ramps in effect is the generator term (Adam is nearly invariant to the scale of the
    discriminator's own loss, whose updates start at disc_start either way).
    """
    if step < disc_start:
        return 0.0
    if ramp_steps > 0:
        return float(factor) * min(1.0, (step - disc_start + 1) / ramp_steps)
    return float(factor)


# --- the objective as named terms ------------------------------------------------------------


@dataclass
class Term:
    """One term of the autoencoder objective ``total = sum(weight * value)``.

    value: 0-dim float32 tensor with its autograd graph (logged as ``loss/<name>``).
    weight: float or 0-dim detached tensor (e.g. the adaptive GAN weight).
    via_reconstruction: the term depends on the trainable parameters only through the
        reconstruction (and the NLL's logvar), as the NLL (pixels, LPIPS) and the generator term
        (D) do; :func:`surrogate` then backpropagates its expensive part once. False (e.g. the
        KL, or a regularizer on encoder features): it is backpropagated as is.
    """

    value: torch.Tensor
    weight: float | torch.Tensor = 1.0
    via_reconstruction: bool = False


def autoencoder_terms(x: torch.Tensor, reconstruction: torch.Tensor, posterior, logvar: torch.Tensor,
                      cfg, perceptual: nn.Module | None = None) -> tuple[dict[str, Term], dict[str, torch.Tensor]]:
    """The autoencoder's own terms, each computed once: ``nll`` (pixel + perceptual, LDM's NLL)
    and ``kl`` (weight ``cfg.kl_weight``); the step adds ``g`` after disc_start.

    x: (B, 3, H, W) in [-1, 1]; reconstruction: same shape, float32 with its graph; posterior:
    diffusers DiagonalGaussianDistribution; logvar: the 0-dim NLL log-variance; cfg: LossConfig
    (l1_weight, l2_weight, perceptual_weight, kl_weight); perceptual: LPIPS module or None (off).
    Returns (terms, parts): parts are detached 0-dim figures for the log only: ``l1`` and ``mse``
    (mean per pixel, whatever the loss weights), ``perceptual`` (mean LPIPS, when on).
    """
    pixel = reconstruction_loss(x, reconstruction, None, 0.0, cfg.l1_weight, cfg.l2_weight)
    with torch.no_grad():
        error = x.float() - reconstruction
        parts = {"l1": error.abs().mean(), "mse": error.square().mean()}
    rec = pixel
    if perceptual is not None and cfg.perceptual_weight > 0:
        # fp32, outside autocast: bf16 quantises LPIPS's feature differences (see reconstruction_loss)
        with torch.autocast(device_type=x.device.type, enabled=False):
            lpips = perceptual(x.float(), reconstruction).float()  # (B, 1, 1, 1)
        rec = rec + cfg.perceptual_weight * lpips
        parts["perceptual"] = lpips.detach().mean()
    terms = {"nll": Term(nll_loss(rec, logvar), via_reconstruction=True),
             "kl": Term(kl_loss(posterior), cfg.kl_weight)}
    return terms, parts


def total(terms: dict[str, Term]) -> torch.Tensor:
    """``sum(weight * value)`` over every term: the autoencoder loss, 0-dim float32."""
    return sum(t.weight * t.value for t in terms.values())


def reconstruction_grads(terms: dict[str, Term], reconstruction: torch.Tensor,
                         logvar: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """For each via_reconstruction term, the detached gradients of its (unweighted) value w.r.t.
    the reconstruction ((B, 3, H, W) float32) and the logvar (None when it is not trained): one
    backward through LPIPS or D per term, shared by the adaptive weight and :func:`surrogate`."""
    wrt = [reconstruction, logvar] if logvar.requires_grad else [reconstruction]
    grads = {}
    for name, term in terms.items():
        if term.via_reconstruction:
            g = torch.autograd.grad(term.value, wrt, retain_graph=True, allow_unused=True)
            if g[0] is None:
                raise ValueError(f"loss term {name!r} is marked via_reconstruction but does not depend on "
                                 "the reconstruction; mark it via_reconstruction=False")
            g_logvar = g[1] if len(g) > 1 and g[1] is not None else None
            grads[name] = (g[0].detach(), None if g_logvar is None else g_logvar.detach())
    return grads


def surrogate(terms: dict[str, Term], reconstruction: torch.Tensor, logvar: torch.Tensor,
              grads: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """A 0-dim loss whose gradient w.r.t. every trainable parameter equals that of
    :func:`total` (terms), with each via_reconstruction term replaced by the chain rule from its
    gradients ``grads`` (:func:`reconstruction_grads`): backward through the decoder once, not
    through LPIPS and D again. Exact because those terms reach the parameters only through the
    reconstruction (and logvar). Raises KeyError for a via_reconstruction term without grads."""
    grad_rec = torch.zeros_like(reconstruction)
    out = reconstruction.new_zeros(())
    for name, term in terms.items():
        if not term.via_reconstruction:
            out = out + term.weight * term.value
            continue
        g_rec, g_logvar = grads[name]
        grad_rec = grad_rec + term.weight * g_rec
        if g_logvar is not None:
            out = out + logvar * (term.weight * g_logvar)
    return out + (reconstruction * grad_rec).sum()
