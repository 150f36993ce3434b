"""The training loop around :mod:`kl_ae.step`: data, Accelerate, EMA, logging, checkpoints, export.

Runs as a plain process (CPU or one GPU) and under ``accelerate launch`` (DDP or FSDP2, see
:mod:`kl_ae.distributed`). The run directory describes itself: config.yaml (written before
step 0), train.log, logs/ (TensorBoard), samples/step-NNNNNNN.png (input | reconstruction),
checkpoints/step-NNNNNNN/ + checkpoints/latest, export/ (diffusers layout) and eval.json when
``data.val`` is set.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, TorchDynamoPlugin, set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from kl_ae import checkpoint as ckpt_io
from kl_ae.config import Config, save_config, tracker_names
from kl_ae.data import (
    build_train_dataloader, final_phase_data, is_shard_source, resume_dataloader, shuffle_channels,
)
from kl_ae.distributed import check_distributed, check_fsdp_units, process_state, unsharded_autoencoder
from kl_ae.export import latent_factors_for, save_export
from kl_ae.grids import pair_grid, save_grid
from kl_ae.images import DataError, SkipCounter
from kl_ae.model import AutoencoderWrapper, build_discriminator, count_parameters, load_or_build_autoencoder
from kl_ae.perceptual import build_lpips
from kl_ae.precision import resolve_mixed_precision
from kl_ae.schedule import TrainingClock, build_scheduler, configure, set_progress
from kl_ae.step import StepModels, autoencoder_step, discriminator_step
from kl_ae.tracking import flat_config, init_kwargs, log_images

logger = logging.getLogger("kl_ae")

# optim.implementation -> torch.optim.Adam keyword arguments (same update, different kernels)
_ADAM_KERNEL = {"auto": {}, "fused": {"fused": True}, "foreach": {"foreach": True},
                "for-loop": {"foreach": False, "fused": False}}


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the latest checkpoint is the last good state."""


def scaled_learning_rate(cfg: Config, num_processes: int) -> float:
    """LDM's rule (main.py ``--scale_lr``, on by default): lr = accumulation * processes * batch * base_lr.

    With LDM's kl-f8 settings (batch 12, accumulation 2, 1 GPU): 2 * 1 * 12 * 4.5e-6 = 1.08e-4.
    """
    o, t = cfg.optim, cfg.train
    if not o.scale_lr:
        return o.base_learning_rate
    return t.gradient_accumulation_steps * num_processes * t.batch_size * o.base_learning_rate


def _add_run_log(run_dir: Path, is_main: bool) -> logging.Handler | None:
    """Send the ``kl_ae`` loggers to RUN/train.log (main process) for the duration of one run."""
    logger.setLevel(logging.INFO)
    if not is_main:
        return None
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    return handler


def _batches(loader, counters: dict):
    """Yield pixel batches forever from epoch ``counters["epoch"]`` on, keeping
    ``counters["epoch"]`` / ``counters["batches_in_epoch"]`` (batches drawn, empty ones included)
    current: the position a checkpoint records for an exact resume."""
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(counters["epoch"])
        seen = counters["batches_in_epoch"]  # resumed mid-epoch (maybe at its very end): batches before
        for batch in loader:
            counters["batches_in_epoch"] += 1
            counters["upscaled"] += int(batch["num_upscaled"])
            for reason, n in batch["skip_reasons"].items():
                counters["skip_reasons"].add(reason, n)
            if batch["pixel_values"].shape[0] == 0:
                continue
            seen += 1
            yield batch["pixel_values"]
        if seen == 0:
            raise DataError(f"no usable training image in a whole epoch: {counters['skip_reasons'].summary()}")
        counters["epoch"] += 1
        counters["batches_in_epoch"] = 0


def _prepare_loader(accelerator: Accelerator, cfg: Config, loader):
    """Folder/builtin loaders go through Accelerate (it splits their batches across ranks);
    shard loaders do not: webdataset splits the shards by rank itself."""
    return loader if is_shard_source(cfg.data.train) else accelerator.prepare(loader)


