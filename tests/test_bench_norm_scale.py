"""bench/norm_scale.py's windowed GroupNorm: statistics per window, the module's affine after."""

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

spec = importlib.util.spec_from_file_location("norm_scale", Path(__file__).resolve().parent.parent / "bench/norm_scale.py")
norm_scale = importlib.util.module_from_spec(spec)
spec.loader.exec_module(norm_scale)


def test_windowed_group_norm_normalises_each_window_on_its_own():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 4) * 3 + torch.arange(4.0)  # columns with different means
    weight, bias = torch.rand(8), torch.rand(8)
    assert torch.allclose(norm_scale.windowed_group_norm(1)(x, 4, weight, bias), F.group_norm(x, 4, weight, bias))
    out = norm_scale.windowed_group_norm(2)(x, 4, weight, bias)
    for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)):
        window = x[:, :, 3 * i:3 * i + 3, 2 * j:2 * j + 2]
        assert torch.allclose(out[:, :, 3 * i:3 * i + 3, 2 * j:2 * j + 2], F.group_norm(window, 4, weight, bias),
                              atol=1e-5)
    flat = torch.randn(2, 8, 10)  # not an image map (the attention's norm): normalised whole
    assert torch.equal(norm_scale.windowed_group_norm(2)(flat, 4), F.group_norm(flat, 4))


def test_with_true_mean_gives_the_input_mean_colour_and_keeps_the_rest():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8) * 1.2 - 0.6
    reconstruction = x * 0.5 + torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1)  # a colour cast, less contrast
    fixed = norm_scale.with_true_mean(x, reconstruction)
    torch.testing.assert_close(fixed.mean(dim=(2, 3)), x.mean(dim=(2, 3)))
    torch.testing.assert_close(fixed - fixed.mean(dim=(2, 3), keepdim=True),
                               reconstruction - reconstruction.mean(dim=(2, 3), keepdim=True))
    assert norm_scale.with_true_mean(torch.ones(1, 3, 2, 2), torch.full((1, 3, 2, 2), 3.0)).max() <= 1.0
