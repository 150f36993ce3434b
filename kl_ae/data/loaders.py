"""Training data loaders over image folders, webdataset shards and the built-in sample set.

Sources (folders, shards, builtin sets) are resolved and iterated in :mod:`kl_ae.data.sources`.

Who splits the data under distributed training:
- folder/builtin: map-style :class:`ImageFolderDataset`; pass its DataLoader through
  ``accelerator.prepare``, which shards the batches across processes.
- shards: webdataset splits whole shards by rank (``split_by_node``) and by worker itself; do NOT
  pass its DataLoader through ``accelerator.prepare`` (splitting twice silently dropped a rank's
  shards in our 2-process test) and move its batches to the device yourself.

The order of a folder's samples is in :mod:`kl_ae.data.samplers`. Decoding and the train/eval
transforms are in :mod:`kl_ae.data.images`, dead leaves in
:mod:`kl_ae.data.synthetic`. Shard samples without an image member are skipped (no_image_member).
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

from kl_ae.config import DataConfig
from kl_ae.interrupt import ignore_in_worker
from kl_ae.data.images import (
    PILLOW_MAX_IMAGE_PIXELS, DataError, SkipCounter, decode, sample_generator, train_transform,
)
from kl_ae.data.sources import ImageSource, decode_shard_sample, image_source, warn_and_continue
from kl_ae.data.samplers import EndlessEpochs, EpochSampler
from kl_ae.data.shards import ShardPasses, StreamPosition
from kl_ae.data.synthetic import (
    MAX_DISTINCT, DeadLeavesStream, dead_leaves_count, dead_leaves_files, with_dead_leaves,
)

logger = logging.getLogger(__name__)


def _record(img: Image.Image | None, reason: str | None, name: str, resolution: int,
            random_flip: bool, short_side_range: Sequence[int] | None = None,
            generator: torch.Generator | None = None) -> dict:
    """A training sample ``{"pixel_values": (3, R, R), "upscaled", "name"}`` or a skip record."""
    if img is None:
        return {"pixel_values": None, "skip_reason": reason, "name": name}
    pixels, upscaled = train_transform(img, resolution, random_flip, generator=generator,
                                       short_side_range=short_side_range)
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
    processes), which :func:`collate` counts. ``name``: path relative to ``root`` if given.

    An index ``k >= len(self)`` (from :class:`EpochSampler`) means file ``k % len``; the crop
    and flip are drawn from ``sample_generator(seed, k)``, so distinct indices of one file give
    distinct crops.

    decode_cache_mb > 0 keeps decoded images (as :func:`decode` returns them, so crops are
    bit-identical to uncached ones) in this process, up to that many MiB of pixels, first come
    first kept: a small training set is decoded once per worker instead of once per crop
    (decoding a multi-MP photo costs more than a CPU training step on a 64-px crop of it).
    """

    def __init__(self, files: Iterable[str | Path], resolution: int, random_flip: bool = True,
                 root: str | Path | None = None, short_side_range: Sequence[int] | None = None,
                 seed: int = 0, decode_cache_mb: int = 0, max_image_pixels: int = PILLOW_MAX_IMAGE_PIXELS):
        self.seed, self.max_image_pixels = seed, max_image_pixels
        self.files = [Path(f) for f in files]
        self.resolution, self.random_flip = resolution, random_flip
        self.short_side_range = short_side_range
        self.root = Path(root) if root is not None else None
        self.cache_budget = decode_cache_mb * 2**20
        self._cache: dict[int, Image.Image] = {}
        self._cached_bytes = 0

    def _decode(self, i: int) -> tuple[Image.Image | None, str | None]:
        if i in self._cache:
            return self._cache[i], None
        img, reason = decode(self.files[i], _draft_size(self.short_side_range), self.max_image_pixels)
        if img is not None and self.cache_budget:
            size = img.width * img.height * len(img.getbands())
            if self._cached_bytes + size <= self.cache_budget:
                self._cache[i] = img
                self._cached_bytes += size
        return img, reason

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path = self.files[index % len(self.files)]
        name = path.relative_to(self.root).as_posix() if self.root and path.is_relative_to(self.root) else str(path)
        img, reason = self._decode(index % len(self.files))
        return _record(img, reason, name, self.resolution, self.random_flip, self.short_side_range,
                       sample_generator(self.seed, index))


def _draft_size(short_side_range: Sequence[int] | None) -> int | None:
    """Training images are downscaled to at most the range's top: decode JPEGs no larger."""
    return int(short_side_range[-1]) if short_side_range else None


def _shard_record(sample: dict, resolution: int, random_flip: bool,
                  short_side_range: Sequence[int] | None = None, max_image_pixels: int = PILLOW_MAX_IMAGE_PIXELS) -> dict:
    generator = sample_generator(*sample["__position__"]) if "__position__" in sample else None
    return _record(*decode_shard_sample(sample, _draft_size(short_side_range), max_image_pixels),
                   sample.get("__key__", "?"), resolution, random_flip, short_side_range, generator)