def _final_phase_loader(cfg: Config):
    """The (unprepared) DataLoader of the resolution schedule's final phase; its own seed, so
    its crops do not repeat the first phase's."""
    data, batch_size = final_phase_data(cfg.data, cfg.train.batch_size)
    logger.info("resolution schedule, final phase: %d-px crops, batch %d per process, short side %s",
                data.resolution, batch_size, data.short_side_range or "native")
    return build_train_dataloader(data, batch_size, seed=cfg.train.seed + 1)


def _phases(cfg: Config, accelerator: Accelerator, loader, counters: dict, first_phase_over):
    """Batches of the resolution schedule (data.final_resolution): from ``loader`` while
    ``counters["phase"]`` is 0 and ``first_phase_over()`` is false, then from a new loader of
    final-phase crops, forever. ``loader`` is already the final phase's when resuming in it."""
    if counters["phase"] == 0:
        for x in _batches(loader, counters):
            if first_phase_over():  # this batch is dropped: the next step is a final-phase one
                break
            yield x
        # The first phase's workers stay alive until the run ends (persistent workers, each with
        # its decode cache): a DataLoader has no public way to stop them early.
        loader = _prepare_loader(accelerator, cfg, _final_phase_loader(cfg))
        counters.update(phase=1, epoch=0, batches_in_epoch=0)
    yield from _batches(loader, counters)


def _save_grid(accelerator: Accelerator, run_dir: Path, x: torch.Tensor, rec: torch.Tensor, step: int) -> None:
    """Save and log an input | reconstruction grid of up to 4 images (main process)."""
    grid = pair_grid(x, rec)
    save_grid(grid, run_dir / "samples" / f"{ckpt_io.checkpoint_name(step)}.png")
    log_images(accelerator, {"samples/input_reconstruction": grid}, step)


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, position: dict,
                    ema: EMAModel | None, vae, keep_last: int = 0) -> None:
    """Write checkpoints/step-N atomically (temporary directory, rename, then ``latest``).

    position: ``{"epoch", "batches_in_epoch"}`` of the data stream after this step."""
    ckpts = run_dir / "checkpoints"
    name = ckpt_io.checkpoint_name(step)
    tmp = ckpts / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if ema is not None:  # every rank: under FSDP2 each contributes its shards
        ckpt_io.save_ema(ema, list(vae.named_parameters()), tmp / ckpt_io.EMA_WEIGHTS,
                         write=accelerator.is_main_process)
    if accelerator.is_main_process:
        ckpt_io.finalize_checkpoint(tmp, ckpts / name, {"step": step, **position})
        logger.info("saved checkpoint %s", ckpts / name)
        for path in ckpt_io.prune_checkpoints(ckpts, keep_last):
            logger.info("deleted old checkpoint %s (train.keep_last=%d)", path.name, keep_last)
    accelerator.wait_for_everyone()


def _checkpoint_to_resume(resume: str | None, run_dir: Path) -> Path | None:
    """``--resume latest`` in a run without a checkpoint yet starts from scratch (so a job
    script can always pass it); an explicit checkpoint directory must exist."""
    if not resume:
        return None
    if resume == ckpt_io.LATEST and not (run_dir / "checkpoints" / ckpt_io.LATEST).is_file():
        logger.info("--resume latest: no checkpoint in %s yet, starting from scratch", run_dir)
        return None
    return ckpt_io.resolve_checkpoint(resume, run_dir)


def _build(cfg: Config, accelerator: Accelerator, perceptual, perceptual_name: str):
    """Models, optimizers and schedulers, before Accelerate's prepare (LPIPS is built at start-up)."""
    if perceptual is not None:
        perceptual.to(accelerator.device)
    vae = load_or_build_autoencoder(cfg.model)
    ae = AutoencoderWrapper(vae, cfg.loss.logvar_init, cfg.loss.learn_logvar)
    disc = build_discriminator(cfg.loss)
    lr = scaled_learning_rate(cfg, accelerator.num_processes)
    if cfg.train.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    if cfg.train.channels_last:
        ae.to(memory_format=torch.channels_last)
        disc.to(memory_format=torch.channels_last)
        if perceptual is not None:  # its convolutions follow their weights' memory format
            perceptual.to(memory_format=torch.channels_last)
    o = cfg.optim
    kernel = _ADAM_KERNEL[o.implementation]
    # AdamW with weight_decay 0 is Adam (LDM): decoupled decay multiplies by 1 - lr * 0
    opt_ae = torch.optim.AdamW([p for p in ae.parameters() if p.requires_grad], lr=lr, betas=tuple(o.betas),
                               weight_decay=o.weight_decay, **kernel)
    opt_disc = torch.optim.Adam(disc.parameters(), lr=lr, betas=tuple(o.disc_betas), **kernel)
    sched_ae, sched_disc = (build_scheduler(opt, o.lr_schedule, o.lr_warmup_steps, cfg.train.max_steps,
                                            o.lr_final_ratio) for opt in (opt_ae, opt_disc))
    logger.info(
        "world size %d, autoencoder %.2f M parameters, discriminator %.2f M, lr %.3g (scale_lr=%s, schedule %s, "
        "warm-up %d steps), perceptual: %s", accelerator.num_processes,
        count_parameters(vae) / 1e6, count_parameters(disc) / 1e6, lr, o.scale_lr, o.lr_schedule,
        o.lr_warmup_steps,
        perceptual_name if perceptual is not None else "off",
    )
    return ae, disc, opt_ae, opt_disc, sched_ae, sched_disc


