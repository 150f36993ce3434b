"""Classical image codecs through Pillow (JPEG, WebP, AVIF, JPEG 2000) as rate-distortion baselines.

Rate is measured on the whole file Pillow writes, headers and all: bits per pixel (bpp) =
8 · file bytes / (H · W). That is what storing the image costs, and it is an honest disadvantage
for the codecs on tiny images: a baseline JPEG carries ~600 bytes of headers and tables, which is
4.7 bpp on a 32 x 32 image before any pixel is coded. Autoencoder latent rates, by contrast, are
raw element counts (see kl_ae.rd.benchmark), with no header at all.

Each codec is driven by one integer ``quality`` over its own range (higher = more bytes in
practice; no codec guarantees it, so :func:`match_bpp` does not rely on it strictly):

- ``jpeg``: libjpeg via Pillow, ``quality`` 1-100, optimised Huffman tables, 4:2:0 chroma.
- ``webp``: libwebp lossy, ``quality`` 0-100, ``method=6`` (slowest, smallest files).
- ``avif``: libavif (AV1) via Pillow, ``quality`` 0-100, ``speed=6`` (Pillow's default).
- ``jpeg2000``: OpenJPEG, raw codestream (.j2k, no JP2 boxes), 9/7 irreversible wavelet. OpenJPEG
  takes a rate, not a quality: ``quality`` q in 0-100 requests 0.05 · 2^(q/12.5) bpp (0.05 to
  12.8 bpp, ~5.7 % per step) through ``quality_mode="rates"``; the file is still measured.

A codec is usable when ``PIL.features`` reports its library and a 16 x 16 image survives an
encode/decode round trip here; others are skipped with the reason (:func:`codec_status`).

:func:`bench_codecs` scores whole batches of eval crops at matched rates and over quality sweeps
through :func:`kl_ae.eval.metrics.image_metrics`, the metric code the autoencoders go through.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, features
from tqdm import tqdm

from kl_ae.eval.evaluate import EVAL_DTYPE, summarise
from kl_ae.eval.metrics import image_metrics, to_8bit

logger = logging.getLogger(__name__)


def _jpeg2000_options(quality: int) -> dict:
    requested_bpp = 0.05 * 2 ** (quality / 12.5)
    return {"quality_mode": "rates", "quality_layers": [24.0 / requested_bpp],
            "irreversible": True, "no_jp2": True}


@dataclass(frozen=True)
class Codec:
    """A lossy codec Pillow can write: its format, library feature and integer quality range."""

    name: str
    pil_format: str
    feature: str  # name for PIL.features.check
    qualities: tuple[int, int]  # inclusive range of the quality argument
    options: Callable[[int], dict]  # quality -> Image.save keyword arguments
    sweep: tuple[int, ...]  # qualities drawn as the rate-distortion curve
    note: str  # the settings, for reports


CODECS: dict[str, Codec] = {
    "jpeg": Codec("jpeg", "JPEG", "jpg", (1, 100),
                  lambda q: {"quality": q, "optimize": True, "subsampling": "4:2:0"},
                  tuple(range(5, 100, 10)), "libjpeg, optimised Huffman tables, 4:2:0"),
    "webp": Codec("webp", "WEBP", "webp", (0, 100), lambda q: {"quality": q, "method": 6},
                  tuple(range(5, 100, 10)), "libwebp lossy, method 6"),
    "avif": Codec("avif", "AVIF", "avif", (0, 100), lambda q: {"quality": q, "speed": 6},
                  tuple(range(5, 100, 10)), "libavif (AV1), speed 6"),
    "jpeg2000": Codec("jpeg2000", "JPEG2000", "jpg_2000", (0, 100), _jpeg2000_options,
                      tuple(range(10, 100, 10)),
                      "OpenJPEG codestream, 9/7 wavelet, quality q requests 0.05*2^(q/12.5) bpp"),
}


@functools.cache
def codec_status(name: str) -> str | None:
    """None when ``name`` encodes and decodes here, else why not (unknown name, library missing
    from this Pillow build, or the round trip failed)."""
    if name not in CODECS:
        return f"unknown codec (known: {', '.join(CODECS)})"
    codec = CODECS[name]
    if not features.check(codec.feature):
        return f"Pillow {Image.__version__} was built without {codec.feature} support"
    try:
        test = np.tile(np.arange(16, dtype=np.uint8)[:, None, None] * 16, (1, 16, 3))
        recon, _ = encode_decode(test, name, sum(codec.qualities) // 2)
        if recon.shape != test.shape:
            return f"round trip changed the shape {test.shape} -> {recon.shape}"
    except Exception as err:  # any failure means "not usable here"; the reason is reported
        return f"round trip failed: {type(err).__name__}: {err}"
    return None


def available_codecs(names: list[str]) -> list[str]:
    """The usable codecs among ``names``, in order; each unusable one is logged with its reason."""
    usable = []
    for name in names:
        reason = codec_status(name)
        if reason is None:
            usable.append(name)
        else:
            logger.warning("skipping codec %s: %s", name, reason)
    return usable


def _as_image(img: np.ndarray | Image.Image) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {img.dtype} {img.shape}")
    return Image.fromarray(img, mode="RGB")


def encode(img: np.ndarray | Image.Image, codec: str, quality: int) -> bytes:
    """The whole file ``codec`` writes for ``img`` ((H, W, 3) uint8 or PIL) at ``quality``.

    Raises ValueError for an unknown codec or a quality outside its range."""
    spec = CODECS.get(codec)
    if spec is None:
        raise ValueError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")
    lo, hi = spec.qualities
    if not lo <= quality <= hi:
        raise ValueError(f"{codec} quality must be in [{lo}, {hi}], got {quality}")
    buffer = io.BytesIO()
    _as_image(img).save(buffer, format=spec.pil_format, **spec.options(int(quality)))
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    """A file written by :func:`encode` -> (H, W, 3) uint8 RGB."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def encode_decode(img: np.ndarray | Image.Image, codec: str,
                  quality: int) -> tuple[np.ndarray, int]:
    """(reconstruction (H, W, 3) uint8, file size in bytes, headers included) of ``img``."""
    data = encode(img, codec, quality)
    return decode(data), len(data)


