"""The autoencoder (diffusers ``AutoencoderKL``) and the modules the training loop calls.

The loop touches the autoencoder only through :class:`AutoencoderWrapper` and the
discriminator only through :class:`DiscriminatorWrapper`, so both go through their DDP wrappers
under Accelerate and every gradient is synchronised across processes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from kl_ae.checkpoint import (
    CONFIG, EMA_WEIGHTS, CheckpointError, config_file_of, load_autoencoder_state, read_loop_state, resolve_checkpoint,
)
from kl_ae.config import Config, LossConfig, ModelConfig, load_config
from kl_ae.init_scheme import LATENT_LOGVAR as BLOCK_MEANS_LOGVAR, init_block_means
from kl_ae.parsing import ConfigError
from kl_ae.discriminator import PatchDiscriminator
from kl_ae.single_file import load_ldm_vae_weights

logger = logging.getLogger(__name__)


_INIT_FROM_KEYS = ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
                   "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")


# Single-file VAEs (LDM/SGM key layout) model.init_from accepts, read by kl_ae/single_file.py
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


def check_init_from(m: ModelConfig) -> dict | None:
    """Check ``m.init_from`` (and ``m.init_config``) against ``m`` without reading any weights.

    Returns the diffusers config that describes the VAE: the directory's config.json, or for a
    single file init_config's (None without one: the model section is the architecture).
    Raises ConfigError naming the path and every disagreeing key, before any model is built.
    """
    path = Path(m.init_from)
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES and not path.is_dir():
        if not path.is_file():
            raise ConfigError(f"model.init_from={m.init_from!r}: no such file")
        if not m.init_config:
            return None
        source, value = "model.init_config", m.init_config
        file = Path(value) if Path(value).is_file() else Path(value) / "config.json"
    elif path.is_file():
        raise ConfigError(f"model.init_from={m.init_from!r}: unknown file type {path.suffix!r}; a single-file VAE "
                          f"must end in one of {', '.join(SINGLE_FILE_SUFFIXES)}")
    elif m.init_config:
        raise ConfigError("model.init_config is only for a single-file model.init_from; a directory's own "
                          "config.json describes it (leave model.init_config empty)")
    else:
        source, value, file = "model.init_from", m.init_from, path / "config.json"
    if not file.is_file():
        raise ConfigError(f"{source}={value!r}: no config.json there; expected a local diffusers AutoencoderKL "
                          "directory (e.g. the vae/ folder of a pipeline, or a kl-ae export) or " + (
                              "its config.json" if m.init_config else f"a single-file VAE {SINGLE_FILE_SUFFIXES}"))
    import json

    config = json.loads(file.read_text())
    if config.get("_class_name", "AutoencoderKL") != m.architecture:
        raise ConfigError(f"{source}={value!r} holds a {config['_class_name']}, not model.architecture="
                          f"{m.architecture!r} (set it, or use the preset of that VAE: flux2 for AutoencoderKLFlux2)")
    bad = []
    for key in _INIT_FROM_KEYS:
        theirs = config.get(key, True if key.startswith(("use_", "mid_")) else None)
        ours = getattr(m, key)
        if isinstance(theirs, (list, tuple)):
            theirs = list(theirs)
        if theirs != ours:
            bad.append(f"model.{key}={ours!r} but the VAE has {theirs!r}")
    if bad:
        raise ConfigError(f"{source}={value!r} does not match the model config: " + "; ".join(bad)
                          + " (set these keys, or use the preset of that VAE)")
    return config


def autoencoder_class(name: str):
    """The diffusers class named by model.architecture or a config.json's _class_name."""
    if name == "AutoencoderKLFlux2":
        from diffusers import AutoencoderKLFlux2

        return AutoencoderKLFlux2
    if name != "AutoencoderKL":
        raise ConfigError(f"{name!r} is not a VAE class kl-ae trains (AutoencoderKL, AutoencoderKLFlux2)")
    return AutoencoderKL


def is_flux2(vae) -> bool:
    """Whether ``vae`` is an AutoencoderKLFlux2, also under FSDP2 (whose wrapper class is not
    the model's): its latent BatchNorm, ``vae.bn``, is what sets it apart from an AutoencoderKL."""
    return hasattr(vae, "bn")


