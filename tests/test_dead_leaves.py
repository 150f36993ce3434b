"""kl_ae.data.synthetic and data.dead_leaves_fraction: the images, their cache, their share of the set."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from kl_ae.config import DataConfig, load_config
from kl_ae.data import loaders as D
from kl_ae.data import synthetic
from kl_ae.data.images import DataError
from kl_ae.parsing import ConfigError


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(synthetic, "DISKS", 300)  # fewer disks: the same model, drawn faster
    return tmp_path / "cache"


def test_a_dead_leaves_image_is_flat_regions_of_many_colours_and_fixed_by_its_seed():
    img = synthetic.dead_leaves(np.random.default_rng(0), size=96)
    assert img.mode == "RGB" and img.size == (96, 96)
    pixels = np.asarray(img).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    assert len(colours) > 50  # many disks of their own colours (and anti-aliased edges)
    assert (counts >= 20).sum() >= 10  # ... of which many are flat regions, not noise
    assert np.array_equal(np.asarray(synthetic.dead_leaves(np.random.default_rng(0), size=96)), np.asarray(img))
    assert not np.array_equal(np.asarray(synthetic.dead_leaves(np.random.default_rng(1), size=96)), np.asarray(img))


def test_radii_have_density_r_to_the_minus_3():
    r = synthetic.disk_radii(np.random.default_rng(0), 200_000, 2.0, 80.0)
    assert r.min() >= 2.0 and r.max() <= 80.0
    cdf = lambda x: (2.0 ** -2 - x ** -2) / (2.0 ** -2 - 80.0 ** -2)  # noqa: E731 (of p(r) ~ r^-3)
    for x in (2.5, 3.0, 4.0, 8.0, 20.0):
        assert (r <= x).mean() == pytest.approx(cdf(x), abs=0.005)
    # not a power law of another exponent: for p ~ r^-2 half the radii would be below 3.9
    assert (r <= 2.83).mean() == pytest.approx(0.5, abs=0.01)


def test_with_dead_leaves_adds_the_share_and_writes_each_file_once(tmp_path, cache_home):
    photos = [tmp_path / f"{k}.png" for k in range(3)]
    assert synthetic.with_dead_leaves(photos, 0.0) == photos
    files = synthetic.with_dead_leaves(photos, 0.5)
    assert files[:3] == photos and len(files) == 6
    added = files[3:]
    assert all(f.parent == cache_home / f"kl-ae/dead-leaves-v{synthetic.VERSION}" and f.is_file() for f in added)
    assert Image.open(added[0]).size == (synthetic.SIZE, synthetic.SIZE)
    stamps = [f.stat().st_mtime_ns for f in added]
    assert synthetic.with_dead_leaves(photos, 0.5) == files  # the same files, not written again
    assert [f.stat().st_mtime_ns for f in added] == stamps
    assert not list(added[0].parent.glob(".*.tmp"))
    # one generator in order: a larger set starts with the smaller one's images
    more = synthetic.with_dead_leaves(photos, 0.75)[3:]
    assert len(more) == 9 and more[:3] == added
    assert synthetic.dead_leaves_count(53, 0.5) == 53 and synthetic.dead_leaves_count(7, 0.75) == 21


def test_a_large_share_repeats_at_most_max_distinct_files(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "MAX_DISTINCT", 2)
    photos = [tmp_path / f"{k}.png" for k in range(3)]
    added = synthetic.with_dead_leaves(photos, 0.75)[3:]
    assert len(added) == 9 and len(set(added)) == 2 and added[:4] == [added[0], added[1]] * 2
    assert len(list(added[0].parent.glob("*.png"))) == 2


def test_the_training_set_mixes_them_in_and_crops_them_like_photographs(tmp_path):
    from helpers import write_noise_photos

    folder = write_noise_photos(tmp_path / "photos", 2, size=(80, 80))
    cfg = DataConfig(train=str(folder), resolution=32, dead_leaves_fraction=0.5)
    ds = D.build_train_dataset(cfg, seed=0)
    assert len(ds) == 4
    names = [ds[i]["name"] for i in range(4)]
    assert names[:2] == ["0.png", "1.png"] and all(n.endswith(".png") and "dead-leaves-" in n for n in names[2:])
    assert all(ds[i]["pixel_values"].shape == (3, 32, 32) for i in range(4))
    assert len(D.build_train_dataset(DataConfig(train=str(folder), resolution=32), seed=0)) == 2  # default: none


@pytest.mark.parametrize("value", ["1.0", "-0.1"])
def test_the_fraction_must_be_below_one(value):
    with pytest.raises(ConfigError, match="data.dead_leaves_fraction must be in"):
        load_config(None, [f"data.dead_leaves_fraction={value}"])


@pytest.fixture
def shards(tmp_path, monkeypatch):
    """6 noise photos in 3 shards; at most 8 distinct dead-leaves files (a shard stream draws on all of them)."""
    from helpers import write_noise_photos
    from kl_ae.data.shards import pack_shards

    monkeypatch.setattr(synthetic, "MAX_DISTINCT", 8)
    photos = write_noise_photos(tmp_path / "photos", 6, size=(48, 40))
    return pack_shards(photos, tmp_path / "shards", max_count=2)["pattern"]


def test_a_shard_stream_gets_the_share_between_its_samples_and_every_photo_once(shards):
    assert load_config(None, [f"data.train={shards}", "data.dead_leaves_fraction=0.5"]).data.dead_leaves_fraction == 0.5
    cfg = DataConfig(train=shards, resolution=32, num_workers=0, shuffle_buffer=3, dead_leaves_fraction=0.5)
    samples = list(D.build_train_dataset(cfg, seed=0))
    assert all(s["pixel_values"] is not None and s["pixel_values"].shape == (3, 32, 32) for s in samples)
    names = [s["name"] for s in samples]
    assert len(names) == 12 and len(set(names[0::2])) == 6  # one epoch: each photo once ...
    assert names[1::2] == [f"dead-leaves-384px-{k:05d}" for k in range(6)]  # ... each followed by one
    cfg = dataclasses.replace(cfg, dead_leaves_fraction=0.75)
    names = [s["name"] for s in D.build_train_dataset(cfg, seed=0)]
    leaves = [n for n in names if n.startswith("dead-leaves")]
    assert len(names) == 24 and len(leaves) == 18  # 3 per photo, the 8 files in order, repeated
    assert leaves == [f"dead-leaves-384px-{k % 8:05d}" for k in range(18)] and not names[4].startswith("dead")


def test_the_share_is_counted_over_passes_and_streams_take_their_own_files(shards):
    cfg = DataConfig(train=shards, resolution=32, num_workers=0, shuffle_buffer=3, dead_leaves_fraction=0.3)
    ds = D.build_train_dataset(cfg, seed=0)
    passes = [[s["name"] for s in ds if s["name"].startswith("dead")] for _ in range(2)]
    assert [len(p) for p in passes] == [2, 3]  # floor(6 * 3/7), floor(12 * 3/7) - 2: not 2 again

    class Position:  # stream 1 of 3 (e.g. rank 0's second of three workers)
        def stream(self):
            return 1, 3

    files = synthetic.dead_leaves_files(8)
    stage = synthetic.DeadLeavesStream(files, 0.5, Position())
    out = [s["__key__"] for s in stage(iter([{"__key__": f"photo{i}"} for i in range(4)]))]
    assert out == ["photo0", files[1].stem, "photo1", files[4].stem, "photo2", files[7].stem, "photo3", files[2].stem]


def test_a_resumed_shard_loader_with_dead_leaves_continues_the_same_batches(shards):
    cfg = DataConfig(train=shards, resolution=32, num_workers=2, shuffle_buffer=3, dead_leaves_fraction=0.5)
    loader = D.TrainLoader(cfg, batch_size=2, seed=1)
    straight = [b["pixel_values"] for b in itertools.islice(loader, 8)]
    loader.close()
    resumed = D.TrainLoader(cfg, batch_size=2, seed=1)
    resumed.load_state_dict({"epoch": 0, "batches_in_epoch": 3})  # inside both workers' first pass
    for a, b in zip(straight[3:], itertools.islice(resumed, 5), strict=True):
        assert torch.equal(a, b["pixel_values"])
    resumed.close()
    assert not torch.equal(straight[3], straight[4])


def test_the_images_are_as_large_as_the_largest_crop_or_resize_asks(tmp_path):
    photo = [tmp_path / "a.png"]
    assert Image.open(synthetic.with_dead_leaves(photo, 0.5, size=64)[1]).size == (synthetic.SIZE,) * 2
    large = synthetic.with_dead_leaves(photo, 0.5, size=512)[1]
    assert Image.open(large).size == (512, 512) and "512px" in large.name  # its own files, not the 384-px ones


def test_the_loader_asks_for_the_largest_resize(tmp_path):
    from helpers import write_noise_photos

    folder = write_noise_photos(tmp_path / "photos", 1, size=(80, 80))
    ds = D.build_train_dataset(DataConfig(train=str(folder), resolution=32, short_side_range=[400, 448],
                                          dead_leaves_fraction=0.5), seed=0)
    assert "448px" in ds[1]["name"] and not ds[1]["upscaled"]


def test_an_unwritable_cache_is_a_data_error_that_says_what_to_do(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")  # a file where the cache folder would go (root may write anywhere else)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.raises(DataError, match="cannot write the dead-leaves images .* set XDG_CACHE_HOME"):
        synthetic.with_dead_leaves([tmp_path / "a.png"], 0.5)
