"""Tests for kl_ae.eval.evaluate: metric definitions, baselines, the report and its JSON form."""

from __future__ import annotations

import json
import math
from pathlib import Path

import kl_ae  # noqa: F401  (torchvision import fix before diffusers / torchmetrics)
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from kl_ae.eval import evaluate as ev
from kl_ae.eval import metrics
from kl_ae.eval.report import format_report
from kl_ae.model import downsampling_factor
import helpers

RES = 32


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """4 small RGB images of different sizes and contents, plus one unreadable file."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 32), (32, 48), (64, 64), (36, 36)]):
        grad = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
        noise = rng.integers(0, 60, size=(h, w, 3))
        arr = np.clip(grad * (i + 1) / 4 + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"img{i}.png")
    (d / "zz_broken.png").write_bytes(b"not an image")
    return d


@pytest.fixture(scope="module")
def tiny_vae() -> AutoencoderKL:
    return helpers.tiny_vae()


def _levels(shape, lo=10, hi=240, seed=0) -> torch.Tensor:
    """Random images exactly on 8-bit levels, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, shape, generator=g).float() / 255 * 2 - 1


# --- metrics -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 4, 10])
def test_psnr_constant_error_matches_hand_value(k):
    x = _levels((2, 3, 16, 16))
    x_hat = x + 2 * k / 255  # k 8-bit levels brighter everywhere
    psnr = metrics.psnr_8bit(x, x_hat)
    assert psnr.shape == (2,)
    assert torch.allclose(psnr, torch.full((2,), 20 * math.log10(255 / k)), atol=1e-3)


def test_8bit_rounding_is_applied():
    x = _levels((2, 3, 16, 16))
    q = metrics.to_8bit(x + 0.3 * 2 / 255)  # less than half a level off: rounds back
    assert torch.allclose(q * 255, torch.round(q * 255), atol=1e-4)
    assert torch.isinf(metrics.psnr_8bit(x, x + 0.3 * 2 / 255)).all()
    one_level = torch.full((2,), 20 * math.log10(255))
    assert torch.allclose(metrics.psnr_8bit(x, x + 0.7 * 2 / 255), one_level, atol=1e-3)
    # out-of-range reconstructions are clamped, not wrapped
    assert metrics.to_8bit(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 1.0]


def test_ssim_of_identical_images_is_one_and_drops_with_noise():
    x = _levels((2, 3, 24, 24))
    assert torch.allclose(metrics.ssim_8bit(x, x), torch.ones(2), atol=1e-6)
    noisy = x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert (metrics.ssim_8bit(x, noisy) < 0.95).all()


# --- baselines -----------------------------------------------------------------------------


def test_mean_colour_is_per_channel_mean():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    y = ev.mean_colour(x)
    assert y.shape == x.shape
    expected = x.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(y, expected.expand_as(x))
    assert torch.equal(y.amax(dim=(2, 3)), y.amin(dim=(2, 3)))


def test_bicubic_keeps_a_constant_image_and_the_shape():
    const = torch.tensor([0.3, -0.5, 0.9]).view(1, 3, 1, 1).expand(2, 3, 32, 32)
    assert torch.allclose(ev.bicubic(const, 8), const, atol=1e-5)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = ev.bicubic(x, 4)
    assert y.shape == x.shape and y.abs().max() <= 1


def test_downsampling_factor(tiny_vae):
    assert downsampling_factor(tiny_vae) == 2


# --- the identity reconstructor and JSON form of infinite PSNR -----------------------------


def test_identity_reconstructor_gives_infinite_psnr_as_null_and_ssim_one():
    x = _levels((3, 3, RES, RES))
    batches = [(["a", "b"], x[:2]), (["c"], x[2:])]
    names, scores = ev.score_reconstructors({"model": lambda t: t}, batches)
    assert names == ["a", "b", "c"]
    assert all(math.isinf(v) for v in scores["model"]["psnr"])
    summary = ev.summarise(scores["model"])
    assert summary["psnr"] is None and summary["psnr_infinite"] == 3
    assert summary["ssim"] == pytest.approx(1.0, abs=1e-6)
    json.dumps(summary, allow_nan=False)  # JSON has no inf: must not raise


# --- evaluate / format_report / run --------------------------------------------------------


