from pathlib import Path

import pytest
import torch

from kl_ae.config import Config, load_config, save_config

from kl_ae.parsing import ConfigError
from kl_ae.model import build_autoencoder, count_parameters

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
# Parameter counts of the diffusers AutoencoderKL layouts (SD 1.x VAE: 83,653,863).
EXPECTED_PARAMS = {"sd-f8c4.yaml": 83_653_863, "f8c16.yaml": 83_819_683}


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "sd-f8c4.yaml", "f8c16.yaml"} <= names


@pytest.mark.parametrize("without_bf16", [False, True], ids=["bf16-cpu", "cpu-without-bf16"])
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_builds(path, without_bf16, monkeypatch):
    """On both kinds of machine: an on_cpu_without_bf16 section must pass validation too."""
    monkeypatch.setattr("kl_ae.config.cpu_without_bf16", lambda: without_bf16)
    cfg = load_config(path)
    with torch.device("meta"):
        vae = build_autoencoder(cfg.model)
    n = count_parameters(vae)
    if path.name in EXPECTED_PARAMS:
        assert n == EXPECTED_PARAMS[path.name]
    assert vae.config.latent_channels == cfg.model.latent_channels


def test_sd_config_matches_ldm_hyperparameters():
    cfg = load_config(Path(__file__).parent.parent / "configs" / "sd-f8c4.yaml")
    assert cfg.loss.kl_weight == 1e-6 and cfg.loss.disc_start == 50001 and cfg.loss.disc_weight == 0.5
    assert cfg.data.resolution == 256 and cfg.train.batch_size == 12
    assert cfg.train.gradient_accumulation_steps == 2 and cfg.optim.base_learning_rate == 4.5e-6
    assert cfg.model.downsampling_factor == 8


def test_override_and_types(tmp_path):
    cfg = load_config(None, ["train.max_steps=20", "loss.kl_weight=1e-6", "model.block_out_channels=[32,64]",
                             "train.output_dir=" + str(tmp_path / "run")])
    assert cfg.train.max_steps == 20 and cfg.loss.kl_weight == 1e-6
    assert cfg.model.block_out_channels == [32, 64]
    assert cfg.train.output_dir == str(tmp_path / "run")


@pytest.mark.parametrize("override, key", [
    ("train.max_step=3", "train.max_step"),
    ("trian.max_steps=3", "trian"),
    ("train.max_steps=abc", "train.max_steps"),
    ("train.max_steps=1.5", "train.max_steps"),
    ("loss.learn_logvar=3", "loss.learn_logvar"),
    ("model.block_out_channels=[32,x]", "model.block_out_channels[1]"),
    ("train.max_minutes=nan", "train.max_minutes"),  # NaN passes every range check
    ("optim.base_learning_rate=.inf", "optim.base_learning_rate"),
    ("model.block_out_channels=[32,64", "model.block_out_channels"),  # not YAML: the text, not a list
])
def test_bad_keys_and_types_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, override.split("|"))


def test_a_set_value_that_is_not_yaml_is_an_error_naming_the_key_except_a_glob():
    assert load_config(None, ["data.val= *.png"]).data.val == "*.png"  # '*' starts a YAML alias
    for item in ("train.output_dir=[runs/x", "data.val='a b"):
        with pytest.raises(ConfigError, match=f"--set {item.split('=')[0]}: .* is not a YAML value"):
            load_config(None, [item])


def test_yaml_unknown_key_is_an_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_steps: 5\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match="train.batchsize"):
        load_config(f)


