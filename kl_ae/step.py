"""One optimizer step of the LDM first-stage recipe: autoencoder update, then discriminator update.

Source: LDM ``LPIPSWithDiscriminator`` (ldm/modules/losses/contperceptual.py) and its training
step (two optimizers, both updated every step). The formulas and the named loss terms live in
:mod:`kl_ae.losses`; a new term of the objective goes into ``losses.autoencoder_terms``, and the
step logs and trains it without a change here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn

from kl_ae import losses
from kl_ae.checkpoint import full_tensor
from kl_ae.config import LossConfig
from kl_ae.distributed import gathered


@dataclass
class StepModels:
    """What one training step needs; ``autoencoder`` and ``discriminator`` may be DDP-wrapped."""

    autoencoder: nn.Module  # AutoencoderWrapper (possibly wrapped by Accelerate)
    discriminator: nn.Module  # DiscriminatorWrapper (possibly wrapped by Accelerate)
    opt_ae: torch.optim.Optimizer
    opt_disc: torch.optim.Optimizer
    sched_ae: object
    sched_disc: object
    perceptual: nn.Module | None
    perceptual_name: str  # "lpips" or "lpips_random_trunk"


def _update(accelerator: Accelerator, loss: torch.Tensor, module: nn.Module, optimizer, scheduler,
            max_grad_norm: float) -> torch.Tensor | None:
    """Backward; on the last micro-batch: gradient norm (clipped if max_grad_norm > 0), then the
    optimizer and scheduler step only if that norm is finite, then zero_grad.

    Returns the gradient norm (a tensor; None between accumulation micro-batches). A NaN/Inf
    loss or gradient on any rank makes the all-reduced norm non-finite on every rank, so all
    ranks skip the same update. Reading it costs one host synchronisation per step.
    """
    accelerator.backward(loss)
    if not accelerator.sync_gradients:
        return None
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    norm = full_tensor(accelerator.clip_grad_norm_(module.parameters(), limit))  # FSDP2: a DTensor
    if torch.isfinite(norm):
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.detach()


def _chain_to(last_layer: torch.Tensor, reconstruction: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient w.r.t. ``last_layer`` of a loss whose gradient w.r.t. ``reconstruction`` is
    ``grad`` (the chain rule through the last layer alone; nothing accumulates into .grad)."""
    (out,) = torch.autograd.grad(reconstruction, last_layer, grad_outputs=grad, retain_graph=True)
    return out


def _generator_logits(accelerator: Accelerator, m: StepModels, reconstruction: torch.Tensor) -> torch.Tensor:
    """D's patch logits on the reconstruction with D frozen: the generator term leaves no
    gradient on D, only on the autoencoder."""
    disc = accelerator.unwrap_model(gathered(m.discriminator)).discriminator
    disc.requires_grad_(False)
    with accelerator.autocast():
        logits = disc(reconstruction).float()
    disc.requires_grad_(True)
    return logits


def autoencoder_step(accelerator: Accelerator, m: StepModels, x: torch.Tensor, step: int,
                     cfg: LossConfig, max_grad_norm: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Reconstruct, compute the named loss terms (+ the adaptive GAN term after disc_start), update.

    x: (B, 3, H, W) float in [-1, 1]. Returns the detached reconstruction and a dict of
    detached scalar tensors (read at log time; the one host synchronisation is the finiteness
    check of the gradient norm, see ``_update``). The logged ``loss/total`` is
    ``losses.total(terms)``; what is backpropagated is that loss or, with the GAN on,
    ``losses.surrogate`` of the same terms (same gradient, LPIPS and D traversed once).
    """
    ae = accelerator.unwrap_model(m.autoencoder)
    with accelerator.autocast():
        reconstruction, posterior = m.autoencoder(x)
    reconstruction = reconstruction.float()
    terms, parts = losses.autoencoder_terms(x, reconstruction, posterior, ae.logvar, cfg, m.perceptual)
    disc_factor = losses.disc_factor_at(step, cfg.disc_start, cfg.disc_factor, cfg.disc_ramp_steps)
    out, surrogate = {}, None
    if disc_factor > 0:
        last_layer = ae.last_layer  # before any backward: under FSDP2 that swaps in the sharded parameter
        terms["g"] = losses.Term(losses.generator_loss(_generator_logits(accelerator, m, reconstruction)),
                                 via_reconstruction=True)
        grads = losses.reconstruction_grads(terms, reconstruction, ae.logvar)
        d_weight = losses.adaptive_weight_from_grads(_chain_to(last_layer, reconstruction, grads["nll"][0]),
                                                     _chain_to(last_layer, reconstruction, grads["g"][0]),
                                                     cfg.disc_weight)
        terms["g"].weight = d_weight * disc_factor
        out.update({"disc/adaptive_weight": d_weight, "disc/factor": torch.tensor(disc_factor, device=x.device)})
        surrogate = losses.surrogate(terms, reconstruction, ae.logvar, grads)  # total's gradient, LPIPS and D once
    loss = losses.total(terms)  # what is logged, and backpropagated when there is no surrogate
    norm = _update(accelerator, loss if surrogate is None else surrogate, m.autoencoder, m.opt_ae, m.sched_ae,
                   max_grad_norm)
    if norm is not None:
        out["optim/ae_grad_norm"] = norm
    with torch.no_grad():
        out.update({f"loss/{name}": term.value.detach() for name, term in terms.items()})
        out["loss/total"] = loss.detach()
        out.update({"loss/l1": parts["l1"], "loss/mse": parts["mse"], "loss/logvar": ae.logvar.detach()})
        if "perceptual" in parts:
            out[f"loss/{m.perceptual_name}"] = parts["perceptual"]
        out["latent/mu_mean"] = posterior.mean.float().mean()  # mean of the posterior means
        out["latent/mu_std"] = posterior.mean.float().std()  # spread of the posterior means
        out["latent/sigma_mean"] = posterior.std.float().mean()  # mean posterior std (-> 0: KL rising)
    return reconstruction.detach(), out


def discriminator_step(accelerator: Accelerator, m: StepModels, x: torch.Tensor,
                       reconstruction: torch.Tensor, step: int, cfg: LossConfig,
                       max_grad_norm: float = 0.0) -> dict:
    """Update D on real ``x`` and the detached ``reconstruction`` (no gradient reaches the AE).

    Skipped (empty dict) before disc_start, as LDM's disc_factor = 0 makes that update a no-op.
    """
    disc_factor = losses.disc_factor_at(step, cfg.disc_start, cfg.disc_factor, cfg.disc_ramp_steps)
    if disc_factor <= 0:
        return {}
    with accelerator.autocast():
        logits_real, logits_fake = m.discriminator(x, reconstruction.detach())
    logits_real, logits_fake = logits_real.float(), logits_fake.float()
    d_loss = disc_factor * losses.discriminator_loss(logits_real, logits_fake, cfg.disc_loss)
    norm = _update(accelerator, d_loss, m.discriminator, m.opt_disc, m.sched_disc, max_grad_norm)
    out = {"disc/loss": d_loss.detach(), "disc/logits_real": logits_real.detach().mean(),
           "disc/logits_fake": logits_fake.detach().mean()}
    if norm is not None:
        out["optim/disc_grad_norm"] = norm
    return out