def _shard_train_dataset(cfg: DataConfig, source: ImageSource, seed: int, position: StreamPosition | None = None,
                         dead_leaves: list[Path] = ()) -> wds.WebDataset:
    urls = list(source.urls)
    _, world_size, _, _ = wds.utils.pytorch_worker_info()  # the rank info split_by_node uses
    if len(urls) < world_size:
        raise DataError(f"{cfg.train!r}: {len(urls)} shard(s) for {world_size} processes; "
                        f"webdataset gives each process whole shards, so at least {world_size} "
                        "are needed (an empty rank would hang DDP); repack with a smaller "
                        "`kl-ae shards --max-count N`")
    per_rank = len(urls) // world_size
    if cfg.num_workers > per_rank:
        logger.warning("%d shards per process for %d DataLoader workers: %d workers will idle",
                       per_rank, cfg.num_workers, cfg.num_workers - per_rank)
    position = position or StreamPosition(seed, 1)
    ds = wds.WebDataset(urls, shardshuffle=len(urls), detshuffle=True, seed=seed,
                        nodesplitter=wds.split_by_node, workersplitter=position.split,
                        empty_check=False, handler=warn_and_continue)
    if cfg.shuffle_buffer > 1:
        ds = ds.compose(partial(position.shuffle, bufsize=cfg.shuffle_buffer))
    if dead_leaves:  # before the position, which skips and seeds them like shard samples
        ds = ds.compose(DeadLeavesStream(dead_leaves, cfg.dead_leaves_fraction, position))
    ds = ds.compose(position)
    decode = partial(_shard_record, resolution=cfg.resolution, random_flip=cfg.random_flip,
                     short_side_range=cfg.short_side_range, max_image_pixels=cfg.max_image_pixels)
    return ds.map(decode, handler=warn_and_continue)


def _dead_leaves_size(cfg: DataConfig) -> int:
    """The side of the dead-leaves images ``cfg`` crops: its largest crop or resize, so none is upscaled."""
    return max([cfg.resolution, *cfg.short_side_range])


def _dead_leaves_files(cfg: DataConfig, source: ImageSource) -> list[Path]:
    """The distinct dead-leaves files ``cfg`` trains on with ``source``, written where missing: all
    MAX_DISTINCT for shards (a stream of unknown length), a folder's share otherwise; none at fraction 0."""
    if not cfg.dead_leaves_fraction:
        return []
    count = MAX_DISTINCT if source.shards else dead_leaves_count(len(source.files), cfg.dead_leaves_fraction)
    return dead_leaves_files(count, _dead_leaves_size(cfg))


def _train_source(cfg: DataConfig) -> ImageSource:
    """``cfg.train`` parsed; its DataError says it is about data.train."""
    try:
        return image_source(cfg.train)
    except DataError as err:
        raise DataError(f"data.train: {err}") from None


def build_train_dataset(cfg: DataConfig, seed: int = 0, position: StreamPosition | None = None,
                        source: ImageSource | None = None) -> Dataset | IterableDataset:
    """Training set of ``cfg.train`` (or of ``source``, its parsed form; samples as in :class:`ImageFolderDataset`).

    Folder/builtin: map-style :class:`ImageFolderDataset`. Shards: a ``wds.WebDataset`` IterableDataset of one epoch
    per iteration: shards split by rank and worker, their order shuffled from ``seed`` + epoch, samples through a
    ``cfg.shuffle_buffer`` buffer of raw file bytes (memory: buffer × mean file size × workers). Both with
    ``cfg.dead_leaves_fraction``'s synthetic images. Raises DataError for an unusable source or too few shards."""
    source = source or _train_source(cfg)
    if source.shards:
        dead_leaves = _dead_leaves_files(cfg, source)  # DataError about the cache, not data.train
        try:
            return _shard_train_dataset(cfg, source, seed, position, dead_leaves)
        except DataError as err:
            raise DataError(f"data.train: {err}") from None
    files = with_dead_leaves(list(source.files), cfg.dead_leaves_fraction, _dead_leaves_size(cfg))
    logger.info("data.train=%s: %d images, %d dead leaves", source.spec, len(source.files), len(files) - len(source.files))
    return ImageFolderDataset(files, cfg.resolution, cfg.random_flip, root=source.root,
                              short_side_range=cfg.short_side_range, seed=seed, decode_cache_mb=cfg.decode_cache_mb,
                              max_image_pixels=cfg.max_image_pixels)


