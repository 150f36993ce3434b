"""Does an autoencoder depend on the size of the images its GroupNorm statistics were taken over?

    python bench/norm_scale.py runs/mine/export ../shared/data/photos/val --window 64

Scores the model on ``kl-ae eval``'s protocol (short side resized to 256, centre crop, PSNR on
8-bit images) three ways:

  whole     the protocol itself: one forward pass over each 256-px image
  tiles     each image cut into window x window tiles, reconstructed tile by tile (seams included)
  gn-window one forward pass, but every 4-D GroupNorm takes its statistics over window-sized
            regions (window / 256 of the feature map per side) instead of the whole map
  true-mean "whole" with each image's mean colour (per channel) replaced by the input's: what
            the model would score if it got only the mean colour right (with_true_mean)

A model trained on small crops whose "tiles" and "gn-window" scores beat "whole" has learned to
rely on GroupNorm statistics of crop-sized regions (BENCHMARKS.md, "Quality per minute"); equal
scores mean it does not. A "true-mean" score far above "whole" says the error is mostly a
colour cast (a wrong mean colour), not blur. Diagnoses, not metrics: only "whole" is the model's score.
"""

from __future__ import annotations

import argparse
import json
from unittest import mock

import torch
import torch.nn.functional as F

from kl_ae.eval.evaluate import _batches
from kl_ae.data.images import SkipCounter
from kl_ae.eval.metrics import image_metrics
from kl_ae.model import load_autoencoder, reconstruct as decode_mode

RESOLUTION = 256


def windowed_group_norm(windows: int):
    """F.group_norm with its statistics taken over a windows x windows grid of regions of each
    4-D input (inputs of other ranks, or maps not divisible by the grid, are normalised whole)."""
    plain = F.group_norm

    def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
        if x.dim() != 4 or x.shape[2] % windows or x.shape[3] % windows:
            return plain(x, num_groups, weight, bias, eps)
        b, c, h, w = x.shape
        hh, ww = h // windows, w // windows
        t = x.view(b, c, windows, hh, windows, ww).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, hh, ww)
        t = plain(t, num_groups, weight, bias, eps)
        return t.view(b, windows, windows, c, hh, ww).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    return group_norm


def with_true_mean(x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """``reconstruction`` (B, C, H, W) shifted per image and channel so that its mean equals that
    of ``x`` (same shape), then clamped to [-1, 1]: the reconstruction with its colour cast removed."""
    shift = x.mean(dim=(2, 3), keepdim=True) - reconstruction.mean(dim=(2, 3), keepdim=True)
    return (reconstruction + shift).clamp(-1, 1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="diffusers AutoencoderKL directory (an export) or a checkpoint directory")
    p.add_argument("images", help="image folder, shard pattern or builtin:val")
    p.add_argument("--window", type=int, default=64, help="tile / statistics window in pixels (the training crop)")
    a = p.parse_args(argv)
    if RESOLUTION % a.window:
        p.error(f"--window must divide {RESOLUTION}")
    vae = load_autoencoder(a.model).float().eval()

    def reconstruct(x):
        return decode_mode(vae, x).clamp(-1, 1)

    def tiled(x):
        out = torch.empty_like(x)
        for i in range(0, RESOLUTION, a.window):
            for j in range(0, RESOLUTION, a.window):
                out[:, :, i:i + a.window, j:j + a.window] = reconstruct(x[:, :, i:i + a.window, j:j + a.window])
        return out

    def gn_window(x):
        with mock.patch.object(F, "group_norm", windowed_group_norm(RESOLUTION // a.window)):
            return reconstruct(x)

    psnr: dict[str, list[float]] = {"whole": [], "tiles": [], "gn-window": [], "true-mean": []}
    with torch.inference_mode():
        for _, x in _batches(a.images, RESOLUTION, 4, None, SkipCounter()):
            whole = reconstruct(x)  # once: "true-mean" is this reconstruction with its mean colour set
            for name, y in (("whole", whole), ("tiles", tiled(x)), ("gn-window", gn_window(x)),
                            ("true-mean", with_true_mean(x, whole))):
                psnr[name] += image_metrics(x, y, None)["psnr"].tolist()
    result = {"model": a.model, "images": a.images, "window": a.window,
              "psnr_mean": {k: sum(v) / len(v) for k, v in psnr.items()}, "psnr": psnr}
    for name, v in result["psnr_mean"].items():
        print(f"{name:10s} {v:6.2f} dB   per image: {', '.join(f'{x:.2f}' for x in psnr[name])}")
    return result


if __name__ == "__main__":
    print(json.dumps(main()["psnr_mean"]))
