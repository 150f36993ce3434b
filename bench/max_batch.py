"""The largest training batch that fits in GPU memory, with and without gradient checkpointing.

    python bench/max_batch.py configs/sd-f8c4.yaml --resolution 256 512 --out results/gpu/max-batch.json
    python bench/max_batch.py configs/quickstart.yaml --resolution 32 --max-batch 4   # CPU smoke run

For each resolution and each setting of ``train.gradient_checkpointing``, runs one full kl-ae
training step (autoencoder update with LPIPS and the GAN term active, then the discriminator
update; kl_ae.step, the trainer's own code) at batch 1, 2, 4, ... until it runs out of memory
or reaches --max-batch, then bisects between the last batch that fitted and the first that did
not. Reports the largest batch and its peak allocated memory (CUDA only). LPIPS uses an
untrained VGG16 trunk (same size and cost as the real one). Each step runs in this process;
after each try its objects are freed and the CUDA cache emptied before the next.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and any(s in str(err) for s in ("out of memory", "ALLOC_FAILED")))


def _try_step(config: str, resolution: int, batch: int, checkpointing: bool) -> dict | None:
    """One training step at ``batch``; None when it runs out of memory. Frees everything it built
    before returning (the caller empties the CUDA cache once this frame is gone)."""
    try:
        return _step_once(config, resolution, batch, checkpointing)
    except (RuntimeError, MemoryError) as err:
        if not _is_oom(err):
            raise
        return None


def _release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _step_once(config: str, resolution: int, batch: int, checkpointing: bool) -> dict:
    import torch
    from accelerate import Accelerator

    from kl_ae.config import load_config
    from kl_ae.perceptual import build_lpips
    from kl_ae.precision import resolve_mixed_precision
    from kl_ae.step import StepModels, autoencoder_step, discriminator_step
    from kl_ae.trainer import _build, _Frozen

    cfg = load_config(config, [f"data.resolution={resolution}", "loss.disc_start=0", "loss.lpips_trunk=random",
                               "train.gradient_accumulation_steps=1",
                               f"train.gradient_checkpointing={'true' if checkpointing else 'false'}"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision, _, _ = resolve_mixed_precision(cfg.train.mixed_precision, device)
    accelerator = Accelerator(mixed_precision=precision)
    try:
        perceptual, name = build_lpips("random") if cfg.loss.perceptual_weight > 0 else (None, "lpips")
        ae, disc, opt_ae, opt_disc, s_ae, s_disc = _build(cfg, accelerator, _Frozen(perceptual, name))
        ae, disc, opt_ae, opt_disc = accelerator.prepare(ae, disc, opt_ae, opt_disc)
        m = StepModels(ae, disc, opt_ae, opt_disc, s_ae, s_disc, perceptual, name)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        x = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
        t0 = time.perf_counter()
        for _ in range(2):  # the second step runs with the optimizer states allocated
            rec, _ = autoencoder_step(accelerator, m, x, 0, cfg.loss)
            discriminator_step(accelerator, m, x, rec, 0, cfg.loss)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out = {"batch": batch, "step_s": round((time.perf_counter() - t0) / 2, 3)}
        if device.type == "cuda":
            out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        return out
    finally:
        accelerator.free_memory()


def largest_batch(config: str, resolution: int, checkpointing: bool, max_batch: int) -> dict:
    """Doubling, then bisection. Returns {"largest_batch", "fits", "tries"} (largest 0: not even batch 1)."""
    tries, fits = [], None
    lo, hi, batch = 0, None, 1
    while batch <= max_batch:
        r = _try_step(config, resolution, batch, checkpointing)
        _release()
        tries.append({"batch": batch, "fits": r is not None, **(r or {})})
        print(f"  {resolution} px, checkpointing {checkpointing}: batch {batch} {'fits' if r else 'OOM'}", flush=True)
        if r is None:
            hi = batch
            break
        lo, fits = batch, r
        batch *= 2
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        r = _try_step(config, resolution, mid, checkpointing)
        _release()
        tries.append({"batch": mid, "fits": r is not None, **(r or {})})
        if r is None:
            hi = mid
        else:
            lo, fits = mid, r
    return {"largest_batch": lo, "capped_at_max_batch": hi is None, "fits": fits, "tries": tries}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--resolution", type=int, nargs="+", default=[256, 512])
    p.add_argument("--max-batch", type=int, default=256, help="stop doubling here")
    p.add_argument("--out", help="JSON file for the results")
    a = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    results = {"config": a.config, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "runs": []}
    for res in a.resolution:
        for ckpt in (False, True):
            r = largest_batch(a.config, res, ckpt, a.max_batch)
            results["runs"].append({"resolution": res, "gradient_checkpointing": ckpt, **r})
            print(f"{res} px, gradient checkpointing {'on' if ckpt else 'off'}: largest batch {r['largest_batch']}"
                  f"{' (the --max-batch cap)' if r['capped_at_max_batch'] else ''}"
                  + (f", peak {r['fits']['peak_cuda_mb']} MB" if r["fits"] and "peak_cuda_mb" in r["fits"] else ""),
                  flush=True)
            if a.out:  # after every setting: a run cut short by a time limit keeps what it measured
                Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
