"""Fine-tuning an existing diffusers VAE: model.init_from, decoder-only mode, config checks."""

import json

import pytest
import torch
from diffusers import AutoencoderKL

from kl_ae.config import load_config

from kl_ae.parsing import ConfigError
from kl_ae.trainer import train
import helpers

ARCH = ["model.block_out_channels=[8,16]", "model.layers_per_block=1", "model.norm_num_groups=8"]


@pytest.fixture()
def setup(tmp_path):
    photos = helpers.write_noise_photos(tmp_path / "photos", 4)
    vae = helpers.tiny_vae(scaling_factor=0.123, sample_size=32)
    vae.save_pretrained(tmp_path / "original")
    return photos, tmp_path / "original"


def run(photos, original, run_dir, *extra):
    return load_config(None, ARCH + [
        f"model.init_from={original}", f"data.train={photos}", "data.resolution=32", "data.num_workers=0",
        f"train.output_dir={run_dir}", "train.max_steps=3", "train.batch_size=2", "train.tracker=none",
        "train.gradient_accumulation_steps=1", "train.mixed_precision=no", "train.scaling_images=2",
        "loss.perceptual_weight=0", "loss.disc_start=2", "loss.disc_channels=8", "loss.disc_num_layers=2",
        "optim.scale_lr=false", "optim.base_learning_rate=1e-3", *extra])


def test_decoder_only_keeps_encoder_and_factors(setup, tmp_path):
    photos, original = setup
    train(run(photos, original, tmp_path / "run", "model.train_encoder=false"))
    before = AutoencoderKL.from_pretrained(original).state_dict()
    after = AutoencoderKL.from_pretrained(tmp_path / "run/export").state_dict()
    encoder_side = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert encoder_side and all(torch.equal(before[k], after[k]) for k in encoder_side)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    config = json.loads((tmp_path / "run/export/config.json").read_text())
    assert config["scaling_factor"] == 0.123 and config["shift_factor"] is None


def test_full_finetune_recomputes_factors(setup, tmp_path):
    photos, original = setup
    train(run(photos, original, tmp_path / "run"))
    config = json.loads((tmp_path / "run/export/config.json").read_text())
    assert config["scaling_factor"] != 0.123
    stats = json.loads((tmp_path / "run/export/latent_stats.json").read_text())
    assert config["scaling_factor"] == pytest.approx(1 / stats["std"])


@pytest.mark.parametrize("train_encoder", [False, True])
def test_export_writes_its_own_normalisation_and_upcast_not_the_originals(tmp_path, train_encoder):
    """An original that says force_upcast: false (an fp16-fixed VAE) and has per-channel
    latents_mean/std (SDXL-family): a decoder-only fine-tune keeps the statistics (the latent
    space is the original's), a full one measures a new scaling_factor and must not keep them;
    neither passed an fp16 audit as a loss.fp16_fix run, so both say force_upcast: true."""
    photos = helpers.write_noise_photos(tmp_path / "photos", 4)
    mean, std = [0.1, -0.2, 0.3, 0.0], [0.9, 1.1, 1.2, 0.8]
    helpers.tiny_vae(scaling_factor=0.5, sample_size=32, force_upcast=False, latents_mean=mean,
                     latents_std=std).save_pretrained(tmp_path / "original")
    train(run(photos, tmp_path / "original", tmp_path / "run", f"model.train_encoder={str(train_encoder).lower()}"))
    config = json.loads((tmp_path / "run/export/config.json").read_text())
    assert config["force_upcast"] is True
    if train_encoder:
        assert config["latents_mean"] is None and config["latents_std"] is None
        assert config["scaling_factor"] != 0.5
    else:
        assert config["scaling_factor"] == 0.5
        assert config["latents_mean"] == pytest.approx(mean) and config["latents_std"] == pytest.approx(std)


def test_mismatched_architecture_is_one_clear_error(setup, tmp_path):
    photos, original = setup
    with pytest.raises(ConfigError, match=r"model.latent_channels=16 but the VAE has 4"):
        train(run(photos, original, tmp_path / "run", "model.latent_channels=16"))
    assert not (tmp_path / "run").exists()  # refused before the run directory was made
    with pytest.raises(ConfigError, match="no config.json"):
        train(load_config(None, ARCH + [f"model.init_from={tmp_path / 'missing'}"]))
    with pytest.raises(ConfigError, match="needs model.init_from"):
        load_config(None, ["model.train_encoder=false"])


def test_saved_config_reloads_after_the_vae_has_moved(setup, tmp_path):
    """Validating a config reads no disk: kl-ae export / eval reload a fine-tune's config.yaml
    although its model.init_from is gone."""
    from kl_ae.config import save_config

    photos, original = setup
    cfg = run(photos, original, tmp_path / "run")
    save_config(cfg, tmp_path / "config.yaml")
    original.rename(tmp_path / "moved")
    assert load_config(tmp_path / "config.yaml").model.init_from == str(original)


def test_exporting_a_decoder_only_checkpoint_without_images_says_it_is_not_audited(setup, tmp_path, caplog):
    """Its kept factors need no images, the fp16 audit does: no audit, and no 'audit failed' warning."""
    from kl_ae.export import export_checkpoint
    from kl_ae.eval.fp16 import FP16_AUDIT

    photos, original = setup
    train(run(photos, original, tmp_path / "run", "model.train_encoder=false", "train.checkpoint_every=1",
              "train.keep_last=0"))
    with caplog.at_level("INFO", logger="kl_ae"):
        out = export_checkpoint(tmp_path / "run/checkpoints/step-0000002", tmp_path / "export-2")
    assert json.loads((out / "config.json").read_text())["scaling_factor"] == 0.123
    assert not (out / FP16_AUDIT).exists()
    assert "the export is not audited for fp16" in caplog.text and "audit of the export failed" not in caplog.text
