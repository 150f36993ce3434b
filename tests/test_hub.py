"""The Hub upload folder: export files + a model card with front matter, factors and latent stats.

Nothing here reaches the network: push_to_hub is only run against stand-ins for huggingface_hub.
"""

import inspect
import json

import huggingface_hub
import pytest
import torch
import yaml
from diffusers import AutoencoderKL

from kl_ae.config import ModelConfig
from kl_ae.export import compute_latent_factors, save_export
from kl_ae.hub import prepare_hub_folder, push_to_hub
from kl_ae.model import build_autoencoder
import helpers


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    return helpers.write_noise_photos(root, 3, size=(32, 32))


def make_export(path, photos, latent_channels):
    """A tiny export through the real path: measured factors, save_export (as kl-ae export)."""
    torch.manual_seed(0)
    shift = latent_channels == 16
    vae = build_autoencoder(ModelConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=8,
                                        latent_channels=latent_channels, use_quant_conv=not shift,
                                        use_post_quant_conv=not shift, use_shift_factor=shift))
    factors = compute_latent_factors(vae, str(photos), resolution=32, num_images=3, use_shift=shift, progress=False)
    return save_export(vae, path, factors, {"step": 7, "ema": True})


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.parametrize("channels", [4, 16])
def test_folder_holds_export_and_model_card(photos, tmp_path, channels):
    export = make_export(tmp_path / "export", photos, channels)
    folder = prepare_hub_folder(export, tmp_path / "hub", "someone/tiny-vae")
    assert folder == tmp_path / "hub"
    assert {p.name for p in folder.iterdir()} == {
        "config.json", "diffusion_pytorch_model.safetensors", "latent_stats.json", "README.md"}
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "latent_stats.json"):
        assert (folder / name).read_bytes() == (export / name).read_bytes()
    AutoencoderKL.from_pretrained(folder)  # the folder itself is a loadable diffusers model

    card = (folder / "README.md").read_text()
    meta = front_matter(card)
    assert meta == {"library_name": "diffusers", "license": "apache-2.0", "tags": ["kl-ae", "autoencoder", "vae"]}
    assert huggingface_hub.ModelCard.load(folder / "README.md").data.library_name == "diffusers"

    config = json.loads((export / "config.json").read_text())
    stats = json.loads((export / "latent_stats.json").read_text())
    assert f"| scaling_factor | {config['scaling_factor']!r} |" in card
    if channels == 16:
        assert config["shift_factor"] == stats["mean"]
        assert f"| shift_factor | {config['shift_factor']!r} |" in card and "shift_factor = mean" in card
    else:
        assert config["shift_factor"] is None and "| shift_factor | none |" in card
    assert f"| latent | {channels} channels at 1/2 of the image size: (B, 3, H, W) -> (B, {channels}, H/2, W/2) |" \
        in card
    assert f"mean {stats['mean']:.6g}, std {stats['std']:.6g}" in card
    assert "Measured on 3 images" in card and "training step 7 (EMA)" in card
    assert 'AutoencoderKL.from_pretrained("someone/tiny-vae")' in card


def test_license_and_kept_factors(photos, tmp_path):
    export = make_export(tmp_path / "export", photos, 4)
    # a decoder-only fine-tune records where its factors come from instead of measured stats
    (export / "latent_stats.json").write_text(json.dumps(
        {"scaling_factor": 0.18215, "shift_factor": None, "resolution": 32,
         "source": "kept from model.init_from=sd/vae (decoder-only fine-tune: encoder frozen)"}))
    card = (prepare_hub_folder(export, tmp_path / "hub", "a/b", license="mit") / "README.md").read_text()
    assert front_matter(card)["license"] == "mit"
    assert "kept from model.init_from=sd/vae" in card and "Measured on" not in card


def test_a_per_channel_export_gets_a_card_with_its_convention_and_a_snippet_that_applies_it(photos, tmp_path):
    """model.latents_mean_std (SDXL-family): scaling_factor 1 and per-channel statistics; the card
    must not tell users 1/std or scaling_factor alone, and its snippet must normalise per channel."""
    torch.manual_seed(0)
    vae = build_autoencoder(ModelConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=8))
    factors = compute_latent_factors(vae, str(photos), resolution=32, num_images=3, progress=False)
    factors.update(scaling_factor=1.0, shift_factor=None, store_latents_mean_std=True)  # as latent_factors_for
    export = save_export(vae, tmp_path / "export", factors, {"step": 7, "ema": True})
    card = (prepare_hub_folder(export, tmp_path / "hub", str(tmp_path / "hub")) / "README.md").read_text()
    assert "| latents_mean | [" in card and "| latents_std | [" in card and "| scaling_factor | 1.0 |" in card
    assert "scaling_factor = 1/std" not in card and "| shift_factor |" not in card
    assert "latents_mean / latents_std: the per-channel mean and std, with scaling_factor 1." in card
    snippet = card.split("```python\n")[1].split("```")[0].replace("256, 256", "32, 32")
    scope = {}
    exec(snippet, scope)  # the card's own code, on the export (its repo id here is the local folder)
    assert scope["z"].shape == (1, 4, 16, 16) and scope["reconstruction"].shape == (1, 3, 32, 32)
    torch.testing.assert_close(scope["mean"].flatten(), torch.tensor(factors["latents_mean"]))
    assert "- mean) * s / std" in snippet and "z * std / s + mean" in snippet


