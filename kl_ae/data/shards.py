"""Webdataset shards: ``kl-ae shards`` packs a folder of images into them (original bytes, checked);
:class:`StreamPosition` and :class:`ShardPasses` make a training stream over them resumable."""

from __future__ import annotations

import itertools
import logging
import random
from pathlib import Path
from typing import Iterable, Iterator

import torch
import webdataset as wds
from torch.utils.data import IterableDataset
from tqdm.auto import tqdm

from kl_ae.data.sources import image_source, list_image_files, sample_key
from kl_ae.data.images import PILLOW_MAX_IMAGE_PIXELS, DataError, SkipCounter, decode, sample_generator

logger = logging.getLogger(__name__)


def pack_shards(src: str | Path, out_dir: str | Path, max_count: int = 1000,
                max_size: int = 512 * 2**20, max_image_pixels: int = PILLOW_MAX_IMAGE_PIXELS) -> dict:
    """Pack a folder / builtin set into ``out_dir/shard-000000.tar``, ... (webdataset).

    A sample holds the original file bytes under the lower-case extension (jpeg -> jpg) and
    ``__key__ = sample_key(relative path)``; images that do not decode are skipped and counted.
    A shard closes at ``max_count`` samples or ``max_size`` bytes. Returns ``{"pattern":
    "<out_dir>/shard-{000000..00000N}.tar", "num_shards", "num_samples", "skipped": {reason:
    count}}``. Images above ``max_image_pixels`` are skipped as decompression_bomb (0: no limit).
    Raises DataError if ``out_dir`` has shard-*.tar files or nothing decodes."""
    source = image_source(src)
    root, files = source.root, list_image_files(source)  # DataError for shards
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
            img, reason = decode(data, max_pixels=max_image_pixels) if data is not None else (None, "unreadable")
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


class StreamPosition:
    """The per-worker streams of a shard DataLoader, made resumable.

    Batch j of an IterableDataset DataLoader comes from worker j % W, each batch of
    ``batch_size`` raw samples. A DataLoader created to resume after ``batches`` batches starts
    again at worker 0, so its worker p plays *logical* worker (p + batches) % W of the
    original run: it reads that worker's shards (:meth:`split`), shuffles with that worker's
    seeds (:meth:`shuffle`) and skips the samples that worker had produced, without decoding
    them (:meth:`__call__`). Augmentation is seeded per sample position, so the resumed stream
    is the original one. Set :attr:`batches` before the DataLoader's workers start.
    """

    def __init__(self, seed: int, batch_size: int):
        self.seed, self.batch_size, self.batches = seed, batch_size, 0
        self.read = 0  # samples this worker copy has read, skipped ones included, over all passes
        self.resume_skipped = 0  # of them, skipped because a resumed run had produced them
        self._passes = 0

    def _worker(self) -> tuple[int, int, int]:
        """(rank, logical worker, number of workers >= 1)."""
        rank, _, worker, num_workers = wds.utils.pytorch_worker_info()
        workers = max(num_workers, 1)
        return rank, (worker + self.batches) % workers, workers

    def stream(self) -> tuple[int, int]:
        """(this logical worker's index over every rank's workers, their number)."""
        rank, world_size, _, _ = wds.utils.pytorch_worker_info()
        _, logical, workers = self._worker()
        return rank * workers + logical, max(world_size, 1) * workers

    def split(self, urls: Iterable) -> Iterator:
        """workersplitter: the shards of this logical worker."""
        _, logical, workers = self._worker()
        return itertools.islice(urls, logical, None, workers)

    def shuffle(self, src: Iterator, bufsize: int) -> Iterator:
        """The sample buffer shuffle, seeded by (seed, rank, logical worker, pass)."""
        rank, logical, _ = self._worker()
        seed = int(torch.randint(2**62, (1,), generator=sample_generator(self.seed, rank, logical, self._passes)))
        self._passes += 1
        return _buffer_shuffle(src, bufsize, seed)

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        rank, logical, workers = self._worker()
        skip = max(0, -(-(self.batches - logical) // workers)) * self.batch_size  # j < batches, j % W == logical
        for sample in src:  # called again for every pass over the shards: the count goes on
            i, self.read = self.read, self.read + 1
            if i < skip:
                self.resume_skipped += 1
                continue
            yield {**sample, "__position__": (self.seed, rank, logical, i)}  # seeds its augmentation


def _buffer_shuffle(src: Iterator, bufsize: int, seed: int | None = None) -> Iterator:
    """Shuffle a stream through a ``bufsize`` buffer, seeded by ``seed`` (default: drawn from torch's RNG each pass)."""
    rng = random.Random(int(torch.randint(2**62, (1,))) if seed is None else seed)
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


class ShardPasses(IterableDataset):
    """A shard dataset's passes (``dataset``, a WebDataset ending in ``position``), one after
    another without end: what a shard DataLoader iterates.

    Written here, not ``WebDataset.repeat()``, because that stops after a pass that yields no
    sample, and a resumed worker's first passes yield none when its :class:`StreamPosition` skips
    them whole: a run resumed after more than one pass over its shards lost the stream's order or
    stopped with "no usable training image". This stops after a pass that read no sample at all
    (no shard with a sample), as ``repeat()`` meant to, and after a whole pass (none of it skipped
    for a resume) that read samples but decoded none: decoding gives the same result every pass,
    so going on would yield empty batches for good. A loader whose workers all stop ends its pass
    without a usable batch, and :class:`kl_ae.data.loaders.TrainBatches` raises DataError; a
    worker that stops while others go on leaves its shards out (logged), and as the loader then
    no longer takes batches from its workers in turn, resuming such a run does not replay the
    stream exactly (:class:`StreamPosition` assumes the turns)."""

    def __init__(self, dataset: IterableDataset, position: StreamPosition):
        self.dataset, self.position = dataset, position

    def __iter__(self) -> Iterator[dict]:
        while True:
            read, resume_skipped, usable = self.position.read, self.position.resume_skipped, False
            for record in self.dataset:
                usable = usable or record.get("pixel_values") is not None
                yield record
            if self.position.read == read:
                return
            if not usable and self.position.resume_skipped == resume_skipped:
                logger.warning("a whole pass over this loader worker's shards read %d samples and decoded no "
                               "image; the worker stops (its skip reasons are in the run's skip counts). Other "
                               "workers go on without its shards, and a resume of this run no longer replays "
                               "their order exactly: fix or remove those shards", self.position.read - read)
                return
