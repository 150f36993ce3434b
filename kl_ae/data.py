"""Training and evaluation images: image folders, webdataset shards and a built-in sample set.

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

Who splits the data under distributed training:
- folder/builtin: map-style :class:`ImageFolderDataset`; pass its DataLoader through
  ``accelerator.prepare``, which shards the batches across processes.
- shards: webdataset splits whole shards by rank (``split_by_node``) and by worker itself; do NOT
  pass its DataLoader through ``accelerator.prepare`` (splitting twice silently
  dropped a rank's shards in our 2-process test) and move its batches to the device yourself.

Decoding and the train/eval transforms are in :mod:`kl_ae.images` (re-exported here). Shard
samples without an image member are skipped with the reason no_image_member.
"""

from __future__ import annotations

import logging
import os
import random
from functools import partial
from glob import glob
from importlib.util import find_spec
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import braceexpand
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler
from tqdm.auto import tqdm

from kl_ae.config import DataConfig
from kl_ae.images import DataError, SkipCounter, decode, train_transform  # noqa: F401 (re-exported)
from kl_ae.images import eval_transform, resize_short_side, to_rgb, to_tensor  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
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


def _record(img: Image.Image | None, reason: str | None, name: str, resolution: int,
            random_flip: bool, short_side_range: Sequence[int] | None = None) -> dict:
    """A training sample ``{"pixel_values": (3, R, R), "upscaled", "name"}`` or a skip record."""
    if img is None:
        return {"pixel_values": None, "skip_reason": reason, "name": name}
    pixels, upscaled = train_transform(img, resolution, random_flip, short_side_range=short_side_range)
    return {"pixel_values": pixels, "upscaled": upscaled, "name": name}


def collate(samples: Iterable[dict | None], resolution: int | None = None) -> dict:
    """Batch samples -> ``{"pixel_values": (B, 3, R, R) float32 in [-1, 1], "num_upscaled": int,
    "num_skipped": int, "skip_reasons": {reason: count}}``. Skip records (and None, reason
    "unknown") are dropped and counted, so B can be below the batch size; all skipped gives an
    empty (0, 3, R, R) tensor (R = ``resolution``, 0 if not given)."""
    skipped, pixels, upscaled = SkipCounter(), [], 0
    for sample in samples:
        if sample is None or sample.get("pixel_values") is None:
            skipped.add((sample or {}).get("skip_reason") or "unknown")
            continue
        pixels.append(sample["pixel_values"])
        upscaled += bool(sample.get("upscaled", False))
    r = resolution or 0
    batch = torch.stack(pixels) if pixels else torch.empty(0, 3, r, r)
    return {"pixel_values": batch, "num_upscaled": upscaled, "num_skipped": skipped.total,
            "skip_reasons": skipped.as_dict()}


class ImageFolderDataset(Dataset):
    """Map-style training set: item i -> ``{"pixel_values": (3, R, R) float32 in [-1, 1],
    "upscaled": bool, "name": str}``, or for an undecodable file ``{"pixel_values": None,
    "skip_reason": str, "name": str}`` (a record, not None, so the reason survives worker
    processes), which :func:`collate` counts. ``name``: path relative to ``root`` if given."""

    def __init__(self, files: Iterable[str | Path], resolution: int, random_flip: bool = True,
                 root: str | Path | None = None, short_side_range: Sequence[int] | None = None):
        self.files = [Path(f) for f in files]
        self.resolution, self.random_flip = resolution, random_flip
        self.short_side_range = short_side_range
        self.root = Path(root) if root is not None else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        name = path.relative_to(self.root).as_posix() if self.root else str(path)
        img, reason = decode(path, _draft_size(self.short_side_range))
        return _record(img, reason, name, self.resolution, self.random_flip, self.short_side_range)


def _draft_size(short_side_range: Sequence[int] | None) -> int | None:
    """Training images are downscaled to at most the range's top: decode JPEGs no larger."""
    return int(short_side_range[-1]) if short_side_range else None


def _decode_sample(sample: dict, draft_short_side: int | None = None) -> tuple[Image.Image | None, str | None]:
    """Decode a webdataset sample's first member with an image extension."""
    for key, value in sample.items():
        if not key.startswith("__") and key.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
            return decode(value, draft_short_side)
    return None, "no_image_member"


def _shard_record(sample: dict, resolution: int, random_flip: bool,
                  short_side_range: Sequence[int] | None = None) -> dict:
    return _record(*_decode_sample(sample, _draft_size(short_side_range)), sample.get("__key__", "?"),
                   resolution, random_flip, short_side_range)


def _warn_and_continue(exn: Exception) -> bool:
    """webdataset handler: log a corrupted tar stream / sample and go on (no sleep, unlike wds')."""
    logger.warning("webdataset: skipping after error: %r", exn)
    return True


