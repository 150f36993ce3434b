"""Where images come from: image folders, webdataset shards and a built-in sample set.

Sources (``data.train``, or the ``spec`` of :func:`iter_images`):
- an image folder, searched recursively for .jpg .jpeg .png .webp .bmp .tif .tiff (any case;
  hidden files and folders ignored), or one image file;
- webdataset shards: a ``.tar``, a brace pattern ``dir/shard-{000000..000003}.tar``, a glob, or
  ``http(s)://`` / ``pipe:`` URLs passed to webdataset unchanged (:func:`is_shard_source`);
- ``builtin:train`` / ``builtin:val`` (``builtin:samples`` = train): photographs read from the
  installed ``skimage/data`` folder (no fetcher, no network). Train: astronaut, coffee,
  hubble_deep_field, ihc, motorcycle_left, motorcycle_right, retina; val: chelsea, rocket. These
  are all the real colour photographs scikit-image ships (the rest are greyscale, synthetic or
  alpha cut-outs). Rocket is in val because the only other candidate, motorcycle_right, is the
  stereo partner of motorcycle_left: a near-duplicate would leak training content into val.

Every reader here yields images in a fixed order (never split by rank or worker); the training
loaders in :mod:`kl_ae.data.loaders` build on these. Undecodable images are counted by reason, never fatal.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial
from glob import glob
from importlib.util import find_spec
from pathlib import Path
from typing import Iterable, Iterator

import braceexpand
import webdataset as wds
from PIL import Image

from kl_ae.data.images import PILLOW_MAX_IMAGE_PIXELS, DataError, SkipCounter, decode

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")  # multi-frame: the first frame
SHARD_URL_PREFIXES = ("http://", "https://", "pipe:")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
BUILTIN_SETS = {
    "train": ("astronaut.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
              "motorcycle_left.png", "motorcycle_right.png", "retina.jpg"),
    "val": ("chelsea.png", "rocket.jpg"),
}
BUILTIN_ALIASES = {"samples": "train"}
_EXPECTED = ("expected an image folder, a shard pattern like 'shards/train-{000000..000009}.tar' "
             "or builtin:train")


def decode_shard_sample(sample: dict, draft_short_side: int | None = None,
                        max_pixels: int = PILLOW_MAX_IMAGE_PIXELS) -> tuple[Image.Image | None, str | None]:
    """Decode a webdataset sample's first member with an image extension (see decode)."""
    for key, value in sample.items():
        if not key.startswith("__") and key.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
            return decode(value, draft_short_side, max_pixels)
    return None, "no_image_member"


def warn_and_continue(exn: Exception) -> bool:
    """webdataset handler: log a corrupted tar stream / sample and go on (no sleep, unlike wds')."""
    logger.warning("webdataset: skipping after error: %r", exn)
    return True


def is_shard_source(spec: str | Path) -> bool:
    """True for webdataset shards (a URL, or a path/pattern ending in .tar/.tar.gz/.tgz): their
    loader splits by node itself and must not go through ``accelerator.prepare``; a folder's or
    builtin set's loader must."""
    spec = str(spec)
    if spec.startswith(SHARD_URL_PREFIXES):
        return True
    return spec.lower().endswith(SHARD_SUFFIXES) and not os.path.isdir(spec)


def expand_shards(spec: str) -> list[str]:
    """Shard paths/URLs of a shard spec, in order (braces and globs expanded; URLs unchecked).
    Raises DataError if a local shard is missing or nothing matches."""
    if not is_shard_source(spec):
        raise DataError(f"{spec!r} is not a shard source (a .tar path, brace pattern or URL)")
    urls = list(braceexpand.braceexpand(str(spec)))
    if str(spec).startswith(SHARD_URL_PREFIXES):
        return urls
    found, missing = [], []
    for url in map(os.path.expanduser, urls):
        if any(c in url for c in "*?["):
            found += sorted(glob(url))
        else:
            (found if os.path.isfile(url) else missing).append(url)
    if not found:
        raise DataError(f"{spec!r}: no such file or folder (the shard pattern matches no files); "
                        f"{_EXPECTED}")
    if missing:
        raise DataError(f"{spec!r}: {len(missing)} of {len(urls)} shards do not exist "
                        f"(first: {missing[0]!r})")
    return found


