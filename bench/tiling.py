"""What tiled decoding costs, by tile size and overlap: the measurement behind an export's tile size.

    python bench/tiling.py runs/mine/export ../shared/data/photos/val --out results/tiling/mine
    python bench/tiling.py MODEL IMAGES --short-side 512 --tiles 64 128 256 --overlaps 0.125 0.25 0.5

diffusers ``AutoencoderKL.enable_tiling`` encodes and decodes overlapping tiles of
``sample_size`` pixels (config.json) and blends their seams linearly over ``tile_overlap_factor``
of a tile (0.25 unless changed on the loaded model). On each image, resized to a short side of
``--short-side`` pixels (so that the untiled pass fits) and cropped to a multiple of the model's
factor, this reconstructs the posterior mode untiled and then tiled for every tile size and
overlap (enable_tiling tiles the encoder and the decoder alike, and so does this), and reports
PSNR(untiled) - PSNR(tiled) (dB, positive: tiling is worse; kl-ae eval's 8-bit PSNR) and the tiled
pass's time relative to the untiled one (the first image's untiled pass includes warm-up, so its
ratios read low). Also prints the decoder's
receptive field (kl_ae.eval.tiling.decoder_receptive_field). Writes result.json and table.md to
``--out``. A benchmark, not a test: the timings are this machine's.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from kl_ae.data.images import resize_short_side, to_tensor
from kl_ae.data.sources import iter_images
from kl_ae.eval.metrics import psnr_8bit
from kl_ae.eval.tiling import decoder_receptive_field, tiled
from kl_ae.model import downsampling_factor, load_autoencoder, reconstruct


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="diffusers export directory or run checkpoint")
    p.add_argument("images", help="folder, shards or builtin set")
    p.add_argument("--short-side", type=int, default=512, help="images resized to this short side (pixels)")
    p.add_argument("--tiles", type=int, nargs="+", default=[64, 128, 256], help="tile sides (pixels)")
    p.add_argument("--overlaps", type=float, nargs="+", default=[0.125, 0.25, 0.5], help="tile_overlap_factor values")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--out", help="directory for result.json and table.md")
    return p.parse_args(argv)


@torch.inference_mode()
def measure(vae, images: str, short_side: int, tiles: list[int], overlaps: list[float],
            max_images: int | None = None) -> dict:
    f = downsampling_factor(vae)
    vae = vae.float().eval()
    rows = []
    for n, (name, img) in enumerate(iter_images(images)):
        if max_images is not None and n >= max_images:
            break
        img = resize_short_side(img, short_side)
        w, h = img.size
        x = to_tensor(img.crop((0, 0, w - w % f, h - h % f))).unsqueeze(0)
        t0 = time.perf_counter()
        plain = reconstruct(vae, x)
        plain_s = time.perf_counter() - t0
        psnr_plain = float(psnr_8bit(x, plain)[0])
        row = {"name": name, "width": x.shape[-1], "height": x.shape[-2], "psnr_untiled": psnr_plain,
               "seconds_untiled": plain_s, "tiled": {}}
        for tile in tiles:
            for overlap in overlaps:
                with tiled(vae, tile, overlap):
                    t0 = time.perf_counter()
                    rec = reconstruct(vae, x)
                    seconds = time.perf_counter() - t0
                psnr = float(psnr_8bit(x, rec)[0])
                row["tiled"][f"{tile}/{overlap:g}"] = {"psnr": psnr, "cost_db": psnr_plain - psnr,
                                                       "time_ratio": seconds / plain_s}
        rows.append(row)
        print(f"{name} {row['width']}x{row['height']}: untiled {psnr_plain:.2f} dB; "
              + ", ".join(f"{k}: {v['cost_db']:+.2f}" for k, v in row["tiled"].items()), flush=True)
    if not rows:
        raise SystemExit(f"no usable image in {images!r}")
    summary = {}
    for key in rows[0]["tiled"]:
        costs = [r["tiled"][key]["cost_db"] for r in rows]
        ratios = [r["tiled"][key]["time_ratio"] for r in rows]
        summary[key] = {"mean_cost_db": float(np.mean(costs)), "max_cost_db": float(np.max(costs)),
                        "time_ratio": float(np.mean(ratios))}
    return {"per_image": rows, "summary": summary}


def table(result: dict) -> str:
    lines = ["| tile (px) | overlap | mean cost (dB) | max cost (dB) | time / untiled |", "|---|---|---|---|---|"]
    for key, s in result["summary"].items():
        tile, overlap = key.split("/")
        lines.append(f"| {tile} | {overlap} | {s['mean_cost_db']:.3f} | {s['max_cost_db']:.3f} | {s['time_ratio']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    a = _parse(argv)
    vae = load_autoencoder(a.model)
    rf = decoder_receptive_field(vae)
    result = measure(vae, a.images, a.short_side, a.tiles, a.overlaps, a.max_images)
    result.update({"model": a.model, "images": a.images, "short_side": a.short_side, "receptive_field": rf,
                   "protocol": "posterior mode, fp32; cost = PSNR(untiled) - PSNR(tiled), 8-bit PSNR",
                   "cpu": platform.processor() or platform.machine(), "torch": torch.__version__})
    text = (f"decoder receptive field: {rf['pixels']} px ({rf['latents']:g} latents) of convolutions"
            + ("; GroupNorm and the mid-block attention see the whole tile" if rf["attention"]
               else "; GroupNorm sees the whole tile") + "\n\n" + table(result))
    print(text)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=2))
        (out / "table.md").write_text(text + "\n")
        print(f"written to {out}")


if __name__ == "__main__":
    main()
