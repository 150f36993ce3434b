"""Tests for kl_ae.eval.latent: KL/rate against hand values, collapse, aggregate moments, merging,
and decoder robustness on a tiny AutoencoderKL."""

from __future__ import annotations

import math

import kl_ae  # noqa: F401  (torchvision import fix before diffusers / torchmetrics)
import pytest
import torch
from diffusers import AutoencoderKL

from kl_ae.eval.metrics import psnr_8bit
from kl_ae.eval.latent import LatentStats, RobustnessStats, decoder_robustness, kl_to_standard_normal
import helpers

LN4 = math.log(4.0)


def _constant_posterior(b=2, h=2, w=2):
    """4 channels, each with one (mu, logvar) everywhere; returns mean, logvar and the hand KL
    per element of each channel."""
    mus = torch.tensor([0.0, 1.0, 0.0, 2.0])
    logvars = torch.tensor([0.0, 0.0, LN4, -LN4])
    kl = [0.0, 0.5, 0.5 * (4 - 1 - LN4), 0.5 * (4 + 0.25 - 1 + LN4)]
    mean = mus.view(1, 4, 1, 1).expand(b, 4, h, w).clone()
    logvar = logvars.view(1, 4, 1, 1).expand(b, 4, h, w).clone()
    return mean, logvar, kl


def test_kl_per_element_matches_hand_formula():
    mean, logvar, kl = _constant_posterior()
    got = kl_to_standard_normal(mean, logvar)
    assert got.shape == mean.shape
    for c in range(4):
        torch.testing.assert_close(got[:, c], torch.full_like(got[:, c], kl[c]))
    # a general element: 0.5 (mu^2 + sigma^2 - 1 - log sigma^2)
    mu, lv = torch.tensor(-0.7), torch.tensor(0.3)
    assert kl_to_standard_normal(mu, lv).item() == pytest.approx(0.5 * (0.49 + math.exp(0.3) - 1 - 0.3))


def test_rate_and_active_channels_of_a_constructed_case():
    mean, logvar, kl = _constant_posterior(b=2, h=2, w=2)
    stats = LatentStats(4, image_hw=(16, 16))
    stats.update(mean, logvar, mean)  # z = mu: the z moments do not matter here
    r = stats.report()
    kl_image = 2 * 2 * sum(kl)  # h*w positions x sum over channels
    assert r["images"] == 2 and r["latent_elements_per_channel"] == 2 * 2 * 2
    assert r["kl_nats_per_image"] == pytest.approx(kl_image)
    assert r["rate_bits_per_pixel"] == pytest.approx(kl_image / math.log(2) / (16 * 16))
    assert r["kl_nats_per_element"] == pytest.approx(sum(kl) / 4)
    assert r["kl_nats_per_element_per_channel"] == pytest.approx(kl)
    # channel 0 is q(z|x) = N(0, 1): collapsed; the others carry information
    assert r["active_channels"] == 3 and r["active_channel_indices"] == [1, 2, 3]
    assert r["active_threshold_nats"] == 0.01
    assert stats.report(active_threshold_nats=0.6)["active_channel_indices"] == [2, 3]


def test_image_size_is_required_and_shapes_checked():
    mean, logvar, _ = _constant_posterior()
    with pytest.raises(ValueError, match="image_hw"):
        LatentStats(4).update(mean, logvar, mean)
    with pytest.raises(ValueError, match="channels"):
        LatentStats(3, (16, 16)).update(mean, logvar, mean)
    with pytest.raises(ValueError, match="before any update"):
        LatentStats(4, (16, 16)).report()
    # mixed image sizes: the rate is per pixel of all images
    stats = LatentStats(4)
    stats.update(mean, logvar, mean, image_hw=(16, 16))
    stats.update(mean, logvar, mean, image_hw=(32, 32))
    assert stats.report()["rate_bits_per_pixel"] == pytest.approx(
        2 * 2 * 2 * 2 * sum(_constant_posterior()[2]) / math.log(2) / (2 * 256 + 2 * 1024))