def build_autoencoder(cfg: ModelConfig) -> AutoencoderKL:
    """A randomly initialised diffusers ``AutoencoderKL`` in the LDM/SD layout (no download), or
    ``AutoencoderKLFlux2`` (the same network, 2x2 latent patches, BatchNorm eps 1e-4) for
    model.architecture='AutoencoderKLFlux2'.

    Build it under ``torch.device("meta")`` to count parameters of real-size models for free.
    """
    n = len(cfg.block_out_channels)
    return autoencoder_class(cfg.architecture)(
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
        if (config or {}).get("_class_name", cfg.architecture) != "AutoencoderKL":
            raise ConfigError(f"model.init_from={cfg.init_from!r}: a single file loads only into an AutoencoderKL "
                              "(the LDM/SGM layout); for a FLUX.2 VAE use its diffusers vae/ folder")
        vae = load_ldm_vae_weights(AutoencoderKL.from_config(config) if config else build_autoencoder(cfg),
                                   cfg.init_from)
        if config is None and not cfg.train_encoder:
            logger.warning("model.init_from is a single file without model.init_config: its scaling_factor is "
                           "unknown, so the export measures one; set model.init_config to keep the original")
    elif cfg.init_from:
        check_init_from(cfg)
        vae = autoencoder_class(cfg.architecture).from_pretrained(cfg.init_from, torch_dtype=torch.float32)
    else:
        vae = build_autoencoder(cfg)
        logvar = cfg.posterior_logvar_init
        if cfg.init_scheme == "block_means":
            init_block_means(vae)
            logvar = BLOCK_MEANS_LOGVAR if logvar is None else logvar  # a codec's latent is not noise
        if logvar is not None:
            init_posterior_logvar(vae, logvar)
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


@dataclass
class AutoencoderOutput:
    """One training forward. reconstruction: (B, 3, H, W); posterior: q(z|x) over (B, c, h, w);
    z: its sample; noise_strength: (B,) per-image latent-noise strength (loss.latent_noise), or
    None; projection: (B, D, h, w) the VF projection of z, or None; eq_reconstruction: decode of
    the EQ-transformed z, or None."""

    reconstruction: torch.Tensor
    posterior: DiagonalGaussianDistribution
    z: torch.Tensor
    noise_strength: torch.Tensor | None = None
    projection: torch.Tensor | None = None
    eq_reconstruction: torch.Tensor | None = None


class AutoencoderWrapper(nn.Module):
    """Training view of an ``AutoencoderKL``: ``forward(x, eq) -> AutoencoderOutput``.

    diffusers' own ``AutoencoderKL.forward`` decodes the posterior mode unless asked otherwise;
    training needs a sample z = mu + sigma * eps (LDM ``AutoencoderKL.forward(sample_posterior=True)``).
    Also holds the scalar NLL log-variance of the LDM loss and, with the VF term on, the 1x1
    projection of z to the teacher's width (VA-VAE), so both are synchronised with the model and
    kept in checkpoints (not in exports). Every decoder pass of a step happens in this one
    forward, as DDP needs: the reconstruction (from z plus latent noise when latent_noise > 0,
    kl_ae.regularizers.noisy_latent) and the EQ-VAE one of ``eq``'s transform of z.
    """

    def __init__(self, vae: AutoencoderKL, logvar_init: float = 0.0, learn_logvar: bool = False,
                 latent_noise: float = 0.0, vf_dim: int = 0):
        super().__init__()
        self.vae = vae
        self.latent_noise = latent_noise
        self.vf_projection = nn.Conv2d(vae.config.latent_channels, vf_dim, 1) if vf_dim else None
        # LDM keeps this parameter out of the optimizer, so it stays at its initial value;
        # learn_logvar=True trains it (SGM's learn_logvar). A fixed one is a buffer (same state-dict
        # key): FSDP2's fully_shard rejects 0-dim parameters.
        logvar = torch.full((), float(logvar_init))
        if learn_logvar:
            self.logvar = nn.Parameter(logvar)
        else:
            self.register_buffer("logvar", logvar)

    def forward(self, x: torch.Tensor, eq=None) -> AutoencoderOutput:
        """x: (B, 3, H, W) float in [-1, 1]; eq: a kl_ae.regularizers.EqTransform or None."""
        from kl_ae.regularizers import noisy_latent

        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample()
        decoded, strength = z, None
        if self.training and self.latent_noise > 0:
            decoded, strength = noisy_latent(z, self.latent_noise)
        out = AutoencoderOutput(self.vae.decode(decoded).sample, posterior, z, strength)
        if self.vf_projection is not None:
            out.projection = self.vf_projection(z)
        if eq is not None:
            out.eq_reconstruction = self.vae.decode(eq.latent(z)).sample
        return out

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

    def __init__(self, discriminator: PatchDiscriminator, lecam: bool = False):
        super().__init__()
        self.discriminator = discriminator
        if lecam:  # LeCam's anchors (loss.disc_lecam_weight): moving averages of D's mean logits
            self.register_buffer("lecam_real", torch.zeros(()))
            self.register_buffer("lecam_fake", torch.zeros(()))

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.discriminator(real), self.discriminator(fake)


def build_discriminator(cfg: LossConfig) -> DiscriminatorWrapper:
    return DiscriminatorWrapper(
        PatchDiscriminator(in_channels=3, channels=cfg.disc_channels, num_layers=cfg.disc_num_layers),
        lecam=cfg.disc_lecam_weight > 0,
    )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- what every part needs of a trained autoencoder: its factor, a reconstruction, loading it --


def downsampling_factor(vae: AutoencoderKL) -> int:
    """Spatial factor f of a diffusers AutoencoderKL: one 2x downsample per block but the last."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def reconstruct(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """Decode the posterior mode (the mean) of ``x``: the deterministic reconstruction that
    evaluation, grids and codec comparisons score. x: (B, 3, H, W) in [-1, 1]; returns the same
    shape, unclamped, in ``vae``'s dtype."""
    return vae.decode(vae.encode(x).latent_dist.mode()).sample


RUN_CONFIG = CONFIG  # a run directory's resolved config, written before step 0 (each checkpoint has its own)

# What a resumed run must share with its checkpoint: the keys that shape the saved models and
# optimizer states (the autoencoder, the trainable set, the discriminator, the VF projection and
# the LeCam anchors: whether those terms are on, not their weights).
RESUME_KEYS = ("model.architecture",) + tuple(f"model.{k}" for k in _INIT_FROM_KEYS) + (
    "model.train_encoder", "loss.learn_logvar", "loss.disc_num_layers", "loss.disc_channels",
    "loss.vf_weight > 0", "loss.vf_teacher_arch", "loss.disc_lecam_weight > 0")


def checkpoint_config(checkpoint: str | Path) -> Config:
    """The config ``checkpoint`` was trained with (kl_ae.checkpoint.config_file_of). Raises
    FileNotFoundError without one, ConfigError when it does not load."""
    file = config_file_of(Path(checkpoint))
    try:
        return load_config(file)
    except ConfigError as err:
        raise ConfigError(f"{file}, the config of checkpoint {checkpoint}, does not load: {err}") from err


def check_resume(cfg: Config, checkpoint: Path) -> None:
    """Raise ConfigError naming every key of :data:`RESUME_KEYS` where ``cfg`` differs from the
    config ``checkpoint`` was trained with: its weights and optimizer states would not load."""
    trained = checkpoint_config(checkpoint)

    def value(c: Config, key: str):
        section, name = key.split(" ")[0].split(".")
        v = getattr(getattr(c, section), name)
        if key.endswith(" > 0"):
            return v > 0
        if key == "loss.vf_teacher_arch":  # shapes the projection only while the term is on
            return v if c.loss.vf_weight > 0 else None
        return v

    diff = [f"{k}: checkpoint {value(trained, k)!r}, this run {value(cfg, k)!r}" for k in RESUME_KEYS
            if value(trained, k) != value(cfg, k)]
    if diff:
        raise ConfigError(f"cannot resume from {checkpoint}: the model differs from the one it holds ("
                          + "; ".join(diff) + f"). Resume with the checkpoint's settings ({config_file_of(checkpoint)}), "
                          "or start a new run in a new train.output_dir (model.init_from can start it from an export)")


def autoencoder_from_checkpoint(checkpoint: str | Path, use_ema: bool = True) -> tuple[AutoencoderKL, Config, dict]:
    """Build the autoencoder of a run checkpoint (EMA weights when present) with the config it
    was trained with (the checkpoint's own config.yaml; the run directory's for older ones)."""
    ckpt = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt)
    loop_state = read_loop_state(ckpt)
    vae = build_autoencoder(cfg.model)
    state = load_autoencoder_state(ckpt, use_ema=use_ema)
    expected = vae.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"checkpoint {ckpt} does not hold the autoencoder its config ({config_file_of(ckpt)}) describes: "
            f"{len(missing)} weights missing, {len(unexpected)} unexpected, {len(wrong)} of another shape (e.g. "
            f"{(missing + unexpected + wrong)[0]}); the weights and the config come from different runs")
    vae.load_state_dict(state)
    loop_state["ema"] = use_ema and (ckpt / EMA_WEIGHTS).is_file()
    return vae, cfg, loop_state


def load_autoencoder(path: str | Path) -> AutoencoderKL:
    """Load an ``AutoencoderKL`` from a diffusers directory, a run directory or a checkpoint.

    Raises FileNotFoundError naming what was expected when ``path`` is none of these.
    """
    path = Path(path)
    if (path / "config.json").is_file():
        try:
            # safetensors only: a received directory's pickle (.bin) is never loaded
            import json

            name = json.loads((path / "config.json").read_text()).get("_class_name", "AutoencoderKL")
            return autoencoder_class(name).from_pretrained(path, use_safetensors=True)
        except (OSError, ValueError, RuntimeError) as err:  # diffusers: no weights file, truncated, mismatch
            raise CheckpointError(
                f"{path} has a diffusers config.json but its weights do not load ({type(err).__name__}: "
                f"{str(err).splitlines()[0]}); expected diffusion_pytorch_model.safetensors matching it: export "
                "again with kl-ae export RUN DIR --force") from None
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        vae, _, _ = autoencoder_from_checkpoint(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{path} is neither a diffusers AutoencoderKL directory (config.json + safetensors) "
            f"nor a kl-ae run or checkpoint directory: {err}"
        ) from err
    return vae
