"""Every latent-normalisation convention (issue 15, point 2): measured from the same posterior
samples, checked against hand computations, printed by kl-ae factors, stored by the export."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kl_ae.cli import main
from kl_ae.data.images import eval_transform
from kl_ae.export import compute_latent_factors, save_export
import helpers


@pytest.fixture()
def photos(tmp_path):
    return helpers.write_noise_photos(tmp_path / "photos", 5, size=(40, 48), seed=2)


def samples(vae, photos, n=5, batch=8):
    """The posterior samples compute_latent_factors draws (same images, order and generator)."""
    x = torch.stack([eval_transform(Image.open(photos / f"{i}.png"), 32) for i in range(n)])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return torch.cat([vae.encode(x[i:i + batch]).latent_dist.sample(generator=generator)
                          for i in range(0, n, batch)]).double()


def test_every_convention_against_a_hand_computation(photos):
    vae = helpers.tiny_vae(4)
    factors = compute_latent_factors(vae, str(photos), resolution=32, num_images=5, use_shift=True, progress=False)
    z = samples(vae, photos)
    per_channel = z.transpose(0, 1).flatten(1)
    torch.testing.assert_close(torch.tensor(factors["latents_mean"], dtype=torch.float64), per_channel.mean(1),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(factors["latents_std"], dtype=torch.float64),
                               per_channel.std(1, correction=0), rtol=1e-5, atol=1e-6)
    x = torch.stack([eval_transform(Image.open(photos / f"{i}.png"), 32) for i in range(5)])
    with torch.no_grad():  # FLUX.2 pipelines encode images to the posterior mode (sample_mode="argmax")
        mode = vae.encode(x).latent_dist.mode().double()
    patched = F.pixel_unshuffle(mode, 2).transpose(0, 1).flatten(1)  # FLUX.2's 2x2 patchify order
    bn_mean = torch.tensor(factors["flux2_bn_mean"], dtype=torch.float64)
    bn_var = torch.tensor(factors["flux2_bn_var"], dtype=torch.float64)
    torch.testing.assert_close(bn_mean, patched.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn_var, patched.var(1, correction=0), rtol=1e-5, atol=1e-6)
    # normalised with these statistics (FLUX.2 adds eps 1e-4 to the variance): mean 0, std 1
    normalised = (patched - bn_mean[:, None]) / bn_var[:, None].sqrt()
    assert normalised.mean(1).abs().max() < 1e-6 and (normalised.std(1, correction=0) - 1).abs().max() < 1e-6
    assert factors["scaling_factor"] == pytest.approx(1 / z.std(correction=0).item(), rel=1e-5)


def test_the_export_stores_latents_mean_std_as_sdxl_pipelines_read_them(photos, tmp_path):
    from kl_ae.config import load_config
    from kl_ae.export import latent_factors_for

    vae = helpers.tiny_vae(4)
    cfg = load_config(None, ["model.block_out_channels=[8,16]", "model.norm_num_groups=8", "data.resolution=32",
                             "train.scaling_images=5", "model.latents_mean_std=true"])
    factors = latent_factors_for(vae, cfg, str(photos))
    config = json.loads((save_export(vae, tmp_path / "export", factors) / "config.json").read_text())
    assert config["scaling_factor"] == 1.0 and len(config["latents_mean"]) == 4
    z = samples(vae, photos)
    mean = torch.tensor(config["latents_mean"], dtype=torch.float64).view(1, 4, 1, 1)
    std = torch.tensor(config["latents_std"], dtype=torch.float64).view(1, 4, 1, 1)
    normalised = (z - mean) * config["scaling_factor"] / std  # diffusers' SDXL img2img pipeline
    per_channel = normalised.transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max() < 1e-5 and (per_channel.std(1, correction=0) - 1).abs().max() < 1e-4


def test_kl_ae_factors_prints_the_four_conventions(photos, tmp_path, capsys):
    export = tmp_path / "vae"
    helpers.tiny_vae(4).save_pretrained(export)
    assert main(["factors", str(export), str(photos), "--resolution", "32", "--num-images", "5",
                 "--out", str(tmp_path / "f.json")]) == 0
    out = capsys.readouterr().out
    for needle in ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "FLUX.2 BatchNorm",
                   "running_mean", "running_var", "measured on 5 images"):
        assert needle in out, needle
    written = json.loads((tmp_path / "f.json").read_text())
    assert len(written["flux2_bn_mean"]) == 16 and written["shift_factor"] is not None
