"""``kl-ae shards``: pack a folder of images into webdataset shards (original bytes, checked)."""

from __future__ import annotations

import logging
from pathlib import Path

import webdataset as wds
from tqdm.auto import tqdm

from kl_ae.data.sources import image_source, list_image_files, sample_key
from kl_ae.data.images import PILLOW_MAX_IMAGE_PIXELS, DataError, SkipCounter, decode

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
