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
from kl_ae.export import LATENT_STATS, latent_factors_for, save_export
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


FP16_AUDIT_IMAGES = 2


def audit_export(vae, export_dir: Path, images: str, resolution: int) -> dict | None:
    """Run the fp16 safety audit on the exported weights (the first FP16_AUDIT_IMAGES of
    ``images`` at ``resolution``) and write it to ``export_dir``/fp16_audit.json for the model
    card. A failure is logged, not raised: the export is written. Returns the audit or None."""
    from kl_ae.eval.fp16 import FP16_AUDIT, format_fp16_audit, fp16_audit

    try:
        audit = fp16_audit(vae, images, resolution=resolution, max_images=FP16_AUDIT_IMAGES)
    except Exception as err:  # noqa: BLE001 (the export is written; the card then says "not audited")
        logger.warning("fp16 audit of the export failed (run kl-ae eval %s IMAGES --fp16-audit): %s: %s",
                       export_dir, type(err).__name__, err)
        return None
    (export_dir / FP16_AUDIT).write_text(json.dumps(audit, indent=2))  # no local path: it goes to the Hub
    logger.info("%s", "\n".join(format_fp16_audit(audit)))
    return audit


def finish_run(cfg: Config, run_dir: Path, vae, ema: EMAModel | None, step: int) -> str | None:
    """Export the EMA (or raw) weights with measured latent factors; evaluate on data.val.
    Returns why the evaluation failed (logged with its traceback), or None."""
    with _ema_weights(vae, ema):
        factors = latent_factors_for(vae, cfg, cfg.data.train)
        export_dir = run_dir / "export"
        shutil.rmtree(export_dir, ignore_errors=True)
        save_export(vae, export_dir, factors, {"step": step, "ema": ema is not None})
        audit = audit_export(vae, export_dir, cfg.data.val or cfg.data.train, cfg.data.resolution)
        if cfg.loss.fp16_fix and audit is not None and audit["fp16_safe"]:
            # SDXL pipelines upcast a VAE to fp32 unless its config says force_upcast: false
            vae.register_to_config(force_upcast=False)
            vae.save_config(export_dir)
            logger.info("fp16-fix: the export passes the fp16 audit; config.json says force_upcast: false")
        # kl-ae export of this checkpoint reuses them (and never reads a received run's data.train)
        final_checkpoint = run_dir / "checkpoints" / ckpt_io.checkpoint_name(step)
        if final_checkpoint.is_dir():
            shutil.copyfile(export_dir / LATENT_STATS, final_checkpoint / LATENT_STATS)
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
