"""model.init_from as a single LDM/SGM-layout VAE file (.safetensors / .ckpt): exact loading,
the errors before training, and a decoder-only fine-tune from one."""

import json
import re

import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL

from kl_ae.config import load_config

from kl_ae.parsing import ConfigError

from kl_ae.model import check_init_from
from kl_ae.model import load_or_build_autoencoder
from kl_ae.trainer import train
import helpers

ARCH = ["model.block_out_channels=[8,16]", "model.layers_per_block=1", "model.norm_num_groups=8"]
PAYLOAD_RAN = []


def to_ldm_layout(state: dict, levels: int) -> dict:
    """diffusers AutoencoderKL keys -> the LDM first-stage keys (test data, written by hand):
    down_blocks.i.resnets.j -> down.i.block.j, up_blocks.i -> up.(levels-1-i) (LDM counts the
    decoder from the lowest resolution), mid_block -> mid.block_1/2 + mid.attn_1 with 1x1-conv
    q/k/v/proj_out weights, conv_shortcut -> nin_shortcut, conv_norm_out -> norm_out."""
    renames = [(r"down_blocks\.(\d+)\.resnets\.", lambda m: f"down.{m[1]}.block."),
               (r"down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"down.{m[1]}.downsample."),
               (r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{levels - 1 - int(m[1])}.block."),
               (r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{levels - 1 - int(m[1])}.upsample."),
               (r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}."),
               (r"mid_block\.attentions\.0\.", lambda m: "mid.attn_1."),
               (r"\.group_norm\.", lambda m: ".norm."), (r"\.to_(q|k|v)\.", lambda m: f".{m[1]}."),
               (r"\.to_out\.0\.", lambda m: ".proj_out."), (r"conv_shortcut", lambda m: "nin_shortcut"),
               (r"conv_norm_out", lambda m: "norm_out")]
    out = {}
    for key, tensor in state.items():
        for pattern, new in renames:
            key = re.sub(pattern, new, key)
        if ".attn_1." in key and key.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[key] = tensor.clone().contiguous()
    return out


def as_training_ckpt(ldm: dict) -> dict:
    """An LDM Lightning checkpoint: the VAE under first_stage_model., next to loss.* tensors."""
    loss = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4)}
    return {"state_dict": {**{f"first_stage_model.{k}": v for k, v in ldm.items()}, **loss}, "global_step": 7}


@pytest.fixture()
def original(tmp_path):
    """A tiny VAE, its LDM-layout .safetensors and .ckpt, and its diffusers directory (config)."""
    vae = helpers.tiny_vae(scaling_factor=0.123, sample_size=32)
    ldm = to_ldm_layout(vae.state_dict(), levels=2)
    assert "encoder.mid.attn_1.q.weight" in ldm and "decoder.up.1.upsample.conv.weight" in ldm
    safetensors.torch.save_file(ldm, tmp_path / "vae.safetensors")
    torch.save(as_training_ckpt(ldm), tmp_path / "vae.ckpt")
    vae.save_pretrained(tmp_path / "diffusers")
    return vae, ldm


def load(*overrides) -> AutoencoderKL:
    return load_or_build_autoencoder(load_config(None, ARCH + list(overrides)).model)


@pytest.mark.parametrize("name", ["vae.safetensors", "vae.ckpt"])
@pytest.mark.parametrize("with_config", [False, True])
def test_loads_exactly(original, tmp_path, name, with_config):
    vae, _ = original
    extra = [f"model.init_config={tmp_path / 'diffusers/config.json'}"] if with_config else []
    loaded = load(f"model.init_from={tmp_path / name}", *extra)
    ours, theirs = vae.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.eval()(x).sample, loaded.eval()(x).sample)  # posterior mode: deterministic
    if with_config:  # the config's factors travel with the model (a decoder-only export keeps them)
        assert loaded.config.scaling_factor == 0.123


def checked(*overrides):
    """What a run checks before it builds any model (kl_ae.trainer.train calls it first)."""
    cfg = load_config(None, ARCH + list(overrides))
    check_init_from(cfg.model)
    return cfg


def test_unusable_paths_fail_before_any_model_is_built(original, tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        checked(f"model.init_from={tmp_path / 'missing.ckpt'}")
    (tmp_path / "vae.npz").write_bytes(b"")
    with pytest.raises(ConfigError, match="unknown file type '.npz'"):
        checked(f"model.init_from={tmp_path / 'vae.npz'}")
    with pytest.raises(ConfigError, match=r"model.init_config=.* does not match .*latent_channels=8 but the VAE has"):
        checked(f"model.init_from={tmp_path / 'vae.ckpt'}", "model.latent_channels=8",
                f"model.init_config={tmp_path / 'diffusers'}")
    with pytest.raises(ConfigError, match="model.init_config=.*: no config.json"):
        checked(f"model.init_from={tmp_path / 'vae.ckpt'}", f"model.init_config={tmp_path}")
    with pytest.raises(ConfigError, match="only for a single-file"):
        checked(f"model.init_from={tmp_path / 'diffusers'}", f"model.init_config={tmp_path / 'diffusers'}")
    with pytest.raises(ConfigError, match="set model.init_from too"):
        load_config(None, ARCH + [f"model.init_config={tmp_path / 'diffusers'}"])


def test_files_that_are_not_an_ldm_vae(original, tmp_path):
    vae, _ = original
    safetensors.torch.save_file(vae.state_dict(), tmp_path / "diffusers.safetensors")
    with pytest.raises(ConfigError, match="diffusers layout.*set model.init_from to that directory"):
        load(f"model.init_from={tmp_path / 'diffusers.safetensors'}")
    torch.save({"state_dict": {"model.layer.weight": torch.zeros(2)}}, tmp_path / "random.pt")
    with pytest.raises(ConfigError, match=r"holds no LDM/SGM VAE.*found e.g. \['model.layer.weight'\]"):
        load(f"model.init_from={tmp_path / 'random.pt'}")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="cannot be read as safetensors"):
        load(f"model.init_from={tmp_path / 'junk.safetensors'}")


