"""Value checks of a typed config (kl_ae.config.Config.validate): ranges, combinations, known
names. Each ConfigError names the key. Reads no disk: a run's saved config.yaml reloads after the
files it names have moved (model.init_from and the teachers are checked when a run starts)."""

from __future__ import annotations

import logging

from kl_ae.discriminator import patch_logits_side
from kl_ae.init_scheme import SCHEMES as INIT_SCHEMES, block_means_problem
from kl_ae.parsing import ConfigError
from kl_ae.precision import CHOICES as PRECISION_CHOICES
from kl_ae.schedule import SCHEDULES as LR_SCHEDULES
from kl_ae.tracking import check_trackers


def check_config(cfg) -> None:
    """Raise ConfigError for a well-typed but unusable value of ``cfg`` (a kl_ae.config.Config)."""
    m, d, loss, t = cfg.model, cfg.data, cfg.loss, cfg.train
    _check_ranges(cfg)
    if m.architecture not in ARCHITECTURES:
        raise ConfigError(f"model.architecture must be one of {ARCHITECTURES}, got {m.architecture!r}")
    if not m.block_out_channels or any(c <= 0 for c in m.block_out_channels):
        raise ConfigError("model.block_out_channels must be a non-empty list of positive ints")
    bad = [c for c in m.block_out_channels if c % m.norm_num_groups]
    if bad:
        raise ConfigError(
            f"model.norm_num_groups={m.norm_num_groups} does not divide model.block_out_channels {bad}"
        )
    if m.init_scheme not in INIT_SCHEMES:
        raise ConfigError(f"model.init_scheme must be one of {INIT_SCHEMES}, got {m.init_scheme!r}")
    if m.init_scheme == "block_means" and not m.init_from:  # an init_from VAE keeps its weights
        problem = block_means_problem(m.block_out_channels, m.norm_num_groups, m.latent_channels, m.architecture)
        if problem:
            raise ConfigError(f"model.init_scheme=block_means: {problem}")
    f = m.downsampling_factor
    if d.resolution <= 0 or d.resolution % f:
        raise ConfigError(
            f"data.resolution={d.resolution} is not divisible by the downsampling factor {f} "
            f"(2**(len(model.block_out_channels)-1)); use a multiple of {f}"
        )
    if d.short_side_range and (len(d.short_side_range) != 2 or not
                               d.resolution <= d.short_side_range[0] <= d.short_side_range[1]):
        raise ConfigError(
            f"data.short_side_range must be [lo, hi] with data.resolution <= lo <= hi, got {d.short_side_range}"
        )
    _check_final_phase(d, f)
    # model.init_from's files are checked by check_init_from when a run starts, not here:
    # validating reads no disk, so a run's saved config.yaml reloads after its VAE has moved
    if m.init_config and not m.init_from:
        raise ConfigError("model.init_config describes a single-file model.init_from; set model.init_from too")
    if not m.train_encoder and not m.init_from:
        raise ConfigError("model.train_encoder=false (decoder-only) needs model.init_from: a trained VAE to keep")
    if loss.fp16_fix:
        if not m.init_from:
            raise ConfigError("loss.fp16_fix needs model.init_from: the VAE whose outputs the fp16-fix keeps")
        if loss.latent_noise > 0:
            raise ConfigError("loss.fp16_fix trains the decoder to reproduce the original's decode of the same z: "
                              "set loss.latent_noise=0")
        if t.gradient_checkpointing:
            raise ConfigError("loss.fp16_fix's activation penalty cannot run under train.gradient_checkpointing "
                              "(the recomputed forward would not rebuild its terms): set it to false")
        if not 0 < loss.fp16_fix_activation_limit <= 65504:
            raise ConfigError("loss.fp16_fix_activation_limit must be in (0, 65504] (fp16's largest value), "
                              f"got {loss.fp16_fix_activation_limit}")
    if loss.disc_loss not in ("hinge", "vanilla"):
        raise ConfigError(f"loss.disc_loss must be 'hinge' or 'vanilla', got {loss.disc_loss!r}")
    if t.mixed_precision not in PRECISION_CHOICES:
        raise ConfigError(f"train.mixed_precision must be one of {PRECISION_CHOICES}, got {t.mixed_precision!r}")
    o = cfg.optim
    if o.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"optim.lr_schedule must be one of {LR_SCHEDULES}, got {o.lr_schedule!r}")
    if not 0.0 <= o.lr_final_ratio <= 1.0:
        raise ConfigError(f"optim.lr_final_ratio must be in [0, 1], got {o.lr_final_ratio}")
    for key in ("betas", "disc_betas"):
        b = getattr(o, key)
        if len(b) != 2 or not all(0.0 <= v < 1.0 for v in b):
            raise ConfigError(f"optim.{key} must be two numbers in [0, 1), got {b}")
    if o.weight_decay < 0 or o.lr_warmup_steps < 0:
        raise ConfigError("optim.weight_decay and optim.lr_warmup_steps must be >= 0")
    if loss.l1_weight < 0 or loss.l2_weight < 0 or loss.l1_weight + loss.l2_weight == 0:
        raise ConfigError(f"loss.l1_weight={loss.l1_weight} and loss.l2_weight={loss.l2_weight} must be "
                          ">= 0 and not both 0 (the autoencoder needs a pixel term)")
    if not 0.0 <= d.dead_leaves_fraction < 1.0:
        raise ConfigError(f"data.dead_leaves_fraction must be in [0, 1), got {d.dead_leaves_fraction}")
    if d.decode_cache_mb < 0:
        raise ConfigError(f"data.decode_cache_mb must be >= 0 (0: no cache), got {d.decode_cache_mb}")
    if loss.disc_ramp_steps < 0:
        raise ConfigError(f"loss.disc_ramp_steps must be >= 0, got {loss.disc_ramp_steps}")
    if t.max_minutes < 0 or t.checkpoint_every_minutes < 0:
        raise ConfigError("train.max_minutes and train.checkpoint_every_minutes must be >= 0 (0: off)")
    if t.keep_last < 0 or t.eval_every < 0:
        raise ConfigError("train.keep_last and train.eval_every must be >= 0")
    if t.eval_every and not d.val:
        raise ConfigError("train.eval_every needs data.val (images to evaluate on)")
    if d.val:
        from kl_ae.eval.metrics import SSIM_KERNEL_SIZE

        if d.val_resolution % f or d.val_resolution < SSIM_KERNEL_SIZE:
            raise ConfigError(f"data.val_resolution={d.val_resolution} must be a multiple of the downsampling "
                              f"factor {f} and at least {SSIM_KERNEL_SIZE} (the SSIM window)")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    if cfg.optim.implementation not in ADAM_IMPLEMENTATIONS:
        raise ConfigError(f"optim.implementation must be one of {ADAM_IMPLEMENTATIONS}, "
                          f"got {cfg.optim.implementation!r}")
    check_trackers(t.tracker)
    _check_recipe_terms(loss)