def _builtin_files(spec: str) -> tuple[Path, list[Path]]:
    name = spec.split(":", 1)[1]
    name = BUILTIN_ALIASES.get(name, name)
    if name not in BUILTIN_SETS:
        raise DataError(f"unknown built-in data set {spec!r}; choose builtin:train, builtin:val "
                        "or builtin:samples (= builtin:train)")
    skimage = find_spec("skimage")  # locate the package without importing it
    if skimage is None or skimage.origin is None:
        raise DataError(f"{spec} needs scikit-image installed (pip install scikit-image)")
    root = Path(skimage.origin).parent / "data"
    files = [root / f for f in BUILTIN_SETS[name]]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{spec}: scikit-image at {root} lacks {missing}")
    return root, files


def _walk_images(root: Path) -> list[Path]:
    """Image files under ``root`` (hidden names skipped), sorted by relative path. Symlinks are
    followed, but no folder is walked twice (a loop, or a second name for a folder) and a file
    reached under several names is kept once, under its first name. Only when a symlink was
    passed are file paths resolved (one system call per file): a plain folder costs the walk alone.
    os.walk cannot tell a symlinked file from a plain one without that call, hence os.scandir."""
    walked, found, linked_any = {os.path.realpath(root)}, [], False
    stack = [root]
    while stack:
        folder = stack.pop()
        entries = sorted((e for e in os.scandir(folder) if not e.name.startswith(".")), key=lambda e: e.name)
        subfolders = []
        for entry in entries:  # in name order: the first name of a folder claims it
            linked_any = linked_any or entry.is_symlink()
            if entry.is_dir():
                real = os.path.realpath(entry.path)
                if real not in walked:
                    walked.add(real)
                    subfolders.append(Path(entry.path))
            elif "." in entry.name and entry.name.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(entry.path))
        stack.extend(reversed(subfolders))  # popped in name order
    found.sort(key=lambda f: f.relative_to(root).as_posix())
    if not linked_any:
        return found
    unique, real_files = [], set()
    for f in found:
        if (real := os.path.realpath(f)) not in real_files:
            real_files.add(real)
            unique.append(f)
    return unique


def _resolve_files(spec: str) -> tuple[Path, list[Path]]:
    """``(root, sorted image files)`` of a folder, a single image file or a builtin set."""
    spec = str(spec)
    if spec.startswith("builtin:"):
        return _builtin_files(spec)
    if is_shard_source(spec):
        raise DataError(f"{spec!r} is a webdataset shard source, not an image folder; "
                        "use iter_images or expand_shards")
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"{spec!r}: no such file or folder; {_EXPECTED}")
    if path.is_file():
        if path.suffix[1:].lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"{spec!r} is not an image file or folder; {_EXPECTED}")
        return path.parent, [path]
    unique = _walk_images(path)
    if not unique:
        raise DataError(f"{spec!r}: folder has no images (searched recursively for "
                        f"{', '.join(IMAGE_EXTENSIONS)}, any case)")
    return path, unique


@dataclass(frozen=True)
class ImageSource:
    """A data spec parsed once (:func:`image_source`); nothing downstream reads the string again.

    kind: 'folder' (searched recursively), 'file' (one image), 'builtin' (scikit-image's
    photographs) or 'shards' (webdataset). root, files: the images of the first three, sorted by
    relative path. urls: the shard paths or URLs of 'shards', in order (local ones checked)."""

    spec: str
    kind: str
    root: Path | None = None
    files: tuple[Path, ...] = ()
    urls: tuple[str, ...] = ()

    @property
    def shards(self) -> bool:
        """Shards are split by rank and worker by webdataset itself (never by Accelerate)."""
        return self.kind == "shards"