def test_unusable_values_fail_before_building():
    with pytest.raises(ConfigError, match="divisible"):
        load_config(None, ["data.resolution=100"])  # SD layout: factor 8
    with pytest.raises(ConfigError, match="disc_loss"):
        load_config(None, ["loss.disc_loss=wasserstein"])
    with pytest.raises(ConfigError, match="no such file, and not the name of a shipped config"):
        load_config("no/such/file.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.max_steps=7", "model.latent_channels=16"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert Config() == load_config(None)


@pytest.mark.parametrize("override,key", [
    ("data.train=", "data.train"), ("data.train='  '", "data.train"), ("train.output_dir=", "train.output_dir"),
    ("data.val=' '", "data.val"), ("model.latent_channels=0", "model.latent_channels"),
    ("model.norm_num_groups=0", "model.norm_num_groups"), ("model.layers_per_block=0", "model.layers_per_block"),
    ("loss.kl_weight=-1e-6", "loss.kl_weight"), ("loss.perceptual_weight=-1", "loss.perceptual_weight"),
    ("optim.base_learning_rate=0", "optim.base_learning_rate"),
    ("data.val=builtin:val|data.val_resolution=100", "data.val_resolution"),
    ("model.norm_num_groups=24", "model.norm_num_groups"), ("train.ema_decay=1.5", "train.ema_decay"),
    ("data.final_resolution=256|data.final_fraction=1.5", "data.final_fraction"), ("train.seed=-1", "train.seed"),
    ("loss.lpips_trunk=", "loss.lpips_trunk"), ("train.tracker=", "unknown tracker"),
    ("loss.disc_ramp_steps=-1", "loss.disc_ramp_steps"), ("optim.lr_final_ratio=2", "optim.lr_final_ratio"),
])
def test_unusable_values_are_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, override.split("|"))


@pytest.mark.parametrize("without_bf16", [True, False])
def test_on_cpu_without_bf16_section_replaces_the_files_values_only_there(monkeypatch, tmp_path, without_bf16):
    """The quickstart trains a narrower model on a CPU without bf16 arithmetic; --set still wins,
    and the resolved config has no such section and loads back to the same values."""
    monkeypatch.setattr("kl_ae.config.cpu_without_bf16", lambda: without_bf16)
    cfg = load_config("quickstart")
    assert cfg.model.block_out_channels == ([16, 32, 64, 64] if without_bf16 else [32, 64, 128, 128])
    assert cfg.data.dead_leaves_fraction == (0.5 if without_bf16 else 0.0)
    assert cfg.model.norm_num_groups == (4 if without_bf16 else 8)  # block_means: 4 channels per group at 16
    # the 128-px final phase, measured with bf16 only
    assert (cfg.data.final_resolution, cfg.data.final_fraction) == ((0, 0.0) if without_bf16 else (128, 0.3))
    assert cfg.model.init_scheme == "block_means"  # set at the top of the file: every machine
    assert cfg.train.max_minutes == 5.5  # the rest of the file applies on both
    chosen = load_config("quickstart", ["model.block_out_channels=[64,128,256,256]"])
    assert chosen.model.block_out_channels == [64, 128, 256, 256]
    save_config(cfg, tmp_path / "resolved.yaml")
    assert "on_cpu_without_bf16" not in (tmp_path / "resolved.yaml").read_text()
    monkeypatch.setattr("kl_ae.config.cpu_without_bf16", lambda: not without_bf16)  # another machine
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_kl_ae_config_says_when_the_section_applied(monkeypatch, capsys):
    from kl_ae.cli import main

    for without_bf16 in (True, False):
        monkeypatch.setattr("kl_ae.config.cpu_without_bf16", lambda: without_bf16)
        assert main(["config", "quickstart"]) == 0
        header = capsys.readouterr().out.split("\n\n")[0]
        assert ("on_cpu_without_bf16" in header) is without_bf16, header


@pytest.mark.parametrize("section, match", [
    ("on_cpu_without_bf16:\n  model:\n    block_out_chanels: [8, 16]\n", "on_cpu_without_bf16.model.block_out_chanels"),
    ("on_cpu_without_bf16:\n  model:\n    block_out_channels: 16\n", "on_cpu_without_bf16.model.block_out_channels"),
    ("on_cpu_without_bf16: [16, 32]\n", "must be a mapping"),
])
@pytest.mark.parametrize("without_bf16", [True, False])
def test_a_bad_on_cpu_without_bf16_section_fails_on_every_machine(monkeypatch, tmp_path, section, match,
                                                                   without_bf16):
    monkeypatch.setattr("kl_ae.config.cpu_without_bf16", lambda: without_bf16)
    (tmp_path / "c.yaml").write_text("train:\n  max_steps: 3\n" + section)
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("cuda, native, expected", [(False, False, True), (False, True, False), (True, False, False)])
def test_cpu_without_bf16_means_no_cuda_and_no_native_bf16(monkeypatch, cuda, native, expected):
    from kl_ae.precision import cpu_without_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr("kl_ae.precision.native_bf16", lambda device: (native, "stub"))
    assert cpu_without_bf16() is expected
