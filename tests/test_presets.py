"""The VAE presets build exactly the published diffusers AutoencoderKL layouts (on the meta device)."""

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from kl_ae.config import load_config
from kl_ae.model import build_autoencoder, count_parameters

CONFIGS = Path(__file__).parent.parent / "configs"

# The published vae/config.json of each model (see /work/shared/REFERENCE.md, "diffusers
# AutoencoderKL layouts"). The factors are what an export of a fine-tune of that VAE keeps for the
# diffusion model trained on it (a decoder-only fine-tune copies them from model.init_from).
COMMON = {
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "in_channels": 3,
    "out_channels": 3,
    "mid_block_add_attention": True,
    "force_upcast": True,
}
PUBLISHED = {
    "sd1-vae.yaml": {"latent_channels": 4, "scaling_factor": 0.18215, "shift_factor": None,
                     "use_quant_conv": True, "use_post_quant_conv": True},
    "sdxl-vae.yaml": {"latent_channels": 4, "scaling_factor": 0.13025, "shift_factor": None,
                      "use_quant_conv": True, "use_post_quant_conv": True},
    "sd3-vae.yaml": {"latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609,
                     "use_quant_conv": False, "use_post_quant_conv": False},
    "flux-vae.yaml": {"latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
                      "use_quant_conv": False, "use_post_quant_conv": False},
}
PARAMS = {4: 83_653_863, 16: 83_819_683}  # SD 1.x/SDXL and SD3/FLUX.1 VAEs


@pytest.fixture(scope="module", params=sorted(PUBLISHED), ids=str)
def preset(request):
    cfg = load_config(CONFIGS / request.param)
    with torch.device("meta"):
        vae = build_autoencoder(cfg.model)
    return request.param, cfg, vae


def test_preset_builds_the_published_layout(preset):
    name, cfg, vae = preset
    published = {**COMMON, **PUBLISHED[name]}
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "norm_num_groups",
                "act_fn", "in_channels", "out_channels", "latent_channels", "use_quant_conv",
                "use_post_quant_conv", "mid_block_add_attention", "force_upcast"):
        value = vae.config[key]
        assert (list(value) if isinstance(value, (list, tuple)) else value) == published[key], key
    assert cfg.model.downsampling_factor == 8
    assert count_parameters(vae) == PARAMS[published["latent_channels"]]


def test_preset_modules(preset):
    name, _, vae = preset
    quant = PUBLISHED[name]["use_quant_conv"]
    assert (vae.quant_conv is not None) == quant and (vae.post_quant_conv is not None) == quant
    for mid in (vae.encoder.mid_block, vae.decoder.mid_block):
        assert len(mid.attentions) == 1 and mid.attentions[0] is not None
    # attention only in the mid block: the down/up blocks are plain ResNet stacks (LDM kl-f8)
    assert not any("attention" in n for n, _ in vae.encoder.down_blocks.named_modules())
    assert not any("attention" in n for n, _ in vae.decoder.up_blocks.named_modules())
    assert vae.encoder.conv_out.out_channels == 2 * PUBLISHED[name]["latent_channels"]  # mean and log-variance


def test_published_weights_load_into_the_preset(preset):
    """The published VAE's config, built by diffusers, has exactly the preset's tensor names and
    shapes: init_from can load the published weights into it."""
    name, _, vae = preset
    published = {**COMMON, **PUBLISHED[name]}
    with torch.device("meta"):
        reference = AutoencoderKL.from_config(published)
    ours = {k: v.shape for k, v in vae.state_dict().items()}
    assert ours == {k: v.shape for k, v in reference.state_dict().items()}


def test_preset_exports_a_shift_exactly_where_the_published_vae_has_one(preset):
    """16-channel VAEs (SD3, FLUX.1) publish a shift_factor and their presets export one
    (model.use_shift_factor); 4-channel ones (SD 1.x, SDXL) do neither."""
    name, cfg, _ = preset
    published = PUBLISHED[name]
    assert cfg.model.use_shift_factor == (published["shift_factor"] is not None)
    assert cfg.model.latent_channels == published["latent_channels"]


def test_presets_keep_the_ldm_recipe(preset):
    _, cfg, _ = preset
    assert cfg.loss.kl_weight == 1e-6 and cfg.loss.perceptual_weight == 1.0 and cfg.loss.disc_loss == "hinge"
    assert cfg.loss.disc_start == 50001 and cfg.loss.disc_weight == 0.5
    assert cfg.optim.base_learning_rate == 4.5e-6 and cfg.optim.scale_lr
    assert cfg.train.batch_size == 12 and cfg.train.gradient_accumulation_steps == 2
    assert cfg.data.resolution == 256 and not cfg.model.init_from


def test_preset_factors_are_the_published_ones(preset):
    from kl_ae.presets import PRESETS

    name, cfg, _ = preset
    p = PRESETS[cfg.model.preset]
    assert (p.scaling_factor, p.shift_factor) == (PUBLISHED[name]["scaling_factor"], PUBLISHED[name]["shift_factor"])


def test_yaml_and_set_values_apply_on_top_of_a_preset(tmp_path):
    from kl_ae.config import save_config
    from kl_ae.parsing import ConfigError

    cfg = load_config(None, ["model.latent_channels=32", "model.preset=flux"])  # order does not matter
    assert (cfg.model.latent_channels, cfg.model.use_quant_conv, cfg.model.use_shift_factor) == (32, False, True)
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg  # a run's saved config reloads as it was
    with pytest.raises(ConfigError, match="model.preset='sd5' is not a preset"):
        load_config(None, ["model.preset=sd5"])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_yaml_states_only_what_differs_from_the_defaults(path):
    """Every value in a shipped config differs from the default beneath it (the dataclass default,
    or its preset's value): a config that restates defaults hides what it changes."""
    import dataclasses

    from kl_ae.config import CPU_WITHOUT_BF16_SECTION, Config, preset_values, read_config_file

    from kl_ae.parsing import apply

    raw, machine = read_config_file(path)  # as load_config reads it (YAML 1.2); beneath the section: the file
    machine = machine or {}
    beneath = Config()
    if raw.get("model", {}).get("preset"):
        apply(beneath.model, preset_values(raw["model"]["preset"]), "model.")
    restated = [f"{section}.{key}: {value!r}" for section, values in raw.items() for key, value in values.items()
                if key != "preset" and getattr(getattr(beneath, section), key) == value]
    apply(beneath, raw)
    restated += [f"{CPU_WITHOUT_BF16_SECTION}.{section}.{key}: {value!r}" for section, values in machine.items()
                 for key, value in values.items() if getattr(getattr(beneath, section), key) == value]
    assert not restated, f"{path.name} restates defaults: {restated}"
    assert set(raw) <= {f.name for f in dataclasses.fields(Config)}
