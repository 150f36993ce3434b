"""Latent scaling/shift factors and loading paths of kl_ae.export."""

import json

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from kl_ae.config import ModelConfig
from kl_ae.export import compute_latent_factors, save_export
from kl_ae.model import load_autoencoder
from kl_ae.data.images import eval_transform
from kl_ae.model import build_autoencoder
import helpers


@pytest.fixture()
def folder(tmp_path):
    return helpers.write_noise_photos(tmp_path, 5, size=(40, 48), seed=1)


def tiny_vae(channels=16):
    torch.manual_seed(0)
    cfg = ModelConfig(block_out_channels=[8, 16], layers_per_block=1, latent_channels=channels,
                      norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False)
    return build_autoencoder(cfg)


def test_factors_are_inverse_std_and_mean_of_posterior_samples(folder):
    vae = tiny_vae(16)
    factors = compute_latent_factors(vae, str(folder), resolution=32, num_images=5, batch_size=2,
                                     use_shift=True, progress=False)
    # independent computation: same images, same sampling noise (a generator seeded with 0)
    x = torch.stack([eval_transform(Image.open(folder / f"{i}.png"), 32) for i in range(5)])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z = torch.cat([vae.encode(x[i:i + 2]).latent_dist.sample(generator=generator)
                       for i in range(0, 5, 2)]).double()
    assert factors["num_images"] == 5
    assert factors["shift_factor"] == pytest.approx(z.mean().item(), rel=1e-6)
    assert factors["scaling_factor"] == pytest.approx(1 / z.std(unbiased=False).item(), rel=1e-6)


def test_the_same_weights_and_images_give_the_same_factors(folder):
    vae = tiny_vae(16)
    first = compute_latent_factors(vae, str(folder), resolution=32, num_images=5, use_shift=True, progress=False)
    torch.manual_seed(99)  # the global RNG plays no part
    again = compute_latent_factors(vae, str(folder), resolution=32, num_images=5, use_shift=True, progress=False)
    assert first == again


def test_four_channel_layout_has_no_shift(folder):
    factors = compute_latent_factors(tiny_vae(4), str(folder), resolution=32, num_images=3,
                                     use_shift=False, progress=False)
    assert factors["shift_factor"] is None and factors["num_images"] == 3


def test_export_stores_factors_in_diffusers_config(folder, tmp_path):
    vae = tiny_vae(16)
    factors = compute_latent_factors(vae, str(folder), resolution=32, num_images=5, use_shift=True,
                                     progress=False)
    out = save_export(vae, tmp_path / "export", factors, {"step": 0})
    config = json.loads((out / "config.json").read_text())
    assert config["scaling_factor"] == pytest.approx(factors["scaling_factor"])
    assert config["shift_factor"] == pytest.approx(factors["shift_factor"])
    assert config["use_quant_conv"] is False and config["latent_channels"] == 16
    # diffusers' tile size: the training resolution (32), raised to cover the decoder's 49-px
    # receptive field (tests/test_eval_scale.py) by the smallest power of two
    assert config["sample_size"] == 64
    reloaded = load_autoencoder(out)
    assert isinstance(reloaded, AutoencoderKL)
    assert reloaded.config.shift_factor == pytest.approx(factors["shift_factor"])


def test_load_autoencoder_explains_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_autoencoder(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="neither a diffusers AutoencoderKL directory"):
        load_autoencoder(tmp_path)


def test_no_usable_image_is_a_clear_error(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="no usable image"):
        compute_latent_factors(tiny_vae(4), str(tmp_path), resolution=32, progress=False)
