"""kl_ae.data: decoding, transforms, sources, shards and loaders (offline, tiny images)."""

from __future__ import annotations

import io
import itertools
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kl_ae.data import images, sources
from kl_ae.data import loaders as D
from kl_ae.data.shards import pack_shards  # before torchvision: kl_ae fixes its import here
from kl_ae.config import DataConfig

GOOD = {  # relative path -> (width, height) after decoding
    "photo_0.jpg": (40, 60), "photo_1.png": (60, 40), "big_0.jpg": (100, 80),
    "sub/big_1.PNG": (80, 100), "sub/deeper/photo.v2.JPEG": (40, 60),
    "palette.png": (40, 60), "grey.png": (40, 60), "rgba.png": (40, 60), "cmyk.jpg": (40, 60),
    "grey16.png": (40, 60), "exif.jpg": (40, 60),
}
BAD = {"truncated.jpg": "truncated", "empty.jpg": "empty_file", "text.png": "not_an_image"}


def _photo(w: int, h: int, seed: int) -> Image.Image:
    """A smooth random colour image (a photo-like gradient plus noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    arr = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _make_folder(root: Path, with_bad: bool = True) -> Path:
    (root / "sub/deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    _photo(40, 60, 0).save(root / "photo_0.jpg")
    _photo(60, 40, 1).save(root / "photo_1.png")
    _photo(100, 80, 2).save(root / "big_0.jpg")
    _photo(80, 100, 3).save(root / "sub/big_1.PNG")
    _photo(40, 60, 4).save(root / "sub/deeper/photo.v2.JPEG", format="JPEG")
    pal = Image.new("P", (40, 60), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (20, 0, 40, 60))  # left half index 0 (transparent), right half red
    pal.save(root / "palette.png", transparency=0)
    Image.new("L", (40, 60), 100).save(root / "grey.png")
    rgba = Image.new("RGBA", (40, 60), (0, 0, 0, 0))
    rgba.paste((0, 200, 0, 255), (20, 0, 40, 60))
    rgba.save(root / "rgba.png")
    Image.new("CMYK", (40, 60), (255, 0, 0, 0)).save(root / "cmyk.jpg")  # pure cyan
    Image.fromarray(np.full((60, 40), 32768, np.uint16)).save(root / "grey16.png")
    rot = Image.new("RGB", (60, 40), (255, 0, 0))  # stored landscape: left red, right blue
    rot.paste((0, 0, 255), (30, 0, 60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rot.save(root / "exif.jpg", exif=exif, quality=95)
    _photo(40, 60, 5).save(root / ".hidden/ignored.jpg")
    _photo(40, 60, 6).save(root / ".dotfile.jpg")
    (root / "notes.txt").write_text("not an image and not an image extension")
    if with_bad:
        buf = io.BytesIO()
        _photo(100, 80, 7).save(buf, format="JPEG")
        (root / "truncated.jpg").write_bytes(buf.getvalue()[:400])
        (root / "empty.jpg").write_bytes(b"")
        (root / "text.png").write_text("hello, I am not a PNG")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _make_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> dict:
    return pack_shards(folder, tmp_path_factory.mktemp("shards") / "out", max_count=4)


def _decoded(folder: Path) -> dict[str, Image.Image]:
    return dict(sources.iter_images(str(folder)))


def test_train_transform_shape_range_and_upscale():
    x, upscaled = images.train_transform(_photo(100, 80, 0), 64)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and not upscaled
    assert -1.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5 and x.min() < -0.5
    x, upscaled = images.train_transform(_photo(40, 60, 0), 64, random_flip=False)
    assert x.shape == (3, 64, 64) and upscaled


def test_train_transform_flip_follows_torch_generator():
    img = _photo(32, 32, 0)
    flips = set()
    for seed in range(8):
        x, _ = images.train_transform(img, 32, True, torch.Generator().manual_seed(seed))
        y, _ = images.train_transform(img, 32, True, torch.Generator().manual_seed(seed))
        assert torch.equal(x, y)
        flips.add(torch.equal(x, images.to_tensor(img).flip(-1)))
    assert flips == {True, False}


def test_eval_transform_matches_torchvision_protocol():
    from torchvision.transforms import v2

    protocol = v2.Compose([v2.Resize(32, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                           v2.CenterCrop(32)])
    for img in (_photo(100, 80, 1), _photo(45, 90, 2), _photo(20, 27, 3)):
        x = images.eval_transform(img, 32)
        assert x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1
        assert torch.equal(x, images.to_tensor(protocol(img)))


def test_modes_become_sensible_rgb(folder):
    imgs = _decoded(folder)
    assert all(im.mode == "RGB" and im.size == GOOD[name] for name, im in imgs.items())
    pal, rgba = np.asarray(imgs["palette.png"]), np.asarray(imgs["rgba.png"])
    assert (pal[:, :20] == 255).all() and (pal[:, 20:] == [255, 0, 0]).all()  # transparent -> white
    assert (rgba[:, :20] == 255).all() and (rgba[:, 20:] == [0, 200, 0]).all()
    assert (np.asarray(imgs["grey.png"]) == 100).all()
    cyan = np.asarray(imgs["cmyk.jpg"]).reshape(-1, 3).mean(0)
    assert cyan[0] < 40 and cyan[1] > 215 and cyan[2] > 215
    grey16 = np.asarray(imgs["grey16.png"])
    assert np.abs(grey16.astype(int) - 128).max() <= 1  # 16-bit mid-grey stays mid-grey
    ramp = Image.fromarray(np.array([[0, 65535]], np.uint16))
    assert np.asarray(images.to_rgb(ramp))[0].tolist() == [[0, 0, 0], [255, 255, 255]]
    as_int32 = images.to_rgb(Image.fromarray(np.array([[0, 32768, 65535]], np.int32)))  # mode "I"
    assert np.asarray(as_int32)[0, :, 0].tolist() == [0, 128, 255]
    as_float = images.to_rgb(Image.fromarray(np.array([[0.0, 0.5]], np.float32)))
    assert np.asarray(as_float)[0, :, 0].tolist() == [0, 128]


def test_a_transparent_colour_in_an_rgb_or_grey_png_is_composited_onto_white(tmp_path):
    """A PNG's tRNS chunk marks one colour transparent in RGB and grey images too, not only in palettes."""
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = [10, 20, 30]
    Image.fromarray(rgb).save(tmp_path / "rgb.png", transparency=(0, 0, 0))
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png", transparency=0)
    for name, kept in (("rgb.png", [10, 20, 30]), ("grey.png", [10, 10, 10])):
        out = np.asarray(images.to_rgb(Image.open(tmp_path / name)))
        assert out[0, 0].tolist() == kept and (out.reshape(-1, 3)[1:] == 255).all(), name


