"""bench/norm_scale.py's windowed GroupNorm: statistics per window, the module's affine after."""

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

spec = importlib.util.spec_from_file_location("norm_scale", Path(__file__).resolve().parent.parent / "bench/norm_scale.py")
norm_scale = importlib.util.module_from_spec(spec)
spec.loader.exec_module(norm_scale)


def test_windowed_group_norm_normalises_each_window_on_its_own():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 4) * 3 + torch.arange(4.0)  # columns with different means
    weight, bias = torch.rand(8), torch.rand(8)
    assert torch.allclose(norm_scale.windowed_group_norm(1)(x, 4, weight, bias), F.group_norm(x, 4, weight, bias))
    out = norm_scale.windowed_group_norm(2)(x, 4, weight, bias)
    for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)):
        window = x[:, :, 3 * i:3 * i + 3, 2 * j:2 * j + 2]
        assert torch.allclose(out[:, :, 3 * i:3 * i + 3, 2 * j:2 * j + 2], F.group_norm(window, 4, weight, bias),
                              atol=1e-5)
    flat = torch.randn(2, 8, 10)  # not an image map (the attention's norm): normalised whole
    assert torch.equal(norm_scale.windowed_group_norm(2)(flat, 4), F.group_norm(flat, 4))


def test_with_true_mean_gives_the_input_mean_colour_and_keeps_the_rest():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8) * 1.2 - 0.6
    reconstruction = x * 0.5 + torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1)  # a colour cast, less contrast
    fixed = norm_scale.with_true_mean(x, reconstruction)
    torch.testing.assert_close(fixed.mean(dim=(2, 3)), x.mean(dim=(2, 3)))
    torch.testing.assert_close(fixed - fixed.mean(dim=(2, 3), keepdim=True),
                               reconstruction - reconstruction.mean(dim=(2, 3), keepdim=True))
    assert norm_scale.with_true_mean(torch.ones(1, 3, 2, 2), torch.full((1, 3, 2, 2), 3.0)).max() <= 1.0


def test_with_fitted_colour_undoes_a_global_colour_transform():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8) * 1.2 - 0.6
    swap = torch.tensor([[0.0, 0.0, 0.9], [0.1, 0.8, 0.0], [0.7, 0.0, 0.2]])  # channels swapped and mixed
    reconstruction = torch.einsum("ij,bjhw->bihw", swap, x) + torch.tensor([0.1, -0.2, 0.05]).view(1, 3, 1, 1)
    torch.testing.assert_close(norm_scale.with_fitted_colour(x, reconstruction), x, atol=1e-5, rtol=0)
    noisy = reconstruction + 0.3 * torch.randn_like(x)  # detail the colour map cannot fix stays an error
    fixed = norm_scale.with_fitted_colour(x, noisy)
    assert 0 < (fixed - x).square().mean() < (noisy - x).square().mean()
    assert norm_scale.with_fitted_colour(x, torch.full_like(x, 0.2)).abs().max() <= 1.0


def test_with_true_block_means_sets_each_block_mean_and_keeps_the_detail():
    torch.manual_seed(0)
    x, reconstruction = torch.rand(2, 3, 16, 8) * 1.2 - 0.6, torch.rand(2, 3, 16, 8) * 1.2 - 0.6
    fixed = norm_scale.with_true_block_means(x, reconstruction, block=8)
    torch.testing.assert_close(F.avg_pool2d(fixed, 8), F.avg_pool2d(x, 8))
    detail = reconstruction - F.interpolate(F.avg_pool2d(reconstruction, 8), scale_factor=8, mode="nearest")
    torch.testing.assert_close(fixed - F.interpolate(F.avg_pool2d(fixed, 8), scale_factor=8, mode="nearest"), detail)


def test_the_flat_image_is_each_images_mean_colour_everywhere():
    x = torch.rand(2, 3, 8, 4) * 1.2 - 0.6
    flat = norm_scale.mean_colour(x)  # the mean-colour baseline's image
    assert flat.shape == x.shape
    torch.testing.assert_close(flat, x.mean(dim=(2, 3), keepdim=True).expand(2, 3, 8, 4))


def test_flat_colour_scores_the_reconstruction_of_the_flat_image(monkeypatch, tmp_path):
    from helpers import tiny_vae, write_noise_photos

    monkeypatch.setattr(norm_scale, "load_autoencoder", lambda path: tiny_vae())
    photos = write_noise_photos(tmp_path / "p", 2, size=(256, 256))
    # a "decoder" that casts flat images by a known amount and returns anything else as it is: the
    # row must reconstruct the flat image (a photo would come back exact) and score it against itself
    monkeypatch.setattr(norm_scale, "decode_mode",
                        lambda vae, x: x + 32 / 255 * (x.std(dim=(2, 3), keepdim=True) == 0))
    result = norm_scale.main(["EXPORT", str(photos)])
    expected = 20 * torch.log10(torch.tensor(255 / 16)).item()  # 32/255 in [-1, 1]: 16 levels of 8 bits
    assert all(abs(v - expected) < 0.05 for v in result["psnr"]["flat-colour"]), result["psnr"]["flat-colour"]


def test_raw_weights_scores_the_optimizer_weights_and_every_row_is_reported(monkeypatch, tmp_path):
    from helpers import tiny_vae, write_noise_photos

    loaded = []
    monkeypatch.setattr(norm_scale, "load_autoencoder", lambda path: loaded.append("ema") or tiny_vae())
    monkeypatch.setattr(norm_scale, "autoencoder_from_checkpoint",
                        lambda path, use_ema: loaded.append(f"use_ema={use_ema}") or (tiny_vae(), None, None))
    photos = write_noise_photos(tmp_path / "p", 1, size=(256, 256))
    result = norm_scale.main(["CKPT", str(photos), "--raw-weights"])
    assert loaded == ["use_ema=False"] and result["raw_weights"] is True
    assert set(result["psnr"]) == {"whole", "tiles", "gn-window", "true-mean", "fitted-colour", "true-block-means",
                                   "flat-colour"}
    assert all(len(v) == 1 for v in result["psnr"].values())
    # least squares over colour maps includes the identity, and block means include the global mean:
    # each correction scores at least as high as what it refines (up to 8-bit rounding)
    assert result["psnr_mean"]["fitted-colour"] >= result["psnr_mean"]["whole"] - 0.05
    assert result["psnr_mean"]["true-block-means"] >= result["psnr_mean"]["true-mean"] - 0.05
    norm_scale.main(["CKPT", str(photos)])
    assert loaded[-1] == "ema"
