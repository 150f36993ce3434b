"""What the training loop checks and reports besides the loss: the one logging path of the
scalars, finiteness of each update (and when to give up), the data summary and the DDP replica check.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from kl_ae.checkpoint import LoopState
from kl_ae.data.loaders import TrainBatches
from kl_ae.data.images import SkipCounter
from kl_ae.step import StepModels

logger = logging.getLogger("kl_ae")
# Log records with this attribute set go to train.log but not to the console (kl_ae.cli; --verbose shows them)
FILE_ONLY = {"file_only": True}


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the latest checkpoint is the last good state."""


class EvaluationFailed(RuntimeError):
    """Training finished, its checkpoint and export are written, but the final evaluation on
    data.val failed (the message says why; train.log has the traceback)."""


@dataclass
class RunCounters:
    """What this process counts during one run (not saved: logged and summarised at the end)."""

    nonfinite_ae: int = 0  # skipped autoencoder updates (non-finite gradient norm)
    nonfinite_disc: int = 0  # skipped discriminator updates
    consecutive: int = 0  # bad steps in a row (the run stops at train.max_nonfinite_steps)
    fp16_overflows: int = 0  # updates the fp16 GradScaler skipped while lowering its scale (not counted as bad)
    warned_upscaled: bool = False  # the early warning about upscaled crops was given


# Above this fraction of training crops taken from images smaller than the crop (upscaled, so
# blurry targets), the run warns: once early (after UPSCALED_WARN_AFTER crops) and at the end.
UPSCALED_WARN_FRACTION = 0.1
UPSCALED_WARN_AFTER = 100


def _upscaled_warning(upscaled: int, crops: int, resolution: int) -> str:
    return (f"{upscaled} of {crops} training crops ({upscaled / crops:.0%}) came from images smaller than the "
            f"{resolution}-px crop, upscaled to it: blurry targets teach blur. Use larger images, a smaller "
            "data.resolution, or leave the small images out")


def check_finite(scalars_ae: dict, scalars_d: dict, counters: RunCounters, step: int, limit: int,
                  run_dir: Path) -> bool:
    """Count updates skipped for a non-finite gradient norm; stop after ``limit`` in a row.

    An update that the fp16 GradScaler skipped while lowering its scale (the step's
    ``optim/*_fp16_overflow`` flag, see ``kl_ae.step._update``; this function removes the flags
    from the dicts) is counted apart and is no bad step: the scaler's start-up back-off skips
    several in a row by design.

    Returns whether the autoencoder was updated. Raises TrainingDiverged (before any checkpoint
    of the bad state is written) after ``limit`` consecutive bad steps.
    """
    ae_updated = bool(torch.isfinite(scalars_ae["optim/ae_grad_norm"]))
    ae_overflow = bool(scalars_ae.pop("optim/ae_fp16_overflow", False))
    d_overflow = bool(scalars_d.pop("optim/disc_fp16_overflow", False))
    ae_ok = ae_updated or ae_overflow
    d_ok = ("optim/disc_grad_norm" not in scalars_d or d_overflow
            or bool(torch.isfinite(scalars_d["optim/disc_grad_norm"])))
    counters.fp16_overflows += ae_overflow or d_overflow
    if ae_overflow or d_overflow:
        logger.info("step %d: fp16 gradient overflow; the GradScaler skipped the update and lowered its scale", step)
    counters.nonfinite_ae += not ae_ok
    counters.nonfinite_disc += not d_ok
    counters.consecutive = 0 if ae_ok and d_ok else counters.consecutive + 1
    if counters.consecutive:
        bad = [name for name, ok in (("autoencoder", ae_ok), ("discriminator", d_ok)) if not ok]
        logger.warning("step %d: non-finite loss or gradient in the %s; update skipped (%d in a row)",
                       step, " and ".join(bad), counters.consecutive)
    if counters.consecutive >= limit:
        raise TrainingDiverged(
            f"{limit} consecutive steps with a non-finite loss or gradient (up to step {step}); stopped "
            f"without saving this state. The last good checkpoint is {run_dir / 'checkpoints'} (latest): "
            "resume from it with a lower optim.base_learning_rate, optim.max_grad_norm > 0, or "
            "train.mixed_precision=no"
        )
    return ae_updated


