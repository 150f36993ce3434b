"""Evaluation at scale: split across two processes, and full-size tiled reconstruction."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from kl_ae.cli import main
from kl_ae.eval.tiling import decoder_receptive_field, default_tile_size, full_size_report, tiled
import helpers


def tiny_vae():
    return helpers.tiny_vae()


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (36 + 4 * i, 44, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "5_broken.png").write_bytes(b"not an image")
    return root


def test_tiled_context_restores_the_model():
    vae = tiny_vae()
    before = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor)
    with tiled(vae, 16, overlap=0.5):
        assert vae.use_tiling and vae.tile_sample_min_size == 16 and vae.tile_latent_min_size == 8
        assert vae.tile_overlap_factor == 0.5
    assert (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor) == before


def test_decoder_receptive_field_by_hand():
    # tiny_vae: f = 2, one resnet per block (two in each up block and in the mid block).
    # Output pixels spanned per 3x3 conv = 2 x (output pixels per input pixel):
    # conv_in 4, mid block 4 convs x 4 = 16, up block 0 (4 convs at latent scale) 16,
    # its upsampler's conv (full scale) 2, up block 1 (4 convs) 8, conv_out 2: 48, plus the pixel itself
    rf = decoder_receptive_field(helpers.tiny_vae())
    assert rf == {"pixels": 49, "latents": 24.5, "attention": True}
    assert decoder_receptive_field(helpers.tiny_vae(mid_block_add_attention=False))["attention"] is False


def test_default_tile_size_covers_the_receptive_field():
    vae = helpers.tiny_vae()  # receptive field 49 px
    assert default_tile_size(vae, 32) == 64 and default_tile_size(vae, 128) == 128


def test_full_size_compares_tiled_with_untiled(folder):
    report = full_size_report(tiny_vae(), str(folder), tile_size=16, tile_above=48, progress=False)
    rows = {r["name"]: r for r in report["per_image"]}
    assert len(rows) == 5  # the broken file is skipped
    small, large = rows["0.png"], rows["4.png"]  # 36x44 and 52x44: multiples of f=2, kept whole
    assert (small["height"], small["width"]) == (36, 44)
    assert small["psnr_tiling_cost_db"] == pytest.approx(small["psnr_untiled"] - small["psnr_tiled"])
    assert "psnr_untiled" not in large and np.isfinite(large["psnr_tiled"])  # 52 > 48: tiled only
    assert report["num_compared"] == sum("psnr_untiled" in r for r in rows.values())
    with pytest.raises(ValueError, match="multiple"):
        full_size_report(tiny_vae(), str(folder), tile_size=15)


@pytest.mark.slow
def test_two_process_eval_matches_one_process(folder, tmp_path):
    export = tmp_path / "export"
    tiny_vae().save_pretrained(export)
    single = tmp_path / "single.json"
    assert main(["eval", str(export), str(folder), "--out", str(single), "--resolution", "32",
                 "--lpips-trunk", "none", "--batch-size", "2"]) == 0
    double = tmp_path / "double.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kl_ae.cli",
           "eval", str(export), str(folder), "--out", str(double), "--resolution", "32",
           "--lpips-trunk", "none", "--batch-size", "2"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert two["throughput"]["processes"] == 2 and one["throughput"]["processes"] == 1
    assert [r["name"] for r in two["per_image"]] == [r["name"] for r in one["per_image"]]  # none dropped or doubled
    assert two["num_images"] == one["num_images"] == 5
    assert two["skipped"] == one["skipped"] == {"not_an_image": 1}
    for key in ("kl_nats_per_element", "rate_bits_per_pixel"):  # from posterior moments: deterministic
        assert two["latent"][key] == pytest.approx(one["latent"][key], rel=1e-5)
    assert two["latent"]["images"] == 5 and two["latent"]["decoder_robustness"]["images"] == 5
    for a, b in zip(one["per_image"], two["per_image"]):
        assert a["psnr"] == pytest.approx(b["psnr"], abs=1e-3)
        assert a["ssim"] == pytest.approx(b["ssim"], abs=1e-4)


def test_eval_report_has_latent_section_and_rfid_skip(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_weights"))
    export = tmp_path / "export"
    tiny_vae().save_pretrained(export)
    out = tmp_path / "m.json"
    assert main(["eval", str(export), str(folder), "--out", str(out), "--resolution", "32"]) == 0
    report = json.loads(out.read_text())  # strict JSON: no NaN/inf anywhere
    lat = report["latent"]
    assert lat["images"] == 5 and len(lat["z_mean_per_channel"]) == 4
    assert lat["scaling_factor"] == pytest.approx(1 / lat["z_std"])
    assert 0 <= lat["active_channels"] <= 4 and lat["rate_bits_per_pixel"] > 0
    assert set(lat["decoder_robustness"]) >= {"psnr_sigma_0", "psnr_sigma_0.1", "psnr_sigma_1", "images"}
    assert "rfid" not in report and "no weights at" in report["rfid_skipped"]
    text = capsys.readouterr().out
    assert "rFID: skipped, no weights at" in text and "active channels" in text
