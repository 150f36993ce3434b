"""Input | reconstruction image grids (PNG), for training samples and evaluation reports."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid


def pair_grid(x: torch.Tensor, x_hat: torch.Tensor, max_rows: int = 4) -> torch.Tensor:
    """Rows of ``input | reconstruction``: x, x_hat (B, 3, H, W) in [-1, 1] -> (3, H', W') in [0, 1]."""
    n = min(max_rows, x.shape[0])
    pairs = torch.stack([x[:n].float().cpu(), x_hat[:n].float().cpu()], dim=1).flatten(0, 1)
    return make_grid((pairs.clamp(-1, 1) + 1) / 2, nrow=2, padding=2)


def save_grid(grid: torch.Tensor, path: str | Path) -> Path:
    """Write a (3, H, W) grid in [0, 1] as an 8-bit PNG (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(array).save(path)
    return path


@torch.inference_mode()
def reconstruction_grid(vae, images: str, path: str | Path, *, resolution: int = 256,
                        max_images: int = 4, amplify: float | None = None) -> Path:
    """Grid of the first ``max_images`` images of ``images`` (eval protocol crops) and their
    reconstructions decode(posterior mode), written to ``path``; with ``amplify`` a third
    column shows |x - x̂| times amplify (:func:`difference_grid`). To show chosen images, point
    ``images`` at a folder holding them."""
    from kl_ae.data.sources import iter_images
    from kl_ae.data.images import eval_transform
    from kl_ae.model import reconstruct

    crops = []
    for _, img in iter_images(images):
        crops.append(eval_transform(img, resolution))
        if len(crops) == max_images:
            break
    if not crops:
        raise ValueError(f"no usable image in {images!r} for the grid")
    device = next(vae.parameters()).device
    x = torch.stack(crops).to(device, torch.float32)
    x_hat = reconstruct(vae, x)
    if amplify:
        return save_grid(difference_grid(x, x_hat, amplify=amplify, max_rows=max_images), path)
    return save_grid(pair_grid(x, x_hat, max_rows=max_images), path)


def difference_grid(x: torch.Tensor, x_hat: torch.Tensor, amplify: float = 5.0,
                    max_rows: int = 4) -> torch.Tensor:
    """Rows of ``input | reconstruction | amplified difference``, to see where the errors sit.

    x, x_hat: (B, 3, H, W) in [-1, 1] (clamped). The difference panel is |x − x̂| in [0, 1]
    units (half the [-1, 1] difference) times ``amplify``, clamped to [0, 1], per RGB channel:
    black where the images agree. Returns (3, H', W') in [0, 1] for the first ``max_rows`` images.
    """
    n = min(max_rows, x.shape[0])
    a = (x[:n].float().cpu().clamp(-1, 1) + 1) / 2
    b = (x_hat[:n].float().cpu().clamp(-1, 1) + 1) / 2
    diff = ((a - b).abs() * amplify).clamp(0, 1)
    return make_grid(torch.stack([a, b, diff], dim=1).flatten(0, 1), nrow=3, padding=2)
