"""Reconstruction quality and speed of an autoencoder on an image set, under a stated protocol.

Protocol (also written into every report, so a number never travels without it):

- Each image goes through ``kl_ae.data.images.eval_transform``: short side resized to R (bicubic,
  antialias), centre crop R x R, values in [-1, 1].
- Reconstruction x̂ = decode(posterior MODE): deterministic, no sampling; fp32, eval mode.
- x and x̂ are clamped to [-1, 1], mapped to [0, 1] and rounded to k/255 (what saving an 8-bit
  PNG gives). PSNR, SSIM and LPIPS are all computed on these 8-bit images.
- PSNR = 10·log10(1 / MSE), data range 1.0, MSE over all pixels and RGB channels of one image.
- SSIM (Wang, Bovik, Sheikh, Simoncelli, "Image quality assessment: from error visibility to
  structural similarity", IEEE TIP 2004) via torchmetrics: gaussian window 11 x 11, sigma 1.5,
  K1 0.01, K2 0.03, data range 1.0, averaged over RGB channels and pixels of one image.
- LPIPS (Zhang et al. 2018, v0.1, VGG trunk) via ``kl_ae.perceptual.build_lpips`` when its VGG16
  trunk weights are present; otherwise skipped with the reason. A random-trunk network is
  reported only under the key ``lpips_random_trunk``, never as ``lpips``.
- Per-image values, then the plain mean over images.
- Infinite PSNR (x̂ identical to x after 8-bit rounding, MSE 0) has no JSON form: it is written
  as ``null``, and a mean over images that include one is ``null`` too, with
  ``psnr_infinite`` giving the count. (Any other non-finite value, e.g. from a NaN
  reconstruction, is also written as ``null``.)

Baselines go through the same metric code as the model: a *reconstructor* is any callable
x -> x̂ on (B, 3, R, R) float tensors in [-1, 1].
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn
from tqdm import tqdm

from kl_ae.distributed import process_state
from kl_ae.data.images import SkipCounter, eval_transform
from kl_ae.eval.metrics import SSIM_KERNEL_SIZE, image_metrics
from kl_ae.model import downsampling_factor
from kl_ae.perceptual import LPIPSWeightsError, build_lpips
from kl_ae.eval.report import format_report
from kl_ae.data.images import PILLOW_MAX_IMAGE_PIXELS
from kl_ae.data.sources import iter_indexed_images

Reconstructor = Callable[[torch.Tensor], torch.Tensor]

LPIPS_NET = "vgg"  # the trunk the LDM/SD loss and most published VAE tables use
EVAL_DTYPE = torch.float32  # evaluation precision; fp16 overflows in SD-family VAEs

BASELINE_DESCRIPTIONS = {
    "mean_colour": "every pixel replaced by the image's per-channel mean",
    "bicubic": "downsample by the autoencoder's factor f (bicubic, antialias), "
    "upsample back (bicubic), clamp to [-1, 1]",
}


# --- reconstructors ------------------------------------------------------------------------


def mean_colour(x: torch.Tensor) -> torch.Tensor:
    """Baseline: (B, 3, H, W) -> same shape, every pixel set to its image's per-channel mean."""
    return x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous()