def image_source(spec: str | Path | ImageSource) -> ImageSource:
    """Parse a data spec (see the module docstring) into an :class:`ImageSource`; an ImageSource
    is returned as is. Raises DataError for an empty spec, a missing path, a folder without images,
    an unknown builtin set or missing local shards, saying what was expected."""
    if isinstance(spec, ImageSource):
        return spec
    spec = str(spec)
    if not spec.strip():  # Path("") would be the current directory
        raise DataError(f"empty data spec {spec!r}; {_EXPECTED}")
    if is_shard_source(spec):
        return ImageSource(spec, "shards", urls=tuple(expand_shards(spec)))
    root, files = _resolve_files(spec)
    kind = "builtin" if spec.startswith("builtin:") else "file" if Path(spec).expanduser().is_file() else "folder"
    return ImageSource(spec, kind, root, tuple(files))


def list_image_files(source: str | Path | ImageSource) -> list[Path]:
    """Sorted image files of a folder (recursive), one image file or ``builtin:<set>``. Raises
    DataError for a missing path, a folder without images, an unknown builtin set or shards."""
    spec = source.spec if isinstance(source, ImageSource) else str(source)
    if is_shard_source(spec):  # said before looking for the shards
        raise DataError(f"{spec!r} is a webdataset shard source, not an image folder; "
                        "use iter_images or expand_shards")
    return list(image_source(source).files)


def sample_key(relative_path: str) -> str:
    """webdataset ``__key__`` of a file: its relative path with ``%`` -> ``%25`` and ``.`` ->
    ``%2E`` (webdataset splits keys at dots; the escape keeps distinct paths distinct)."""
    return relative_path.replace("%", "%25").replace(".", "%2E")


def iter_images(spec: str | ImageSource, counter: SkipCounter | None = None) -> Iterator[tuple[str, Image.Image]]:
    """``(name, RGB PIL image)`` for every decodable image, in a fixed order: sorted relative
    paths (folder; file names for builtin sets) or shard order with ``__key__`` as name (never
    split by rank or worker: every caller sees every image). Undecodable images are logged and
    counted in ``counter``. Raises DataError for an unusable source."""
    for _, name, img in iter_indexed_images(spec, counter):
        yield name, img


def iter_indexed_images(spec: str | ImageSource, counter: SkipCounter | None = None, *, limit: int | None = None,
                        shard: tuple[int, int] = (0, 1), max_pixels: int = PILLOW_MAX_IMAGE_PIXELS,
                        ) -> Iterator[tuple[int, str, Image.Image]]:
    """Like :func:`iter_images` with the position of each item in the fixed order, for
    multi-process evaluation: process ``shard = (index, count)`` decodes only items
    ``i % count == index`` among the first ``limit`` items, so ranks see disjoint sets that
    together cover every item once. Undecodable items are counted by the rank that owns them.
    max_pixels: larger images are skipped as decompression_bomb (0: no limit; see decode)."""
    counter = counter if counter is not None else SkipCounter()
    index, count = shard
    source = image_source(spec)
    if source.shards:  # every sample once, in shard order, not split, not shuffled
        shards = wds.WebDataset(list(source.urls), shardshuffle=False, nodesplitter=None,
                                workersplitter=None, empty_check=False, handler=warn_and_continue)
        items: Iterable = ((s.get("__key__", "?"), partial(decode_shard_sample, s, max_pixels=max_pixels))
                           for s in shards)
    else:
        items = ((f.relative_to(source.root).as_posix(), partial(decode, f, max_pixels=max_pixels))
                 for f in source.files)
    for i, (name, load) in enumerate(items):
        if limit is not None and i >= limit:
            break
        if i % count != index:
            continue
        img, reason = load()
        if img is None:
            counter.add(reason)
            logger.warning("skipping image %s: %s", name, reason)
            continue
        yield i, name, img