def check_run_start(cfg) -> None:
    """Checks of what a training run with ``cfg`` will do, made when it starts (kl_ae.trainer.train)
    rather than in :func:`check_config`: a checkpoint's saved config must still reload for export,
    eval or a resume with other settings. Raises ConfigError; logs a warning where the run may
    end (train.max_minutes) before the problem is reached."""
    m, d, loss, t = cfg.model, cfg.data, cfg.loss, cfg.train
    if not m.train_encoder and loss.vf_weight > 0:
        raise ConfigError("loss.vf_weight > 0 aligns the latent with a teacher, but model.train_encoder=false "
                          "freezes the encoder that makes the latent: set loss.vf_weight=0")
    if loss.disc_start >= t.max_steps:  # the GAN never turns on
        return
    for key, side in (("data.resolution", d.resolution), ("data.final_resolution", d.final_resolution)):
        if side and not patch_logits_side(side, loss.disc_num_layers):
            deepest = max((n for n in range(1, loss.disc_num_layers) if patch_logits_side(side, n)), default=0)
            problem = (f"loss.disc_num_layers={loss.disc_num_layers} is too deep for {key}={side}: each layer "
                       f"halves the crop, and the discriminator would fail at loss.disc_start={loss.disc_start}; "
                       f"use loss.disc_num_layers<={deepest} or larger crops")
            if t.max_minutes > 0:  # the budget may end the run first
                logging.getLogger("kl_ae").warning("%s (if train.max_minutes lets the run get there)", problem)
            else:
                raise ConfigError(problem)


EQ_TRANSFORMS = ("scale", "rot90")
ARCHITECTURES = ("AutoencoderKL", "AutoencoderKLFlux2")