def bicubic(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Baseline: downsample by ``factor`` (bicubic, antialias), upsample back (bicubic), clamp.

    x: (B, 3, H, W) in [-1, 1] -> same shape in [-1, 1]. Keeps as many pixels as the latent
    has positions, with 3 numbers each instead of latent_channels.
    """
    h, w = x.shape[-2:]
    small = F.interpolate(
        x, size=(max(1, h // factor), max(1, w // factor)), mode="bicubic", antialias=True,
        align_corners=False,
    )
    return F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).clamp(-1, 1)


def model_summary(vae: AutoencoderKL) -> dict:
    """latent_channels c, downsampling_factor f, compression_ratio 3·f²/c, parameters."""
    f, c = downsampling_factor(vae), vae.config.latent_channels
    return {"latent_channels": c, "downsampling_factor": f, "compression_ratio": 3 * f * f / c,
            "parameters": sum(p.numel() for p in vae.parameters())}


class AutoencoderReconstructor:
    """x -> decode(posterior mode) for an ``AutoencoderKL``, timing encode and decode apart.

    Encode = encoder + quant_conv + posterior mode; decode = post_quant_conv + decoder. On CUDA
    the device is synchronised around each timed part. Call under ``torch.inference_mode()``.
    """

    def __init__(self, vae: AutoencoderKL, device: torch.device, probe: Callable | None = None):
        self.vae = vae
        self.device = device
        self.probe = probe  # called as probe(vae, x, posterior, x_hat) after each batch, untimed
        self.timings: list[tuple[int, float, float]] = []  # (images, encode s, decode s) per call

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t0 = self._now()
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mode()
        t1 = self._now()
        x_hat = self.vae.decode(z).sample
        t2 = self._now()
        self.timings.append((x.shape[0], t1 - t0, t2 - t1))
        if self.probe is not None:
            self.probe(self.vae, x, posterior, x_hat)
        return x_hat

    def throughput(self) -> dict:
        """Images per second for encode and decode over the batches after the first (warm-up)
        one, leaving out a smaller last batch (a new shape is a second warm-up on CPU backends).
        With a single batch it is all there is, and ``warmup_batch_excluded`` is False."""
        later = self.timings[1:]
        full = [t for t in later if t[0] == self.timings[0][0]]
        timed = full or later or self.timings
        n = sum(t[0] for t in timed)
        enc = sum(t[1] for t in timed)
        dec = sum(t[2] for t in timed)
        return {
            "encode_images_per_s": n / enc if enc > 0 else None,
            "decode_images_per_s": n / dec if dec > 0 else None,
            "timed_batches": len(timed),
            "timed_images": n,
            "warmup_batch_excluded": bool(later),
            "partial_batch_excluded": len(timed) < len(later),
        }


# --- the evaluation loop -------------------------------------------------------------------


def _batches(
    images: str, resolution: int, batch_size: int, max_images: int | None, counter: SkipCounter,
    shard: tuple[int, int] = (0, 1), max_image_pixels: int = PILLOW_MAX_IMAGE_PIXELS,
) -> Iterator[tuple[list[tuple[int, str]], torch.Tensor]]:
    """([(index, name)], (b, 3, R, R) in [-1, 1]) batches in the data module's deterministic
    order; with ``shard=(rank, world_size)`` only this rank's share of the first max_images."""
    stream = iter_indexed_images(images, counter, limit=max_images, shard=shard, max_pixels=max_image_pixels)
    while chunk := list(itertools.islice(stream, batch_size)):
        yield [(i, name) for i, name, _ in chunk], torch.stack(
            [eval_transform(img, resolution) for _, _, img in chunk]
        )


def _gather(names: list, scores: dict, counter: SkipCounter) -> tuple[list, dict, SkipCounter]:
    """Collect every rank's per-image results on every rank, in the single-process order.

    Ranks evaluate disjoint images (``i % world_size == rank``), so after sorting by the image
    index each image appears exactly once, as if one process had evaluated all of them.
    """
    from accelerate.utils import gather_object

    parts = gather_object([{"names": names, "scores": scores, "skipped": counter.as_dict()}])
    rows = []
    for part in parts:
        for j, name in enumerate(part["names"]):
            rows.append((name, {k: {m: v[j] for m, v in d.items()} for k, d in part["scores"].items()}))
    rows.sort(key=lambda row: row[0][0])
    merged: dict = {k: {} for k in scores}
    for _, per in rows:
        for k, metrics in per.items():
            for m, v in metrics.items():
                merged[k].setdefault(m, []).append(v)
    total = SkipCounter()
    for part in parts:
        for reason, n in part["skipped"].items():
            total.add(reason, n)
    return [name for name, _ in rows], merged, total


def score_reconstructors(
    reconstructors: dict[str, Reconstructor],
    batches: Iterable[tuple[list[str], torch.Tensor]],
    lpips: tuple[nn.Module, str] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    total: int | None = None,
) -> tuple[list[str], dict[str, dict[str, list[float]]]]:
    """Run every reconstructor on every batch and score it with :func:`image_metrics`.

    batches: (names, (B, 3, R, R) float in [-1, 1]). Returns the image names and
    ``{reconstructor: {metric: [per-image value, ...]}}`` in the same order.
    """
    names: list[str] = []
    scores: dict[str, dict[str, list[float]]] = {key: {} for key in reconstructors}
    with torch.inference_mode():
        for batch_names, x in tqdm(
            batches, total=total, disable=not progress, desc="evaluate", unit="batch"
        ):
            x = x.to(device=device, dtype=EVAL_DTYPE)
            names.extend(batch_names)
            for key, reconstruct in reconstructors.items():
                for metric, values in image_metrics(x, reconstruct(x), lpips).items():
                    scores[key].setdefault(metric, []).extend(values.cpu().tolist())
    return names, scores


def _json_float(v: float | None) -> float | None:
    """JSON has no inf/nan: non-finite values become None (null)."""
    return v if v is not None and math.isfinite(v) else None


def summarise(values: dict[str, list[float]]) -> dict:
    """Per-metric means over images, JSON-safe (see the module docstring on infinite PSNR)."""
    out: dict = {m: _json_float(math.fsum(v) / len(v)) for m, v in values.items() if v}
    n_inf = sum(math.isinf(v) for v in values.get("psnr", []))
    if n_inf:
        out["psnr_infinite"] = n_inf
    return out


def _protocol(resolution: int, lpips_name: str | None, lpips_reason: str | None,
              lpips_net: str = LPIPS_NET) -> dict:
    if lpips_name is None:
        lpips_text = f"skipped: {lpips_reason}"
    else:
        lpips_text = (
            f"{lpips_name}: LPIPS v0.1 ({lpips_net}) via kl_ae.perceptual.build_lpips on the "
            "8-bit images mapped back to [-1, 1]"
        )
        if lpips_name.endswith("random_trunk"):
            lpips_text += " -- RANDOM trunk weights: not LPIPS, not comparable to LPIPS"
    return {
        "text": (
            f"{resolution}x{resolution} centre crops; reconstruction = decode(posterior mode), "
            "deterministic, fp32; PSNR/SSIM on images rounded to 8 bits in [0, 1] "
            "(data range 1.0); SSIM gaussian 11x11 sigma 1.5 (torchmetrics, Wang et al. 2004); "
            "per-image values averaged over images; PSNR null = infinite (identical images)"
        ),
        "resolution": resolution,
        "crop": f"resize short side to {resolution} (bicubic, antialias), centre crop",
        "reconstruction": "decode(posterior mode): deterministic, no sampling",
        "precision": "float32, model in eval mode",
        "rounding": "x and reconstruction clamped to [-1, 1], mapped to [0, 1], rounded to k/255",
        "psnr": "10*log10(1/MSE) per image, data range 1.0, MSE over pixels and RGB; "
        "null where infinite (MSE 0)",
        "ssim": "torchmetrics structural_similarity_index_measure, gaussian 11x11 sigma 1.5, "
        "K1 0.01, K2 0.03, data range 1.0, mean over RGB and pixels (Wang et al. 2004)",
        "lpips": lpips_text,
        "lpips_net": lpips_net,
        "baselines": BASELINE_DESCRIPTIONS,
    }


def _load_lpips(
    trunk: str | None, device: torch.device, net: str = LPIPS_NET
) -> tuple[tuple[nn.Module, str] | None, str | None]:
    """(module, name) or None with the reason LPIPS is skipped."""
    if trunk is None or trunk == "none":
        return None, "disabled (lpips_trunk=None)"
    try:
        module, name = build_lpips(trunk=trunk, net=net)
    except LPIPSWeightsError as err:
        return None, f"LPIPS trunk weights unavailable: {err}"
    return (module.to(device=device, dtype=EVAL_DTYPE).eval(), name), None


def evaluate(
    vae: AutoencoderKL,
    images: str,
    *,
    resolution: int = 256,
    batch_size: int = 4,
    lpips_trunk: str | None = "auto",
    baselines: bool = False,
    max_images: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    distributed: bool = False,
    latent: bool = True,
    rfid_weights: str | None = None,
    lpips_net: str = LPIPS_NET,
    max_image_pixels: int = PILLOW_MAX_IMAGE_PIXELS,
) -> dict:
    """Reconstruction metrics and encode/decode throughput of ``vae`` on ``images``.

    distributed: split the images across the processes of an ``accelerate launch`` (each rank
    evaluates every world_size-th image, results gathered on every rank). Every process must
    call it; throughput is then rank 0's own, per process. max_images counts the first items of
    the source, decodable or not. latent: add the latent report (kl_ae.eval.latent) under "latent".
    rfid_weights: Inception weights for rFID (None: the default location; "none": skip); without
    them the report says "rfid_skipped" and gives no number. lpips_net: "vgg" or "alex".
    max_image_pixels: larger images are skipped as decompression_bomb (data.max_image_pixels).

    images: a spec for ``kl_ae.data.sources.iter_images`` (folder, webdataset shards or 'builtin:val').
    The model is moved to ``device`` (default: CUDA if available, else CPU) in float32 and put
    in eval mode, in place. lpips_trunk: passed to ``build_lpips`` ("auto", "random", ...);
    None skips LPIPS. Returns a JSON-serialisable report (see the module docstring and
    :func:`format_report`). Raises ValueError on bad arguments or when no image could be used.
    """
    f = downsampling_factor(vae)
    if batch_size < 1 or (max_images is not None and max_images < 1):
        raise ValueError(f"batch_size and max_images must be >= 1, got {batch_size}, {max_images}")
    if resolution % f or resolution < SSIM_KERNEL_SIZE:
        raise ValueError(
            f"resolution {resolution} must be a multiple of the downsampling factor {f} "
            f"and at least {SSIM_KERNEL_SIZE} (the SSIM window)"
        )
    state = process_state() if distributed else None
    shard = (state.process_index, state.num_processes) if state else (0, 1)
    if device is None and state is not None:
        device = state.device
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if any(p.dtype != EVAL_DTYPE for p in vae.parameters()):
        vae = vae.to(dtype=EVAL_DTYPE)  # only then: diffusers warns about any dtype cast
    vae = vae.to(device).eval()
    lpips, lpips_reason = _load_lpips(lpips_trunk, device, lpips_net)

    probe = None
    if latent:
        from kl_ae.eval.probe import LatentProbe

        probe = LatentProbe(vae.config.latent_channels, device, seed=shard[0], rfid_weights=rfid_weights)
    model = AutoencoderReconstructor(vae, device, probe)
    reconstructors: dict[str, Reconstructor] = {"model": model}
    if baselines:
        reconstructors["mean_colour"] = mean_colour
        reconstructors["bicubic"] = lambda x: bicubic(x, f)
    counter = SkipCounter()
    total = math.ceil(max_images / batch_size) if max_images else None
    batches = _batches(images, resolution, batch_size, max_images, counter, shard, max_image_pixels)
    names, scores = score_reconstructors(reconstructors, batches, lpips, device, progress, total)
    if shard[1] > 1:
        names, scores, counter = _gather(names, scores, counter)
    if not names:
        raise ValueError(
            f"no usable image in {images!r} (skipped: {counter.as_dict() or 'none found'})"
        )

    report = {
        "protocol": _protocol(resolution, lpips[1] if lpips else None, lpips_reason, lpips_net),
        "images": images,
        "num_images": len(names),
        "skipped": counter.as_dict(),
        "model": model_summary(vae),
        "metrics": summarise(scores["model"]),
    }
    if lpips_reason:
        report["lpips_skipped"] = lpips_reason
    report["per_image"] = [
        {"name": name, **{m: _json_float(v[i]) for m, v in scores["model"].items()}}
        for i, (_, name) in enumerate(names)
    ]
    report["throughput"] = {
        "processes": shard[1],
        "device": str(device),
        "dtype": str(EVAL_DTYPE).removeprefix("torch."),
        "batch_size": batch_size,
        **model.throughput(),
    }
    if baselines:
        report["baselines"] = {k: summarise(scores[k]) for k in BASELINE_DESCRIPTIONS}
    if probe is not None:
        report.update(probe.report(distributed=shard[1] > 1))
    return report


# --- entry point (presentation: kl_ae/eval/report.py) ---------------------------------------------


def run(model: str, images: str, out: str | None = None, *, full_size: bool = False,
        tile_size: int = 256, tile_above: int = 1024, fp16_audit: bool = False, **kwargs) -> dict:
    """Load ``model`` (diffusers export dir, run dir or checkpoint dir), evaluate it on
    ``images`` (kwargs go to :func:`evaluate`; split across processes under
    ``accelerate launch``), print the table, write the JSON report to ``out`` (parent dirs
    created) if given, and return the report. full_size: also reconstruct at native resolution,
    tiled above ``tile_above`` px, with the measured PSNR cost of tiling (main process only;
    see :mod:`kl_ae.eval.tiling`), under the report's "full_size" key. fp16_audit: also the fp16
    safety audit (:mod:`kl_ae.eval.fp16`) under "fp16_audit"."""
    from kl_ae.model import load_autoencoder

    vae = load_autoencoder(model)
    report = evaluate(vae, images, distributed=True, **kwargs)
    report["model"]["path"] = str(model)
    if not process_state().is_main_process:
        return report
    text = format_report(report)
    if full_size:
        from kl_ae.eval.tiling import format_full_size, full_size_report

        report["full_size"] = full_size_report(vae, images, tile_size=tile_size, tile_above=tile_above,
                                               max_images=kwargs.get("max_images"))
        text += "\n" + format_full_size(report["full_size"])
    if fp16_audit:
        from kl_ae.eval.fp16 import format_fp16_audit
        from kl_ae.eval.fp16 import fp16_audit as audit

        report["fp16_audit"] = audit(vae, images, resolution=kwargs.get("resolution", 256))
        text += "\n" + "\n".join(format_fp16_audit(report["fp16_audit"]))
    print(text)
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report
