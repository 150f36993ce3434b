"""fp16 safety audit (``kl-ae eval --fp16-audit``): does this VAE encode and decode in float16?

fp16's largest finite value is 65504; SDXL's VAE exceeds it inside the decoder, so fp16 inference
gives NaN or black images (the community "fp16-fix" VAEs were fine-tuned to shrink those
activations). The audit runs the model twice on the first images:

- in float32, with a forward hook on every module, recording the largest absolute output of
  each block (encoder/decoder down, mid and up blocks, the convolutions around them): a block
  above 65504 overflows in fp16, and ``headroom`` = 65504 / the largest value says how close the
  model is. The composite modules count, not only the leaves: a ResNet block adds its shortcut
  and an attention block its residual inside their own forward, and those sums, the residual
  stream, are often a decoder's largest values;
- in float16 (a copy of the weights), encoding to the posterior mode and decoding: whether any
  output is inf or NaN, and the PSNR of the fp16 reconstruction against the fp32 one (8-bit,
  data range 1, as kl_ae.eval.metrics.psnr_8bit).

``fp16_safe`` is true when no block exceeds 65504 and the fp16 pass is finite.
"""

from __future__ import annotations

import copy
import itertools

import torch

from kl_ae.data.images import eval_transform
from kl_ae.data.sources import iter_images
from kl_ae.eval.metrics import psnr_8bit

FP16_MAX = 65504.0
FP16_AUDIT = "fp16_audit.json"  # in an export (written by the trainer), stated by its model card


def _block_of(name: str) -> str:
    """'decoder.up_blocks.1.resnets.0.conv1' -> 'decoder.up_blocks.1'; 'quant_conv' stays."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[1] in ("down_blocks", "up_blocks"):
        return ".".join(parts[:3])
    return ".".join(parts[:2]) if parts[0] in ("encoder", "decoder") else parts[0]


def first_images(images: str, resolution: int, count: int) -> torch.Tensor:
    """The first ``count`` usable images of ``images`` (a folder, shards or builtin set) under the
    eval protocol: (N, 3, R, R) float32 in [-1, 1]. Raises ValueError when none could be read."""
    x = [eval_transform(img, resolution) for _, img in itertools.islice(iter_images(images), count)]
    if not x:
        raise ValueError(f"no usable image in {images!r}")
    return torch.stack(x)


@torch.no_grad()
def fp16_audit(vae, images: str, resolution: int = 256, max_images: int = 4, device: str | None = None) -> dict:
    """The audit of the module docstring on the first ``max_images`` usable images of ``images``
    (short side resized to ``resolution``, centre crop). fp16 runs on CUDA when available, else on
    the CPU (slow but supported). Raises ValueError when no image could be read."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    x = first_images(images, resolution, max_images).to(device)
    vae32 = copy.deepcopy(vae).to(device=device, dtype=torch.float32).eval()
    peaks: dict[str, float] = {}

    def hook(name):
        def record(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            if torch.is_tensor(out) and out.is_floating_point():
                peaks[_block_of(name)] = max(peaks.get(_block_of(name), 0.0), out.detach().abs().max().item())
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in vae32.named_modules() if n]
    try:
        reference = vae32.decode(vae32.encode(x).latent_dist.mode()).sample.float()
    finally:
        for h in handles:
            h.remove()
    vae16 = copy.deepcopy(vae32).to(torch.float16)
    reconstruction = vae16.decode(vae16.encode(x.half()).latent_dist.mode()).sample.float()
    finite = bool(torch.isfinite(reconstruction).all())
    largest = max(peaks.values())
    over = sorted(b for b, v in peaks.items() if v > FP16_MAX)
    psnr = psnr_8bit(reference.clamp(-1, 1), reconstruction.nan_to_num(0).clamp(-1, 1)).mean().item()
    return {
        "images": x.shape[0],
        "resolution": resolution,
        "max_abs_activation": largest,
        "headroom": FP16_MAX / largest if largest else None,
        "max_abs_per_block": dict(sorted(peaks.items())),
        "blocks_over_fp16_max": over,
        "fp16_finite": finite,
        "psnr_fp16_vs_fp32": psnr if finite else None,
        "fp16_safe": finite and not over,
        "device": str(device),
    }


def format_fp16_audit(audit: dict) -> list[str]:
    """Plain-text lines of an audit."""
    verdict = "fp16-safe" if audit["fp16_safe"] else "NOT fp16-safe"
    lines = [f"fp16 audit ({audit['images']} images at {audit['resolution']} px): {verdict}; largest activation "
             f"{audit['max_abs_activation']:.4g} (fp16 max 65504, headroom {audit['headroom']:.3g}x); fp16 decode "
             + (f"finite, PSNR {audit['psnr_fp16_vs_fp32']:.2f} dB against fp32" if audit["fp16_finite"]
                else "has inf/NaN")]
    if audit["blocks_over_fp16_max"]:
        lines.append("  blocks over 65504: " + ", ".join(
            f"{b} ({audit['max_abs_per_block'][b]:.4g})" for b in audit["blocks_over_fp16_max"]))
    return lines
