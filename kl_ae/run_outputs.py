"""What a run leaves besides its checkpoints: sample grids, the periodic evaluation, and at the end
the export with its measured latent factors and the evaluation on data.val."""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from kl_ae import checkpoint as ckpt_io
from kl_ae.config import Config
from kl_ae.distributed import unsharded_autoencoder
from kl_ae.eval.grids import pair_grid, save_grid
from kl_ae.eval.fp16 import FP16_AUDIT
from kl_ae.export import LATENT_STATS, audit_export, latent_factors_for, save_export
from kl_ae.tracking import log_images

logger = logging.getLogger("kl_ae")


def save_sample_grid(accelerator: Accelerator, run_dir: Path, x: torch.Tensor, rec: torch.Tensor, step: int) -> None:
    """Save and log an input | reconstruction grid of up to 4 images (main process)."""
    grid = pair_grid(x, rec)
    save_grid(grid, run_dir / "samples" / f"{ckpt_io.checkpoint_name(step)}.png")
    log_images(accelerator, {"samples/input_reconstruction": grid}, step)


@contextmanager
def _ema_weights(vae, ema: EMAModel | None):
    """Swap the EMA weights into ``vae`` for the duration (no-op without EMA)."""
    if ema is None:
        yield vae
        return
    ema.store(vae.parameters())
    ema.copy_to(vae.parameters())
    try:
        yield vae
    finally:
        ema.restore(vae.parameters())


def periodic_eval(cfg: Config, accelerator: Accelerator, vae, ema: EMAModel | None, step: int) -> None:
    """PSNR/SSIM of the (EMA) autoencoder on data.val, logged as val/*; main process only. A
    failure is logged as a warning and training goes on."""
    if accelerator.is_fsdp2:  # every rank gathers its shards; the main process evaluates a plain copy
        vae, ema = unsharded_autoencoder(vae, ema, accelerator.is_main_process)
    if accelerator.is_main_process:
        from kl_ae.eval.evaluate import evaluate

        try:
            with _ema_weights(vae, ema):
                report = evaluate(vae, cfg.data.val, resolution=cfg.data.val_resolution, lpips_trunk=None,
                                  progress=False, latent=False, max_image_pixels=cfg.data.max_image_pixels)
        except Exception as err:  # noqa: BLE001 (an evaluation must not end the training)
            logger.warning("evaluation at step %d on data.val=%r failed, training goes on: %s: %s", step,
                           cfg.data.val, type(err).__name__, err, exc_info=logger.isEnabledFor(logging.DEBUG))
        else:
            metrics = {f"val/{k}": v for k, v in report["metrics"].items() if isinstance(v, (int, float))}
            accelerator.log(metrics, step=step)
            logger.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        vae.train()
    accelerator.wait_for_everyone()


def finish_run(cfg: Config, run_dir: Path, vae, ema: EMAModel | None, step: int) -> str | None:
    """Export the EMA (or raw) weights with measured latent factors; evaluate on data.val.
    Returns why the evaluation failed (logged with its traceback), or None."""
    with _ema_weights(vae, ema):
        factors = latent_factors_for(vae, cfg, cfg.data.train)
        export_dir = run_dir / "export"
        shutil.rmtree(export_dir, ignore_errors=True)
        save_export(vae, export_dir, factors, {"step": step, "ema": ema is not None})
        audit = audit_export(vae, export_dir, cfg.data.val or cfg.data.train, cfg.data.resolution,
                             cfg.loss.fp16_fix)
        # kl-ae export of this checkpoint reuses them (and never reads a received run's data.train)
        final_checkpoint = run_dir / "checkpoints" / ckpt_io.checkpoint_name(step)
        if final_checkpoint.is_dir():
            shutil.copyfile(export_dir / LATENT_STATS, final_checkpoint / LATENT_STATS)
            if audit is not None:
                shutil.copyfile(export_dir / FP16_AUDIT, final_checkpoint / FP16_AUDIT)
        if not cfg.data.val:
            return None
        from kl_ae.eval.evaluate import evaluate
        from kl_ae.eval.report import format_report

        try:
            report = evaluate(vae, cfg.data.val, resolution=cfg.data.val_resolution,
                              lpips_trunk=cfg.loss.lpips_trunk, baselines=True,
                              max_image_pixels=cfg.data.max_image_pixels)
        except Exception as err:  # noqa: BLE001 (the checkpoint and export are written: report, keep them)
            logger.error("evaluation on data.val=%r failed (the checkpoint and export are kept; evaluate again "
                         "with kl-ae eval %s IMAGES)", cfg.data.val, export_dir, exc_info=True)
            return f"{type(err).__name__}: {err}"
        (run_dir / "eval.json").write_text(json.dumps(report, indent=2))
        logger.info("evaluation on %s (%s):\n%s", cfg.data.val, run_dir / "eval.json", format_report(report))
    return None