def bits_per_pixel(num_bytes: int, h: int, w: int) -> float:
    """Rate of a file of ``num_bytes`` for an H x W image: 8 · num_bytes / (H · W) bits per pixel."""
    return 8.0 * num_bytes / (h * w)


def match_bpp(img: np.ndarray | Image.Image, codec: str,
              target_bpp: float) -> tuple[int, float, np.ndarray]:
    """The quality whose file rate best matches ``target_bpp`` for this one image.

    Bisection over the integer quality range, assuming rate grows with quality (true enough in
    practice; ~log2(range) + 2 encodes). Among every quality tried, the answer is the largest
    rate not above the target (the codec never gets more bits than the target) when one is;
    when even the lowest rate tried is above it (tiny images: headers alone may exceed the
    target), it is the closest rate. With a monotone codec that is the best quality within
    budget, or the lowest quality.

    Returns (quality, achieved bpp, reconstruction (H, W, 3) uint8).
    """
    image = _as_image(img)
    w, h = image.size
    tried: dict[int, tuple[float, np.ndarray]] = {}

    def rate(q: int) -> float:
        if q not in tried:
            recon, n = encode_decode(image, codec, q)
            tried[q] = (bits_per_pixel(n, h, w), recon)
        return tried[q][0]

    lo, hi = CODECS[codec].qualities
    if rate(lo) <= target_bpp < rate(hi):  # invariant: rate(lo) <= target < rate(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if rate(mid) <= target_bpp:
                lo = mid
            else:
                hi = mid
    within = [q for q, (bpp, _) in tried.items() if bpp <= target_bpp]
    if within:
        best = max(within, key=lambda q: (tried[q][0], q))
    else:
        best = min(tried, key=lambda q: (abs(tried[q][0] - target_bpp), q))
    return best, tried[best][0], tried[best][1]