def _check_recipe_terms(loss) -> None:
    """The 2025-2026 recipe terms' settings (EQ-VAE, LeCam, VF): probabilities and factors in
    range, known transforms, a teacher named when the VF term is on."""
    if not 0.0 <= loss.eq_probability <= 1.0:
        raise ConfigError(f"loss.eq_probability must be in [0, 1], got {loss.eq_probability}")
    if loss.eq_weight > 0:
        unknown = [t for t in loss.eq_transforms if t not in EQ_TRANSFORMS]
        if not loss.eq_transforms or unknown:
            raise ConfigError(f"loss.eq_transforms must be a non-empty list of {EQ_TRANSFORMS}, got {loss.eq_transforms}")
        if "scale" in loss.eq_transforms and (not loss.eq_scales or not all(0 < s < 1 for s in loss.eq_scales)):
            raise ConfigError(f"loss.eq_scales must be factors in (0, 1), got {loss.eq_scales}")
    if not 0.0 <= loss.disc_lecam_decay < 1.0:
        raise ConfigError(f"loss.disc_lecam_decay must be in [0, 1), got {loss.disc_lecam_decay}")
    if loss.vf_weight > 0:
        if not loss.vf_teacher.strip():
            raise ConfigError("loss.vf_weight > 0 needs loss.vf_teacher: the teacher's weights file (e.g. timm's "
                              "vit_small_patch14_dinov2.lvd142m model.safetensors), or 'random' for a smoke run")
        if loss.vf_teacher_resolution <= 0:  # a multiple of the teacher's patch size: checked when it loads
            raise ConfigError(f"loss.vf_teacher_resolution must be positive, got {loss.vf_teacher_resolution}")


ADAM_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for-loop")

# Value ranges checked by key (Config.validate); the message names the key.
_POSITIVE = {"model": ("latent_channels", "layers_per_block", "norm_num_groups"),
             "loss": ("disc_num_layers", "disc_channels"), "data": ("val_resolution",),
             "optim": ("base_learning_rate",),
             "train": ("max_steps", "batch_size", "gradient_accumulation_steps", "log_every", "image_every",
                       "checkpoint_every", "max_nonfinite_steps", "scaling_images")}
_NON_NEGATIVE = {"loss": ("kl_weight", "perceptual_weight", "disc_weight", "disc_factor", "disc_start", "disc_r1_gamma",
                          "disc_lecam_weight", "eq_weight", "latent_noise", "vf_weight", "vf_margin_cos",
                          "vf_margin_distmat", "fp16_fix_latent_weight", "fp16_fix_activation_weight"),
                 "data": ("num_workers", "shuffle_buffer", "max_image_pixels"), "optim": ("max_grad_norm",), "train": ("seed",)}
# empty would mean the current directory, or nothing the code can look up
_NOT_BLANK = (("data", "train"), ("train", "output_dir"), ("loss", "lpips_trunk"))  # train.tracker: check_trackers


def _check_ranges(cfg) -> None:
    """Positive counts, non-negative weights, no blank paths: the ConfigError names the key."""
    for section, keys in _POSITIVE.items():
        for key in keys:
            value = getattr(getattr(cfg, section), key)
            if value <= 0:
                raise ConfigError(f"{section}.{key} must be positive, got {value}")
    for section, keys in _NON_NEGATIVE.items():
        for key in keys:
            value = getattr(getattr(cfg, section), key)
            if value < 0:
                raise ConfigError(f"{section}.{key} must be >= 0, got {value}")
    for section, key in _NOT_BLANK:
        if not str(getattr(getattr(cfg, section), key)).strip():
            raise ConfigError(f"{section}.{key} is empty (an unset shell variable?); name a value (an empty "
                              "path would mean the current directory)")
    if cfg.data.val and not cfg.data.val.strip():
        raise ConfigError("data.val is blank; leave it empty for no evaluation or name the images")


def _check_final_phase(d, factor: int) -> None:
    """The resolution schedule's fields (data.final_*): both or neither of final_resolution and
    final_fraction, a crop size the model can take, a short-side range that allows it."""
    if not d.final_resolution and not d.final_fraction:
        return
    if not 0.0 < d.final_fraction < 1.0 or d.final_resolution <= 0:
        raise ConfigError(
            f"data.final_resolution={d.final_resolution} and data.final_fraction={d.final_fraction}: a "
            "resolution schedule needs both, final_resolution > 0 and 0 < final_fraction < 1 (0 and 0: none)")
    if d.final_resolution % factor:
        raise ConfigError(f"data.final_resolution={d.final_resolution} is not divisible by the downsampling "
                          f"factor {factor}; use a multiple of {factor}")
    if d.final_batch_size < 0:
        raise ConfigError(f"data.final_batch_size must be >= 0 (0: same pixels per batch), got {d.final_batch_size}")
    lohi = d.final_short_side_range or d.short_side_range
    if lohi and (len(lohi) != 2 or not d.final_resolution <= lohi[0] <= lohi[1]):
        raise ConfigError(
            f"data.final_short_side_range (or data.short_side_range when it is empty) must be [lo, hi] with "
            f"data.final_resolution={d.final_resolution} <= lo <= hi, got {lohi}")