class TrainLoader:
    """The training batches of one data source and resolution, and their position.

    Iterating it never ends. A folder gives epoch after epoch in one DataLoader pass
    (:class:`EndlessEpochs`; each epoch shuffled by ``seed`` and the epoch, the same on every rank,
    :attr:`batches_per_epoch` batches per process, at least one: a set smaller than a batch on every
    process is drawn repeatedly, fresh crops each time). Shards: each worker re-reads its shards,
    reshuffled, so ranks with unequal shards never run dry at different times; their ``epoch``
    stays 0. Items are :func:`collate` batches (``pixel_values``: (B, 3, R, R) in [-1, 1], B <=
    batch_size). :meth:`state_dict` is the position, ``{"epoch", "batches_in_epoch"}`` (batches
    drawn by this process, empty ones included; an epoch's last batch moves it to the next epoch);
    :meth:`load_state_dict` before a pass continues there (folders skip the consumed samples in the
    sampler; shards read them again, without decoding them). A new pass after one left off
    continues at the position too (batches the workers had fetched ahead are fetched again).
    Raises DataError at construction for an unusable source.
    """

    def __init__(self, cfg: DataConfig, batch_size: int, seed: int = 0, source: ImageSource | None = None):
        self.source = source or _train_source(cfg)  # source: cfg.train already parsed
        self.batch_size = batch_size
        self.epoch = self.batches_in_epoch = 0
        self._processes = 1
        self._position = StreamPosition(seed, batch_size) if self.source.shards else None
        dataset = build_train_dataset(cfg, seed, self._position, self.source)
        kwargs = dict(batch_size=batch_size, num_workers=cfg.num_workers,
                      collate_fn=partial(collate, resolution=cfg.resolution),
                      persistent_workers=cfg.num_workers > 0, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=ignore_in_worker if cfg.num_workers > 0 else None)
        # The loader's own generator draws the workers' base seed, so it does not depend on (or
        # consume) the global RNG that the training step's posterior sampling uses.
        generator = torch.Generator().manual_seed(seed)
        self._sampler, self.batches_per_epoch = None, 0
        if isinstance(dataset, IterableDataset):
            self._loader = DataLoader(ShardPasses(dataset, self._position), generator=generator, **kwargs)
        else:
            self._sampler = EndlessEpochs(EpochSampler(len(dataset), 0, seed), 0)
            self._epoch_layout()
            self._loader = DataLoader(dataset, sampler=self._sampler, drop_last=True, generator=generator, **kwargs)

    def _epoch_layout(self) -> None:
        """A folder's epoch for ``self._processes`` processes: every file once (repeated up to a
        batch on every process), cut to whole rounds of one batch per process."""
        per_round = self.batch_size * self._processes
        epochs = self._sampler.epochs
        epochs.num_samples = max(epochs.n, per_round)
        self.batches_per_epoch = epochs.num_samples // per_round
        self._sampler.per_epoch = self.batches_per_epoch * per_round

    def prepare(self, accelerator) -> "TrainLoader":
        """Under Accelerate: a folder's loader goes through ``accelerator.prepare``, which splits
        its batches across processes; a shard loader does not (webdataset splits the shards by
        rank itself; splitting twice silently dropped a rank's shards). Returns self."""
        self._processes = accelerator.num_processes
        if not self.source.shards:
            self._epoch_layout()
            self._loader = accelerator.prepare(self._loader)
        return self

    def close(self) -> None:
        """Stop the DataLoader's workers now, not when an exception's frames let go of their
        iterator (kl_ae.interrupt: they outlive SIGTERM). torch has no public call for it: this
        shuts down the loader's kept iterator (DataLoader._iterator)."""
        loader = getattr(self._loader, "base_dataloader", self._loader)  # Accelerate's DataLoaderShard wraps one
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            loader._iterator = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue at ``state`` (from :meth:`state_dict`); call after :meth:`prepare` and
        before the first pass."""
        self.epoch, self.batches_in_epoch = int(state["epoch"]), int(state["batches_in_epoch"])
        if self._position is not None:
            self._position.batches = self.batches_in_epoch
        else:  # a checkpoint taken at an epoch's end by an earlier kl-ae: (epoch, all its batches)
            self.epoch += self.batches_in_epoch // self.batches_per_epoch
            self.batches_in_epoch %= self.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        if self._sampler is not None:
            self._sampler.resume_at(self.epoch, self.batches_in_epoch * self._processes * self.batch_size)
        if hasattr(self._loader, "set_epoch"):  # Accelerate's prepared loader keeps its own count
            self._loader.set_epoch(self.epoch)
        for batch in self._loader:
            self.batches_in_epoch += 1
            if self.batches_in_epoch == self.batches_per_epoch:  # never for shards (0)
                self.epoch, self.batches_in_epoch = self.epoch + 1, 0
            yield batch


class TrainBatches:
    """The pixel batches of a whole run: crops of data.resolution, then, once the caller's
    ``first_phase_over()`` says so, the resolution schedule's final phase (data.final_resolution,
    :func:`final_phase_data`) from a new :class:`TrainLoader` seeded ``seed + 1``.

    :meth:`state_dict` (``{"phase", "epoch", "batches_in_epoch"}``) and :meth:`load_state_dict`
    make a run resumable in either phase. ``crops``, ``upscaled`` and ``skipped`` count, over both
    phases, this process's training crops, those from images upscaled to the crop size, and
    unusable images by reason.
    """

    def __init__(self, cfg: DataConfig, batch_size: int, seed: int = 0):
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.phase, self.crops, self.upscaled, self.skipped = 0, 0, 0, SkipCounter()
        self.loader = TrainLoader(cfg, batch_size, seed)
        self._loaders = [self.loader]  # every phase's, for close()
        if cfg.final_resolution:  # the final phase's dead-leaves files now, not in the timed loop
            _dead_leaves_files(final_phase_data(cfg, batch_size)[0], self.loader.source)
        self._accelerator = None

    def _enter_phase(self, phase: int) -> None:
        if phase and not self.cfg.final_resolution:
            raise DataError("this run is in the resolution schedule's final phase (a checkpoint of it), but "
                            "data.final_resolution is 0 now; set it as the run had it")
        self.phase = phase
        data, batch_size = final_phase_data(self.cfg, self.batch_size) if phase else (self.cfg, self.batch_size)
        logger.info("resolution schedule, phase %d: %d-px crops, batch %d per process, short side %s", phase,
                    data.resolution, batch_size, data.short_side_range or "native")
        # The first phase's workers stay alive until the run ends (persistent workers, each with
        # its decode cache): a DataLoader has no public way to stop them early.
        self.loader = TrainLoader(data, batch_size, self.seed + phase, source=self.loader.source)
        self._loaders.append(self.loader)
        if self._accelerator is not None:
            self.loader.prepare(self._accelerator)

    @property
    def resolution(self) -> int:
        """The crop size of the current phase."""
        return self.cfg.final_resolution if self.phase else self.cfg.resolution

    def prepare(self, accelerator) -> "TrainBatches":
        self._accelerator = accelerator
        self.loader.prepare(accelerator)
        return self

    def close(self) -> None:
        """Stop every phase's DataLoader workers (TrainLoader.close); the run is over."""
        for loader in self._loaders:
            loader.close()

    def state_dict(self) -> dict:
        return {"phase": self.phase, **self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("phase", 0) != self.phase:
            self._enter_phase(state["phase"])
        self.loader.load_state_dict(state)

    def _pixels(self) -> Iterator[torch.Tensor]:
        """(B, 3, R, R) batches of the current loader; empty batches (every image unusable) are
        skipped. Raises DataError after a whole epoch (a folder's) or a whole pass (shards: the
        pass ends when every worker has stopped, :class:`ShardPasses`) without a usable image."""
        while True:  # a folder's loader never ends; a shard loader's does when its workers stop
            epoch, usable = self.loader.epoch, self.loader.batches_in_epoch  # resumed mid-epoch: those before
            for batch in self.loader:
                self.upscaled += int(batch["num_upscaled"])
                self.crops += int(batch["pixel_values"].shape[0])
                for reason, n in batch["skip_reasons"].items():
                    self.skipped.add(reason, n)
                if batch["pixel_values"].shape[0]:
                    usable += 1
                    yield batch["pixel_values"]
                if self.loader.epoch != epoch:  # that batch was its epoch's last
                    if usable == 0:
                        break
                    epoch, usable = self.loader.epoch, 0
            if usable == 0:
                raise DataError(f"no usable training image in a whole epoch: {self.skipped.summary()}")

    def batches(self, first_phase_over: Callable[[], bool]) -> Iterator[torch.Tensor]:
        """Pixel batches forever; ``first_phase_over`` is asked before each batch of the first
        phase (the batch drawn when it turns true is dropped: the next step is a final-phase one)."""
        if self.phase == 0:
            for x in self._pixels():
                if first_phase_over():
                    break
                yield x
            self._enter_phase(1)
        yield from self._pixels()


def final_phase_data(cfg: DataConfig, batch_size: int) -> tuple[DataConfig, int]:
    """The data settings and batch size of the resolution schedule's final phase
    (``data.final_resolution``; see DataConfig): crops of final_resolution from images resized
    into final_short_side_range (empty: short_side_range), final_batch_size images a batch (0:
    as many pixels per batch as the first phase, at least one image)."""
    r = cfg.final_resolution
    batch = cfg.final_batch_size or max(1, round(batch_size * (cfg.resolution / r) ** 2))
    short_side = list(cfg.final_short_side_range or cfg.short_side_range)
    return dataclasses.replace(cfg, resolution=r, short_side_range=short_side), batch