def train(cfg: Config, resume: str | None = None) -> Path:
    """Train, checkpoint, export (and evaluate if ``data.val``). Returns the run directory.

    resume: 'latest' (the run directory's latest checkpoint), a checkpoint directory, or None.
    Raises LPIPSWeightsError at start-up when LPIPS is asked for and its VGG16 trunk is missing,
    DataError when the training data is unusable.
    """
    t = cfg.train
    run_dir = Path(t.output_dir)
    # Unusable data or missing LPIPS weights: fail before Accelerate, models or the run directory.
    loader = build_train_dataloader(cfg.data, t.batch_size, seed=t.seed)
    perceptual, perceptual_name = None, "lpips"
    if cfg.loss.perceptual_weight > 0:
        perceptual, perceptual_name = build_lpips(cfg.loss.lpips_trunk)
    # 'auto' needs the device, which the process state knows before the Accelerator exists
    mixed_precision, precision_note, note_level = resolve_mixed_precision(t.mixed_precision, process_state().device)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with=tracker_names(t.tracker) or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        step_scheduler_with_optimizer=False,
        # None: Accelerate's default, i.e. what `accelerate launch --dynamo_backend` asked for
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if t.compile else None,
    )
    check_distributed(accelerator, cfg)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    handler = _add_run_log(run_dir, accelerator.is_main_process)
    logger.log(note_level, precision_note)
    try:
        _train(cfg, accelerator, run_dir, resume, loader, (perceptual, perceptual_name))
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
    return run_dir


def _train(cfg: Config, accelerator: Accelerator, run_dir: Path, resume: str | None, loader,
           lpips: tuple) -> None:
    t = cfg.train
    perceptual, perceptual_name = lpips
    set_seed(t.seed)  # identical initial weights on every rank
    ae, disc, opt_ae, opt_disc, sched_ae, sched_disc = _build(cfg, accelerator, perceptual, perceptual_name)
    vae = ae.vae

    ckpt = _checkpoint_to_resume(resume, run_dir)
    state = ckpt_io.read_loop_state(ckpt) if ckpt is not None else {}
    if state.get("phase", 0):  # resuming in the resolution schedule's final phase
        loader = _final_phase_loader(cfg)
    raw_loader = loader
    loader = _prepare_loader(accelerator, cfg, loader)
    # One model (with its optimizer) per call: FSDP2 shards one model per prepare.
    ae, opt_ae, sched_ae = accelerator.prepare(ae, opt_ae, sched_ae)
    disc, opt_disc, sched_disc = accelerator.prepare(disc, opt_disc, sched_disc)
    check_fsdp_units(ae)
    # After prepare, so that under FSDP2 the EMA is sharded like the (DTensor) parameters.
    ema = EMAModel(vae.parameters(), decay=t.ema_decay, foreach=True) if t.ema_decay > 0 else None
    if ema is not None:
        ema.to(accelerator.device)
    models = StepModels(ae, disc, opt_ae, opt_disc, sched_ae, sched_disc, perceptual, perceptual_name)

    step, position = 0, {"epoch": 0, "batches_in_epoch": 0}
    if ckpt is None:
        set_seed(t.seed, device_specific=True)  # different noise and crops on every rank
    else:
        accelerator.load_state(str(ckpt))  # also restores every rank's RNG states
        o = cfg.optim
        for sched in (sched_ae, sched_disc):  # this run's schedule settings, the checkpoint's progress
            configure(sched, o.lr_schedule, o.lr_warmup_steps, t.max_steps, o.lr_final_ratio)
        if ema is not None and (ckpt / ckpt_io.EMA_WEIGHTS).is_file():
            ckpt_io.load_ema_into(ema, list(vae.named_parameters()), ckpt / ckpt_io.EMA_WEIGHTS)
        step = state["step"]
        position = {"epoch": state["epoch"], "batches_in_epoch": state.get("batches_in_epoch", 0),
                    "train_seconds": state.get("train_seconds", 0.0), "phase": state.get("phase", 0)}
        if "images_seen" in state:
            position["images_seen"] = state["images_seen"]
        resume_dataloader(raw_loader, position["epoch"], position["batches_in_epoch"], accelerator.num_processes)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt, step, position["epoch"],
                    position["batches_in_epoch"])

    if accelerator.is_main_process and tracker_names(t.tracker):
        accelerator.init_trackers("kl-ae", config=flat_config(cfg), init_kwargs=init_kwargs(run_dir))
    _loop(cfg, accelerator, models, ema, vae, loader, run_dir, step, position)
    accelerator.end_training()


