"""PatchGAN discriminator: output shapes, layer layout, parameter count and init."""

import pytest
import torch
from torch import nn

import kl_ae  # noqa: F401
from kl_ae.discriminator import PatchDiscriminator


def _expected_params(in_ch: int, ch: int, n_layers: int) -> int:
    """Count from the layer shapes: 4x4 convs; bias only on the first and the last conv, BN
    (weight + bias) after every other conv."""
    total = in_ch * ch * 16 + ch  # first conv with bias
    mult = 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2**n, 8)
        total += ch * prev * ch * mult * 16  # conv without bias
        total += 2 * ch * mult  # BatchNorm affine
    total += ch * mult * 16 + 1  # final conv to one channel, with bias
    return total


def test_default_parameter_count():
    d = PatchDiscriminator()
    n = sum(p.numel() for p in d.parameters())
    # 3136 + (131072 + 256) + (524288 + 512) + (2097152 + 1024) + 8193
    assert n == 2_765_633 == _expected_params(3, 64, 3)


@pytest.mark.parametrize("in_ch,ch,n_layers", [(3, 8, 1), (3, 16, 2), (1, 8, 4), (3, 4, 5)])
def test_parameter_count_other_layouts(in_ch, ch, n_layers):
    d = PatchDiscriminator(in_channels=in_ch, channels=ch, num_layers=n_layers)
    assert sum(p.numel() for p in d.parameters()) == _expected_params(in_ch, ch, n_layers)


def test_output_shapes():
    d = PatchDiscriminator().eval()
    with torch.no_grad():
        assert d(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
        assert d(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    small = PatchDiscriminator(channels=8, num_layers=2).eval()
    with torch.no_grad():
        assert small(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 14, 14)  # 64/4 - 2


def test_layer_layout():
    d = PatchDiscriminator()
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in d.modules() if isinstance(m, nn.BatchNorm2d)]
    acts = [m for m in d.modules() if isinstance(m, nn.LeakyReLU)]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (2, 2), (1, 1), (1, 1)]
    assert all(c.kernel_size == (4, 4) and c.padding == (1, 1) for c in convs)
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    assert [b.num_features for b in bns] == [128, 256, 512]
    assert len(acts) == 4 and all(a.negative_slope == 0.2 for a in acts)
    # channel multiplier capped at 8
    deep = PatchDiscriminator(channels=4, num_layers=5)
    assert [c.out_channels for c in deep.modules() if isinstance(c, nn.Conv2d)] == [4, 8, 16, 32, 32, 32, 1]


def test_init_statistics():
    torch.manual_seed(0)
    d = PatchDiscriminator()
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    w = torch.cat([c.weight.flatten() for c in convs])  # 2.76 M samples
    assert abs(w.mean().item()) < 1e-3
    assert w.std().item() == pytest.approx(0.02, rel=0.01)
    big = convs[3].weight  # 2.1 M samples on its own
    assert big.std().item() == pytest.approx(0.02, rel=0.01)
    assert all(torch.all(c.bias == 0) for c in convs if c.bias is not None)
    bn_w = torch.cat([m.weight for m in d.modules() if isinstance(m, nn.BatchNorm2d)])  # 896 samples
    assert bn_w.mean().item() == pytest.approx(1.0, abs=0.005)
    assert bn_w.std().item() == pytest.approx(0.02, rel=0.15)
    assert all(torch.all(m.bias == 0) for m in d.modules() if isinstance(m, nn.BatchNorm2d))


def test_backward_in_train_mode():
    d = PatchDiscriminator(channels=8)
    x = torch.rand(2, 3, 32, 32, requires_grad=True) * 2 - 1
    d(x).mean().backward()
    assert all(p.grad is not None for p in d.parameters())


def test_rejects_zero_layers():
    with pytest.raises(ValueError, match="num_layers"):
        PatchDiscriminator(num_layers=0)


@pytest.mark.parametrize("resolution", [8, 16, 24, 32, 64])
@pytest.mark.parametrize("num_layers", [1, 2, 3, 4])
def test_patch_logits_side_matches_the_network(resolution, num_layers):
    """config_checks rejects a discriminator too deep for the crops with this arithmetic."""
    from kl_ae.discriminator import patch_logits_side

    try:
        side = PatchDiscriminator(channels=4, num_layers=num_layers).eval()(torch.zeros(1, 3, resolution, resolution)).shape[-1]
    except RuntimeError:  # "Kernel size can't be greater than actual input size"
        side = 0
    assert patch_logits_side(resolution, num_layers) == side


def test_a_discriminator_too_deep_for_the_crops_stops_the_run_at_its_start(caplog):
    """Checked when a run starts, not when a config loads (a checkpoint's config must reload);
    with a time budget, which may end the run before disc_start, it is a warning."""
    from kl_ae.config import load_config
    from kl_ae.config_checks import check_run_start
    from kl_ae.parsing import ConfigError

    base = ["model.block_out_channels=[8,16]", "model.norm_num_groups=8", "data.resolution=16", "data.short_side_range=[]"]
    cfg = load_config(None, base + ["loss.disc_start=10", "train.max_steps=100"])  # loads
    with pytest.raises(ConfigError, match=r"loss.disc_num_layers=3 is too deep for data.resolution=16.*<=2"):
        check_run_start(cfg)
    check_run_start(load_config(None, base + ["loss.disc_start=100", "train.max_steps=100"]))  # the GAN never turns on
    with pytest.raises(ConfigError, match="data.final_resolution=16"):
        check_run_start(load_config(None, base + ["data.resolution=32", "data.final_resolution=16",
                                                  "data.final_fraction=0.3", "loss.disc_start=0", "train.max_steps=100"]))
    with caplog.at_level("WARNING", logger="kl_ae"):
        check_run_start(load_config(None, base + ["loss.disc_start=10", "train.max_minutes=2"]))
    assert "too deep for data.resolution=16" in caplog.text and "train.max_minutes" in caplog.text

