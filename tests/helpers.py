"""Small builders shared by the tests: random photo folders and a tiny diffusers autoencoder."""

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image


def write_noise_photos(folder: Path, n: int, size: tuple[int, int] = (40, 40), seed: int = 0) -> Path:
    """Write ``n`` uniform-noise RGB PNGs ``0.png`` ... of ``size`` (H, W) into ``folder``
    (created), drawn in order from one generator seeded with ``seed``. Returns ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def tiny_vae(latent_channels: int = 4, **config) -> AutoencoderKL:
    """A 2-level AutoencoderKL (channels [8, 16], factor 2), weights seeded with 0."""
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=8, **config)
