"""Decoding and transforms of single images: Pillow in, (3, R, R) float tensors in [-1, 1] out.

Decoding is Pillow only (torchvision.io cannot decode with the CPU torch build we support).
Undecodable files never raise: :func:`decode` returns a reason, which callers count in a
:class:`SkipCounter`. Reasons: empty_file, not_an_image, truncated, decompression_bomb,
unreadable, decode_error (and no_image_member for shard samples, see kl_ae.data.loaders).
"""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A data source is unusable; the message names the source and what was expected."""


class SkipCounter:
    """Counts skipped images by reason, e.g. ``{"truncated": 2, "not_an_image": 1}``."""

    def __init__(self):
        self._counts: Counter[str] = Counter()

    def add(self, reason: str, n: int = 1) -> None:
        self._counts[reason] += n

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def as_dict(self) -> dict[str, int]:
        """Reasons by decreasing count (ties by name)."""
        return dict(sorted(self._counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def summary(self) -> str:
        """E.g. ``"skipped 3 images: truncated=2, not_an_image=1"``."""
        parts = ", ".join(f"{reason}={n}" for reason, n in self.as_dict().items())
        noun = "image" if self.total == 1 else "images"
        return f"skipped {self.total} {noun}" + (f": {parts}" if parts else "")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Alpha (RGBA, LA, PA, a transparent palette entry, or an 8-bit
    RGB or grey PNG's transparent colour, its tRNS chunk) is composited onto white; ``I;16*`` (and ``I`` within [0, 65535]) is scaled by 255/65535, ``F`` within [0, 1] by
    255, other ``I``/``F`` data min-max; CMYK and the rest use Pillow's ``convert("RGB")``."""
    mode = img.mode
    if mode in ("RGB", "L") and "transparency" in img.info:  # one colour (tRNS) is transparent
        img, mode = img.convert("RGBA"), "RGBA"
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
            arr = arr * (255.0 / 65535.0)
        elif mode == "F" and lo >= 0 and hi <= 1:
            arr = arr * 255.0
        else:
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


PILLOW_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS: 1024 * 1024 * 1024 // 4 // 3


@contextmanager
def _pixel_limit(max_pixels: int):
    """Pillow's decompression-bomb limit is a module global (Image.MAX_IMAGE_PIXELS): set it for
    one decode and put it back (data workers and evaluation decode in one thread each)."""
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels or None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def decode(source: bytes | str | Path, draft_short_side: int | None = None,
           max_pixels: int = PILLOW_MAX_IMAGE_PIXELS) -> tuple[Image.Image | None, str | None]:
    """Decode file bytes or a path to an RGB image: ``(image, None)`` or ``(None, reason)``.

    draft_short_side: a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose short
    side is still >= this many pixels (Pillow ``draft``): several times faster for multi-MP
    photos that are downscaled anyway. Other formats decode at full size.
    max_pixels: images with more pixels are skipped as "decompression_bomb" (data.max_image_pixels;
    default Pillow's limit; 0: none). A multi-frame file (animated GIF/PNG/WebP, multi-page
    TIFF) gives its first frame.
    """
    try:
        in_memory = isinstance(source, (bytes, bytearray, memoryview))
        if (len(source) if in_memory else os.path.getsize(source)) == 0:
            return None, "empty_file"
        fp = io.BytesIO(source) if in_memory else source
        with warnings.catch_warnings(), _pixel_limit(max_pixels):
            # between 1x and 2x Image.MAX_IMAGE_PIXELS Pillow only warns; treat it as a bomb too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:  # positioned at the first frame
                if draft_short_side and img.format == "JPEG":
                    w, h = img.size
                    scale = draft_short_side / min(w, h)
                    if scale < 1:
                        img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
                img.load()
                try:
                    img = ImageOps.exif_transpose(img)
                except Exception as err:  # malformed EXIF: keep the stored orientation
                    logger.debug("ignoring unreadable EXIF orientation: %s", err)
                return to_rgb(img), None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "decompression_bomb"
    except UnidentifiedImageError:
        return None, "not_an_image"
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        return None, "unreadable"
    except OSError as err:
        return None, "truncated" if "truncat" in str(err).lower() else "decode_error"
    except Exception as err:  # SyntaxError, ValueError, struct.error, ... from broken files
        logger.debug("decode error: %r", err)
        return None, "decode_error"


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    arr = np.array(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().float().div_(127.5).sub_(1.0)


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the short side is ``size`` (long side as torchvision: truncated)."""
    w, h = img.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return img if new == img.size else img.resize(new, Image.Resampling.BICUBIC)


def train_transform(img: Image.Image, resolution: int, random_flip: bool = True,
                    generator: torch.Generator | None = None,
                    short_side_range: Sequence[int] | None = None) -> tuple[torch.Tensor, bool]:
    """Random R×R crop (R = ``resolution``), optional horizontal flip -> ((3, R, R) float32 in
    [-1, 1], upscaled). A short side below R is first upscaled (bicubic) to exactly R, reported by
    ``upscaled``. Randomness: torch's generator (global unless given; DataLoader seeds workers).

    short_side_range: (lo, hi) in pixels: first downscale the image so its short side is a
    uniform random integer in [lo, hi] (never above its native short side; LDM's autoencoder
    data crops 0.5-1.0 of the short side and resizes the crop to R, about [R, 2R]); None or
    empty: crop at native resolution.
    """
    if short_side_range:
        lo, hi = int(short_side_range[0]), int(short_side_range[-1])
        target = int(torch.randint(lo, hi + 1, (1,), generator=generator))
        if target < min(img.size):
            img = resize_short_side(img, max(target, resolution))
    upscaled = min(img.size) < resolution
    if upscaled:
        img = resize_short_side(img, resolution)
    w, h = img.size
    top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
    img = img.crop((left, top, left + resolution, top + resolution))
    if random_flip and float(torch.rand(1, generator=generator)) < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(img), upscaled


def eval_transform(img: Image.Image, resolution: int) -> torch.Tensor:
    """Deterministic eval protocol -> (3, R, R) float32 in [-1, 1]: short side resized to R
    (bicubic; Pillow antialiases when shrinking), center R×R crop. Same pixels as torchvision
    ``Resize(R, BICUBIC, antialias=True)`` + ``CenterCrop(R)``."""
    img = resize_short_side(img, resolution)
    w, h = img.size
    top, left = int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))
    return to_tensor(img.crop((left, top, left + resolution, top + resolution)))


def shuffle_channels(x: torch.Tensor) -> torch.Tensor:
    """Permute the channels of each image by its own uniformly drawn order (``data.channel_shuffle``).

    x: (B, C, H, W); returns a new tensor of the same shape. Draws from the global RNG of
    ``x``'s device (restored by a checkpoint, so a resumed run draws the same orders).
    """
    order = torch.rand(x.shape[0], x.shape[1], device=x.device).argsort(dim=1)
    return x.gather(1, order[:, :, None, None].expand_as(x))


def sample_generator(*parts: int) -> torch.Generator:
    """A generator seeded from integers (seed, epoch, index, ...): augmentation that depends on
    which sample it is, not on how many random numbers were drawn before, so a resumed run
    crops and flips exactly as an uninterrupted one."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**61 - 1)
    return torch.Generator().manual_seed(value)
