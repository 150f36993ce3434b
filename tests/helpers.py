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


def tiny_train_overrides(photos: Path, run_dir: Path, steps: int, **extra) -> list[str]:
    """``--set`` items for a seconds-long CPU training of a 2-level model on 32-px crops of
    ``photos``: a checkpoint every step, no LPIPS, no GAN, no tracker. ``extra``: more key=value."""
    return [
        "model.block_out_channels=[8,16]", "model.layers_per_block=1", "model.norm_num_groups=8",
        f"data.train={photos}", "data.resolution=32", "data.num_workers=0", f"train.output_dir={run_dir}",
        f"train.max_steps={steps}", "train.batch_size=2", "train.gradient_accumulation_steps=1",
        "train.checkpoint_every=1", "train.log_every=1", "train.mixed_precision=no", "train.scaling_images=2",
        "train.tracker=none", "loss.perceptual_weight=0", "loss.disc_start=1000",
    ] + [f"{k}={v}" for k, v in extra.items()]
