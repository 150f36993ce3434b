"""The autoencoder (diffusers ``AutoencoderKL``) and the modules the training loop calls.

The loop touches the autoencoder only through :class:`AutoencoderWrapper` and the
discriminator only through :class:`DiscriminatorWrapper`, so both go through their DDP wrappers
under Accelerate and every gradient is synchronised across processes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from kl_ae.config import LossConfig, ModelConfig, check_init_from
from kl_ae.discriminator import PatchDiscriminator
from kl_ae.single_file import load_ldm_vae_weights

logger = logging.getLogger(__name__)


def build_autoencoder(cfg: ModelConfig) -> AutoencoderKL:
    """A randomly initialised diffusers ``AutoencoderKL`` in the LDM/SD layout (no download).

    Build it under ``torch.device("meta")`` to count parameters of real-size models for free.
    """
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        act_fn="silu",
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        use_quant_conv=cfg.use_quant_conv,
        use_post_quant_conv=cfg.use_post_quant_conv,
        mid_block_add_attention=cfg.mid_block_add_attention,
    )


def load_or_build_autoencoder(cfg: ModelConfig) -> AutoencoderKL:
    """``AutoencoderKL.from_pretrained(cfg.init_from)`` (local, fp32), a single LDM/SGM file loaded
    into the architecture of ``cfg.init_config`` or ``cfg`` (:func:`load_ldm_vae_weights`, which
    raises ConfigError), or a random :func:`build_autoencoder`; with ``train_encoder=False`` the
    encoder side is frozen."""
    if cfg.init_from and Path(cfg.init_from).is_file():
        config = check_init_from(cfg)  # init_config's diffusers config, or None: this section
        vae = load_ldm_vae_weights(AutoencoderKL.from_config(config) if config else build_autoencoder(cfg),
                                   cfg.init_from)
        if config is None and not cfg.train_encoder:
            logger.warning("model.init_from is a single file without model.init_config: its scaling_factor is "
                           "unknown, so the export measures one; set model.init_config to keep the original")
    elif cfg.init_from:
        check_init_from(cfg)
        vae = AutoencoderKL.from_pretrained(cfg.init_from, torch_dtype=torch.float32)
    else:
        vae = build_autoencoder(cfg)
        if cfg.posterior_logvar_init is not None:
            init_posterior_logvar(vae, cfg.posterior_logvar_init)
    if not cfg.train_encoder:
        freeze_encoder(vae)
    return vae


def init_posterior_logvar(vae: AutoencoderKL, value: float) -> None:
    """Start every posterior log-variance at ``value``: zero the weights and set the bias of the
    log-variance half of the last layer before the posterior (``quant_conv``, or
    ``encoder.conv_out`` without one), so ``posterior.logvar == value`` for any input at step 0.

    Why: with PyTorch's default init the posterior starts with sigma ~ 1 against posterior means of
    order 1, and with kl_weight ~ 1e-6 only the reconstruction gradient shrinks sigma, slowly
    (sigma 0.36 after 400 steps of the quickstart): a short run trains its decoder on noisy
    latents. A low start (e.g. -8: sigma 0.018) removes that handicap; the KL term is free to
    move it. Channels [latent_channels:] of the layer are the log-variance (diffusers'
    ``DiagonalGaussianDistribution`` chunks mean, then logvar).
    """
    layer = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    c = vae.config.latent_channels
    with torch.no_grad():
        layer.weight[c:].zero_()
        layer.bias[c:].fill_(value)


def freeze_encoder(vae: AutoencoderKL) -> None:
    """Decoder-only fine-tuning: no gradient for the encoder and quant_conv (the latent space)."""
    vae.encoder.requires_grad_(False)
    if vae.quant_conv is not None:
        vae.quant_conv.requires_grad_(False)


class AutoencoderWrapper(nn.Module):
    """Training view of an ``AutoencoderKL``: ``forward(x) -> (reconstruction, posterior)``.

    diffusers' own ``AutoencoderKL.forward`` decodes the posterior mode unless asked otherwise;
    training needs a sample z = mu + sigma * eps (LDM ``AutoencoderKL.forward(sample_posterior=True)``).
    Also holds the scalar NLL log-variance of the LDM loss, so it is synchronised with the model.
    """

    def __init__(self, vae: AutoencoderKL, logvar_init: float = 0.0, learn_logvar: bool = False):
        super().__init__()
        self.vae = vae
        # LDM keeps this parameter out of the optimizer, so it stays at its initial value;
        # learn_logvar=True trains it (SGM's learn_logvar). A fixed one is a buffer (same state-dict
        # key): FSDP2's fully_shard rejects 0-dim parameters.
        logvar = torch.full((), float(logvar_init))
        if learn_logvar:
            self.logvar = nn.Parameter(logvar)
        else:
            self.register_buffer("logvar", logvar)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """x: (B, 3, H, W) float in [-1, 1] -> reconstruction (B, 3, H, W), posterior over
        latents (B, latent_channels, H/f, W/f)."""
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample()
        reconstruction = self.vae.decode(z).sample
        return reconstruction, posterior

    @property
    def last_layer(self) -> torch.Tensor:
        """decoder.conv_out.weight: the layer the adaptive GAN weight is measured on (LDM)."""
        return self.vae.decoder.conv_out.weight


class DiscriminatorWrapper(nn.Module):
    """``forward(real, fake) -> (logits_real, logits_fake)`` in one call.

    Two separate calls of a DDP module before one backward would mark parameters ready twice;
    one call that runs the PatchGAN twice keeps LDM's separate BatchNorm statistics for the
    real and the fake batch and stays legal under DDP.
    """

    def __init__(self, discriminator: PatchDiscriminator):
        super().__init__()
        self.discriminator = discriminator

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.discriminator(real), self.discriminator(fake)


def build_discriminator(cfg: LossConfig) -> DiscriminatorWrapper:
    return DiscriminatorWrapper(
        PatchDiscriminator(in_channels=3, channels=cfg.disc_channels, num_layers=cfg.disc_num_layers)
    )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