def _gaussian_batch(seed, b=64, c=4, hw=16, loc=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    z = loc + scale * torch.randn(b, c, hw, hw, generator=g)
    return torch.zeros_like(z), torch.zeros_like(z), z


def test_standard_normal_aggregate_is_at_the_prior():
    stats = LatentStats(4, (128, 128))
    stats.update(*_gaussian_batch(0))  # 65536 samples per channel
    r = stats.report()
    assert r["scaling_factor"] == pytest.approx(1.0, abs=0.01)
    assert r["shift_factor"] == pytest.approx(0.0, abs=0.01)
    assert r["z_mean_per_channel"] == pytest.approx([0.0] * 4, abs=0.02)
    assert r["z_std_per_channel"] == pytest.approx([1.0] * 4, abs=0.02)
    assert r["prior_kl_moment_matched_mean"] == pytest.approx(0.0, abs=1e-3)
    assert max(r["prior_kl_moment_matched_per_channel"]) < 1e-3
    assert r["channel_correlation_max_abs"] < 0.03


def test_shifted_scaled_aggregate_and_factor_definition():
    mean, logvar, z = _gaussian_batch(1, loc=3.0, scale=2.0)
    stats = LatentStats(4, (128, 128))
    stats.update(mean, logvar, z)
    r = stats.report()
    # same definition as kl_ae.export.compute_latent_factors: 1/std and mean over all elements
    assert r["scaling_factor"] == pytest.approx(1 / z.double().flatten().std(correction=0).item(), rel=1e-9)
    assert r["shift_factor"] == pytest.approx(z.double().mean().item(), rel=1e-9)
    assert r["scaling_factor"] == pytest.approx(0.5, rel=0.01)
    assert r["prior_kl_moment_matched_mean"] == pytest.approx(0.5 * (9 + 4 - 1 - LN4), rel=0.01)
    assert r["prior_kl_moment_matched_after_scaling_mean"] == pytest.approx(0.0, abs=1e-3)


def test_channel_correlation():
    mean, logvar, z = _gaussian_batch(2, b=8)
    z[:, 1] = -z[:, 0]
    stats = LatentStats(4, (64, 64))
    stats.update(mean, logvar, z)
    r = stats.report()
    assert r["channel_correlation_max_abs"] == pytest.approx(1.0, abs=1e-9)
    assert r["channel_correlation_mean_abs"] == pytest.approx(2 / 12, abs=0.02)  # 2 of 12 ordered pairs


def test_merge_of_two_halves_equals_the_whole():
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(6, 4, 3, 3, generator=g)
    logvar = torch.randn(6, 4, 3, 3, generator=g) - 1
    z = mean + (0.5 * logvar).exp() * torch.randn(6, 4, 3, 3, generator=g)
    whole = LatentStats(4, (24, 24))
    whole.update(mean, logvar, z)
    a, b = LatentStats(4, (24, 24)), LatentStats(4, (24, 24))
    a.update(mean[:2], logvar[:2], z[:2])
    b.update(mean[2:], logvar[2:], z[2:])
    torch.testing.assert_close(LatentStats(4, (24, 24)).merge(a).merge(b).state_tensor(), whole.state_tensor())
    # the all-reduce route: sum of state tensors, loaded or rebuilt
    summed = a.state_tensor() + b.state_tensor()
    assert summed.dtype == torch.float64 and summed.numel() == LatentStats.state_size(4)
    rebuilt = LatentStats.from_state_tensor(summed)
    assert rebuilt.channels == 4
    merged = LatentStats(4, (24, 24)).load_state_tensor(summed).report()
    for key, value in whole.report().items():
        assert merged[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    with pytest.raises(ValueError):
        LatentStats.from_state_tensor(torch.zeros(10, dtype=torch.float64))


# --- decoder robustness ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vae() -> AutoencoderKL:
    return helpers.tiny_vae().eval()


def _images(seed, n=3, size=32):
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(-0.8, 0.8, size).view(1, 1, 1, size).expand(n, 3, size, size)
    return (base + 0.1 * torch.randn(n, 3, size, size, generator=g)).clamp(-1, 1)


def test_decoder_robustness_reference_and_monotone(tiny_vae):
    x = _images(0)
    out = decoder_robustness(tiny_vae, x, generator=torch.Generator().manual_seed(0))
    keys = ["psnr_sigma_0", "psnr_sigma_0.1", "psnr_sigma_0.25", "psnr_sigma_0.5", "psnr_sigma_1"]
    assert [k for k in out if k.startswith("psnr_sigma")] == keys
    with torch.no_grad():
        plain = psnr_8bit(x, tiny_vae.decode(tiny_vae.encode(x).latent_dist.mode()).sample).mean().item()
    assert out["psnr_sigma_0"] == pytest.approx(plain, rel=1e-6)
    vs_x = [out[k] for k in keys]
    assert all(later <= earlier + 1e-6 for earlier, later in zip(vs_x, vs_x[1:])), vs_x
    vs_recon = [out[k.replace("psnr", "psnr_vs_recon")] for k in keys[1:]]
    assert all(later < earlier for earlier, later in zip(vs_recon, vs_recon[1:])), vs_recon
    assert out["images"] == 3


def test_robustness_accumulates_and_merges(tiny_vae):
    x1, x2 = _images(1, n=2), _images(2, n=2)
    std = [1.0, 0.5, 2.0, 1.0]
    one = RobustnessStats((0.5,), latent_std=std, generator=torch.Generator().manual_seed(0))
    one.update(tiny_vae, x1)
    two = RobustnessStats((0.5,), latent_std=std, generator=torch.Generator().manual_seed(1))
    two.update(tiny_vae, x2)
    r1, r2 = one.report(), two.report()
    merged = RobustnessStats((0.5,), latent_std=std).load_state_tensor(one.state_tensor() + two.state_tensor())
    r = merged.report()
    assert r["images"] == 4
    assert r["psnr_sigma_0.5"] == pytest.approx((r1["psnr_sigma_0.5"] + r2["psnr_sigma_0.5"]) / 2)
    assert one.merge(two).report() == pytest.approx(r)
    # the first-batch estimate of std_z is kept and exposed
    auto = RobustnessStats(generator=torch.Generator().manual_seed(0))
    auto.update(tiny_vae, x1)
    assert auto.latent_std.shape == (4,) and auto.latent_std_source == "first batch"
    with pytest.raises(ValueError, match="channels"):
        RobustnessStats(latent_std=[1.0, 1.0]).update(tiny_vae, x1)