def test_exif_orientation_is_applied(folder):
    img = _decoded(folder)["exif.jpg"]
    assert img.size == (40, 60)  # stored 60x40, displayed portrait
    top, bottom = np.asarray(img)[2, 20], np.asarray(img)[-3, 20]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_bad_files_are_skipped_with_reasons(folder):
    counter = images.SkipCounter()
    names = [name for name, _ in sources.iter_images(str(folder), counter)]
    assert names == sorted(names) and set(names) == set(GOOD)
    assert counter.as_dict() == {"empty_file": 1, "not_an_image": 1, "truncated": 1}
    assert counter.total == 3
    assert counter.summary() == "skipped 3 images: empty_file=1, not_an_image=1, truncated=1"
    for name, reason in BAD.items():
        assert images.decode(folder / name) == (None, reason)


def test_decompression_bomb_limit_is_a_setting_and_pillows_global_is_left_alone():
    before = Image.MAX_IMAGE_PIXELS
    for w, h in ((40, 60), (40, 30)):  # above 2x the limit (error) and between 1x and 2x (warning)
        buf = io.BytesIO()
        _photo(w, h, 0).save(buf, format="PNG")
        assert images.decode(buf.getvalue(), max_pixels=1000) == (None, "decompression_bomb")
        assert images.decode(buf.getvalue(), max_pixels=0)[0].size == (w, h)  # 0: no limit
        assert images.decode(buf.getvalue())[0].size == (w, h)  # Pillow's default limit
    assert Image.MAX_IMAGE_PIXELS == before == images.PILLOW_MAX_IMAGE_PIXELS