def _buffer_shuffle(src: Iterator, bufsize: int) -> Iterator:
    """Shuffle a stream through a ``bufsize`` buffer, seeded from torch's RNG at each pass
    (so per-worker DataLoader seeding, and the trainer's seed, govern it)."""
    rng = random.Random(int(torch.randint(2**62, (1,))))
    buf: list = []
    for sample in src:
        if len(buf) < bufsize:
            buf.append(sample)
            continue
        i = rng.randrange(bufsize)
        yield buf[i]
        buf[i] = sample
    rng.shuffle(buf)
    yield from buf


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
    files = []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [Path(dirpath, f) for f in filenames if not f.startswith(".") and "." in f
                  and f.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS]
    if not files:
        raise DataError(f"{spec!r}: folder has no images (searched recursively for "
                        f"{', '.join(IMAGE_EXTENSIONS)}, any case)")
    return path, sorted(files, key=lambda f: f.relative_to(path).as_posix())


def list_image_files(spec_or_folder: str | Path) -> list[Path]:
    """Sorted image files of a folder (recursive), one image file or ``builtin:<set>``. Raises
    DataError for a missing path, a folder without images, an unknown builtin set or shards."""
    return _resolve_files(str(spec_or_folder))[1]


def sample_key(relative_path: str) -> str:
    """webdataset ``__key__`` of a file: its relative path with ``%`` -> ``%25`` and ``.`` ->
    ``%2E`` (webdataset splits keys at dots; the escape keeps distinct paths distinct)."""
    return relative_path.replace("%", "%25").replace(".", "%2E")


def iter_images(spec: str, counter: SkipCounter | None = None) -> Iterator[tuple[str, Image.Image]]:
    """``(name, RGB PIL image)`` for every decodable image, in a fixed order: sorted relative
    paths (folder; file names for builtin sets) or shard order with ``__key__`` as name (never
    split by rank or worker: every caller sees every image). Undecodable images are logged and
    counted in ``counter``. Raises DataError for an unusable source."""
    for _, name, img in iter_indexed_images(spec, counter):
        yield name, img


def iter_indexed_images(spec: str, counter: SkipCounter | None = None, *, limit: int | None = None,
                        shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[int, str, Image.Image]]:
    """Like :func:`iter_images` with the position of each item in the fixed order, for
    multi-process evaluation: process ``shard = (index, count)`` decodes only items
    ``i % count == index`` among the first ``limit`` items, so ranks see disjoint sets that
    together cover every item once. Undecodable items are counted by the rank that owns them."""
    counter = counter if counter is not None else SkipCounter()
    index, count = shard
    if is_shard_source(spec):  # every sample once, in shard order, not split, not shuffled
        shards = wds.WebDataset(expand_shards(spec), shardshuffle=False, nodesplitter=None,
                                workersplitter=None, empty_check=False, handler=_warn_and_continue)
        items: Iterable = ((s.get("__key__", "?"), partial(_decode_sample, s)) for s in shards)
    else:
        root, files = _resolve_files(spec)
        items = ((f.relative_to(root).as_posix(), partial(decode, f)) for f in files)
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


def _shard_train_dataset(cfg: DataConfig, seed: int) -> wds.WebDataset:
    urls = expand_shards(cfg.train)
    _, world_size, _, _ = wds.utils.pytorch_worker_info()  # the rank info split_by_node uses
    if len(urls) < world_size:
        raise DataError(f"{cfg.train!r}: {len(urls)} shard(s) for {world_size} processes; "
                        f"webdataset gives each process whole shards, so at least {world_size} "
                        "are needed (an empty rank would hang DDP); repack with a smaller "
                        "pack_shards(max_count=...)")
    per_rank = len(urls) // world_size
    if cfg.num_workers > per_rank:
        logger.warning("%d shards per process for %d DataLoader workers: %d workers will idle",
                       per_rank, cfg.num_workers, cfg.num_workers - per_rank)
    ds = wds.WebDataset(urls, shardshuffle=len(urls), detshuffle=True, seed=seed,
                        nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
                        empty_check=False, handler=_warn_and_continue)
    if cfg.shuffle_buffer > 1:
        ds = ds.compose(partial(_buffer_shuffle, bufsize=cfg.shuffle_buffer))
    decode = partial(_shard_record, resolution=cfg.resolution, random_flip=cfg.random_flip,
                     short_side_range=cfg.short_side_range)
    return ds.map(decode, handler=_warn_and_continue)


