"""Export to the diffusers ``AutoencoderKL`` layout and the latent scaling/shift factors.

An export directory is exactly what ``AutoencoderKL.save_pretrained`` writes (config.json +
diffusion_pytorch_model.safetensors), so ``AutoencoderKL.from_pretrained(DIR)`` and diffusers
pipelines load it as they load the SD/SDXL/SD3/FLUX VAEs. ``scaling_factor`` (and
``shift_factor`` where the config asks for it) are measured on training images and stored in
config.json; ``latent_stats.json`` records how. The trainer also stores that file in the
checkpoint it exported, so ``kl-ae export`` of that checkpoint reuses it; any other checkpoint
is measured on images the user names (``--images``): a received run's data specs, which may be
``pipe:`` commands, are never read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from kl_ae.config import Config

from kl_ae.checkpoint import resolve_checkpoint
from kl_ae.eval.tiling import default_tile_size
from kl_ae.model import autoencoder_from_checkpoint, check_init_from, is_flux2

logger = logging.getLogger(__name__)

@torch.no_grad()
def compute_latent_factors(
    vae: AutoencoderKL,
    images: str,
    *,
    resolution: int,
    num_images: int = 64,
    batch_size: int = 8,
    use_shift: bool = False,
    progress: bool = True,
) -> dict:
    """Measure scaling_factor (and shift_factor) of the latents of ``num_images`` images.

    Latents are samples z ~ q(z|x) of the center-cropped images, as a diffusion model is trained
    on them, drawn with a generator seeded with 0: the same weights and images give the same
    factors on every call. scaling_factor = 1 / std(z) over all elements (LDM: ``1/z.flatten().std()`` of the
    first batch; here over ``num_images``); with ``use_shift`` also shift_factor = mean(z) (the
    SD3/FLUX convention: diffusion runs on (z - shift_factor) * scaling_factor).

    Every other convention comes from the same samples: latents_mean / latents_std, the
    per-channel mean and (population) std (config.json keys that SDXL-family and Wan/Qwen
    pipelines read), and flux2_bn_mean / flux2_bn_var, the per-channel mean and variance of the
    2x2-patchified posterior MODE (B, 4c, h/2, w/2), what FLUX.2 pipelines read from the VAE's
    BatchNorm running statistics (diffusers pipeline_flux2 encodes images with
    sample_mode="argmax", patchifies, then (z - running_mean) / sqrt(running_var + eps)).

    Returns a dict with scaling_factor, shift_factor (None unless use_shift), mean, std,
    latents_mean, latents_std, flux2_bn_mean, flux2_bn_var (None for an odd latent side),
    num_images and images. Raises ValueError when no image could be read.
    """
    from kl_ae.data.sources import iter_images
    from kl_ae.data.images import eval_transform
    from kl_ae.eval.latent import LatentStats

    device = next(vae.parameters()).device
    was_training = vae.training
    vae.eval()
    stats = LatentStats(vae.config.latent_channels, image_hw=(resolution, resolution))
    n_images = 0
    batch: list[torch.Tensor] = []

    generator = torch.Generator(device).manual_seed(0)
    patched = torch.zeros(3, 4 * vae.config.latent_channels, dtype=torch.float64)  # count, sum, sum of squares

    def flush() -> None:
        posterior = vae.encode(torch.stack(batch).to(device)).latent_dist
        sample = posterior.sample(generator=generator)
        stats.update(posterior.mean, posterior.logvar, sample)
        if sample.shape[-1] % 2 == 0 and sample.shape[-2] % 2 == 0:  # FLUX.2's 2x2 patches (pixel_unshuffle order)
            p = F.pixel_unshuffle(posterior.mode().double(), 2).transpose(0, 1).flatten(1).cpu()
            patched[0] += p.shape[1]
            patched[1] += p.sum(1)
            patched[2] += p.square().sum(1)
        batch.clear()

    bar = tqdm(total=num_images, desc="latent statistics", disable=not progress, leave=False)
    for _, img in iter_images(images):
        batch.append(eval_transform(img, resolution))
        n_images += 1
        bar.update(1)
        if len(batch) == batch_size:
            flush()
        if n_images >= num_images:
            break
    if batch:
        flush()
    bar.close()
    vae.train(was_training)
    if n_images == 0:
        raise ValueError(f"no usable image in {images!r} to compute the latent scaling factor")
    report = stats.report()  # the same definitions as the eval latent report
    bn_mean = bn_var = None
    if patched[0, 0] > 0:
        bn_mean = patched[1] / patched[0]
        bn_var = (patched[2] / patched[0] - bn_mean.square()).clamp_min(0)
    return {
        "scaling_factor": report["scaling_factor"],
        "shift_factor": report["shift_factor"] if use_shift else None,
        "mean": report["z_mean"],
        "std": report["z_std"],
        "latents_mean": list(report["z_mean_per_channel"]),
        "latents_std": list(report["z_std_per_channel"]),
        "flux2_bn_mean": None if bn_mean is None else bn_mean.tolist(),
        "flux2_bn_var": None if bn_var is None else bn_var.tolist(),
        "num_images": n_images,
        "images": images,
        "resolution": resolution,
        "latent": "posterior sample (seed 0); flux2_bn_*: posterior mode, as FLUX.2 pipelines encode images",
    }


def latent_factors_for(vae: AutoencoderKL, cfg: Config, images: str | None) -> dict:
    """The factors to export: a decoder-only or fp16-fix fine-tune keeps its init_from VAE's (the latent
    space did not change, and the diffusion models built on it expect them; for a single file,
    init_config's); otherwise, and for a single file without init_config, they are measured on
    ``images`` with :func:`compute_latent_factors`. Raises ValueError when they must be measured
    and ``images`` is None."""
    m = cfg.model
    keeps = bool(m.init_from) and (not m.train_encoder or cfg.loss.fp16_fix)
    original = check_init_from(m) if keeps else None
    if original is not None:
        kept_from = f"model.init_config={m.init_config}" if m.init_config else f"model.init_from={m.init_from}"
        why = ("decoder-only fine-tune: encoder frozen" if not m.train_encoder
               else "fp16-fix fine-tune: trained to keep the original's posterior means")
        kept = {"scaling_factor": original.get("scaling_factor", 0.18215),
                "shift_factor": original.get("shift_factor"), "resolution": cfg.data.resolution,
                "source": f"kept from {kept_from} ({why})"}
        if original.get("latents_mean") is not None and original.get("latents_std") is not None:
            kept.update(latents_mean=list(original["latents_mean"]), latents_std=list(original["latents_std"]),
                        store_latents_mean_std=True)  # SDXL-family pipelines read them with the scaling_factor
        return kept
    if images is None:
        raise ValueError("the latent scaling factor must be measured: name the images to measure it on")
    factors = compute_latent_factors(vae, images, resolution=cfg.data.resolution,
                                     num_images=cfg.train.scaling_images, use_shift=m.use_shift_factor)
    if m.latents_mean_std:  # SDXL-family pipelines: (z - latents_mean) * scaling_factor / latents_std
        factors.update(scaling_factor=1.0, shift_factor=None, store_latents_mean_std=True)
    if keeps:  # a single file without init_config carries no factors
        factors["source"] = (f"measured: model.init_from={m.init_from} is a single file without "
                             "model.init_config, so its original scaling_factor is unknown")
        logger.warning("scaling_factor %s", factors["source"])
    return factors


LATENT_STATS = "latent_stats.json"  # in an export, and in the checkpoint the trainer exported


def stored_factors(checkpoint: Path) -> dict | None:
    """The factors the trainer measured on the weights of ``checkpoint`` (its latent_stats.json,
    written with the run's final export), or None."""
    file = Path(checkpoint) / LATENT_STATS
    if not file.is_file():
        return None
    try:
        factors = json.loads(file.read_text())
        float(factors["scaling_factor"]), factors["resolution"], factors["shift_factor"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{file} is not a latent statistics file ({err}); delete it and pass --images") from None
    return factors


def format_factors(factors: dict) -> str:
    """The four latent-normalisation conventions of :func:`compute_latent_factors`'s result, one
    block each, with the pipelines that read them (kl-ae factors)."""
    def vec(values) -> str:
        return "[" + ", ".join(f"{v:.5g}" for v in values) + "]"

    lines = [f"measured on {factors['num_images']} images of {factors['images']} at {factors['resolution']} px "
             f"(center crops), z ~ q(z|x) sampled with seed 0:",
             f"  scaling_factor                (SD 1.x / SDXL: diffusion on z * s)            {factors['scaling_factor']:.5g}",
             f"  + shift_factor                (SD3 / FLUX.1: on (z - shift) * s)             {factors['mean']:.5g}",
             "  latents_mean / latents_std    (SDXL-family, Wan, Qwen: (z - mean_c) * s / std_c, per channel)",
             f"    latents_mean {vec(factors['latents_mean'])}",
             f"    latents_std  {vec(factors['latents_std'])}"]
    if factors.get("flux2_bn_mean") is not None:
        lines += [f"  FLUX.2 BatchNorm              (2x2-patchified posterior mode, {len(factors['flux2_bn_mean'])} "
                  "channels: (z_p - running_mean) / sqrt(running_var + eps))",
                  f"    running_mean {vec(factors['flux2_bn_mean'])}",
                  f"    running_var  {vec(factors['flux2_bn_var'])}"]
    return "\n".join(lines)


def save_export(vae: AutoencoderKL, out_dir: str | Path, factors: dict, provenance: dict | None = None) -> Path:
    """Write ``vae`` with its factors in config.json via ``save_pretrained`` (safetensors).

    Every latent-normalisation field of an AutoencoderKL is written, not inherited (an
    AutoencoderKLFlux2 has none: its BatchNorm statistics are set): ``latents_mean``/``latents_std``
    are the factors' (measured, or kept from the init_from VAE) or null, and ``force_upcast`` is
    true (an fp16 audit that a loss.fp16_fix run passes turns it off, :func:`audit_export`). A model
    fine-tuned from a VAE whose config said otherwise would else carry that VAE's per-channel
    statistics next to a new scaling_factor, or its ``force_upcast: false`` without the audit."""
    out_dir = Path(out_dir)
    # sample_size only sets diffusers' tile size (enable_tiling): the training resolution, or more
    # when the decoder's receptive field is wider (measured in bench/tiling.py)
    tile = default_tile_size(vae, int(factors["resolution"]))
    if is_flux2(vae):  # its pipelines read the BatchNorm statistics, no factors
        vae.register_to_config(sample_size=tile)
        if factors.get("flux2_bn_mean") is not None:  # measured (a decoder-only fine-tune keeps its own)
            with torch.no_grad():
                vae.bn.running_mean.copy_(torch.tensor(factors["flux2_bn_mean"]))
                vae.bn.running_var.copy_(torch.tensor(factors["flux2_bn_var"]))
        vae.save_pretrained(out_dir, safe_serialization=True)
        (out_dir / LATENT_STATS).write_text(json.dumps({**factors, **(provenance or {})}, indent=2))
        logger.info("exported to %s (FLUX.2 BatchNorm statistics of %s images)", out_dir, factors.get("num_images"))
        return out_dir
    store = bool(factors.get("store_latents_mean_std"))
    vae.register_to_config(scaling_factor=float(factors["scaling_factor"]), shift_factor=factors["shift_factor"],
                           sample_size=tile, force_upcast=True,
                           latents_mean=list(factors["latents_mean"]) if store else None,
                           latents_std=list(factors["latents_std"]) if store else None)
    vae.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / LATENT_STATS).write_text(json.dumps({**factors, **(provenance or {})}, indent=2))
    logger.info(
        "exported to %s (scaling_factor=%.5f, shift_factor=%s)",
        out_dir, factors["scaling_factor"], factors["shift_factor"],
    )
    return out_dir


FP16_AUDIT_IMAGES = 2


def audit_export(vae: AutoencoderKL, export_dir: Path, images: str, resolution: int,
                 fp16_fix: bool = False) -> dict | None:
    """Run the fp16 safety audit (:func:`kl_ae.eval.fp16.fp16_audit`) on the exported weights,
    with the first FP16_AUDIT_IMAGES of ``images`` at ``resolution``, and write it to
    ``export_dir``/fp16_audit.json for the model card. With ``fp16_fix`` (the run trained with
    loss.fp16_fix) and a safe result, config.json gets ``force_upcast: false``. A failure is
    logged, not raised: the export is written. Returns the audit or None."""
    from kl_ae.eval.fp16 import FP16_AUDIT, format_fp16_audit, fp16_audit

    try:
        audit = fp16_audit(vae, images, resolution=resolution, max_images=FP16_AUDIT_IMAGES)
    except Exception as err:  # noqa: BLE001 (the export is written; the card then says "not audited")
        logger.warning("fp16 audit of the export failed (run kl-ae eval %s IMAGES --fp16-audit): %s: %s",
                       export_dir, type(err).__name__, err)
        return None
    (export_dir / FP16_AUDIT).write_text(json.dumps(audit, indent=2))  # no local path: it goes to the Hub
    logger.info("%s", "\n".join(format_fp16_audit(audit)))
    _no_upcast_if_safe(vae, export_dir, audit, fp16_fix)
    return audit


def _no_upcast_if_safe(vae: AutoencoderKL, export_dir: Path, audit: dict, fp16_fix: bool) -> None:
    if is_flux2(vae):  # no force_upcast in its config, nor in its pipelines
        return
    if fp16_fix and audit.get("fp16_safe"):  # SDXL pipelines upcast a VAE unless its config says not to
        vae.register_to_config(force_upcast=False)
        vae.save_config(export_dir)
        logger.info("fp16-fix: the export passes the fp16 audit; config.json says force_upcast: false")


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, force: bool = False,
                      images: str | None = None, device: str | None = None) -> Path:
    """``kl-ae export``: write a run checkpoint as a diffusers export with its latent factors and
    its fp16 audit (fp16_audit.json: the trainer's, or measured on ``images`` when given).

    images: where to measure the factors (a data spec the user typed). Without it: the factors the
    trainer stored with the checkpoint it exported, or a decoder-only fine-tune's kept ones; the
    run's own data specs are never used (a received run's ``pipe:`` spec would run a command).
    Raises FileExistsError for a non-empty ``out_dir`` unless ``force``; ValueError when the
    factors must be measured and ``images`` is None.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"{out_dir} is not empty; choose another directory or pass --force")
    ckpt = resolve_checkpoint(checkpoint)
    vae, cfg, loop_state = autoencoder_from_checkpoint(ckpt)
    provenance = {"step": loop_state.get("step"), "ema": loop_state["ema"]}
    stored = None if images else stored_factors(ckpt)
    if stored is not None:
        factors = {k: v for k, v in stored.items() if k not in provenance}
        logger.info("scaling_factor from %s (measured by the trainer on these weights)", ckpt / LATENT_STATS)
        save_export(vae, out_dir, factors, provenance)
        _reuse_audit(vae, ckpt, out_dir, cfg.loss.fp16_fix)
        return out_dir
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vae.to(device)
    try:
        factors = latent_factors_for(vae, cfg, images)
    except ValueError as err:
        if images is not None:
            raise
        raise ValueError(f"{ckpt} has no stored latent statistics (the trainer stores them only with the "
                         "checkpoint it exports at the end of a run), so scaling_factor must be measured: pass "
                         "--images with a folder or shard pattern of training-like images (the run's own "
                         "data.train is never read by export)") from err
    save_export(vae, out_dir, factors, provenance)
    if images is None:  # a decoder-only fine-tune's kept factors needed no images; the audit does
        logger.info("no images given: the export is not audited for fp16 (pass --images to audit it)")
    else:
        audit_export(vae, out_dir, images, cfg.data.resolution, cfg.loss.fp16_fix)
    return out_dir


def _reuse_audit(vae: AutoencoderKL, ckpt: Path, out_dir: Path, fp16_fix: bool) -> None:
    """The trainer's fp16 audit of these weights (kept with the checkpoint it exported, like the
    latent statistics) goes with the export, with its force_upcast; without one the export is
    not audited (``--images`` audits it)."""
    from kl_ae.eval.fp16 import FP16_AUDIT

    if not (ckpt / FP16_AUDIT).is_file():
        logger.info("no fp16 audit stored with %s: the export is not audited (pass --images to audit it)", ckpt)
        return
    audit = json.loads((ckpt / FP16_AUDIT).read_text())
    (out_dir / FP16_AUDIT).write_text(json.dumps(audit, indent=2))
    _no_upcast_if_safe(vae, out_dir, audit, fp16_fix)