def test_the_training_set_applies_data_max_image_pixels(tmp_path):
    _photo(40, 60, 0).save(tmp_path / "big.png")
    _photo(20, 20, 1).save(tmp_path / "small.png")
    files = sorted(tmp_path.glob("*.png"))
    limited = D.ImageFolderDataset(files, 16, max_image_pixels=1000)
    assert [limited[i].get("skip_reason") for i in range(2)] == ["decompression_bomb", None]
    unlimited = D.ImageFolderDataset(files, 16, max_image_pixels=0)
    assert all(unlimited[i]["pixel_values"] is not None for i in range(2))


def test_a_multi_frame_image_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(tmp_path / "still.png")
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    assert [f.name for f in sources.list_image_files(tmp_path)] == ["anim.gif", "still.png"]  # not ignored
    img, reason = images.decode(tmp_path / "anim.gif")
    assert reason is None and img.mode == "RGB" and img.getpixel((5, 5)) == (255, 0, 0)


def test_list_image_files_is_recursive_sorted_and_case_insensitive(folder):
    files = sources.list_image_files(folder)
    rel = [f.relative_to(folder).as_posix() for f in files]
    assert rel == sorted(rel) and set(rel) == set(GOOD) | set(BAD)
    assert sources.list_image_files(folder / "grey.png") == [folder / "grey.png"]


def test_builtin_sets_exist_and_are_disjoint():
    train, val = sources.list_image_files("builtin:train"), sources.list_image_files("builtin:val")
    assert train == sources.list_image_files("builtin:samples")
    assert len(train) >= 5 and len(val) >= 2 and not {f.name for f in train} & {f.name for f in val}
    for f in train + val:
        with Image.open(f) as im:
            assert f.is_file() and im.mode == "RGB" and min(im.size) >= 256


def test_default_config_trains_on_builtin_samples():
    ds = D.build_train_dataset(DataConfig())  # data.train = builtin:samples, 256 px
    sample = ds[0]
    assert len(ds) == len(sources.BUILTIN_SETS["train"]) and sample["name"] == sources.BUILTIN_SETS["train"][0]
    assert sample["pixel_values"].shape == (3, 256, 256) and not sample["upscaled"]