def build_train_dataset(cfg: DataConfig, seed: int = 0) -> Dataset | IterableDataset:
    """Training set of ``cfg.train`` (samples as in :class:`ImageFolderDataset`).

    Folder/builtin: map-style :class:`ImageFolderDataset`. Shards: a ``wds.WebDataset``
    IterableDataset of one epoch per iteration: shards split by rank and worker, their order
    shuffled from ``seed`` + epoch, samples through a ``cfg.shuffle_buffer`` buffer of raw file
    bytes (memory: buffer × mean file size × workers). Raises DataError for an unusable source
    or fewer shards than processes."""
    try:
        if is_shard_source(cfg.train):
            return _shard_train_dataset(cfg, seed)
        root, files = _resolve_files(cfg.train)
    except DataError as err:
        raise DataError(f"data.train: {err}") from None
    logger.info("data.train=%s: %d images", cfg.train, len(files))
    return ImageFolderDataset(files, cfg.resolution, cfg.random_flip, root=root,
                              short_side_range=cfg.short_side_range)


def _seed_worker(worker_id: int) -> None:
    """Offset worker seeds by rank: the generator shared by all ranks (Accelerate's sharding
    needs one permutation) would give every rank the same crops."""
    rank = wds.utils.pytorch_worker_info()[0]
    if rank:
        torch.manual_seed((torch.initial_seed() + 1_000_003 * rank) % 2**63)


def build_train_dataloader(cfg: DataConfig, batch_size: int, seed: int = 0) -> DataLoader:
    """DataLoader of :func:`collate` batches (``pixel_values``: (B, 3, R, R), B <= batch_size).

    Folder/builtin: ends after each epoch; shuffled by a generator seeded with ``seed`` (same on
    every rank), ``drop_last``, at least ``batch_size`` samples per epoch (a smaller set is drawn
    repeatedly, fresh crops each time); pass it through ``accelerator.prepare``. Shards: endless
    (each worker re-reads its shards, reshuffled), so ranks with unequal shards never run dry at
    different times; iterate it by steps, NOT through ``accelerator.prepare``."""
    dataset = build_train_dataset(cfg, seed)
    kwargs = dict(batch_size=batch_size, num_workers=cfg.num_workers,
                  collate_fn=partial(collate, resolution=cfg.resolution),
                  persistent_workers=cfg.num_workers > 0, pin_memory=torch.cuda.is_available(),
                  worker_init_fn=_seed_worker)
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset.repeat(), **kwargs)
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, num_samples=max(len(dataset), batch_size), generator=generator)
    return DataLoader(dataset, sampler=sampler, drop_last=True, generator=generator, **kwargs)


def pack_shards(src: str | Path, out_dir: str | Path, max_count: int = 1000,
                max_size: int = 512 * 2**20) -> dict:
    """Pack a folder / builtin set into ``out_dir/shard-000000.tar``, ... (webdataset).

    A sample holds the original file bytes under the lower-case extension (jpeg -> jpg) and
    ``__key__ = sample_key(relative path)``; images that do not decode are skipped and counted.
    A shard closes at ``max_count`` samples or ``max_size`` bytes. Returns ``{"pattern":
    "<out_dir>/shard-{000000..00000N}.tar", "num_shards", "num_samples", "skipped": {reason:
    count}}``. Raises DataError if ``out_dir`` has shard-*.tar files or nothing decodes."""
    root, files = _resolve_files(str(src))
    out = Path(out_dir)
    if out.is_dir() and any(out.glob("shard-*.tar")):
        raise DataError(f"{str(out)!r} already contains shard-*.tar files; use an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    skipped, writer, num_samples = SkipCounter(), None, 0
    try:
        for path in tqdm(files, desc=f"packing {src}", unit="img"):
            name = path.relative_to(root).as_posix()
            try:
                data = path.read_bytes()
            except OSError:
                data = None
            img, reason = decode(data) if data is not None else (None, "unreadable")
            if img is None:
                skipped.add(reason)
                logger.warning("not packing %s: %s", name, reason)
                continue
            if writer is None:
                writer = wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=max_count,
                                         maxsize=max_size, verbose=0)
            ext = path.suffix[1:].lower()
            writer.write({"__key__": sample_key(name), "jpg" if ext == "jpeg" else ext: data})
            num_samples += 1
    finally:
        if writer is not None:
            writer.close()
    if num_samples == 0:
        raise DataError(f"{src}: none of {len(files)} images could be decoded ({skipped.summary()})")
    num_shards = len(list(out.glob("shard-*.tar")))
    logger.info("packed %d images into %d shards in %s; %s", num_samples, num_shards, out,
                skipped.summary())
    return {"pattern": f"{out}/shard-{{000000..{num_shards - 1:06d}}}.tar", "num_shards": num_shards,
            "num_samples": num_samples, "skipped": skipped.as_dict()}
