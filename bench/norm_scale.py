"""Does an autoencoder depend on the size of the images its GroupNorm statistics were taken over?

    python bench/norm_scale.py runs/mine/export ../shared/data/photos/val --window 64
    python bench/norm_scale.py runs/mine/checkpoints/step-0000500 builtin:val --raw-weights

Scores the model on ``kl-ae eval``'s protocol (short side resized to 256, centre crop, PSNR on
8-bit images) in these ways:

  whole     the protocol itself: one forward pass over each 256-px image
  tiles     each image cut into window x window tiles, reconstructed tile by tile (seams included)
  gn-window one forward pass, but every 4-D GroupNorm takes its statistics over window-sized
            regions (window / 256 of the feature map per side) instead of the whole map
  true-mean "whole" with each image's mean colour (per channel) replaced by the input's: what
            the model would score if it got only the mean colour right (with_true_mean)
  fitted-colour "whole" through the 3x3 colour matrix and offset that fit the input best (least
            squares, per image): the model's score if only its global colour transform were wrong
            (a cast, wrong saturation, swapped channels) (with_fitted_colour)
  true-block-means "whole" with the mean colour of each latent cell's block of pixels (8x8 for
            an f8 model) replaced by the input's: the score of the detail within the blocks alone
            (with_true_block_means)
  flat-colour each image replaced by a flat image of its mean colour, and that reconstructed: a
            test any decoder should pass near-perfectly. A GroupNorm keeps of a flat feature map
            only each group's pattern of channel levels, scaled to unit variance (with one or two
            channels per group, its bias or a sign), so a model that has not learned to carry
            absolute colour in those patterns fails it (the flat image is the mean-colour
            baseline's, kl_ae.eval.evaluate.mean_colour)

A model trained on small crops whose "tiles" and "gn-window" scores beat "whole" has learned to
rely on GroupNorm statistics of crop-sized regions (BENCHMARKS.md, "Quality per minute"); equal
scores mean it does not. A "true-mean" score far above "whole" says the error is mostly a
colour cast (a wrong mean colour), not blur; "fitted-colour" far above "true-mean" says the
colours are transformed, not only shifted; a low "flat-colour" says the model cannot put out
the colour of a flat region it is given. Diagnoses, not metrics: only "whole" is the model's score.
"""

from __future__ import annotations

import argparse
import json
from unittest import mock

import torch
import torch.nn.functional as F

from kl_ae.eval.evaluate import _batches, mean_colour
from kl_ae.data.images import SkipCounter
from kl_ae.eval.metrics import image_metrics
from kl_ae.model import autoencoder_from_checkpoint, downsampling_factor, load_autoencoder, reconstruct as decode_mode

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


def with_fitted_colour(x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """``reconstruction`` (B, 3, H, W) mapped per image by the affine colour transform
    ``A @ rgb + b`` (A 3x3, b 3) that minimises the squared error to ``x`` (same shape), clamped to
    [-1, 1]: the reconstruction with its global colour transform corrected. torch.linalg.lstsq
    fits the 12 numbers per image."""
    b, c = reconstruction.shape[:2]
    design = torch.cat([reconstruction.reshape(b, c, -1), torch.ones_like(reconstruction[:, :1]).reshape(b, 1, -1)], 1)
    design = design.transpose(1, 2).double()  # (B, H*W, 4)
    solution = torch.linalg.lstsq(design, x.reshape(b, c, -1).transpose(1, 2).double()).solution  # (B, 4, 3)
    return (design @ solution).transpose(1, 2).reshape_as(x).to(x.dtype).clamp(-1, 1)


def with_true_block_means(x: torch.Tensor, reconstruction: torch.Tensor, block: int = 8) -> torch.Tensor:
    """``reconstruction`` (B, C, H, W) with the mean of each ``block`` x ``block`` block (H, W its
    multiples) replaced by that of ``x``, clamped to [-1, 1]."""
    def block_means(t):
        return F.interpolate(F.avg_pool2d(t, block), scale_factor=block, mode="nearest")
    return (reconstruction - block_means(reconstruction) + block_means(x)).clamp(-1, 1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="diffusers AutoencoderKL directory (an export) or a checkpoint directory")
    p.add_argument("images", help="image folder, shard pattern or builtin:val")
    p.add_argument("--window", type=int, default=64, help="tile / statistics window in pixels (the training crop)")
    p.add_argument("--raw-weights", action="store_true",
                   help="a checkpoint's optimizer weights instead of its EMA weights (the default when it has them)")
    a = p.parse_args(argv)
    if RESOLUTION % a.window:
        p.error(f"--window must divide {RESOLUTION}")
    if a.raw_weights:
        vae = autoencoder_from_checkpoint(a.model, use_ema=False)[0].float().eval()
    else:
        vae = load_autoencoder(a.model).float().eval()

    factor = downsampling_factor(vae)

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

    psnr: dict[str, list[float]] = {"whole": [], "tiles": [], "gn-window": [], "true-mean": [],
                                    "fitted-colour": [], "true-block-means": [], "flat-colour": []}
    with torch.inference_mode():
        for _, x in _batches(a.images, RESOLUTION, 4, None, SkipCounter()):
            whole = reconstruct(x)  # once: the last three rows are this reconstruction, corrected
            for name, y in (("whole", whole), ("tiles", tiled(x)), ("gn-window", gn_window(x)),
                            ("true-mean", with_true_mean(x, whole)), ("fitted-colour", with_fitted_colour(x, whole)),
                            ("true-block-means", with_true_block_means(x, whole, factor))):
                psnr[name] += image_metrics(x, y, None)["psnr"].tolist()
            flat = mean_colour(x)  # scored against itself, not against x
            psnr["flat-colour"] += image_metrics(flat, reconstruct(flat), None)["psnr"].tolist()
    result = {"model": a.model, "images": a.images, "window": a.window, "raw_weights": a.raw_weights,
              "psnr_mean": {k: sum(v) / len(v) for k, v in psnr.items()}, "psnr": psnr}
    for name, v in result["psnr_mean"].items():
        print(f"{name:16s} {v:6.2f} dB   per image: {', '.join(f'{x:.2f}' for x in psnr[name])}")
    return result


if __name__ == "__main__":
    print(json.dumps(main()["psnr_mean"]))
