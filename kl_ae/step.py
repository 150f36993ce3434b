"""One optimizer step of the LDM first-stage recipe: autoencoder update, then discriminator update.

Source: LDM ``LPIPSWithDiscriminator`` (ldm/modules/losses/contperceptual.py) and its training
step (two optimizers, both updated every step). The formulas and the named loss terms live in
:mod:`kl_ae.losses`; a new term of the objective goes into ``losses.autoencoder_terms``, and the
step logs and trains it without a change here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn

from kl_ae import alignment, losses, regularizers
from kl_ae.checkpoint import full_tensor
from kl_ae.config import LossConfig
from kl_ae.distributed import gathered
from kl_ae.model import downsampling_factor


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
    teacher: nn.Module | None = None  # the VF term's frozen vision model (kl_ae.alignment.Teacher)
    teacher_name: str = "vf"  # "vf" or "vf_random_teacher"
    original: nn.Module | None = None  # loss.fp16_fix: the frozen model.init_from VAE, the target


def _update(accelerator: Accelerator, loss: torch.Tensor, module: nn.Module, optimizer, scheduler,
            max_grad_norm: float) -> tuple[torch.Tensor, bool] | None:
    """Backward; on the last micro-batch: gradient norm (clipped if max_grad_norm > 0), then the
    optimizer and scheduler step only if that norm is finite, then zero_grad.

    Returns (gradient norm, fp16 overflow), or None between accumulation micro-batches. A NaN/Inf
    loss or gradient on any rank makes the all-reduced norm non-finite on every rank, so all
    ranks skip the same update. Reading it costs one host synchronisation per step.

    Under fp16 (Accelerate's GradScaler) a non-finite norm is usually the scaler's overflow, not
    divergence, and the scaler handles it: this optimizer's gradients alone are unscaled
    (Accelerate's ``clip_grad_norm_`` unscales every optimizer, which would also divide the other
    model's gradients of the earlier micro-batches, pending under accumulation, and then again at
    its own step), and the optimizer step always runs, since only ``GradScaler.step`` + ``update``
    skip the update, lower the scale and reset the unscaled state (without them the next unscale
    raises). The second value is True for such a skip while the scale is above 1 (GradScaler's
    back-off, the same on every rank); once the scale is at 1 a skip counts as non-finite, so a
    NaN loss stops the run about 16 steps later than in bf16 (the halvings from 2^16).
    """
    accelerator.backward(loss)
    if not accelerator.sync_gradients:
        return None
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    overflow = False
    if accelerator.scaler is not None:
        accelerator.unscale_gradients(optimizer=optimizer)
        # torch's clip handles DDP's tensors and FSDP2's DTensors (one mesh) alike
        norm = full_tensor(torch.nn.utils.clip_grad_norm_(module.parameters(), limit))
        scale = accelerator.scaler.get_scale()  # before update() lowers it
        optimizer.step()  # GradScaler.step skips it on a non-finite gradient, update() lowers the scale
        if optimizer.step_was_skipped:
            overflow = scale > 1.0
        else:
            scheduler.step()
    else:
        norm = full_tensor(accelerator.clip_grad_norm_(module.parameters(), limit))  # FSDP2: a DTensor
        if torch.isfinite(norm):
            optimizer.step()
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.detach(), overflow


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


def _vf_term(accelerator: Accelerator, m: StepModels, ae, x: torch.Tensor, forward, reconstruction: torch.Tensor,
             terms: dict, cfg: LossConfig, grads: dict | None, out: dict) -> tuple[torch.Tensor, torch.Tensor | float]:
    """VA-VAE's VF loss of this batch and its weight: loss.vf_weight, times with loss.vf_adaptive
    ||grad nll|| / ||grad vf|| at the encoder's last layer (kl_ae.alignment). The NLL's gradient
    there is chained from its gradient w.r.t. the reconstruction when the GAN step computed it,
    else taken through LPIPS and the decoder (one extra backward)."""
    with accelerator.autocast():
        features = m.teacher(x)  # frozen, no graph
    vf = alignment.vf_loss(forward.projection.float(), features, cfg.vf_margin_cos, cfg.vf_margin_distmat)
    if not cfg.vf_adaptive:
        return vf, cfg.vf_weight
    encoder_last = ae.vae.encoder.conv_out.weight
    if grads is not None:
        (nll_grad,) = torch.autograd.grad(reconstruction, encoder_last, grad_outputs=grads["nll"][0],
                                          retain_graph=True)
    else:
        (nll_grad,) = torch.autograd.grad(terms["nll"].value, encoder_last, retain_graph=True)
    (vf_grad,) = torch.autograd.grad(vf, encoder_last, retain_graph=True)
    adaptive = alignment.adaptive_vf_weight(nll_grad, vf_grad)
    out["loss/vf_adaptive_weight"] = adaptive
    return vf, cfg.vf_weight * adaptive


def autoencoder_step(accelerator: Accelerator, m: StepModels, x: torch.Tensor, step: int,
                     cfg: LossConfig, max_grad_norm: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Reconstruct, compute the named loss terms (+ the adaptive GAN term after disc_start), update.

    With loss.fp16_fix (``m.original`` set) the pixel and LPIPS terms compare the reconstruction
    with the frozen original's decode of the same z instead of x, and two terms join:
    ``fp16_fix_latent`` (mean squared distance of the posterior means) and
    ``fp16_fix_activation`` (kl_ae.fp16_fix.ActivationPenalty over this forward).

    x: (B, 3, H, W) float in [-1, 1]. Returns the detached reconstruction and a dict of
    detached scalar tensors (read at log time; the one host synchronisation is the finiteness
    check of the gradient norm, see ``_update``). The logged ``loss/total`` is
    ``losses.total(terms)``; what is backpropagated is that loss or, with the GAN on,
    ``losses.surrogate`` of the same terms (same gradient, LPIPS and D traversed once).
    """
    ae = accelerator.unwrap_model(m.autoencoder)
    eq = (regularizers.draw_eq_transform(cfg.eq_transforms, cfg.eq_scales, cfg.eq_probability)
          if cfg.eq_weight > 0 else None)
    penalty = getattr(ae, "activation_penalty", None)  # loss.fp16_fix (kl_ae.fp16_fix.ActivationPenalty)
    with accelerator.autocast(), penalty.collecting() if penalty is not None else contextlib.nullcontext():
        forward = m.autoencoder(x, eq)
    reconstruction, posterior = forward.reconstruction.float(), forward.posterior
    target, original = x, None
    if m.original is not None:  # fp16-fix: the frozen original's decode of the same z, and its posterior
        # not under fp16 autocast: the original is the model that overflows fp16
        fp16 = accelerator.mixed_precision == "fp16"
        with torch.no_grad(), accelerator.autocast() if not fp16 else contextlib.nullcontext():
            original = m.original.encode(x).latent_dist
            target = m.original.decode(forward.z.detach()).sample.float()
    terms, parts = losses.autoencoder_terms(target, reconstruction, posterior, ae.logvar, cfg, m.perceptual)
    out, surrogate = {}, None
    if original is not None:
        terms["fp16_fix_latent"] = losses.Term(
            (posterior.mean.float() - original.mean.float()).square().mean(), cfg.fp16_fix_latent_weight)
    if penalty is not None:
        terms["fp16_fix_activation"] = losses.Term(penalty.penalty(x.device), cfg.fp16_fix_activation_weight)
        out["fp16_fix/max_activation"] = torch.tensor(penalty.max_activation, device=x.device)
    if cfg.eq_weight > 0:  # every step logs loss/eq (0 without a transform): the same keys on every rank
        terms["eq"] = losses.Term(reconstruction.new_zeros(()) if eq is None else regularizers.equivariance_loss(
            eq.image(x, downsampling_factor(ae.vae)), forward.eq_reconstruction.float(), cfg.l1_weight,
            cfg.l2_weight), cfg.eq_weight)
    if forward.noise_strength is not None:
        out["latent/noise_strength"] = forward.noise_strength.mean()
    disc_factor = losses.disc_factor_at(step, cfg.disc_start, cfg.disc_factor, cfg.disc_ramp_steps)
    grads = None
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
    if m.teacher is not None:
        vf, weight = _vf_term(accelerator, m, ae, x, forward, reconstruction, terms, cfg,
                              grads if disc_factor > 0 else None, out)
        terms[m.teacher_name] = losses.Term(vf, weight)
    if disc_factor > 0:
        surrogate = losses.surrogate(terms, reconstruction, ae.logvar, grads)  # total's gradient, LPIPS and D once
    loss = losses.total(terms)  # what is logged, and backpropagated when there is no surrogate
    updated = _update(accelerator, loss if surrogate is None else surrogate, m.autoencoder, m.opt_ae, m.sched_ae,
                      max_grad_norm)
    if updated is not None:
        out["optim/ae_grad_norm"] = updated[0]
        out["optim/ae_fp16_overflow"] = torch.tensor(float(updated[1]))  # consumed by monitor.check_finite
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
    """Update D on real ``x`` and the detached ``reconstruction`` (no gradient reaches the AE),
    with the R1 penalty (loss.disc_r1_gamma) and LeCam regularization (loss.disc_lecam_weight)
    when on (kl_ae.regularizers), both scaled by the adversarial factor like the loss.

    Skipped (empty dict) before disc_start, as LDM's disc_factor = 0 makes that update a no-op.
    """
    disc_factor = losses.disc_factor_at(step, cfg.disc_start, cfg.disc_factor, cfg.disc_ramp_steps)
    if disc_factor <= 0:
        return {}
    real = x.detach().requires_grad_(True) if cfg.disc_r1_gamma > 0 else x
    with accelerator.autocast():
        logits_real, logits_fake = m.discriminator(real, reconstruction.detach())
    logits_real, logits_fake = logits_real.float(), logits_fake.float()
    d_loss = losses.discriminator_loss(logits_real, logits_fake, cfg.disc_loss)
    out = {}
    if cfg.disc_r1_gamma > 0:
        r1 = regularizers.r1_penalty(logits_real, real, cfg.disc_r1_gamma)
        d_loss = d_loss + r1
        out["disc/r1"] = r1.detach()
    if cfg.disc_lecam_weight > 0:
        wrapper = accelerator.unwrap_model(m.discriminator)
        lecam = regularizers.lecam_loss(logits_real, logits_fake, wrapper.lecam_real, wrapper.lecam_fake)
        d_loss = d_loss + cfg.disc_lecam_weight * lecam
        out["disc/lecam"] = lecam.detach()
        regularizers.update_anchor(wrapper.lecam_real, logits_real, cfg.disc_lecam_decay)
        regularizers.update_anchor(wrapper.lecam_fake, logits_fake, cfg.disc_lecam_decay)
    d_loss = disc_factor * d_loss
    updated = _update(accelerator, d_loss, m.discriminator, m.opt_disc, m.sched_disc, max_grad_norm)
    out.update({"disc/loss": d_loss.detach(), "disc/logits_real": logits_real.detach().mean(),
                "disc/logits_fake": logits_fake.detach().mean()})
    if updated is not None:
        out["optim/disc_grad_norm"] = updated[0]
        out["optim/disc_fp16_overflow"] = torch.tensor(float(updated[1]))  # consumed by monitor.check_finite
    return out
