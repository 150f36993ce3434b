"""kl-ae shards / train / eval on a corpus of broken and unusual files: finish, skip, count by reason."""

import io
import json
import tarfile

import pytest
from PIL import Image
from test_data import _make_folder, _photo

from kl_ae.cli import main
import helpers


@pytest.fixture()
def corpus(tmp_path):
    root = _make_folder(tmp_path / "corpus")  # good photos, every Pillow mode, EXIF, truncated, empty, text
    _photo(1, 1, 9).save(root / "one_pixel.png")  # usable: upscaled to the crop size
    Image.new("RGB", (400, 400), (10, 20, 30)).save(root / "bomb.png")  # 160k px > 2x the limit LIMIT below
    return root


LIMIT = "50000"  # data.max_image_pixels / --max-image-pixels of these tests


def tiny(run_dir, data, val):
    sets = ["model.block_out_channels=[8,16]", "model.layers_per_block=1", "model.norm_num_groups=8",
            f"data.train={data}", f"data.val={val}", "data.resolution=32", "data.val_resolution=32",
            "data.num_workers=0", f"train.output_dir={run_dir}", "train.max_steps=3", "train.batch_size=4",
            "train.gradient_accumulation_steps=1", "train.mixed_precision=no", "train.scaling_images=4",
            "train.tracker=none", "loss.perceptual_weight=0", f"data.max_image_pixels={LIMIT}"]
    return [arg for item in sets for arg in ("--set", item)]


def test_shards_train_eval_skip_and_count(corpus, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["shards", str(corpus), str(out), "--max-count", "4", "--max-image-pixels", LIMIT]) == 0
    packed = json.loads(capsys.readouterr().out.split("\ntrain on them")[0])
    assert packed["skipped"] == {"decompression_bomb": 1, "empty_file": 1, "not_an_image": 1, "truncated": 1}
    shards = sorted(out.glob("shard-*.tar"))
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[: len(data) // 2])  # a shard cut off mid-stream
    with tarfile.open(out / "shard-junk.tar", "w") as tar:  # a non-image member, a broken image
        for name, payload in (("a.txt", b"caption only"), ("b.jpg", b"not a jpeg")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

    run = tmp_path / "run"
    assert main(["train", *tiny(run, str(out / "shard-*.tar"), str(corpus))]) == 0
    log = (run / "train.log").read_text()
    assert "training data, counted over all epochs" in log
    final_eval = json.loads((run / "eval.json").read_text())
    assert final_eval["skipped"] == packed["skipped"]

    report_file = tmp_path / "m.json"
    assert main(["eval", str(run / "export"), str(corpus), "--out", str(report_file), "--resolution", "32",
                 "--lpips-trunk", "none", "--rfid-weights", "none", "--max-image-pixels", LIMIT]) == 0
    report = json.loads(report_file.read_text())
    assert report["skipped"] == packed["skipped"]
    assert "decompression_bomb: 1" in capsys.readouterr().out
    assert report["num_images"] == packed["num_samples"]


def test_nothing_usable_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"")
    (bad / "b.png").write_text("text")
    export = tmp_path / "export"
    helpers.tiny_vae().save_pretrained(export)
    assert main(["shards", str(bad), str(tmp_path / "out")]) == 2
    assert main(["eval", str(export), str(bad), "--resolution", "32"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kl-ae ")]
    assert len(errors) == 2 and all("error: " in line for line in errors)
    assert "no usable image" in errors[1] and "empty_file" in errors[1]
