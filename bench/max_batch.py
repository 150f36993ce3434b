"""The largest training batch that fits in GPU memory, with and without gradient checkpointing.

    python bench/max_batch.py configs/sd-f8c4.yaml --resolution 256 512 --out results/gpu/max-batch.json
    python bench/max_batch.py configs/quickstart.yaml --resolution 32 --max-batch 4   # CPU smoke run

For each resolution and each setting of ``train.gradient_checkpointing``, runs one full kl-ae
training step (autoencoder update with LPIPS and the GAN term active, then the discriminator
update; kl_ae.step, the trainer's own code) at batch --start-batch, twice that, ... until it
runs out of memory or reaches --max-batch, then bisects between the last batch that fitted and
the first that did not (to within --tolerance). Reports the largest batch, the time of its
second step and its peak allocated memory (CUDA only). LPIPS uses an untrained VGG16 trunk (same
size and cost as the real one). The models of one setting are built once in this process; after
each try its batch is freed and the CUDA cache emptied before the next.
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


class _Setting:
    """The models, optimizers and Accelerator of one (resolution, checkpointing) setting, built
    once: each try allocates only its batch. (Building the VAE and a 138 M-parameter random
    VGG16 on the host for every try cost seconds each.) Use as a context manager."""

    def __init__(self, config: str, resolution: int, checkpointing: bool):
        import torch
        from accelerate import Accelerator

        from kl_ae.config import load_config
        from kl_ae.perceptual import build_lpips
        from kl_ae.precision import resolve_mixed_precision
        from kl_ae.step import StepModels
        from kl_ae.trainer import _build, _Frozen

        cfg = load_config(config, [f"data.resolution={resolution}", "loss.disc_start=0", "loss.lpips_trunk=random",
                                   "train.gradient_accumulation_steps=1",
                                   f"train.gradient_checkpointing={'true' if checkpointing else 'false'}"])
        self.cfg, self.resolution = cfg, resolution
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        precision, _, _ = resolve_mixed_precision(cfg.train.mixed_precision, self.device)
        self.accelerator = Accelerator(mixed_precision=precision)
        perceptual, name = build_lpips("random") if cfg.loss.perceptual_weight > 0 else (None, "lpips")
        ae, disc, opt_ae, opt_disc, s_ae, s_disc = _build(cfg, self.accelerator, _Frozen(perceptual, name))
        ae, disc, opt_ae, opt_disc = self.accelerator.prepare(ae, disc, opt_ae, opt_disc)
        self.models = StepModels(ae, disc, opt_ae, opt_disc, s_ae, s_disc, perceptual, name)

    def __enter__(self) -> "_Setting":
        return self

    def __exit__(self, *exc) -> None:
        self.accelerator.free_memory()
        self.models = None
        _release()

    def try_batch(self, batch: int) -> dict:
        """Two training steps at ``batch`` (the second with the optimizer states allocated);
        {"batch", "fits", "step_s" (the second step), "peak_cuda_mb"} or, for a batch that does
        not fit, {"batch", "fits": False, "error"?}. A RuntimeError other than out-of-memory at
        a batch > 1 counts as not fitting and is recorded (large tensors can exceed a kernel's
        32-bit indexing before they exceed the memory); at batch 1 it is raised."""
        import torch

        from kl_ae.step import autoencoder_step, discriminator_step

        m, cuda = self.models, self.device.type == "cuda"
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            x = torch.rand(batch, 3, self.resolution, self.resolution, device=self.device) * 2 - 1
            seconds = []
            for _ in range(2):
                t0 = time.perf_counter()
                rec, _ = autoencoder_step(self.accelerator, m, x, 0, self.cfg.loss)
                discriminator_step(self.accelerator, m, x, rec, 0, self.cfg.loss)
                del rec
                if cuda:
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - t0)
            out = {"batch": batch, "fits": True, "step_s": round(seconds[-1], 3)}
            if cuda:
                out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
            return out
        except (RuntimeError, MemoryError) as err:
            if not _is_oom(err) and batch == 1:
                raise
            return {"batch": batch, "fits": False, **({} if _is_oom(err) else {"error": str(err)[:300]})}
        finally:
            x = None
            for opt in (m.opt_ae, m.opt_disc):
                opt.zero_grad(set_to_none=True)
            _release()


def _release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def largest_batch(config: str, resolution: int, checkpointing: bool, max_batch: int, start_batch: int = 1,
                  tolerance: float = 0.0) -> dict:
    """Doubling from ``start_batch``, then bisection until the gap between the largest batch that
    fitted and the smallest that did not is at most ``max(1, tolerance * largest)``. Returns
    {"largest_batch", "capped_at_max_batch", "fits", "tries"} (largest 0: not even batch 1)."""
    tries, fits = [], None
    lo, hi, batch = 0, None, max(1, min(start_batch, max_batch))
    with _Setting(config, resolution, checkpointing) as setting:
        def attempt(b: int) -> dict | None:
            r = setting.try_batch(b)
            tries.append(r)
            print(f"  {resolution} px, checkpointing {checkpointing}: batch {b} {'fits' if r['fits'] else 'does not fit'}"
                  + (f" ({r['error'][:80]})" if "error" in r else ""), flush=True)
            return r if r["fits"] else None

        while batch <= max_batch:
            r = attempt(batch)
            if r is None:
                hi = batch
                break
            lo, fits = batch, r
            if batch == max_batch:
                break
            batch = min(batch * 2, max_batch)
        while hi is not None and hi - lo > max(1, int(tolerance * lo)):
            mid = (lo + hi) // 2
            r = attempt(mid)
            if r is None:
                hi = mid
            else:
                lo, fits = mid, r
    return {"largest_batch": lo, "capped_at_max_batch": hi is None, "fits": fits, "tries": tries,
            **({"next_failed": hi} if hi is not None else {})}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--resolution", type=int, nargs="+", default=[256, 512])
    p.add_argument("--max-batch", type=int, default=256, help="stop doubling here")
    p.add_argument("--start-batch", type=int, default=1, help="the first batch tried (doubling from there)")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="stop bisecting when the gap is at most this fraction of the largest batch (0: exact)")
    p.add_argument("--out", help="JSON file for the results")
    a = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    results = {"config": a.config, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "runs": []}
    for res in a.resolution:
        for ckpt in (False, True):
            r = largest_batch(a.config, res, ckpt, a.max_batch, a.start_batch, a.tolerance)
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
