"""FLOPs of one kl-ae training step, counted by torch.utils.flop_counter, and the MFU they imply.

    python bench/flops.py configs/sd-f8c4.yaml --resolution 256 --batch 1
    python bench/flops.py configs/sd-f8c4.yaml --resolution 256 --images-per-s 41.0 --peak-tflops 989

Runs one real step (autoencoder update with LPIPS and the GAN term active, then the
discriminator update) under FlopCounterMode and reports FLOPs per image; a step's FLOPs are
linear in the batch, so batch 1 on a CPU gives the figure for any batch. MFU = FLOPs per image x
images/s / peak FLOP/s (pass the peak of your GPU in bf16 dense, e.g. 989 TFLOP/s for an H100
SXM). Counts matmuls and convolutions (what flop_counter counts), forward and backward, including
the two extra backward passes of the adaptive GAN weight (autograd.grad w.r.t. the last layer).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def count_step_flops(config: str, resolution: int, batch: int) -> dict:
    import torch
    from accelerate import Accelerator
    from torch.utils.flop_counter import FlopCounterMode

    from kl_ae.config import load_config
    from kl_ae.perceptual import build_lpips
    from kl_ae.step import StepModels, autoencoder_step, discriminator_step
    from kl_ae.trainer import _build, _Frozen

    cfg = load_config(config, [f"data.resolution={resolution}", "loss.disc_start=0", "loss.lpips_trunk=random",
                               "train.mixed_precision=no", "train.gradient_accumulation_steps=1"])
    accelerator = Accelerator(mixed_precision="no")
    perceptual, name = build_lpips("random") if cfg.loss.perceptual_weight > 0 else (None, "lpips")
    ae, disc, opt_ae, opt_disc, s_ae, s_disc = _build(cfg, accelerator, _Frozen(perceptual, name))
    ae, disc, opt_ae, opt_disc = accelerator.prepare(ae, disc, opt_ae, opt_disc)
    m = StepModels(ae, disc, opt_ae, opt_disc, s_ae, s_disc, perceptual, name)
    x = torch.rand(batch, 3, resolution, resolution, device=accelerator.device) * 2 - 1
    counter = FlopCounterMode(display=False, depth=1)
    with counter:
        rec, _ = autoencoder_step(accelerator, m, x, 0, cfg.loss)
        discriminator_step(accelerator, m, x, rec, 0, cfg.loss)
    total = counter.get_total_flops()
    return {"config": config, "resolution": resolution, "batch": batch, "flops_per_step": total,
            "flops_per_image": total / batch}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--images-per-s", type=float, help="measured training images/s (bench/throughput.py)")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, TFLOP/s")
    p.add_argument("--out", help="write the result as JSON here")
    p.add_argument("--counted", metavar="JSON", help="take the FLOPs from this earlier --out file instead of "
                   "counting again (bench/gpu.sh counts on the CPU while the GPU trains, then adds the MFU)")
    a = p.parse_args()
    sys.path.insert(0, str(REPO))
    if a.counted:
        result = json.loads(Path(a.counted).read_text())
        if (result["config"], result["resolution"]) != (a.config, a.resolution):
            p.error(f"--counted {a.counted} holds {result['config']} at {result['resolution']} px, "
                    f"not {a.config} at {a.resolution}")
    else:
        result = count_step_flops(a.config, a.resolution, a.batch)
    print(f"{Path(a.config).name} at {a.resolution} px: {result['flops_per_image'] / 1e9:.1f} GFLOP per training "
          f"image (autoencoder + LPIPS + GAN step, forward and backward)")
    if a.images_per_s and a.peak_tflops:
        result["mfu"] = result["flops_per_image"] * a.images_per_s / (a.peak_tflops * 1e12)
        result.update(images_per_s=a.images_per_s, peak_tflops=a.peak_tflops)
        print(f"MFU at {a.images_per_s} images/s on a {a.peak_tflops} TFLOP/s device: {result['mfu']:.1%}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
