"""model.init_scheme=block_means: the model starts as a block-mean codec, every weight can learn,
and configs it cannot build are refused with the key to change."""

import pytest
import torch
import torch.nn.functional as F

from kl_ae.config import load_config
from kl_ae.model import load_or_build_autoencoder
from kl_ae.parsing import ConfigError

SMALL = ["model.block_out_channels=[16,32]", "model.norm_num_groups=4", "model.layers_per_block=1",
         "model.init_scheme=block_means"]


def _photo_like(n=2, size=32, seed=0):
    """Smooth random images in [-1, 1]: low-resolution noise upsampled, with a colour cast per image."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 8, size // 8, generator=g) * 1.6 - 0.8
    cast = torch.rand(n, 3, 1, 1, generator=g) * 0.4 - 0.2
    fine = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (fine + cast + 0.1 * torch.randn(n, 3, size, size, generator=g)).clamp(-1, 1)


@pytest.mark.parametrize("extra", [[], ["model.use_quant_conv=false", "model.use_post_quant_conv=false",
                                        "model.latent_channels=16"],
                                   ["model.norm_num_groups=1"],  # three colours and a constant in one group
                                   ["model.layers_per_block=2"], ["model.mid_block_add_attention=false"]])
def test_block_means_encodes_block_means_and_decodes_them_back(extra):
    torch.manual_seed(0)
    vae = load_or_build_autoencoder(load_config(None, SMALL + extra + ["model.posterior_logvar_init=-6"]).model)
    x = _photo_like()
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        means = F.avg_pool2d(x, 2)  # two levels: f = 2
        torch.testing.assert_close(posterior.mean[:, :3], means, atol=0.03, rtol=0)
        torch.testing.assert_close(posterior.logvar, torch.full_like(posterior.logvar, -6.0))
        z = posterior.mean
        decoded = vae.decode(z).sample
        torch.testing.assert_close(decoded, F.interpolate(z[:, :3], scale_factor=2, mode="nearest"),
                                   atol=0.03, rtol=0)
        # an image that is constant on each latent cell comes back whole; PyTorch's init does not
        blocky = F.interpolate(means, scale_factor=2, mode="nearest")
        assert (vae(blocky).sample - blocky).abs().max() < 0.05
        default = load_or_build_autoencoder(load_config(None, SMALL[:-1] + extra).model)
        assert (default(blocky).sample - blocky).abs().max() > 0.2


def test_block_means_on_a_four_level_model_scores_near_the_block_mean_image():
    vae = load_or_build_autoencoder(load_config(None, ["model.block_out_channels=[16,32,64,64]",
                                                       "model.norm_num_groups=4",
                                                       "model.layers_per_block=1",
                                                       "model.init_scheme=block_means"]).model)
    x = _photo_like(size=64, seed=1)
    with torch.no_grad():
        x_hat = vae(x).sample
    target = F.interpolate(F.avg_pool2d(x, 8), scale_factor=8, mode="nearest")
    assert (x_hat - target).abs().max() < 0.05
    logvar = vae.encode(x).latent_dist.logvar  # posterior_logvar_init unset: -8
    torch.testing.assert_close(logvar, torch.full_like(logvar, -8.0))


@pytest.mark.parametrize("extra", [[], ["model.use_quant_conv=false"], ["model.layers_per_block=2"]])
def test_every_weight_gets_a_gradient_within_three_steps(extra):
    """Zeroed weights must not be stuck: a weight whose gradient and input are both zero stays
    zero for good. Three SGD steps on L2 + KL, then every single weight has had a gradient."""
    torch.manual_seed(0)
    vae = load_or_build_autoencoder(load_config(None, SMALL + ["model.latent_channels=4"] + extra).model)
    opt = torch.optim.SGD(vae.parameters(), lr=1e-2)
    touched = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in vae.named_parameters()}
    for step in range(3):
        x = _photo_like(seed=step)
        posterior = vae.encode(x).latent_dist
        x_hat = vae.decode(posterior.sample()).sample
        loss = ((x - x_hat) ** 2).mean() + 1e-3 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        for name, p in vae.named_parameters():
            touched[name] |= p.grad != 0
        opt.step()
    stuck = {name: int((~t).sum()) for name, t in touched.items() if not t.all()}
    assert not stuck, f"weights that never had a gradient: {stuck}"


@pytest.mark.parametrize("overrides, message", [
    (["model.block_out_channels=[16,32]", "model.norm_num_groups=8"], "lower model.norm_num_groups"),
    (["model.block_out_channels=[8,16]", "model.norm_num_groups=2"], "room for 3 colour pairs"),  # 2 pairs
    (["model.block_out_channels=[16,32]", "model.norm_num_groups=4", "model.architecture=AutoencoderKLFlux2"],
     "AutoencoderKL"),
    (["model.init_scheme=xavier"], "model.init_scheme must be one of"),
])
def test_configs_block_means_cannot_build_are_refused(overrides, message):
    scheme = [] if any(o.startswith("model.init_scheme") for o in overrides) else ["model.init_scheme=block_means"]
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides + scheme)


def test_pytorch_scheme_is_the_default_and_leaves_the_init_random():
    cfg = load_config(None, ["model.block_out_channels=[16,32]", "model.norm_num_groups=4"])
    assert cfg.model.init_scheme == "pytorch"
    vae = load_or_build_autoencoder(cfg.model)
    assert all(r.conv2.weight.abs().sum() > 0 for r in vae.encoder.down_blocks[0].resnets)


def test_an_init_from_vae_keeps_its_weights_under_block_means(tmp_path):
    """init_scheme, like posterior_logvar_init, shapes a random model only: fine-tuning with the
    quickstart's recipe loads the VAE as it is (and needs no GroupNorm layout of its own)."""
    original = load_or_build_autoencoder(load_config(None, ["model.block_out_channels=[8,16]",
                                                            "model.norm_num_groups=8"]).model)
    original.save_pretrained(tmp_path / "vae")
    cfg = load_config(None, ["model.block_out_channels=[8,16]", "model.norm_num_groups=8",
                             "model.init_scheme=block_means", f"model.init_from={tmp_path / 'vae'}"])
    loaded = load_or_build_autoencoder(cfg.model)
    for (name, a), b in zip(original.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