def test_a_flux2_export_gets_a_card_with_its_batchnorm_convention(photos, tmp_path):
    """FLUX.2 pipelines read no factors: the card says how they normalise (patchify, BatchNorm)."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    vae = build_autoencoder(ModelConfig(architecture="AutoencoderKLFlux2", block_out_channels=[8, 16],
                                        layers_per_block=1, norm_num_groups=8, latent_channels=4))
    factors = compute_latent_factors(vae, str(photos), resolution=32, num_images=3, progress=False)
    export = save_export(vae, tmp_path / "export", factors, {"step": 7, "ema": True})
    folder = prepare_hub_folder(export, tmp_path / "hub", "someone/flux2-vae")
    loaded = AutoencoderKLFlux2.from_pretrained(folder)  # the folder is a loadable FLUX.2 VAE
    torch.testing.assert_close(loaded.bn.running_mean, torch.tensor(factors["flux2_bn_mean"]))
    card = (folder / "README.md").read_text()
    assert "| diffusion latent | 16 channels: the latent patchified 2x2, then `(z_p - bn.running_mean) / " \
           "sqrt(bn.running_var + 0.0001)` |" in card
    assert "| scaling_factor |" not in card and "scaling_factor = 1/std" not in card
    assert "BatchNorm running statistics measured on 3 images" in card and "(16 channels)" in card
    assert 'AutoencoderKLFlux2.from_pretrained("someone/flux2-vae")' in card
    assert front_matter(card)["library_name"] == "diffusers"


def test_refuses_non_exports_and_non_empty_folders(photos, tmp_path):
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        prepare_hub_folder(tmp_path, tmp_path / "hub", "a/b")
    export = make_export(tmp_path / "export", photos, 4)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        prepare_hub_folder(export, tmp_path / "full", "a/b")
    config = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="UNet2DModel.*AutoencoderKLFlux2"):
        prepare_hub_folder(export, tmp_path / "hub", "a/b")


def test_push_to_hub_uploads_the_folder(photos, tmp_path, monkeypatch):
    """The upload cannot run offline: record what push_to_hub hands to huggingface_hub instead."""
    calls = []

    def stand_in(name):
        signature = inspect.signature(getattr(huggingface_hub, name))

        def record(*args, **kwargs):
            signature.bind(*args, **kwargs)  # the real function would accept these arguments
            calls.append((name, args, kwargs))
            return "ok"
        return record

    for name in ("create_repo", "upload_folder"):
        monkeypatch.setattr(huggingface_hub, name, stand_in(name))
    with pytest.raises(FileNotFoundError, match="README.md"):
        push_to_hub(make_export(tmp_path / "export", photos, 4), "a/b")
    assert calls == []
    folder = prepare_hub_folder(tmp_path / "export", tmp_path / "hub", "a/b")
    assert push_to_hub(folder, "a/b", token="t") == "ok"
    (_, args, create), (_, _, upload) = calls
    assert args == ("a/b",) and create["token"] == "t" and create["exist_ok"]
    assert upload["repo_id"] == "a/b" and upload["folder_path"] == str(folder) and upload["token"] == "t"


def test_export_command_prepares_and_pushes_the_hub_folder(tmp_path, monkeypatch):
    """``kl-ae export RUN OUT --push-to-hub REPO``: the upload itself is replaced (no network here)."""
    from test_train import tiny_overrides

    import kl_ae.hub
    from kl_ae.cli import main
    from kl_ae.config import load_config
    from kl_ae.trainer import train

    photos = helpers.write_noise_photos(tmp_path / "photos", 3)
    run = tmp_path / "run"
    train(load_config(None, tiny_overrides(photos, run, steps=2) + ["data.val=", "train.eval_every=0",
                                                                    "train.tracker=none"]))
    pushed = {}
    monkeypatch.setattr(kl_ae.hub, "push_to_hub", lambda folder, repo, token=None: pushed.update(folder=folder, repo=repo))
    assert main(["export", str(run), str(tmp_path / "out"), "--push-to-hub", "me/tiny-vae"]) == 0
    assert pushed["repo"] == "me/tiny-vae" and (pushed["folder"] / "README.md").is_file()
    assert (pushed["folder"] / "diffusion_pytorch_model.safetensors").is_file()
