"""Typed run configuration: dataclasses are the single source of truth.

A YAML file overrides the dataclass defaults and ``--set dotted.key=value`` overrides the YAML.
Every key is checked against the dataclass fields: an unknown key or a value of the wrong type
raises :class:`ConfigError` naming the key, before any model is built.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kl_ae.data.images import PILLOW_MAX_IMAGE_PIXELS
from kl_ae.parsing import ConfigError, apply, load_yaml, parse_override
from kl_ae.precision import cpu_without_bf16

logger = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """The autoencoder: a diffusers ``AutoencoderKL`` (LDM/SD architecture). Defaults: SD 1.x VAE."""

    preset: str = ""
    """A published layout (kl_ae/presets.py): 'sd1', 'sdxl', 'sd3', 'flux' or 'flux2'. Its values
    replace this section's defaults; the YAML file's and --set values apply on top. Empty: none."""
    architecture: str = "AutoencoderKL"
    """The diffusers class: 'AutoencoderKL' (SD 1.x/SDXL/SD3/FLUX.1) or 'AutoencoderKLFlux2'
    (FLUX.2: the same network plus a BatchNorm over the 2x2-patchified latent whose running
    statistics FLUX.2 pipelines use to normalise latents; the export measures them)."""
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    """Channels of each encoder/decoder level; the downsampling factor is 2**(len - 1)."""
    layers_per_block: int = 2
    """ResNet blocks per encoder level (the decoder has one more, as in LDM)."""
    latent_channels: int = 4
    """Channels of the latent z (4 for SD/SDXL, 16 for SD3/FLUX)."""
    norm_num_groups: int = 32
    """GroupNorm groups; must divide every entry of block_out_channels."""
    use_quant_conv: bool = True
    """1x1 conv on the posterior moments (SD 1.x/SDXL: true; SD3/FLUX: false)."""
    use_post_quant_conv: bool = True
    """1x1 conv on z before decoding (SD 1.x/SDXL: true; SD3/FLUX: false)."""
    mid_block_add_attention: bool = True
    """Self-attention in the encoder/decoder mid block (LDM: true)."""
    use_shift_factor: bool = False
    """Export a shift_factor (latent mean) next to scaling_factor (SD3/FLUX convention)."""
    latents_mean_std: bool = False
    """Export per-channel latents_mean / latents_std in config.json (SDXL-family pipelines, and
    the Wan/Qwen convention: diffusion on (z - latents_mean) * scaling_factor / latents_std), with
    scaling_factor 1.0 so the normalised latent has unit variance per channel."""
    posterior_logvar_init: float | None = None
    """Start every posterior log-variance at this value (e.g. -8.0: sigma 0.018) instead of
    PyTorch's random init (sigma ~ 1), see kl_ae.model.init_posterior_logvar; None: PyTorch's
    init (LDM). Random init only: an init_from VAE keeps its weights."""
    init_scheme: str = "pytorch"
    """How a random model starts: 'pytorch' (PyTorch's default init, as LDM) or 'block_means': at
    step 0 the latent's first 3 channels are each f x f block's mean colour and the decoder paints
    them back, the residual branches start at zero and the posterior log-variance at
    posterior_logvar_init (unset: -8) (kl_ae.init_scheme); needs at least 4 channels per GroupNorm
    group and room for 3 colour pairs beside a constant pair per group. Random init only: an init_from VAE keeps its weights (the key is ignored)."""
    init_from: str = ""
    """VAE to fine-tune: a local diffusers AutoencoderKL directory (config.json + safetensors), or
    a single LDM/SGM-layout file (.safetensors, .ckpt, .pt, .pth; e.g. an SD checkpoint's
    first_stage_model). Its architecture must match this section (checked before anything is
    built). Empty: random init."""
    init_config: str = ""
    """For a single-file init_from: a diffusers AutoencoderKL config.json (or a directory holding
    one) that describes it and whose scaling/shift factors a decoder-only fine-tune keeps.
    Empty: this section is the architecture and the factors are measured."""
    train_encoder: bool = True
    """False: decoder-only fine-tune (encoder and quant_conv frozen, as stabilityai's
    sd-vae-ft-mse): the latent space, and so init_from's scaling/shift factors, are kept."""

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass
class LossConfig:
    """The LDM first-stage loss (ldm/modules/losses/contperceptual.py), see kl_ae/losses.py."""

    kl_weight: float = 1e-6
    """Weight of the KL term; KL is summed over latent C*h*w and averaged over the batch (LDM)."""
    l1_weight: float = 1.0
    """Weight of the per-pixel absolute error |x - x_hat| (LDM: 1.0, its only pixel term)."""
    l2_weight: float = 0.0
    """Weight of the per-pixel squared error (x - x_hat)^2, the error PSNR measures (LDM: 0).
    L1, L2 or a weighted sum: set l1_weight/l2_weight."""
    perceptual_weight: float = 1.0
    """Weight of LPIPS(VGG) added to every pixel's L1 term (LDM); 0 disables LPIPS."""
    lpips_trunk: str = "auto"
    """VGG16 trunk for LPIPS: 'auto' (torchvision's cache, $TORCH_HOME/hub/checkpoints), a path to
    vgg16-397923af.pth, or 'random' (untrained trunk: smoke runs and tests only; logged as
    lpips_random_trunk, never as lpips)."""
    learn_logvar: bool = False
    """Train the scalar log-variance of the NLL (SGM's learn_logvar). False reproduces LDM (stays at logvar_init)."""
    logvar_init: float = 0.0
    """Initial value of the scalar log-variance."""
    disc_start: int = 50001
    """Optimizer step from which the adversarial terms are on (LDM kl-f8: 50001)."""
    disc_ramp_steps: int = 0
    """Steps over which the adversarial losses' factor rises linearly from 0 to disc_factor after
    disc_start, easing the generator term in (0: on at full strength at disc_start, as LDM)."""
    disc_weight: float = 0.5
    """Multiplier of the adaptive generator weight (LDM: 0.5)."""
    disc_factor: float = 1.0
    """Factor of both adversarial losses once active (LDM: 1.0)."""
    disc_loss: str = "hinge"
    """Discriminator loss: 'hinge' (LDM default) or 'vanilla' (softplus / non-saturating)."""
    disc_num_layers: int = 3
    """Strided conv layers of the PatchGAN discriminator (LDM: 3)."""
    disc_channels: int = 64
    """Filters of the discriminator's first layer (LDM: 64)."""
    disc_r1_gamma: float = 0.0
    """R1 gradient penalty on real images, gamma / 2 * E ||grad_x D(x)||^2 (Mescheder et al. 2018,
    StyleGAN2's form; summed over pixels, mean over the batch), added to the discriminator loss
    every step; 0: off. Costs a double backward through D."""
    disc_lecam_weight: float = 0.0
    """LeCam regularization of D (Tseng et al. 2021): weight of mean((D(x) - a_fake)^2) +
    mean((D(x_hat) - a_real)^2), a_real / a_fake exponential moving averages (decay
    disc_lecam_decay) of D's mean logits; 0: off."""
    disc_lecam_decay: float = 0.99
    """EMA decay of the LeCam anchors (Tseng et al.: 0.99)."""
    eq_weight: float = 0.0
    """EQ-VAE (Kouzelis et al. 2025): weight of the equivariance term: the decoder reconstructs
    tau(x) from tau(z) for a random transform tau (eq_transforms), with the pixel loss (l1_weight,
    l2_weight; no LPIPS) reduced as the NLL (sum over C*H*W, mean over the batch); 0: off. Costs
    one more decoder pass on the transformed latent."""
    eq_probability: float = 0.5
    """Fraction of steps that add the equivariance term (drawn each step from the training RNG)."""
    eq_transforms: list[str] = field(default_factory=lambda: ["scale", "rot90"])
    """Transforms tau drawn from (uniformly): 'scale' (downscale latent and image by a factor
    from eq_scales, bilinear with antialiasing) and 'rot90' (rotation by 90, 180 or 270 degrees)."""
    eq_scales: list[float] = field(default_factory=lambda: [0.5, 0.75])
    """Downscale factors of the 'scale' transform, in (0, 1); the latent side is rounded to an
    integer (at least 1) and the image side follows it (latent side x downsampling factor)."""
    latent_noise: float = 0.0
    """Noise-robust decoding (sigma-VAE / l-DeTok): the decoder reconstructs from z + s * std(z) *
    eps, eps ~ N(0, I), s drawn per image uniformly from [0, latent_noise] (std(z): the batch's
    latent std, detached); logged as latent/noise_strength. 0: off (LDM: the decoder sees z)."""
    vf_weight: float = 0.0
    """VA-VAE's VF loss (Yao et al. 2025, arXiv 2501.01423): weight of the alignment of the latent
    to a frozen vision model's patch features (loss.vf_teacher); 0: off. See kl_ae/alignment.py."""
    vf_teacher: str = ""
    """The frozen teacher's weights: a local file (.safetensors, .pth, .bin) holding the state dict
    of the timm model vf_teacher_arch (e.g. timm's vit_small_patch14_dinov2.lvd142m
    model.safetensors); never downloaded. 'random': an untrained teacher for smoke runs and tests
    only, logged as loss/vf_random_teacher, never loss/vf. Needs timm (pip install timm)."""
    vf_teacher_arch: str = "vit_small_patch14_dinov2"
    """timm architecture of the teacher (DINOv2 ViT-S/B/L/g: vit_{small,base,large,giant}_patch14_dinov2)."""
    vf_teacher_resolution: int = 224
    """Side the images are resized to for the teacher (a multiple of its patch size, 14 for DINOv2)."""
    vf_margin_cos: float = 0.5
    """Margin m1 of the marginal cosine-similarity term (VA-VAE's cos_margin: 0.5)."""
    vf_margin_distmat: float = 0.25
    """Margin m2 of the marginal distance-matrix term (VA-VAE's distmat_margin: 0.25)."""
    vf_adaptive: bool = True
    """Scale the VF term by ||grad nll|| / ||grad vf|| at the encoder's last layer (VA-VAE's
    adaptive_vf), as the GAN term is scaled at the decoder's; costs a backward through the
    decoder. False: vf_weight alone."""
    fp16_fix: bool = False
    """fp16-fix fine-tune of model.init_from (kl_ae/fp16_fix.py): its residual streams are first
    scaled down exactly to fp16_fix_activation_limit, then the model trains to reproduce the frozen
    original: the pixel and LPIPS terms target the original's reconstruction instead of the image,
    fp16_fix_latent_weight keeps the posterior mean, fp16_fix_activation_weight penalises values
    above the limit. The export keeps the original's latent factors. Needs model.init_from."""
    fp16_fix_latent_weight: float = 1.0
    """Weight of the mean squared distance between the posterior means of the model and of the
    frozen original (fp16_fix only); keeps the latent space, and so the diffusion models on it."""
    fp16_fix_activation_weight: float = 1.0
    """Weight of the penalty sum over module outputs of mean(relu(|a| / limit - 1)^2) (fp16_fix only)."""
    fp16_fix_activation_limit: float = 4096.0
    """Largest activation the fp16-fix aims for: 4096 leaves 16x headroom under fp16's 65504."""


@dataclass
class DataConfig:
    """Training images."""

    train: str = "builtin:samples"
    """Image folder, webdataset shard pattern ('shards/train-{000000..000009}.tar', a list file
    of shard URLs is not supported) or 'builtin:samples' (photographs shipped with scikit-image)."""
    resolution: int = 256
    """Square crop size in pixels; must be divisible by the downsampling factor."""
    random_flip: bool = True
    """Random horizontal flip."""
    channel_shuffle: bool = False
    """Randomly permute the RGB channels of each training crop (one of the 6 orders, uniformly):
    a colour augmentation for small data sets, where the autoencoder otherwise learns the
    palette of its few training images and shifts other colours towards it."""
    dead_leaves_fraction: float = 0.0
    """The share of the training images, in [0, 1), that are synthetic dead-leaves images (disks of
    random colours, kl_ae.data.synthetic), cropped and flipped like the others: an image folder or
    builtin set gets as many added as make the share (0.5: as many as it has; at most 512 distinct
    files, repeated), a shard stream gets them between its samples (all 512). At 0.5 on a CPU
    without bf16, four 30-minute photo runs scored 20.43-22.92 dB (mean 21.99) against 20.28 and 19.85 without
    (BENCHMARKS.md, "Dead leaves on the photographs: four seeds")."""
    short_side_range: list[int] = field(default_factory=list)
    """[lo, hi] px: before cropping, downscale each image so its short side is a random size in
    [lo, hi] (LDM's autoencoder data, ImageNetSR: a 0.5-1.0 x short-side crop resized to R,
    about [R, 2R]). Empty: crop at native size."""
    num_workers: int = 2
    """DataLoader worker processes per training process (0: decode in the main process)."""
    decode_cache_mb: int = 0
    """Image folders: keep up to this many MiB of decoded images in each data worker, so a small
    training set is decoded once instead of once per crop (0: no cache; shards are streamed and
    never cached). Costs up to this much memory per worker and process; same pixels either way."""
    shuffle_buffer: int = 1000
    """Sample shuffle buffer for webdataset shards (shard order is shuffled too)."""
    max_image_pixels: int = PILLOW_MAX_IMAGE_PIXELS
    """Training images with more pixels (width x height) are skipped and counted as
    decompression_bomb: Pillow's own guard against a small file that decodes to gigabytes
    (Image.MAX_IMAGE_PIXELS, whose default this is: about 9459 x 9459). Raise it for very large
    photographs you trust; 0: no limit."""
    final_resolution: int = 0
    """Resolution schedule (LiteVAE's low-then-full-resolution training): the crop size of the
    run's last ``final_fraction``; 0: data.resolution throughout. A model trained only on small
    crops is evaluated on whole 256-px images, whose GroupNorm statistics and mid-block attention
    span 16x the area it was trained on; a short final phase at the evaluation size adapts it."""
    final_fraction: float = 0.0
    """Fraction of the run trained at final_resolution, in [0, 1): its end, measured on the
    train.max_minutes budget when set, else on train.max_steps (whichever is nearer its end)."""
    final_batch_size: int = 0
    """Batch size of the final phase; 0: the same pixels per batch,
    max(1, round(train.batch_size * (resolution / final_resolution) ** 2)). A batch of 1 cost up to
    5.4 dB on 7 photographs, 4 per batch 0.1-0.3 (BENCHMARKS.md, "A 128-px final phase")."""
    final_short_side_range: list[int] = field(default_factory=list)
    """short_side_range of the final phase ([lo, hi] with final_resolution <= lo); empty: the
    same as data.short_side_range, which must then allow final_resolution."""
    val: str = ""
    """Images evaluated after the final export (same forms as data.train); empty: no evaluation."""
    val_resolution: int = 256
    """Evaluation crop (resize short side, center crop), the common published protocol's 256."""


@dataclass
class OptimConfig:
    """Adam for the autoencoder and the discriminator, as in LDM."""

    base_learning_rate: float = 4.5e-6
    """LDM's base LR; the LR actually used is base * batch * accumulation * processes when scale_lr."""
    scale_lr: bool = True
    """Apply LDM's linear LR scaling rule (main.py --scale_lr, on by default there)."""
    lr_warmup_steps: int = 0
    """Linear warm-up steps of both optimizers (0: none, as LDM)."""
    lr_schedule: str = "constant"
    """Learning rate after the warm-up: 'constant' (LDM), 'cosine' or 'linear' decay to
    lr_final_ratio x the peak at the end of the run: train.max_steps or, when it comes first,
    train.max_minutes (see kl_ae/schedule.py). Both optimizers follow it."""
    lr_final_ratio: float = 0.0
    """Final LR as a fraction of the peak, for 'cosine' and 'linear'."""
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    """Adam(W) betas of the autoencoder (LDM/taming GAN setting: [0.5, 0.9])."""
    disc_betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    """Adam betas of the discriminator (LDM/taming: [0.5, 0.9])."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay of the autoencoder (0: plain Adam, as LDM)."""
    max_grad_norm: float = 0.0
    """Clip each model's gradient norm to this value (0: no clipping, as LDM)."""
    implementation: str = "foreach"
    """Adam kernel: 'foreach' (batched over tensors; 1.09x the step rate of 'for-loop' on a CPU,
    BENCHMARKS.md), 'fused' (one kernel), 'for-loop', or 'auto' (torch's choice: foreach on GPU,
    for-loop on CPU). Same update, different speed."""


@dataclass
class TrainConfig:
    """The training loop and run directory."""

    output_dir: str = "runs/kl-ae"
    """Run directory: config.yaml, train.log, TensorBoard logs, checkpoints/, samples/, export/."""
    max_steps: int = 100_000
    """Optimizer steps (each updates the autoencoder and, once active, the discriminator)."""
    max_minutes: float = 0.0
    """Wall-clock budget of the training loop in minutes, counted over resumes (like Lightning's
    max_time): the run ends at max_steps or here, whichever comes first, with a checkpoint, the
    export and the evaluation as usual. A decaying optim.lr_schedule decays over it. 0: no limit.
    Start-up, checkpoints, periodic evaluation and the final export are not counted."""
    checkpoint_every_minutes: float = 0.0
    """Also write a checkpoint each time this many training minutes have passed (0: off); the
    quality-per-minute benchmark (bench/quality.py) evaluates these."""
    batch_size: int = 12
    """Images per process per micro-batch (LDM kl-f8: 12)."""
    gradient_accumulation_steps: int = 2
    """Micro-batches per optimizer step (LDM kl-f8: 2)."""
    mixed_precision: str = "auto"
    """'auto' (bf16 where the device has bf16 arithmetic: Ampere+ GPUs, CPUs with AVX512-BF16 or
    AMX; fp32 elsewhere, see kl_ae/precision.py), 'bf16' (autocast over fp32 weights), 'fp16'
    (GPU only) or 'no' (fp32)."""
    channels_last: bool = False
    """Keep the autoencoder's, discriminator's and LPIPS trunk's weights, and the inputs, in
    channels-last memory format (NHWC convolutions; same values, a speed option)."""
    compile: bool = False
    """torch.compile the autoencoder and discriminator (Accelerate's dynamo_backend='inductor')."""
    gradient_checkpointing: bool = False
    """Recompute the autoencoder's block activations in the backward pass (diffusers'
    enable_gradient_checkpointing): less memory per image, more compute per step."""
    seed: int = 0
    """Base seed; each process adds its rank."""
    ema_decay: float = 0.9999
    """EMA decay of the autoencoder weights (0 disables EMA; the export then takes the raw weights)."""
    log_every: int = 10
    """Steps between scalar logs."""
    image_every: int = 500
    """Steps between input | reconstruction grids (samples/, TensorBoard, WandB)."""
    checkpoint_every: int = 1000
    """Steps between checkpoints (a final one is always written)."""
    keep_last: int = 3
    """Checkpoints kept in checkpoints/ (older ones are deleted after each save); 0 keeps all."""
    eval_every: int = 0
    """Steps between evaluations on data.val during training (val/psnr, val/ssim; EMA weights);
    0: only the final evaluation after the export."""
    scaling_images: int = 64
    """Training images encoded to compute scaling_factor / shift_factor at export."""
    max_nonfinite_steps: int = 10
    """Consecutive steps with a NaN/Inf loss or gradient (each skips its update) before the run stops
    (fp16 loss-scale overflows are counted apart)."""
    tracker: str = "tensorboard"
    """Accelerate tracker name ('tensorboard', 'wandb', 'mlflow', ...), several comma-separated
    ('tensorboard,wandb'), or 'none'. Scalars go to every one; sample grids to TensorBoard and WandB."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        """Check values that are well-typed but unusable (kl_ae/config_checks.py). Raises ConfigError."""
        from kl_ae.config_checks import check_config

        check_config(self)

SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"  # package data (pyproject.toml)


def shipped_configs() -> dict[str, Path]:
    """The configs that come with kl-ae, by name (file stem): {'quickstart': .../quickstart.yaml, ...}."""
    return {p.stem: p for p in sorted(SHIPPED_CONFIGS.glob("*.yaml"))}


def find_config(name_or_path: str | Path) -> Path:
    """A config file: ``name_or_path`` itself when it is a file, else the shipped config of that
    name ('quickstart', 'quickstart.yaml' and 'configs/quickstart.yaml' all name
    kl_ae/configs/quickstart.yaml), so the shipped configs work from any directory. Raises
    ConfigError listing the shipped names when it is neither."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    name = path.stem if path.suffix in (".yaml", ".yml") else path.name
    if path.parent in (Path("."), Path("configs")) and name in shipped:
        return shipped[name]
    raise ConfigError(f"config {str(name_or_path)!r}: no such file, and not the name of a shipped config "
                      f"({', '.join(shipped)}; list them with kl-ae config --list)")


# A config file's top-level section whose values replace the file's own on a CPU without bf16
# arithmetic (kl_ae.precision.cpu_without_bf16, looked up here so that tests can replace it). Such
# a CPU makes about a tenth of the training steps per minute of one with AMX, and a recipe tuned
# for a wall-clock budget then wants a smaller model: the quickstart's narrower model scores 2 dB
# higher in its 6 minutes there (BENCHMARKS.md).
CPU_WITHOUT_BF16_SECTION = "on_cpu_without_bf16"


def read_config_file(path: Path) -> tuple[dict, dict | None]:
    """A config file's values without its ``on_cpu_without_bf16`` section, and that section (None
    when the file has none). The section's keys and types are checked here, on every machine, so
    a typo in it fails everywhere. Raises ConfigError for invalid YAML or a malformed section."""
    try:
        values = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(values, dict) or CPU_WITHOUT_BF16_SECTION not in values:
        return values, None
    section = values.pop(CPU_WITHOUT_BF16_SECTION)
    apply(Config(), section, f"{CPU_WITHOUT_BF16_SECTION}.")  # a non-mapping section is an error there too
    return values, section


def applies_on_this_cpu(path: str | Path) -> bool:
    """Whether config file ``path`` has an ``on_cpu_without_bf16`` section that applies here."""
    return read_config_file(Path(path))[1] is not None and cpu_without_bf16()


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from the defaults, a YAML file (or a shipped config's name, see
    :func:`find_config`) and ``dotted.key=value`` overrides.

    A file's top-level ``on_cpu_without_bf16`` section (sections and keys as in the file) replaces
    the file's values when :func:`cpu_without_bf16` holds on this machine; ``overrides`` still win.
    The resolved config (what a run's config.yaml stores) has no such section.

    Raises:
        ConfigError: missing/unreadable file, unknown key, wrong type or unusable value.
    """
    layers = []
    if path is not None:
        path = find_config(path)
        values, section = read_config_file(path)
        layers.append(values)
        if section is not None and cpu_without_bf16():
            layers.append(section)
            logger.info("config %s: this CPU has no bf16 arithmetic, so its %s section applies: %s", path.name,
                        CPU_WITHOUT_BF16_SECTION, ", ".join(f"{name}.{key}={value}" for name, keys in section.items()
                                                            for key, value in keys.items()))
    layers += [parse_override(item) for item in overrides]
    cfg = Config()
    for values in layers:  # first the preset the layers name (the last one wins): the defaults beneath them
        apply(cfg, values)
    if cfg.model.preset:
        preset, cfg = cfg.model.preset, Config()
        apply(cfg.model, preset_values(preset), "model.")
        for values in layers:
            apply(cfg, values)
    cfg.validate()
    return cfg


def preset_values(name: str) -> dict:
    """The model section's values of preset ``name``. Raises ConfigError for an unknown name."""
    from kl_ae.presets import PRESETS

    if name not in PRESETS:
        raise ConfigError(f"model.preset={name!r} is not a preset; known: {sorted(PRESETS)} (empty: none)")
    return {"preset": name, **PRESETS[name].model}


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_yaml(cfg: Config) -> str:
    """The fully resolved config as YAML text (loadable again with :func:`load_config`)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write :func:`config_yaml` to ``path``."""
    Path(path).write_text(config_yaml(cfg))
