"""Synthetic training images: the dead-leaves model (``data.dead_leaves_fraction``).

A dead-leaves image is a stack of opaque disks dropped one over another, each of one colour
(Matheron 1968; as a model of natural images' occlusions and scale invariance, Lee, Mumford &
Huang 2001, "Occlusion models for natural images: a statistical study of a scale-invariant dead
leaves model"). Here the radii have density ~ r^-3 on [R_MIN, R_MAX] px and the colours are
uniform in the RGB cube. Mixed into a small training set they are meant to make an autoencoder
carry the absolute colour of a region through its GroupNorms: every crop of one pairs flat regions
with colours no photograph's palette predicts. Trained 30 minutes on half photographs, half dead
leaves, the quickstart's model reproduces flat colours (27-30 dB; every main-command model trained
without them scored 12.6-21.6), and four such runs scored 20.43-22.92 dB on held-out photographs
(mean 21.99) against 20.28 and 19.85 without (BENCHMARKS.md, "Dead leaves on the photographs:
four seeds").

Written here because none of our dependencies generates them; a few lines of PIL drawing. The
images are made once, in a fixed order from one seed (so a set of N is the first N of any larger
set), and kept as PNG files in the cache folder (:func:`cache_folder`), where the training loader
reads them like a folder's photographs (:func:`with_dead_leaves`) or mixes them into a shard
stream (:class:`DeadLeavesStream`).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from kl_ae.data.images import DataError

logger = logging.getLogger(__name__)

SIZE = 384  # px, square; the loader resizes and crops them like photographs (data.short_side_range)
R_MIN, R_MAX = 2.0, 80.0  # px at SIZE
DISKS = 3000
SUPERSAMPLE = 2  # drawn at 2x and downsampled with Lanczos: anti-aliased edges
SEED = 1
MAX_DISTINCT = 512  # at most this many files (about 250 KB each); a larger share repeats them
VERSION = 1  # bump when the images change, so that old cached files are not mixed in


def disk_radii(rng: np.random.Generator, n: int, r_min: float, r_max: float) -> np.ndarray:
    """``n`` radii with density ~ r^-3 on [r_min, r_max], by inverse-CDF sampling: the CDF is
    (r_min^-2 - r^-2) / (r_min^-2 - r_max^-2), so r = (r_min^-2 - u (r_min^-2 - r_max^-2))^(-1/2)
    for u uniform in [0, 1)."""
    return (r_min ** -2 - rng.random(n) * (r_min ** -2 - r_max ** -2)) ** -0.5


def dead_leaves(rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    """One dead-leaves image: RGB, ``size`` x ``size`` px, DISKS disks (:func:`disk_radii` on
    [R_MIN, R_MAX] scaled by size / SIZE) of uniformly random colours over a random background."""
    scale = size * SUPERSAMPLE
    img = Image.new("RGB", (scale, scale), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    radii = disk_radii(rng, DISKS, R_MIN * size / SIZE, R_MAX * size / SIZE) * SUPERSAMPLE
    for r in radii:
        cx, cy = rng.random(2) * scale
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img.resize((size, size), Image.LANCZOS)


def cache_folder() -> Path:
    """Where the images are kept: ``$XDG_CACHE_HOME/kl-ae/dead-leaves-v<VERSION>`` (default
    ``~/.cache/kl-ae/...``)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "kl-ae" / f"dead-leaves-v{VERSION}"


def dead_leaves_count(photos: int, fraction: float) -> int:
    """How many dead-leaves images make ``fraction`` (in [0, 1)) of a set with ``photos`` images."""
    return round(photos * fraction / (1.0 - fraction))


def dead_leaves_files(count: int, size: int = SIZE) -> list[Path]:
    """The first ``count`` images of the sequence (at most MAX_DISTINCT) as PNG files of ``size``
    px (at least SIZE) in :func:`cache_folder`, written where missing. Each is written to a
    unique temporary file (tempfile.mkstemp) and renamed into place, so processes that write the
    same image at once, even on a shared cache, or a crash, never leave a partial one.

    Raises DataError (naming XDG_CACHE_HOME) when the cache folder cannot be written."""
    size = max(SIZE, int(size))
    folder = cache_folder()
    paths = [folder / f"dead-leaves-{size}px-{k:05d}.png" for k in range(min(count, MAX_DISTINCT))]
    missing = sum(not p.is_file() for p in paths)
    try:
        if missing:
            folder.mkdir(parents=True, exist_ok=True)
            logger.info("writing %d dead-leaves images of %d px to %s (once)", missing, size, folder)
            rng = np.random.default_rng(SEED)
            # in order: image k depends on the generator's state after images 0..k-1
            for path in tqdm(paths, desc="dead leaves", unit="img", disable=missing < 64, leave=False):
                img = dead_leaves(rng, size)
                if not path.is_file():
                    _write_atomically(img, path)
    except OSError as err:
        raise DataError(f"data.dead_leaves_fraction: cannot write the dead-leaves images to {folder} ({err}); "
                        "set XDG_CACHE_HOME to a writable folder") from err
    return paths


def with_dead_leaves(files: list[Path], fraction: float, size: int = SIZE) -> list[Path]:
    """An image folder's ``files`` and, after them, :func:`dead_leaves_count` dead-leaves image
    files of ``size`` px (pass the largest side the loader will crop or resize to, so that no crop
    of one is upscaled): :func:`dead_leaves_files`, repeated in order up to the count.

    Raises DataError (naming XDG_CACHE_HOME) when the cache folder cannot be written."""
    count = dead_leaves_count(len(files), fraction)
    if count == 0:
        return list(files)
    paths = dead_leaves_files(count, size)
    return list(files) + [paths[k % len(paths)] for k in range(count)]


class DeadLeavesStream:
    """A webdataset pipeline stage (``WebDataset.compose``) that mixes dead-leaves image files
    (``paths``, from :func:`dead_leaves_files`) into a stream of shard samples, ``fraction`` (in
    (0, 1)) of the samples it yields.

    After the n-th sample of its source (counted over every pass of this worker's copy) it
    inserts floor(n r) - floor((n - 1) r) of them, r = fraction / (1 - fraction), each as a sample
    ``{"__key__": file stem, "png": path}`` (decoded only if not skipped). Stream s of S (every
    rank's logical workers, ``position.stream()``) takes files s, s + S, s + 2S, ... (mod the
    count), so that workers and ranks do not draw the same file at the same time. Where and what
    it inserts depends only on that count and stream, so a stream replayed from its start is the
    same stream: put it before kl_ae.data.shards.StreamPosition, which skips what a resumed run
    had seen and seeds each sample's crop by its position."""

    def __init__(self, paths: list[Path], fraction: float, position):
        if not 0.0 < fraction < 1.0 or not paths:
            raise ValueError(f"need files and a fraction in (0, 1), got {len(paths)} files and {fraction}")
        self.paths, self.position = list(paths), position
        f = Fraction(str(fraction))  # exact: the n-th count below never rounds the wrong way
        self.ratio = f / (1 - f)
        self._sources = self._inserted = 0

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        stream, streams = self.position.stream()
        for sample in src:
            yield sample
            self._sources += 1
            while self._inserted < math.floor(self._sources * self.ratio):
                path = self.paths[(self._inserted * streams + stream) % len(self.paths)]
                self._inserted += 1
                yield {"__key__": path.stem, "png": path}


def _write_atomically(img: Image.Image, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is readable like any image folder
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