def log_metrics(accelerator, scalars: dict, state: LoopState, counters: RunCounters, batches: TrainBatches,
                images_per_s: float, models: StepModels, seconds: float) -> dict:
    """The one logging path: mean over processes, then trackers, train.log and the progress bar."""
    keys = sorted(scalars)
    values = accelerator.reduce(torch.stack([scalars[k].float() for k in keys]), reduction="mean")
    metrics = {k: v for k, v in zip(keys, values.tolist())}
    metrics.update({
        "perf/images_per_s": images_per_s,
        "perf/train_minutes": seconds / 60.0,
        "optim/lr": models.opt_ae.param_groups[0]["lr"],
        "data/epoch": batches.loader.epoch,
        "data/upscaled": batches.upscaled,
        "data/skipped": batches.skipped.total,
        "perf/rss_mb": rss_mb(),
        "optim/nonfinite_ae_steps": counters.nonfinite_ae,
        "optim/nonfinite_disc_steps": counters.nonfinite_disc,
        "optim/fp16_overflow_steps": counters.fp16_overflows,
    })
    if (not counters.warned_upscaled and batches.crops >= UPSCALED_WARN_AFTER
            and batches.upscaled > UPSCALED_WARN_FRACTION * batches.crops):
        counters.warned_upscaled = True
        if accelerator.is_main_process:  # this process's share of the data: an estimate
            logger.warning(_upscaled_warning(batches.upscaled, batches.crops, batches.resolution))
    # a non-finite gradient norm is check_finite's to report (it may be an fp16 scaler back-off)
    if any(not math.isfinite(v) for k, v in metrics.items() if not k.endswith("_grad_norm")):
        logger.warning("non-finite value at step %d: %s", state.step, metrics)
    accelerator.log(metrics, step=state.step)
    logger.info("step %d %s", state.step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), extra=FILE_ONLY)
    return metrics


def log_data_summary(accelerator: Accelerator, batches: TrainBatches) -> None:
    """Per-reason counts of unusable training images over all processes (logged on rank 0)."""
    from accelerate.utils import gather_object

    total = SkipCounter()
    for part in gather_object([batches.skipped.as_dict()]):
        for reason, n in part.items():
            total.add(reason, n)
    upscaled = sum(gather_object([batches.upscaled]))
    crops = sum(gather_object([batches.crops]))
    if accelerator.is_main_process:
        logger.info("training data, counted over all epochs: %s; %d of %d crops came from images upscaled "
                    "to the crop size",
                    total.summary() if total.total else "no image skipped", upscaled, crops)
        if crops and upscaled > UPSCALED_WARN_FRACTION * crops:
            logger.warning(_upscaled_warning(upscaled, crops, batches.resolution))


def check_replicas(accelerator: Accelerator, models: StepModels) -> None:
    """Log whether every rank ends with the same autoencoder and discriminator parameters
    (sha256 of their bytes): DDP should keep them identical; a difference is logged as an error."""
    if accelerator.num_processes == 1:
        return
    if accelerator.is_fsdp2:  # ranks hold different shards by design
        if accelerator.is_main_process:
            logger.info("parameters sharded by FSDP2 across %d ranks: replica check skipped", accelerator.num_processes)
        return
    import hashlib

    from accelerate.utils import gather_object

    digest = hashlib.sha256()
    for module in (models.autoencoder, models.discriminator):
        for p in module.parameters():
            digest.update(p.detach().float().cpu().numpy().tobytes())
    digests = gather_object([digest.hexdigest()])
    if accelerator.is_main_process:
        if len(set(digests)) == 1:
            logger.info("parameters identical on all %d ranks (sha256 %s)", len(digests), digests[0][:16])
        else:
            logger.error("parameters DIFFER between ranks: %s", digests)


def rss_mb() -> float:
    """Resident memory of this process in MiB (Linux /proc; -1 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return -1.0