def _loop(cfg, accelerator, models, ema, vae, loader, run_dir, step, position: dict) -> None:
    t = cfg.train
    counters = {"upscaled": 0, "skip_reasons": SkipCounter(), "nonfinite_ae": 0, "nonfinite_disc": 0,
                "consecutive": 0, "phase": 0,
                "images_seen": step * t.batch_size * t.gradient_accumulation_steps * accelerator.num_processes,
                **position}
    clock = TrainingClock(position.get("train_seconds", 0.0))
    budget_s, every_s = t.max_minutes * 60.0, t.checkpoint_every_minutes * 60.0
    seconds = _synced_seconds(accelerator, clock)  # rank 0's: every rank must take the same decisions
    next_mark = (math.floor(seconds / every_s) + 1) * every_s if every_s else math.inf
    scalars: dict = {}
    images_since_log, t_log = 0, time.perf_counter()
    bar = tqdm(total=t.max_steps, initial=step, desc="train", disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    last_saved = step
    final_from = 1.0 - cfg.data.final_fraction if cfg.data.final_resolution else math.inf

    def first_phase_over() -> bool:  # same answer on every rank: step and rank 0's clock
        return max(step / t.max_steps, seconds / budget_s if budget_s else 0.0) >= final_from

    def checkpoint(seconds: float) -> None:
        with clock.pause():
            save_checkpoint(accelerator, run_dir, step, _position(counters, seconds),
                            ema, vae, t.keep_last)

    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    batches = _phases(cfg, accelerator, loader, counters, first_phase_over)
    for x in batches if step < t.max_steps and seconds < (budget_s or math.inf) else ():
        for sched in (models.sched_ae, models.sched_disc):  # the LR after this step follows the run's step
            set_progress(sched, global_step=step + 1)
        x = x.to(accelerator.device, non_blocking=True, memory_format=memory_format)
        if cfg.data.channel_shuffle:
            x = shuffle_channels(x).contiguous(memory_format=memory_format)
        with accelerator.accumulate(models.autoencoder, models.discriminator):
            rec, scalars_ae = autoencoder_step(accelerator, models, x, step, cfg.loss, cfg.optim.max_grad_norm)
            scalars_d = discriminator_step(accelerator, models, x, rec, step, cfg.loss, cfg.optim.max_grad_norm)
        images_since_log += x.shape[0] * accelerator.num_processes
        counters["images_seen"] += x.shape[0] * accelerator.num_processes
        if not accelerator.sync_gradients:
            continue
        step += 1
        ae_ok = _check_finite(scalars_ae, scalars_d, counters, step, t.max_nonfinite_steps, run_dir)
        if ema is not None and ae_ok:
            ema.step(vae.parameters())
        # only a budget or time marks need every rank to agree (a broadcast per step under DDP)
        seconds = _synced_seconds(accelerator, clock) if budget_s or every_s else clock.seconds()
        if budget_s:  # the LR of the next step decays over the time budget too
            for sched in (models.sched_ae, models.sched_disc):
                set_progress(sched, time_fraction=seconds / budget_s)
        scalars = {**scalars_ae, **scalars_d}
        bar.update(1)
        out_of_time = bool(budget_s) and seconds >= budget_s
        if step % t.log_every == 0 or step == t.max_steps or out_of_time:
            elapsed = time.perf_counter() - t_log
            metrics = _log_metrics(accelerator, scalars, step, counters, images_since_log / elapsed, models,
                                   seconds)
            bar.set_postfix(loss=f"{metrics['loss/total']:.4g}", img_s=f"{metrics['perf/images_per_s']:.2f}",
                            min=f"{seconds / 60:.1f}")
            images_since_log, t_log = 0, time.perf_counter()
        with clock.pause():
            if accelerator.is_main_process and (step % t.image_every == 0 or step == t.max_steps):
                _save_grid(accelerator, run_dir, x, rec, step)
            if t.eval_every and step % t.eval_every == 0 and step != t.max_steps:
                _periodic_eval(cfg, accelerator, vae, ema, step)
        if step % t.checkpoint_every == 0 or seconds >= next_mark:
            checkpoint(seconds)
            last_saved = step
            while next_mark <= seconds:
                next_mark += every_s
        if step >= t.max_steps or out_of_time:
            if out_of_time:
                logger.info("train.max_minutes=%g reached at step %d (%.2f training minutes)",
                            t.max_minutes, step, seconds / 60)
            break
    bar.close()
    seconds = _synced_seconds(accelerator, clock)
    _log_data_summary(accelerator, counters)
    _check_replicas(accelerator, models)
    if last_saved != step:
        checkpoint(seconds)
    if accelerator.is_fsdp2:  # every rank gathers its shards; the main process exports a plain copy
        vae, ema = unsharded_autoencoder(vae, ema, accelerator.is_main_process)
    if accelerator.is_main_process:
        _finish(cfg, run_dir, vae, ema, step)
    accelerator.wait_for_everyone()


def _synced_seconds(accelerator: Accelerator, clock: TrainingClock) -> float:
    """Rank 0's training seconds on every rank: the budget, the time marks and the time-decayed LR
    must agree across ranks (a per-rank clock would give DDP replicas different learning rates)."""
    if accelerator.num_processes == 1:  # nothing to agree on: no tensor, no device synchronisation
        return clock.seconds()
    from accelerate.utils import broadcast

    seconds = torch.tensor([clock.seconds()], dtype=torch.float64, device=accelerator.device)
    return float(broadcast(seconds, from_process=0).item())


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


def _periodic_eval(cfg: Config, accelerator: Accelerator, vae, ema: EMAModel | None, step: int) -> None:
    """PSNR/SSIM of the (EMA) autoencoder on data.val, logged as val/*; main process only."""
    if accelerator.is_fsdp2:  # every rank gathers its shards; the main process evaluates a plain copy
        vae, ema = unsharded_autoencoder(vae, ema, accelerator.is_main_process)
    if accelerator.is_main_process:
        from kl_ae.evaluate import evaluate

        with _ema_weights(vae, ema):
            report = evaluate(vae, cfg.data.val, resolution=cfg.data.val_resolution, lpips_trunk=None,
                              progress=False, latent=False)
        vae.train()
        metrics = {f"val/{k}": v for k, v in report["metrics"].items() if isinstance(v, (int, float))}
        accelerator.log(metrics, step=step)
        logger.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    accelerator.wait_for_everyone()


def _check_replicas(accelerator: Accelerator, models: StepModels) -> None:
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


def _log_data_summary(accelerator: Accelerator, counters: dict) -> None:
    """Per-reason counts of unusable training images over all processes (logged on rank 0)."""
    from accelerate.utils import gather_object

    total = SkipCounter()
    for part in gather_object([counters["skip_reasons"].as_dict()]):
        for reason, n in part.items():
            total.add(reason, n)
    upscaled = sum(gather_object([counters["upscaled"]]))
    if accelerator.is_main_process:
        logger.info("training data, counted over all epochs: %s; %d crops came from images upscaled "
                    "to the crop size",
                    total.summary() if total.total else "no image skipped", upscaled)


def _rss_mb() -> float:
    """Resident memory of this process in MiB (Linux /proc; -1 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return -1.0


def _check_finite(scalars_ae: dict, scalars_d: dict, counters: dict, step: int, limit: int,
                  run_dir: Path) -> bool:
    """Count updates skipped for a non-finite gradient norm; stop after ``limit`` in a row.

    Returns whether the autoencoder was updated. Raises TrainingDiverged (before any checkpoint
    of the bad state is written) after ``limit`` consecutive bad steps.
    """
    ae_ok = bool(torch.isfinite(scalars_ae["optim/ae_grad_norm"]))
    d_ok = "optim/disc_grad_norm" not in scalars_d or bool(torch.isfinite(scalars_d["optim/disc_grad_norm"]))
    counters["nonfinite_ae"] += not ae_ok
    counters["nonfinite_disc"] += not d_ok
    counters["consecutive"] = 0 if ae_ok and d_ok else counters["consecutive"] + 1
    if counters["consecutive"]:
        bad = [name for name, ok in (("autoencoder", ae_ok), ("discriminator", d_ok)) if not ok]
        logger.warning("step %d: non-finite loss or gradient in the %s; update skipped (%d in a row)",
                       step, " and ".join(bad), counters["consecutive"])
    if counters["consecutive"] >= limit:
        raise TrainingDiverged(
            f"{limit} consecutive steps with a non-finite loss or gradient (up to step {step}); stopped "
            f"without saving this state. The last good checkpoint is {run_dir / 'checkpoints'} (latest): "
            "resume from it with a lower optim.base_learning_rate, optim.max_grad_norm > 0, or "
            "train.mixed_precision=no"
        )
    return ae_ok


def _position(counters: dict, seconds: float) -> dict:
    """Loop state of a checkpoint: the data position (exact resume: resolution-schedule phase,
    epoch and batch within it), the training seconds so far (train.max_minutes counts over
    resumes) and the images seen over all processes (bench/quality.py's x axis)."""
    return {"epoch": counters["epoch"], "batches_in_epoch": counters["batches_in_epoch"],
            "train_seconds": round(seconds, 3), "images_seen": counters["images_seen"],
            "phase": counters["phase"]}


def _log_metrics(accelerator, scalars: dict, step: int, counters: dict, images_per_s: float,
                 models: StepModels, seconds: float) -> dict:
    """The one logging path: mean over processes, then trackers, train.log and the progress bar."""
    keys = sorted(scalars)
    values = accelerator.reduce(torch.stack([scalars[k].float() for k in keys]), reduction="mean")
    metrics = {k: v for k, v in zip(keys, values.tolist())}
    metrics.update({
        "perf/images_per_s": images_per_s,
        "perf/train_minutes": seconds / 60.0,
        "optim/lr": models.opt_ae.param_groups[0]["lr"],
        "data/epoch": counters["epoch"],
        "data/upscaled": counters["upscaled"],
        "data/skipped": counters["skip_reasons"].total,
        "perf/rss_mb": _rss_mb(),
        "optim/nonfinite_ae_steps": counters["nonfinite_ae"],
        "optim/nonfinite_disc_steps": counters["nonfinite_disc"],
    })
    if any(not math.isfinite(v) for v in metrics.values()):
        logger.warning("non-finite value at step %d: %s", step, metrics)
    accelerator.log(metrics, step=step)
    logger.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics


def _finish(cfg: Config, run_dir: Path, vae, ema: EMAModel | None, step: int) -> None:
    """Export the EMA (or raw) weights with measured latent factors; evaluate on data.val."""
    with _ema_weights(vae, ema):
        factors = latent_factors_for(vae, cfg)
        export_dir = run_dir / "export"
        shutil.rmtree(export_dir, ignore_errors=True)
        save_export(vae, export_dir, factors, {"step": step, "ema": ema is not None})
        if cfg.data.val:
            from kl_ae.evaluate import evaluate, format_report

            report = evaluate(vae, cfg.data.val, resolution=cfg.data.val_resolution,
                              lpips_trunk=cfg.loss.lpips_trunk, baselines=True)
            (run_dir / "eval.json").write_text(json.dumps(report, indent=2))
            logger.info("evaluation on %s (%s):\n%s", cfg.data.val, run_dir / "eval.json", format_report(report))
