"""The FLUX.2 layout (issue 15, point 1): train a tiny AutoencoderKLFlux2, export it with BatchNorm
statistics measured on the training images, and normalise its latents as FLUX.2 pipelines do."""

import json

import pytest
import torch
from diffusers import AutoencoderKLFlux2
from PIL import Image

from kl_ae.config import load_config
from kl_ae.data.images import eval_transform
from kl_ae.model import load_autoencoder
from kl_ae.trainer import train
import helpers


def patchify(latents):
    """diffusers pipeline_flux2.Flux2Pipeline._patchify_latents, written out: importing the
    pipeline needs transformers, which kl-ae does not depend on."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def test_a_flux2_run_exports_batchnorm_statistics_that_normalise_its_latents(tmp_path):
    photos = helpers.write_noise_photos(tmp_path / "photos", 6, size=(40, 48))
    run_dir = tmp_path / "run"
    cfg = load_config(None, helpers.tiny_train_overrides(photos, run_dir, 3, **{
        "model.preset": "flux2", "model.latent_channels": 8, "train.scaling_images": 6}))
    assert cfg.model.architecture == "AutoencoderKLFlux2"
    train(cfg)
    export = run_dir / "export"
    assert json.loads((export / "config.json").read_text())["_class_name"] == "AutoencoderKLFlux2"
    vae = AutoencoderKLFlux2.from_pretrained(export).eval()
    assert isinstance(load_autoencoder(export), AutoencoderKLFlux2)  # kl-ae eval reads it too
    # the pipeline's normalisation (pipeline_flux2._encode_vae_image) on the images measured
    x = torch.stack([eval_transform(Image.open(photos / f"{i}.png"), 32) for i in range(6)])
    with torch.no_grad():
        latents = patchify(vae.encode(x).latent_dist.mode())
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    normalised = ((latents - mean) / std).transpose(0, 1).flatten(1)
    assert normalised.shape[0] == 32  # 4 x 8 patchified channels
    assert normalised.mean(1).abs().max() < 1e-3
    # std 1 but for the eps the pipeline adds to the variance: sqrt(var / (var + eps))
    expected = (vae.bn.running_var / (vae.bn.running_var + vae.config.batch_norm_eps)).sqrt()
    torch.testing.assert_close(normalised.std(1, correction=0), expected, atol=1e-3, rtol=0)
    assert expected.min() > 0.9
    stats = json.loads((export / "latent_stats.json").read_text())
    assert stats["num_images"] == 6 and len(stats["flux2_bn_mean"]) == 32
    _generate_through_the_flux2_pipeline(vae)


def _generate_through_the_flux2_pipeline(vae):
    """The export as the vae of a real diffusers Flux2Pipeline with a tiny random transformer;
    prompt embeddings are given, so no text encoder or tokenizer is needed (transformers is, to
    import the pipeline module). The pipeline de-normalises the generated latents with the
    export's BatchNorm statistics before decoding: what it decodes is checked against that."""
    pytest.importorskip("transformers", reason="diffusers' FLUX.2 pipeline module imports transformers")
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel

    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(in_channels=32, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                          num_attention_heads=2, joint_attention_dim=32,
                                          timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4))
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                         transformer=transformer)
    decoded = []
    decode = vae.decode
    vae.decode = lambda z, *a, **k: decoded.append(z) or decode(z, *a, **k)
    prompt_embeds = torch.randn(1, 8, 32)
    packed = pipe(prompt_embeds=prompt_embeds, height=32, width=32, num_inference_steps=2,
                  output_type="latent", generator=torch.Generator().manual_seed(0)).images
    images = pipe(prompt_embeds=prompt_embeds, height=32, width=32, num_inference_steps=2,
                  output_type="pt", generator=torch.Generator().manual_seed(0)).images
    vae.decode = decode
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all() and images.std() > 0
    # the decoded latent, patchified again, is the generated one times sqrt(var + eps) plus mean
    (z,) = decoded
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    generated = packed.transpose(1, 2).reshape(1, 32, 8, 8)  # (B, h*w, C) tokens back to (B, C, h, w)
    torch.testing.assert_close(patchify(z), generated * std + mean, atol=1e-5, rtol=1e-5)


def test_the_shipped_flux2_config_builds_the_flux2_class():
    from kl_ae.model import build_autoencoder

    cfg = load_config("flux2-vae")
    with torch.device("meta"):
        vae = build_autoencoder(cfg.model)
    assert isinstance(vae, AutoencoderKLFlux2) and vae.config.latent_channels == 32
    assert vae.quant_conv is not None and tuple(vae.config.patch_size) == (2, 2) and vae.bn.num_features == 128


def test_a_decoder_only_fine_tune_of_a_flux2_vae_keeps_its_batchnorm_statistics_and_encoder(tmp_path):
    from kl_ae.model import build_autoencoder

    photos = helpers.write_noise_photos(tmp_path / "photos", 4, size=(40, 48))
    arch = {"model.preset": "flux2", "model.latent_channels": 8}
    original = build_autoencoder(load_config(None, helpers.tiny_train_overrides(photos, tmp_path / "x", 1,
                                                                                **arch)).model)
    with torch.no_grad():  # statistics as a released FLUX.2 VAE carries them
        original.bn.running_mean.copy_(torch.linspace(-1, 1, 32))
        original.bn.running_var.copy_(torch.linspace(0.5, 2, 32))
    original.save_pretrained(tmp_path / "flux2-vae")
    train(load_config(None, helpers.tiny_train_overrides(photos, tmp_path / "run", 2, **arch, **{
        "model.init_from": tmp_path / "flux2-vae", "model.train_encoder": "false"})))
    tuned = AutoencoderKLFlux2.from_pretrained(tmp_path / "run/export")
    torch.testing.assert_close(tuned.bn.running_mean, torch.linspace(-1, 1, 32), rtol=0, atol=0)
    torch.testing.assert_close(tuned.bn.running_var, torch.linspace(0.5, 2, 32), rtol=0, atol=0)
    before, after = original.state_dict(), tuned.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert "kept from model.init_from" in json.loads((tmp_path / "run/export/latent_stats.json").read_text())["source"]


def test_the_unsharded_copy_of_a_flux2_vae_is_a_flux2_vae():
    """FSDP2 export and evaluation go through kl_ae.distributed.unsharded_autoencoder: its copy
    must keep the BatchNorm (an AutoencoderKL from the same config cannot load it)."""
    from diffusers import AutoencoderKLFlux2

    from kl_ae.config import ModelConfig
    from kl_ae.distributed import unsharded_autoencoder
    from kl_ae.model import build_autoencoder

    vae = build_autoencoder(ModelConfig(architecture="AutoencoderKLFlux2", block_out_channels=[8, 16],
                                        layers_per_block=1, norm_num_groups=8, latent_channels=4))
    plain, _ = unsharded_autoencoder(vae, None, is_main=True)
    assert isinstance(plain, AutoencoderKLFlux2)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), vae.state_dict().values()))