# --- scoring at matched rates (kl-ae bench) ------------------------------------------------


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, the same 8-bit image the metrics see."""
    return (to_8bit(x) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _from_uint8(images: list[np.ndarray], device) -> torch.Tensor:
    """List of (H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1] on ``device``."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(device, EVAL_DTYPE)
    return batch / 127.5 - 1


def _codec_at_target(x, images, codec: str, target: float, acc: dict, lpips) -> None:
    """Match every image of a batch to ``target`` bpp, time it, score it into ``acc``."""
    recons = []
    for img in images:
        quality, bpp, _ = match_bpp(img, codec, target)
        t0 = time.perf_counter()
        data = encode(img, codec, quality)
        t1 = time.perf_counter()
        recons.append(decode(data))
        acc["encode_s"] += t1 - t0
        acc["decode_s"] += time.perf_counter() - t1
        acc["bpp"].append(bpp)
        acc["quality"].append(quality)
        acc["over"] += bpp > target
    for metric, values in image_metrics(x, _from_uint8(recons, x.device), lpips).items():
        acc["scores"].setdefault(metric, []).extend(values.cpu().tolist())


@torch.inference_mode()
def bench_codecs(codecs: list[str], targets: dict[float, list[str]], batches: Iterable, *,
                 lpips, device: torch.device, progress: bool = False) -> tuple[list[dict], dict]:
    """Codec baselines at each target bpp and over each codec's quality sweep.

    targets: {bpp: [methods it comes from]}. batches: (names, (B, 3, R, R) in [-1, 1]) as the
    autoencoders saw them. Returns (rows, curves): one row per (codec, target) with mean bpp,
    target_bpp, quality_mean, images_over_target, metrics (:func:`kl_ae.eval.evaluate.summarise`),
    encode_img_s, decode_img_s, num_images, matched_to; curves {codec: [{quality, bpp, psnr,
    ssim}]} of means over images at each sweep quality.
    """
    matched = {(c, t): {"scores": {}, "bpp": [], "quality": [], "over": 0, "encode_s": 0.0,
                        "decode_s": 0.0} for c in codecs for t in sorted(targets)}
    sweeps: dict = {c: {q: {"bpp": [], "psnr": [], "ssim": []} for q in CODECS[c].sweep}
                    for c in codecs}
    for _, x in tqdm(batches, disable=not progress, desc="codecs", unit="batch"):
        x = x.to(device, EVAL_DTYPE)
        images = list(_to_uint8(x))
        for (codec, target), acc in matched.items():
            _codec_at_target(x, images, codec, target, acc, lpips)
        for codec, curve in sweeps.items():
            for quality, acc in curve.items():
                recons, sizes = zip(*(encode_decode(img, codec, quality) for img in images))
                acc["bpp"] += [bits_per_pixel(n, *img.shape[:2]) for img, n in zip(images, sizes)]
                for metric, values in image_metrics(x, _from_uint8(list(recons), device)).items():
                    acc[metric] += values.cpu().tolist()
    return _codec_rows(matched, targets), _curves(sweeps)


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _codec_rows(matched: dict, matched_to: dict[float, list[str]]) -> list[dict]:
    """One kl-ae bench row per (codec, target bpp): means over images, speeds in images/s."""
    rows = []
    for (codec, target), acc in matched.items():
        n = len(acc["bpp"])
        rows.append({
            "method": f"{codec}@{target:.3g}bpp", "kind": "codec", "bpp": _mean(acc["bpp"]),
            "target_bpp": target, "quality_mean": _mean(acc["quality"]),
            "images_over_target": acc["over"], **summarise(acc["scores"]),
            "encode_img_s": n / acc["encode_s"] if acc["encode_s"] > 0 else None,
            "decode_img_s": n / acc["decode_s"] if acc["decode_s"] > 0 else None,
            "num_images": n, "matched_to": " ".join(matched_to[target]),
        })
    return rows


def _curves(sweeps: dict) -> dict:
    """{codec: [{quality, bpp, psnr, ssim}: means over images, by quality]}."""
    return {codec: [{"quality": q, "bpp": _mean(acc["bpp"]),
                     **summarise({"psnr": acc["psnr"], "ssim": acc["ssim"]})}
                    for q, acc in curve.items()] for codec, curve in sweeps.items()}