def _check_report(report, n, vae):
    assert set(report) >= {"protocol", "images", "num_images", "skipped", "model", "metrics",
                           "per_image", "throughput"}
    assert report["num_images"] == n and len(report["per_image"]) == n
    m = report["model"]
    assert (m["latent_channels"], m["downsampling_factor"], m["compression_ratio"]) == (4, 2, 3.0)
    assert m["parameters"] == sum(p.numel() for p in vae.parameters())
    for key in ("psnr", "ssim"):
        assert math.isfinite(report["metrics"][key])
        assert all(math.isfinite(row[key]) for row in report["per_image"])
    t = report["throughput"]
    assert t["device"] == "cpu" and t["dtype"] == "float32"
    assert t["encode_images_per_s"] > 0 and t["decode_images_per_s"] > 0
    p = report["protocol"]
    assert p["resolution"] == RES and "mode" in p["reconstruction"] and p["lpips_net"] == "vgg"
    assert json.loads(json.dumps(report, allow_nan=False)) == report


def test_evaluate_with_random_trunk_and_baselines(tiny_vae, image_dir):
    report = ev.evaluate(tiny_vae, str(image_dir), resolution=RES, batch_size=2,
                         lpips_trunk="random", baselines=True, progress=False)
    _check_report(report, 4, tiny_vae)
    assert "lpips" not in report["metrics"] and "lpips_skipped" not in report
    assert math.isfinite(report["metrics"]["lpips_random_trunk"])
    assert all("lpips_random_trunk" in row and "lpips" not in row for row in report["per_image"])
    assert [row["name"] for row in report["per_image"]] == [f"img{i}.png" for i in range(4)]
    t = report["throughput"]
    assert t["warmup_batch_excluded"] and t["timed_images"] == 2
    assert set(report["baselines"]) == {"mean_colour", "bicubic"}
    for b in report["baselines"].values():
        assert set(b) == {"psnr", "ssim", "lpips_random_trunk"}
    # bicubic at f=2 keeps far more of the image than a flat colour
    assert report["baselines"]["bicubic"]["psnr"] > report["baselines"]["mean_colour"]["psnr"]
    text = format_report(report)
    for word in ("PSNR", "SSIM", "random trunk", "mean_colour", "bicubic", "img/s", "protocol"):
        assert word in text


def test_evaluate_skips_lpips_without_trunk_weights(tiny_vae, image_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    report = ev.evaluate(tiny_vae, str(image_dir), resolution=RES, batch_size=4, max_images=3,
                         progress=False)
    _check_report(report, 3, tiny_vae)
    assert "lpips" not in report["metrics"] and "lpips_random_trunk" not in report["metrics"]
    assert report["lpips_skipped"]
    assert all(set(row) == {"name", "psnr", "ssim"} for row in report["per_image"])
    assert "baselines" not in report
    # a single batch: nothing to exclude as warm-up, and the report says so
    assert not report["throughput"]["warmup_batch_excluded"]
    text = format_report(report)
    assert "PSNR" in text and "SSIM" in text and "LPIPS skipped" in text


def test_evaluate_raises_when_no_image_is_usable(tiny_vae, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="no usable image"):
        ev.evaluate(tiny_vae, str(tmp_path), resolution=RES, lpips_trunk=None, progress=False)


def test_evaluate_rejects_resolution_not_divisible_by_f(tiny_vae, image_dir):
    with pytest.raises(ValueError, match="multiple"):
        ev.evaluate(tiny_vae, str(image_dir), resolution=33, lpips_trunk=None, progress=False)


def test_run_loads_prints_and_writes_json(tiny_vae, image_dir, tmp_path, capsys):
    model_dir = tmp_path / "export"
    tiny_vae.save_pretrained(model_dir)
    out = tmp_path / "reports" / "nested" / "eval.json"
    report = ev.run(str(model_dir), str(image_dir), out=str(out), resolution=RES,
                    lpips_trunk=None, max_images=2, progress=False)
    assert json.loads(out.read_text()) == report
    assert report["num_images"] == 2 and report["model"]["path"] == str(model_dir)
    assert "PSNR" in capsys.readouterr().out


def test_throughput_excludes_warmup_and_partial_last_batch(tiny_vae):
    rec = ev.AutoencoderReconstructor(tiny_vae, torch.device("cpu"))
    rec.timings = [(4, 9.0, 9.0), (4, 1.0, 2.0), (4, 1.0, 2.0), (1, 5.0, 5.0)]
    t = rec.throughput()
    assert t["encode_images_per_s"] == pytest.approx(4.0)
    assert t["decode_images_per_s"] == pytest.approx(2.0)
    assert t["timed_images"] == 8 and t["warmup_batch_excluded"] and t["partial_batch_excluded"]
    rec.timings = [(3, 1.5, 3.0)]  # one batch: nothing to exclude
    t = rec.throughput()
    assert t["encode_images_per_s"] == pytest.approx(2.0) and not t["warmup_batch_excluded"]