class Payload:
    def __reduce__(self):
        return PAYLOAD_RAN.append, (True,)


def test_pickle_needing_code_is_refused_unrun(original, tmp_path):
    _, ldm = original
    torch.save({**as_training_ckpt(ldm), "hyper_parameters": Payload()}, tmp_path / "unsafe.ckpt")
    with pytest.raises(ConfigError, match=r"weights_only=True\) refused it .*re-save its state dict as .safetensors"):
        load(f"model.init_from={tmp_path / 'unsafe.ckpt'}")
    assert not PAYLOAD_RAN


def test_architecture_mismatches_name_the_tensor(original, tmp_path):
    _, ldm = original
    with pytest.raises(ConfigError, match=r"has 4 latent channels \(decoder.conv_in.weight \(16, 4, 3, 3\)\) "
                                          r"but model.latent_channels=8"):
        load(f"model.init_from={tmp_path / 'vae.safetensors'}", "model.latent_channels=8")
    with pytest.raises(ConfigError, match=r"tensors missing \(e.g. \['encoder.down_blocks.0.resnets.1"):
        load(f"model.init_from={tmp_path / 'vae.safetensors'}", "model.layers_per_block=2")
    with pytest.raises(ConfigError, match=r"left over \(e.g. \['decoder.mid.attn_1"):
        load(f"model.init_from={tmp_path / 'vae.safetensors'}", "model.mid_block_add_attention=false")
    bad = {**ldm, "encoder.mid.attn_1.q.weight": torch.zeros(8, 16, 1, 1)}
    safetensors.torch.save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ConfigError, match=r"encoder.mid.attn_1.q.weight \(diffusers key encoder.mid_block.attentions"
                                          r".0.to_q.weight\) has shape \(8, 16\) but the model config needs "
                                          r"\(16, 16\)"):
        load(f"model.init_from={tmp_path / 'bad.safetensors'}")
    with pytest.raises(ConfigError, match=r"encoder.conv_in.weight has shape \(8, 3, 3, 3\) but the model config "
                                          r"needs \(16, 3, 3, 3\)"):
        load(f"model.init_from={tmp_path / 'vae.safetensors'}", "model.block_out_channels=[16,16]")


@pytest.mark.parametrize("with_config", [True, False])
def test_decoder_only_finetune_from_single_file(original, tmp_path, with_config):
    vae, _ = original
    photos = helpers.write_noise_photos(tmp_path / "photos", 4)
    extra = [f"model.init_config={tmp_path / 'diffusers'}"] if with_config else []
    train(load_config(None, ARCH + [
        f"model.init_from={tmp_path / 'vae.ckpt'}", *extra, "model.train_encoder=false", f"data.train={photos}",
        "data.resolution=32", "data.num_workers=0", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2",
        "train.batch_size=2", "train.tracker=none", "train.gradient_accumulation_steps=1",
        "train.mixed_precision=no", "train.scaling_images=2", "loss.perceptual_weight=0",
        "loss.disc_start=100", "optim.scale_lr=false", "optim.base_learning_rate=1e-3"]))
    before = vae.state_dict()
    after = AutoencoderKL.from_pretrained(tmp_path / "run/export").state_dict()
    encoder_side = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert encoder_side and all(torch.equal(before[k], after[k]) for k in encoder_side)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    config = json.loads((tmp_path / "run/export/config.json").read_text())
    stats = json.loads((tmp_path / "run/export/latent_stats.json").read_text())
    if with_config:
        assert config["scaling_factor"] == 0.123 and "model.init_config=" in stats["source"]
    else:
        assert config["scaling_factor"] == pytest.approx(1 / stats["std"]) and "measured" in stats["source"]


def test_a_single_file_for_a_flux2_model_is_one_clear_error(original, tmp_path):
    """The LDM/SGM conversion knows no FLUX.2 BatchNorm: say to use the diffusers folder instead."""
    with pytest.raises(ConfigError, match="single file loads only into an AutoencoderKL.*FLUX.2"):
        load("model.architecture=AutoencoderKLFlux2", f"model.init_from={tmp_path / 'vae.safetensors'}")
