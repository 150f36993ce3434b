"""Tests for ``kl-ae bench`` (kl_ae.rd.benchmark) and kl_ae.eval.grids.difference_grid."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import kl_ae  # noqa: F401  (torchvision import fix before diffusers / torchmetrics)
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from kl_ae.rd import benchmark as bench
from kl_ae.cli import main
from kl_ae.eval.grids import difference_grid

RES = 32
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench_inputs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny exports (f=2 and f=4, 4 latent channels) and a folder of 3 small images."""
    root = tmp_path_factory.mktemp("bench_inputs")
    for name, channels in [("ae_f2", [8, 16]), ("ae_f4", [8, 16, 16])]:
        torch.manual_seed(0)
        AutoencoderKL(
            block_out_channels=channels, layers_per_block=1, latent_channels=4, norm_num_groups=8,
            down_block_types=["DownEncoderBlock2D"] * len(channels),
            up_block_types=["UpDecoderBlock2D"] * len(channels),
        ).save_pretrained(root / name)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 48), (32, 32), (48, 36)]):
        yy, xx = np.mgrid[0:h, 0:w].astype(float)
        arr = np.stack([128 + 90 * np.sin(xx / (4 + i)), 128 + 90 * np.cos(yy / 7), xx + yy], -1)
        arr = np.clip(arr + rng.normal(0, 6, arr.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(images / f"img{i}.png")
    return {"f2": root / "ae_f2", "f4": root / "ae_f4", "images": images}


@pytest.fixture(scope="module")
def bench_out(bench_inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench_out")
    rc = main(["bench", str(bench_inputs["f2"]), str(bench_inputs["f4"]),
               "--images", str(bench_inputs["images"]), "--out", str(out),
               "--resolution", str(RES), "--batch-size", "2", "--lpips-trunk", "none",
               "--codecs", "jpeg,webp"])
    assert rc == 0
    return out


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "bench.csv", newline="") as file:
        return {row["method"]: row for row in csv.DictReader(file)}


def test_bench_writes_every_output(bench_out):
    for name in ["bench.md", "bench.csv", "bench.json", "rd.png", "grid_ae_f2.png", "grid_ae_f4.png"]:
        assert (bench_out / name).is_file(), name
    for png in ["rd.png", "grid_ae_f2.png", "grid_ae_f4.png"]:
        assert (bench_out / png).read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(bench_out / png) as img:
            img.verify()
    with Image.open(bench_out / "grid_ae_f4.png") as grid:  # 3 images x 3 panels, 2 px padding
        assert grid.size == (3 * RES + 4 * 2, 3 * RES + 4 * 2)


def test_bench_csv_rows_for_models_and_codecs(bench_out):
    rows = _rows(bench_out)
    with open(bench_out / "bench.csv", newline="") as file:
        assert next(csv.reader(file)) == bench.CSV_COLUMNS
    f2, f4 = rows["ae_f2@bf16"], rows["ae_f4@bf16"]
    assert (f2["kind"], f2["f"], f2["c"], f2["compression_ratio"]) == ("autoencoder", "2", "4", "3x")
    assert (f4["f"], f4["compression_ratio"], f4["latent_shape"]) == ("4", "12x", "4x8x8")
    assert f2["latent_shape"] == "4x16x16"
    # latent rates: bits · c / f²
    assert [float(rows[f"ae_f2@{s}"]["bpp"]) for s in ("fp32", "bf16", "8bit")] == [32, 16, 8]
    assert [float(rows[f"ae_f4@{s}"]["bpp"]) for s in ("fp32", "bf16", "8bit")] == [8, 4, 2]
    assert float(rows["ae_f4@8bit"]["side_info_bpp"]) == 32 * 4 / RES**2
    for storage in ("fp32", "bf16", "8bit"):
        row = rows[f"ae_f2@{storage}"]
        assert 0 < float(row["psnr"]) < 100 and -1 <= float(row["ssim"]) <= 1
        assert row["lpips"] == "skipped" and float(row["num_images"]) == 3
        assert float(row["encode_img_s"]) > 0 and row["peak_mem_mb"] != ""
    # codecs matched to each autoencoder's bf16 and 8-bit rate
    for codec in ("jpeg", "webp"):
        codec_rows = [r for r in rows.values() if r["kind"] == "codec" and r["method"].startswith(codec)]
        assert sorted(float(r["target_bpp"]) for r in codec_rows) == [2, 4, 8, 16]
        for r in codec_rows:
            assert float(r["psnr"]) > 0 and r["matched_to"] and int(r["num_images"]) == 3
            # within target unless even the lowest quality was over it (counted)
            assert float(r["bpp"]) <= float(r["target_bpp"]) or int(r["images_over_target"]) > 0
    assert rows["jpeg@4bpp"]["matched_to"] == "ae_f4@bf16"


def test_bench_markdown_and_json(bench_out):
    md = (bench_out / "bench.md").read_text()
    assert "| method | kind | bpp | PSNR (dB)" in md and "headers included" in md
    assert "| ae_f2@bf16 |" in md and "| 3x |" in md and "| 12x |" in md
    report = json.loads((bench_out / "bench.json").read_text())
    assert report["num_images"] == 3 and report["codecs"] == ["jpeg", "webp"]
    assert len(report["rows"]) == 2 * 3 + 2 * 4
    assert {p["quality"] for p in report["rd_curves"]["jpeg"]} == set(range(5, 100, 10))
    assert report["models"]["ae_f4"]["latent_shape"] == [4, RES // 4, RES // 4]


def test_bench_rejects_resolution_not_divisible(bench_inputs, tmp_path, capsys):
    rc = main(["bench", str(bench_inputs["f4"]), "--images", str(bench_inputs["images"]),
               "--out", str(tmp_path), "--resolution", "30", "--lpips-trunk", "none"])
    assert rc == 2 and "not a multiple" in capsys.readouterr().err


def test_store_latent_and_rates():
    torch.manual_seed(0)
    z = torch.rand(2, 4, 8, 8) * 8 - 3
    z[..., 0, 0], z[..., 0, 1] = -3.0, 5.0  # per-channel min / max exact in bf16
    q = bench.store_latent(z, "8bit")
    assert (q - z).abs().max() <= 8 / 255 / 2 + 1e-6  # half a level of 256 over [-3, 5]
    assert len(torch.unique(q[0, 0])) <= 256
    assert torch.equal(bench.store_latent(z, "fp32"), z)
    assert (bench.store_latent(z, "bf16") - z).abs().max() <= 5 * 2**-8
    assert bench.latent_bpp(4, 8, "bf16") == 1.0 and bench.latent_bpp(16, 8, "8bit") == 2.0
    with pytest.raises(ValueError):
        bench.store_latent(z, "fp8")


def test_difference_grid_shape_and_black_difference():
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    grid = difference_grid(x, x, max_rows=4)
    assert grid.shape == (3, 4 * 16 + 5 * 2, 3 * 16 + 4 * 2)
    assert 0 <= grid.min() and grid.max() <= 1
    diff_panels = grid[:, 2:-2, 2 + 2 * (16 + 2):-2]  # third column, padding stripped
    assert diff_panels.abs().max() == 0
    shifted = difference_grid(x.clamp(-1, 0.8), x.clamp(-1, 0.8) + 0.1, amplify=5.0, max_rows=1)
    assert torch.allclose(shifted[:, 2:18, 38:54], torch.full((3, 16, 16), 0.25), atol=1e-5)