def test_errors_are_helpful(folder, tmp_path):
    with pytest.raises(images.DataError, match="unknown built-in data set 'builtin:nope'"):
        sources.list_image_files("builtin:nope")
    with pytest.raises(images.DataError, match="data.train: .*no such file or folder; expected an image "
                                          "folder, a shard pattern like .* or builtin:train"):
        D.build_train_dataset(DataConfig(train=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/readme.txt").write_text("x")
    with pytest.raises(images.DataError, match="folder has no images"):
        sources.list_image_files(tmp_path / "empty")
    with pytest.raises(images.DataError, match="matches no files"):
        sources.expand_shards(str(tmp_path / "shard-{000000..000003}.tar"))
    with pytest.raises(images.DataError, match="shard source"):
        sources.list_image_files(str(tmp_path / "x.tar"))


def test_is_shard_source(folder):
    assert sources.is_shard_source("data/train-{000000..000009}.tar")
    assert sources.is_shard_source("one.tar") and sources.is_shard_source("https://host/s-{0..3}.tar")
    assert sources.is_shard_source("pipe:curl -s http://host/s.tar")
    assert not sources.is_shard_source("builtin:train") and not sources.is_shard_source(str(folder))


def test_collate_drops_skipped_samples():
    good = {"pixel_values": torch.zeros(3, 8, 8), "upscaled": True, "name": "a"}
    bad = {"pixel_values": None, "skip_reason": "truncated", "name": "b"}
    batch = D.collate([good, bad, None, good], resolution=8)
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and batch["num_upscaled"] == 2
    assert batch["num_skipped"] == 2 and batch["skip_reasons"] == {"truncated": 1, "unknown": 1}
    empty = D.collate([bad], resolution=8)
    assert empty["pixel_values"].shape == (0, 3, 8, 8) and empty["num_skipped"] == 1


def test_pack_shards_round_trip(folder, shards):
    assert shards["num_samples"] == len(GOOD) and shards["num_shards"] >= 3
    assert shards["skipped"] == {"empty_file": 1, "not_an_image": 1, "truncated": 1}
    urls = sources.expand_shards(shards["pattern"])
    assert len(urls) == shards["num_shards"] and all(Path(u).is_file() for u in urls)
    with tarfile.open(urls[0]) as tar:  # original bytes under the normalised extension
        assert all(m.name.rsplit(".", 1)[1] in sources.IMAGE_EXTENSIONS for m in tar.getmembers())
    from_folder = {sources.sample_key(name): img for name, img in sources.iter_images(str(folder))}
    counter = images.SkipCounter()
    from_shards = list(sources.iter_images(shards["pattern"], counter))
    assert [k for k, _ in from_shards] == list(from_folder)  # same order: packed in sorted order
    assert counter.total == 0 and len(from_shards) == len(from_folder)
    for key, img in from_shards:
        assert np.array_equal(np.asarray(img), np.asarray(from_folder[key]))
    with pytest.raises(images.DataError, match="already contains"):
        pack_shards(folder, Path(urls[0]).parent)


def test_shard_train_dataset_yields_every_sample_once(shards):
    cfg = DataConfig(train=shards["pattern"], resolution=32, num_workers=0, shuffle_buffer=5)
    ds = D.build_train_dataset(cfg, seed=0)
    names = [s["name"] for s in ds]
    assert sorted(names) == sorted(sources.sample_key(n) for n in GOOD)
    again = [s["name"] for s in ds]  # second epoch: reshuffled, still complete
    assert sorted(again) == sorted(names) and again != names


def test_shard_dataset_two_workers_no_duplicates(shards):
    cfg = DataConfig(train=shards["pattern"], resolution=32, num_workers=2, shuffle_buffer=3)
    loader = torch.utils.data.DataLoader(D.build_train_dataset(cfg), batch_size=None, num_workers=2)
    names = [s["name"] for s in loader]
    assert sorted(names) == sorted(sources.sample_key(n) for n in GOOD)


def test_fewer_shards_than_processes_is_an_error(shards, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(shards["num_shards"] + 1))
    with pytest.raises(images.DataError, match=f"at least {shards['num_shards'] + 1} are needed"):
        D.build_train_dataset(DataConfig(train=shards["pattern"]))


def test_corrupted_shards_do_not_stop_iteration(folder, tmp_path):
    packed = pack_shards(folder, tmp_path / "s", max_count=4)
    urls = sources.expand_shards(packed["pattern"])
    first = set(k for k, _ in sources.iter_images(urls[0]))
    data = Path(urls[0]).read_bytes()
    Path(urls[0]).write_bytes(data[: len(data) // 2])  # a truncated tar stream
    with tarfile.open(tmp_path / "s/shard-extra.tar", "w") as tar:  # member-less, non-image
        for name, payload in (("nothing.txt", b"caption"), ("junk.jpg", b"not a jpeg")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    counter = images.SkipCounter()
    keys = [k for k, _ in sources.iter_images(str(tmp_path / "s/shard-*.tar"), counter)]
    rest = {sources.sample_key(n) for n in GOOD} - first
    assert rest <= set(keys) and len(keys) == len(set(keys))
    assert counter.as_dict() == {"no_image_member": 1, "not_an_image": 1}


@pytest.mark.parametrize("workers", [0, 1])
def test_shards_that_never_decode_end_in_a_data_error(tmp_path, workers):
    """Shards whose samples all fail to decode: each pass is empty batches, so the stream stops
    after one whole pass and training stops with DataError (it went on for good, empty batch
    after empty batch, before ShardPasses checked for a decoded image)."""
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard}.tar", "w") as tar:
            for i in range(4):
                info = tarfile.TarInfo(f"s{shard}_{i}.jpg")
                info.size = len(b"not a jpeg")
                tar.addfile(info, io.BytesIO(b"not a jpeg"))
    cfg = DataConfig(train=str(tmp_path / "shard-*.tar"), resolution=32, num_workers=workers, shuffle_buffer=1)
    loader = D.TrainLoader(cfg, batch_size=2, seed=0)
    one_pass = list(itertools.islice(loader, 50))
    assert len(one_pass) == 4 and all(b["pixel_values"].shape[0] == 0 for b in one_pass)
    assert sum(b["skip_reasons"].get("not_an_image", 0) for b in one_pass) == 8
    loader.close()
    batches = D.TrainBatches(cfg, 2, seed=0)
    with pytest.raises(images.DataError, match="no usable training image in a whole epoch: skipped 8 images"):
        next(batches.batches(lambda: False))
    batches.close()


def test_folder_dataloader_batches(folder):
    cfg = DataConfig(train=str(folder), resolution=32, num_workers=0)
    loader = D.TrainLoader(cfg, batch_size=4, seed=0)
    n = len(GOOD) + len(BAD)
    assert loader.batches_per_epoch == n // 4
    batches = list(itertools.islice(loader, n // 4))
    assert loader.state_dict() == {"epoch": 1, "batches_in_epoch": 0}
    for b in batches:
        assert b["pixel_values"].shape[1:] == (3, 32, 32) and b["pixel_values"].dtype == torch.float32
        assert b["pixel_values"].shape[0] + b["num_skipped"] == 4
        assert sum(b["skip_reasons"].values()) == b["num_skipped"]
    assert sum(b["num_skipped"] for b in batches) <= len(BAD)


def _per_epoch_reference(cfg: DataConfig, batch: int, epochs: int) -> list[torch.Tensor]:
    """The batches of a pass per epoch over an EpochSampler (kl-ae's folder loading before one
    pass spanned the epochs), in this process."""
    from torch.utils.data import DataLoader

    dataset = D.build_train_dataset(cfg, seed=0)
    sampler = D.EpochSampler(len(dataset), max(len(dataset), batch), seed=0)
    loader = DataLoader(dataset, sampler=sampler, batch_size=batch, drop_last=True, collate_fn=D.collate)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out += [b["pixel_values"] for b in loader]
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_one_pass_over_the_epochs_gives_the_per_epoch_batches_and_resumes_across_them(tmp_path, monkeypatch, workers):
    """A folder's loader runs epoch after epoch in one DataLoader iteration (the workers fetch
    ahead across an epoch's end instead of idling until the step takes its last batch), with the
    same batches as a pass per epoch, and a resume at any batch, an epoch's end included,
    continues them."""
    from torch.utils.data import DataLoader

    for i in range(7):
        _photo(48, 40, i).save(tmp_path / f"{i}.png")
    cfg = DataConfig(train=str(tmp_path), resolution=32, num_workers=workers)
    reference = _per_epoch_reference(cfg, 3, epochs=4)  # 2 batches an epoch, 1 photo left out of each
    passes = []
    original_iter = DataLoader.__iter__
    monkeypatch.setattr(DataLoader, "__iter__", lambda self: passes.append(1) or original_iter(self))
    loader = D.TrainLoader(cfg, batch_size=3, seed=0)
    assert loader.batches_per_epoch == 2
    straight = [b["pixel_values"] for b in itertools.islice(loader, 8)]
    assert len(passes) == 1  # four epochs, one DataLoader pass
    assert loader.state_dict() == {"epoch": 4, "batches_in_epoch": 0}
    loader.close()
    assert all(torch.equal(a, b) for a, b in zip(reference, straight, strict=True))
    for state, at in (({"epoch": 1, "batches_in_epoch": 1}, 3), ({"epoch": 2, "batches_in_epoch": 0}, 4),
                      ({"epoch": 1, "batches_in_epoch": 2}, 4)):  # the last: an epoch's end as older kl-ae saved it
        resumed = D.TrainLoader(cfg, batch_size=3, seed=0)
        resumed.load_state_dict(state)
        rest = [b["pixel_values"] for b in itertools.islice(resumed, 8 - at)]
        assert all(torch.equal(a, b) for a, b in zip(straight[at:], rest, strict=True)), state
        assert resumed.state_dict() == {"epoch": 4, "batches_in_epoch": 0}
        resumed.close()


def test_a_folder_without_a_usable_image_ends_in_a_data_error(tmp_path):
    """The folder loader never ends a pass, so TrainBatches checks each epoch for a usable image."""
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(b"not a jpeg")
    batches = D.TrainBatches(DataConfig(train=str(tmp_path), resolution=32, num_workers=0), 2, seed=0)
    with pytest.raises(images.DataError, match="no usable training image in a whole epoch: skipped 2 images"):
        next(batches.batches(lambda: False))
    batches.close()


def test_small_folder_fills_a_batch_and_counts_upscaling(tmp_path):
    for i in range(3):
        _photo(40, 60, i).save(tmp_path / f"{i}.png")
    cfg = DataConfig(train=str(tmp_path), resolution=64, num_workers=0)
    loader = D.TrainLoader(cfg, batch_size=8)
    assert loader.batches_per_epoch == 1
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (8, 3, 64, 64) and batch["num_upscaled"] == 8


def test_shard_dataloader_is_endless(shards):
    cfg = DataConfig(train=shards["pattern"], resolution=32, num_workers=0, shuffle_buffer=4)
    loader = D.TrainLoader(cfg, batch_size=4)
    batches = list(itertools.islice(loader, 6))  # 24 samples > one epoch of 11
    assert all(b["pixel_values"].shape == (4, 3, 32, 32) for b in batches)
    assert all(-1 <= b["pixel_values"].min() and b["pixel_values"].max() <= 1 for b in batches)


def test_shards_split_across_two_ranks_exactly_once(shards, monkeypatch):
    cfg = DataConfig(train=shards["pattern"], resolution=32, num_workers=0, shuffle_buffer=3)
    seen = []
    for rank in (0, 1):  # webdataset reads the rank from RANK / WORLD_SIZE, as under torchrun
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append([s["name"] for s in D.build_train_dataset(cfg, seed=3)])
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(sources.sample_key(n) for n in GOOD)


def test_short_side_range_downscales_before_cropping():
    from kl_ae.data.images import train_transform

    # A 400x200 image: a horizontal ramp. Resized so the short side is 32, a 32-px crop spans
    # a large part of the ramp; cropped at native size it spans a small part.
    ramp = np.tile(np.linspace(0, 255, 400, dtype=np.float32), (200, 1))
    img = Image.fromarray(np.stack([ramp] * 3, -1).astype(np.uint8))
    g = torch.Generator().manual_seed(0)
    small, up = train_transform(img, 32, random_flip=False, generator=g, short_side_range=[32, 32])
    native, _ = train_transform(img, 32, random_flip=False, generator=g)
    assert not up and small.shape == native.shape == (3, 32, 32)
    span_small = (small[0, 0, -1] - small[0, 0, 0]).item()
    span_native = (native[0, 0, -1] - native[0, 0, 0]).item()
    assert span_small > 5 * span_native  # half the ramp (64-px wide after resizing) vs 32/400 of it: 6.25x


def test_short_side_range_is_validated():
    from kl_ae.config import load_config
    from kl_ae.parsing import ConfigError

    with pytest.raises(ConfigError, match="short_side_range"):
        load_config(None, ["data.short_side_range=[128]"])
    with pytest.raises(ConfigError, match="short_side_range"):
        load_config(None, ["data.resolution=256", "data.short_side_range=[128, 512]"])


def test_jpeg_draft_decodes_smaller_but_not_below_target(tmp_path):
    from kl_ae.data.images import decode as _decode

    path = tmp_path / "big.jpg"
    Image.fromarray(np.full((400, 600, 3), 120, np.uint8)).save(path)
    full, _ = _decode(path)
    drafted, _ = _decode(path, draft_short_side=90)
    assert full.size == (600, 400)
    assert 90 <= min(drafted.size) < 400 and drafted.mode == "RGB"


@pytest.mark.parametrize("n, batch, world", [(12, 2, 2), (11, 2, 2), (9, 2, 3)])
def test_folder_epoch_split_across_ranks_never_repeats(n, batch, world):
    """Accelerate shards a folder loader's batches across ranks; with our EpochSampler no sample
    appears twice in an epoch, and drop_last leaves out fewer than world * batch samples."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    sampler = D.EpochSampler(n, n, seed=3)
    seen = []
    for rank in range(world):
        sampler.set_epoch(1)
        shard = BatchSamplerShard(BatchSampler(sampler, batch, drop_last=True), world, rank)
        seen += [k for b in shard for k in b]
    assert len(seen) == len(set(seen))
    assert all(n <= k < 2 * n for k in seen)  # epoch 1: indices offset by n
    assert n - len(seen) < world * batch


def test_epoch_sampler_resume_skips_exactly_the_consumed_samples():
    sampler = D.EpochSampler(10, 10, seed=0)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.resume_at(2, 4)
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # the skip applies to one pass only
    sampler.set_epoch(3)
    assert sorted(list(sampler)) == list(range(30, 40)) and list(sampler) != [k + 10 for k in full]


def test_folder_smaller_than_the_batch_crops_every_repetition_anew(tmp_path):
    """A folder of 3 images and a batch of 8: each file appears 2-3 times in an epoch, and each
    appearance has its own index, hence its own crop (a shared index gave identical duplicates)."""
    sampler = D.EpochSampler(3, 8, seed=0)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    flat = [k for e in epochs for k in e]
    assert len(flat) == len(set(flat))  # unique over the run, not only within an epoch
    for e in epochs:  # every file appears 2 or 3 times per epoch
        assert sorted(sum(1 for k in e if k % 3 == file) for file in range(3)) == [2, 3, 3]
    for i in range(3):
        _photo(96, 96, i).save(tmp_path / f"{i}.png")
    ds = D.ImageFolderDataset(sorted(tmp_path.glob("*.png")), 32, root=tmp_path)
    crops = {}
    for k in epochs[0]:
        crops.setdefault(k % 3, []).append(ds[k]["pixel_values"])
    for file, same_file in crops.items():
        for a in range(len(same_file)):
            for b in range(a + 1, len(same_file)):
                assert not torch.equal(same_file[a], same_file[b]), f"file {file}: two identical crops"


def test_symlinks_are_followed_once_and_each_real_file_counts_once(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    _photo(40, 40, 0).save(root / "a.png")
    _photo(40, 40, 1).save(root / "sub" / "b.png")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)  # a loop back to the top
    (root / "again").symlink_to(root / "sub", target_is_directory=True)  # a second name for sub/
    (root / "a-link.png").symlink_to(root / "a.png")  # a second name for a.png
    names = [f.relative_to(root).as_posix() for f in sources.list_image_files(root)]
    assert names == ["a-link.png", "again/b.png"]  # first name of each real file, in sorted order


def test_an_empty_spec_is_refused_not_read_as_the_current_directory():
    for spec in ("", "  "):
        with pytest.raises(images.DataError, match="empty data spec"):
            sources.image_source(spec)
    with pytest.raises(images.DataError, match="data.train: empty data spec"):
        D.TrainLoader(DataConfig(train=""), batch_size=2)


@pytest.mark.parametrize("workers, dead_leaves", [(0, 0.0), (2, 0.0), (2, 0.5)])
def test_shard_batches_resume_exactly_after_whole_passes(tmp_path, monkeypatch, workers, dead_leaves):
    """Resumed after more batches than a worker's shards hold (each worker skips whole passes), the
    stream goes on where it was, and its position with it; webdataset's repeat() stopped there:
    the run failed with "no usable training image" or went on out of order."""
    import helpers
    from kl_ae.data import synthetic

    monkeypatch.setattr(synthetic, "MAX_DISTINCT", 8)  # fewer, smaller dead-leaves files: faster
    monkeypatch.setattr(synthetic, "DISKS", 300)
    photos = helpers.write_noise_photos(tmp_path / "photos", 6, size=(48, 40))
    cfg = DataConfig(train=pack_shards(photos, tmp_path / "shards", max_count=2)["pattern"], resolution=32,
                     num_workers=workers, shuffle_buffer=3, dead_leaves_fraction=dead_leaves)
    batches = D.TrainBatches(cfg, 2, seed=1)
    straight = list(itertools.islice(batches.batches(lambda: False), 12))
    batches.close()
    for at in (5, 8):  # 10 and 16 samples, more than a pass holds (6 photos, and as many dead leaves)
        resumed = D.TrainBatches(cfg, 2, seed=1)
        resumed.load_state_dict({"phase": 0, "epoch": 0, "batches_in_epoch": at})
        rest = list(itertools.islice(resumed.batches(lambda: False), 12 - at))
        assert all(torch.equal(a, b) for a, b in zip(straight[at:], rest, strict=True)), at
        assert resumed.state_dict() == {"phase": 0, "epoch": 0, "batches_in_epoch": 12}
        resumed.close()
