"""One optimizer step of the LDM first-stage recipe: autoencoder update, then discriminator update.

Source: LDM ``LPIPSWithDiscriminator`` (ldm/modules/losses/contperceptual.py) and its training
step (two optimizers, both updated every step). The formulas live in :mod:`kl_ae.losses`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from kl_ae import losses
from kl_ae.config import LossConfig


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
    norm = accelerator.clip_grad_norm_(module.parameters(), limit)
    if isinstance(norm, DTensor):  # FSDP2: a replicated DTensor; the loop logs plain tensors
        norm = norm.full_tensor()
    if torch.isfinite(norm):
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.detach()


def _reconstruction_grads(nll: torch.Tensor, g_loss: torch.Tensor, reconstruction: torch.Tensor,
                          logvar: torch.Tensor) -> dict:
    """d nll / d reconstruction and d g_loss / d reconstruction, (B, 3, H, W) float32: one backward
    through LPIPS and one through D, shared by the adaptive weight and the update. "logvar":
    a 0-dim term whose backward gives the learned logvar its gradient (0. when it is fixed).

    Exact because the nll depends on the trainable parameters only through the reconstruction
    (and logvar) and g_loss only through the reconstruction (D is frozen in this step); without it
    the adaptive weight's two autograd.grad calls and the update would traverse LPIPS and D twice.
    """
    wrt = [reconstruction, logvar] if logvar.requires_grad else [reconstruction]
    nll_grads = torch.autograd.grad(nll, wrt, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, reconstruction, retain_graph=True)
    logvar_term = logvar * nll_grads[1].detach() if logvar.requires_grad else 0.0
    return {"nll": nll_grads[0].detach(), "g": g_grad.detach(), "logvar": logvar_term}


def _chain_to(last_layer: torch.Tensor, reconstruction: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient w.r.t. ``last_layer`` of a loss whose gradient w.r.t. ``reconstruction`` is
    ``grad`` (the chain rule through the last layer alone; nothing accumulates into .grad)."""
    (out,) = torch.autograd.grad(reconstruction, last_layer, grad_outputs=grad, retain_graph=True)
    return out


def autoencoder_step(accelerator: Accelerator, m: StepModels, x: torch.Tensor, step: int,
                     cfg: LossConfig, max_grad_norm: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Reconstruct, compute nll + kl_weight * KL (+ adaptive GAN term after disc_start), update.

    x: (B, 3, H, W) float in [-1, 1]. Returns the detached reconstruction and a dict of
    detached scalar tensors (read at log time; the one host synchronisation is the finiteness
    check of the gradient norm, see ``_update``). The discriminator is called with its parameters frozen, so this step leaves no gradient on it.
    """
    ae = accelerator.unwrap_model(m.autoencoder)
    with accelerator.autocast():
        reconstruction, posterior = m.autoencoder(x)
    reconstruction = reconstruction.float()
    # pixel part l1_weight * |x - x_hat| + l2_weight * (x - x_hat)^2, (B, C, H, W)
    rec = losses.reconstruction_loss(x, reconstruction, None, 0.0, cfg.l1_weight, cfg.l2_weight)
    with torch.no_grad():
        error = x.float() - reconstruction
        l1, mse = error.abs().mean(), error.square().mean()
    perceptual = None
    if m.perceptual is not None and cfg.perceptual_weight > 0:
        # fp32, outside autocast: bf16 quantises LPIPS's feature differences (see losses.py)
        with torch.autocast(device_type=x.device.type, enabled=False):
            perceptual = m.perceptual(x, reconstruction).float()  # (B, 1, 1, 1)
        rec = rec + cfg.perceptual_weight * perceptual
    nll = losses.nll_loss(rec, ae.logvar)
    kl = losses.kl_loss(posterior)
    loss = nll + cfg.kl_weight * kl

    disc_factor = losses.disc_factor_at(step, cfg.disc_start, cfg.disc_factor, cfg.disc_ramp_steps)
    out = {"loss/l1": l1, "loss/mse": mse, "loss/nll": nll.detach(), "loss/kl": kl.detach(),
           "loss/logvar": ae.logvar.detach()}
    if perceptual is not None:
        out[f"loss/{m.perceptual_name}"] = perceptual.detach().mean()
    if disc_factor > 0:
        disc = accelerator.unwrap_model(m.discriminator).discriminator
        if isinstance(m.discriminator, FSDPModule):  # D is called below its FSDP2 root: gather its shards
            m.discriminator.unshard()  # (resharded after discriminator_step's backward)
        disc.requires_grad_(False)  # the generator term must not leave gradients on D
        with accelerator.autocast():
            logits_fake = disc(reconstruction).float()
        disc.requires_grad_(True)
        g_loss = losses.generator_loss(logits_fake)
        last_layer = ae.last_layer  # before any backward: under FSDP2 that swaps in the sharded parameter
        grads = _reconstruction_grads(nll, g_loss, reconstruction, ae.logvar)
        d_weight = losses.adaptive_weight_from_grads(
            _chain_to(last_layer, reconstruction, grads["nll"]),
            _chain_to(last_layer, reconstruction, grads["g"]), cfg.disc_weight)
        loss = loss + d_weight * disc_factor * g_loss
        out.update({"loss/g": g_loss.detach(), "disc/adaptive_weight": d_weight, "disc/factor": torch.tensor(disc_factor, device=x.device)})
        # Same gradients as backward(loss), with LPIPS and D backpropagated once instead of twice
        backward_target = ((reconstruction * (grads["nll"] + d_weight * disc_factor * grads["g"])).sum()
                           + cfg.kl_weight * kl + grads["logvar"])
    else:
        backward_target = loss
    norm = _update(accelerator, backward_target, m.autoencoder, m.opt_ae, m.sched_ae, max_grad_norm)
    if norm is not None:
        out["optim/ae_grad_norm"] = norm
    out["loss/total"] = loss.detach()
    with torch.no_grad():
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
