"""PatchGAN discriminator (Isola et al. 2017, "Image-to-Image Translation with Conditional
Adversarial Networks", pix2pix ``NLayerDiscriminator``), in the configuration LDM uses through
taming-transformers ``taming/modules/discriminator/model.py``: 64 filters, 3 strided layers,
BatchNorm, LeakyReLU 0.2, N(0, 0.02) init.
"""

from __future__ import annotations

import torch
from torch import nn

_KERNEL = 4  # pix2pix: 4x4 convolutions, padding 1
_MAX_MULT = 8  # channel multiplier cap (pix2pix: at most 8 * channels filters)
_SLOPE = 0.2  # LeakyReLU negative slope (pix2pix)


def patch_logits_side(resolution: int, num_layers: int) -> int:
    """Side of the logit map NLayerDiscriminator(num_layers) gives for a resolution x resolution
    input, or 0 when the input is too small (a 4x4 convolution with padding 1 needs an input side
    of at least 2): num_layers stride-2 convolutions, then two stride-1 ones (conv arithmetic:
    out = (in + 2 - 4) // stride + 1). About resolution / 2**num_layers - 2."""
    side = resolution
    for stride in [2] * num_layers + [1, 1]:
        if side + 2 < _KERNEL:
            return 0
        side = (side + 2 - _KERNEL) // stride + 1
    return side


class PatchDiscriminator(nn.Module):
    """Fully convolutional PatchGAN: one real/fake logit per overlapping image patch.

    Layout: conv(s2) + LReLU; ``num_layers - 1`` x [conv(s2, no bias) + BN + LReLU] with
    channel multiplier min(2**n, 8); conv(s1, no bias) + BN + LReLU with multiplier
    min(2**num_layers, 8); conv(s1) to 1 channel. All 4x4, padding 1. With the defaults the
    receptive field is 70x70 pixels and a 256x256 input gives 30x30 logits (64x64 gives 6x6).
    Parameters for the default (3, 64, 3): 2,765,633.

    Init (pix2pix ``init_weights('normal', 0.02)``): conv weights N(0, 0.02) and conv biases 0;
    BatchNorm weights N(1, 0.02), biases 0.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, _KERNEL, stride=2, padding=1),
            nn.LeakyReLU(_SLOPE, inplace=True),
        ]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, _MAX_MULT)
            stride = 2 if n < num_layers else 1  # the last feature layer keeps the resolution
            layers += [
                # bias is redundant before BatchNorm
                nn.Conv2d(channels * prev, channels * mult, _KERNEL, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(_SLOPE, inplace=True),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, _KERNEL, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, H, W) float in [-1, 1] -> logits (B, 1, h, w), h = H/8 - 2 for the
        default (3 layers), unbounded (no sigmoid: the losses take logits)."""
        return self.main(x)
