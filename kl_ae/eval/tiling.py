"""Full-resolution reconstruction with diffusers' tiled encode/decode, and what tiling costs.

Large images do not fit through an autoencoder in one piece (activation memory grows with H·W).
diffusers ``AutoencoderKL.enable_tiling`` encodes and decodes overlapping tiles and blends their
seams linearly (overlap 25 %). This module reconstructs images at their native size (cropped to
a multiple of the downsampling factor), tiled when the image is larger than ``tile_above`` pixels
on a side, and on images small enough for both it measures tiled against untiled PSNR, so the
price of tiling is a measured number rather than an assumption.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from kl_ae.model import downsampling_factor, reconstruct
from kl_ae.data.images import to_tensor
from kl_ae.eval.metrics import psnr_8bit, ssim_8bit
from kl_ae.data.sources import iter_images


@contextmanager
def tiled(vae: AutoencoderKL, tile_size: int, overlap: float | None = None):
    """Enable diffusers tiling with square ``tile_size``-pixel tiles (latent tiles tile_size/f)
    overlapping by ``overlap`` of a tile (diffusers' tile_overlap_factor; None: the model's, 0.25)."""
    f = downsampling_factor(vae)
    saved = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor)
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile_size, tile_size // f
    if overlap is not None:
        vae.tile_overlap_factor = overlap
    vae.enable_tiling()
    try:
        yield vae
    finally:
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = saved


@torch.no_grad()
def decoder_receptive_field(vae: AutoencoderKL) -> dict:
    """The decoder's convolutional receptive field: how many output pixels (per side) one output
    pixel's convolution chain spans, 1 + sum over its convolutions of (kernel - 1) * dilation *
    (output pixels per pixel of that convolution's input), found by hooking every Conv2d in one
    decode of an 8x8 latent (the decoder's convolutions are stride 1 on one chain; shortcuts are
    1x1). GroupNorm statistics, and the mid-block attention when present, reach further: every
    output depends on the whole tile. Returns ``{"pixels", "latents", "attention"}``."""
    f = downsampling_factor(vae)
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m.kernel_size[0], m.dilation[0], i[0].shape[-1])))
             for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        p = next(vae.parameters())
        side = 8
        vae.decoder(torch.zeros(1, vae.config.latent_channels, side, side, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
    out = side * f
    pixels = 1 + sum((k - 1) * d * out // size for k, d, size in seen)
    attention = any(a is not None for a in getattr(vae.decoder.mid_block, "attentions", None) or [])
    return {"pixels": pixels, "latents": pixels / f, "attention": attention}


def default_tile_size(vae: AutoencoderKL, resolution: int) -> int:
    """The tile side an export stores as ``sample_size`` (diffusers' enable_tiling tile, for
    tiled encoding and decoding alike): the training resolution, or the smallest power of two
    that covers the decoder's convolutional receptive field when that is larger. Measured
    (bench/tiling.py, tiled encode and decode, BENCHMARKS.md "Tiled decoding"): tiles narrower
    than the receptive field cost up to 0.9 dB on a photograph, tiles at least as wide at most
    0.3 dB and nothing on average."""
    rf = decoder_receptive_field(vae)["pixels"]
    return max(int(resolution), 2 ** math.ceil(math.log2(rf)))


def _crop_to_multiple(img, f: int):
    w, h = img.size
    return img.crop((0, 0, w - w % f, h - h % f))


@torch.inference_mode()
def full_size_report(vae: AutoencoderKL, images: str, *, tile_size: int = 256, tile_above: int = 1024,
                     max_images: int | None = None, device: str | torch.device | None = None,
                     progress: bool = True) -> dict:
    """Reconstruct every image at native size; compare tiled with untiled where both run.

    images: a source for ``kl_ae.data.sources.iter_images``. tile_size: tile side in pixels (multiple of
    the downsampling factor f). tile_above: images with a side above this (pixels) are only
    reconstructed tiled; the others both ways. Returns ``{"protocol", "tile_size", "tile_above",
    "per_image": [{name, height, width, psnr_untiled?, psnr_tiled, ssim_untiled?, ssim_tiled,
    psnr_tiling_cost_db?}], "mean_tiling_cost_db", "num_compared"}``; the tiling cost is
    PSNR(untiled) - PSNR(tiled) in dB on the same image (positive: tiling is worse).
    Raises ValueError when tile_size is not a multiple of f.
    """
    f = downsampling_factor(vae)
    if tile_size % f or tile_size <= 0:
        raise ValueError(f"tile_size {tile_size} must be a positive multiple of the downsampling factor {f}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if any(p.dtype != torch.float32 for p in vae.parameters()):
        vae = vae.to(dtype=torch.float32)  # only then: diffusers warns about any dtype cast
    vae = vae.to(device).eval()
    rows = []
    for n, (name, img) in enumerate(tqdm(iter_images(images), desc="full size", disable=not progress)):
        if max_images is not None and n >= max_images:
            break
        img = _crop_to_multiple(img, f)
        x = to_tensor(img).unsqueeze(0).to(device)
        row = {"name": name, "height": x.shape[-2], "width": x.shape[-1]}
        with tiled(vae, tile_size):
            x_tiled = reconstruct(vae, x)
        row["psnr_tiled"] = float(psnr_8bit(x, x_tiled)[0])
        row["ssim_tiled"] = float(ssim_8bit(x, x_tiled)[0])
        if max(x.shape[-2:]) <= tile_above:
            x_plain = reconstruct(vae, x)
            row["psnr_untiled"] = float(psnr_8bit(x, x_plain)[0])
            row["ssim_untiled"] = float(ssim_8bit(x, x_plain)[0])
            row["psnr_tiling_cost_db"] = row["psnr_untiled"] - row["psnr_tiled"]
        rows.append(row)
    costs = [r["psnr_tiling_cost_db"] for r in rows if "psnr_tiling_cost_db" in r and math.isfinite(r["psnr_tiling_cost_db"])]
    return {
        "protocol": (f"native resolution cropped to a multiple of {f} (top-left), reconstruction = "
                     f"decode(posterior mode), fp32; tiled: diffusers tiling, {tile_size}-px tiles, 25% "
                     f"overlap with linear blending; PSNR/SSIM as in the main protocol"),
        "tile_size": tile_size,
        "tile_above": tile_above,
        "per_image": rows,
        "num_compared": len(costs),
        "mean_tiling_cost_db": float(np.mean(costs)) if costs else None,
    }


def format_full_size(report: dict) -> str:
    lines = [f"full-size reconstruction ({report['tile_size']}-px tiles above {report['tile_above']} px):"]
    for r in report["per_image"]:
        untiled = f"untiled {r['psnr_untiled']:.2f} dB, " if "psnr_untiled" in r else "untiled: too large, "
        lines.append(f"  {r['name']} {r['width']}x{r['height']}: {untiled}tiled {r['psnr_tiled']:.2f} dB")
    cost = report["mean_tiling_cost_db"]
    lines.append(f"  mean PSNR cost of tiling over {report['num_compared']} images: "
                 + (f"{cost:.3f} dB" if cost is not None else "n/a"))
    return "\n".join(lines)
