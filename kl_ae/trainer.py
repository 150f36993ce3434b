"""The training loop around :mod:`kl_ae.step`: data, Accelerate, EMA, logging, checkpoints, export.

Runs as a plain process (CPU or one GPU) and under ``accelerate launch`` (DDP or FSDP2, see
:mod:`kl_ae.distributed`). The run directory describes itself: config.yaml (written before
step 0), train.log, logs/ (TensorBoard), samples/step-NNNNNNN.png (input | reconstruction),
checkpoints/step-NNNNNNN/ + checkpoints/latest, export/ (diffusers layout) and eval.json when
``data.val`` is set.
"""

from __future__ import annotations

import datetime
import logging
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, TorchDynamoPlugin, set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from kl_ae import checkpoint as ckpt_io
from kl_ae.checkpoint import LoopState, restore_checkpoint, save_checkpoint
from kl_ae.config import Config, config_yaml, save_config
from kl_ae.config_checks import check_run_start
from kl_ae.data.images import shuffle_channels
from kl_ae.data.loaders import TrainBatches
from kl_ae.eval.fp16 import first_images
from kl_ae.fp16_fix import ActivationPenalty, rescale_for_fp16
from kl_ae.distributed import check_distributed, check_fsdp_units, process_state, unsharded_autoencoder
from kl_ae.model import (
    RUN_CONFIG, AutoencoderWrapper, build_discriminator, check_init_from, check_resume, count_parameters,
    load_or_build_autoencoder,
)
from kl_ae.data.images import DataError
from kl_ae.data.sources import image_source
from kl_ae.interrupt import StopSignals, TrainingInterrupted, signal_name
from kl_ae.run_outputs import finish_run, periodic_eval, save_sample_grid
from kl_ae.monitor import EvaluationFailed, RunCounters, check_finite, check_replicas, log_data_summary, log_metrics
from kl_ae.parsing import ConfigError
from kl_ae.alignment import build_teacher
from kl_ae.perceptual import build_lpips
from kl_ae.precision import cpu_model, resolve_mixed_precision
from kl_ae.schedule import TrainingClock, build_scheduler, configure, set_progress, start_step
from kl_ae.step import StepModels, autoencoder_step, discriminator_step
from kl_ae.tracking import check_tracker_packages, flat_config, init_kwargs, tracker_names

logger = logging.getLogger("kl_ae")

FP16_FIX_CALIBRATION_IMAGES = 4  # images of data.train the fp16-fix's exact rescaling is measured on

# optim.implementation -> torch.optim.Adam keyword arguments (same update, different kernels)
_ADAM_KERNEL = {"auto": {}, "fused": {"fused": True}, "foreach": {"foreach": True},
                "for-loop": {"foreach": False, "fused": False}}


def scaled_learning_rate(cfg: Config, num_processes: int) -> float:
    """LDM's rule (main.py ``--scale_lr``, on by default): lr = accumulation * processes * batch * base_lr.

    With LDM's kl-f8 settings (batch 12, accumulation 2, 1 GPU): 2 * 1 * 12 * 4.5e-6 = 1.08e-4.
    """
    o, t = cfg.optim, cfg.train
    if not o.scale_lr:
        return o.base_learning_rate
    return t.gradient_accumulation_steps * num_processes * t.batch_size * o.base_learning_rate


_RUN_LOGGERS = ("kl_ae", "accelerate")  # what RUN/train.log records (Accelerate: its checkpoint lines)


def _add_run_log(run_dir: Path, is_main: bool) -> logging.Handler | None:
    """Send the ``kl_ae`` and ``accelerate`` loggers to RUN/train.log (main process) for the
    duration of one run; undo with :func:`_remove_run_log`."""
    logger.setLevel(logging.INFO)
    if not is_main:
        return None
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in _RUN_LOGGERS:
        logging.getLogger(name).addHandler(handler)
    return handler


def _remove_run_log(handler: logging.Handler | None) -> None:
    if handler is not None:
        for name in _RUN_LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        handler.close()


def _holds_a_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` has a run's config.yaml or any checkpoint in it."""
    return (run_dir / RUN_CONFIG).is_file() or any((run_dir / "checkpoints").glob("step-*"))


def _checkpoint_to_resume(resume: str | None, run_dir: Path) -> Path | None:
    """``--resume latest`` in a run without a checkpoint yet starts from scratch (so a job
    script can always pass it); an explicit checkpoint directory must exist."""
    if not resume:
        return None
    if resume == ckpt_io.LATEST and not (run_dir / "checkpoints" / ckpt_io.LATEST).is_file():
        logger.info("--resume latest: no checkpoint in %s yet, starting from scratch", run_dir)
        return None
    return ckpt_io.resolve_checkpoint(resume, run_dir)


@dataclass
class _Frozen:
    """The frozen networks of the loss, built at start-up: LPIPS and the VF teacher, with the
    names their terms are logged under."""

    perceptual: torch.nn.Module | None = None
    perceptual_name: str = "lpips"
    teacher: torch.nn.Module | None = None
    teacher_name: str = "vf"
    original: torch.nn.Module | None = None  # loss.fp16_fix: model.init_from as loaded, the target


def _build(cfg: Config, accelerator: Accelerator, frozen: _Frozen):
    """Models, optimizers and schedulers, before Accelerate's prepare."""
    for net in (frozen.perceptual, frozen.teacher, frozen.original):
        if net is not None:
            net.to(accelerator.device)
    perceptual, perceptual_name = frozen.perceptual, frozen.perceptual_name
    vae = load_or_build_autoencoder(cfg.model)
    ae = AutoencoderWrapper(vae, cfg.loss.logvar_init, cfg.loss.learn_logvar, latent_noise=cfg.loss.latent_noise,
                            vf_dim=frozen.teacher.dim if frozen.teacher is not None else 0)
    if cfg.loss.fp16_fix:
        _start_fp16_fix(cfg, ae)
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
        "warm-up %d steps), perceptual: %s, alignment: %s", accelerator.num_processes,
        count_parameters(vae) / 1e6, count_parameters(disc) / 1e6, lr, o.scale_lr, o.lr_schedule,
        o.lr_warmup_steps,
        perceptual_name if perceptual is not None else "off",
        f"{frozen.teacher_name} ({cfg.loss.vf_teacher_arch})" if frozen.teacher is not None else "off",
    )
    return ae, disc, opt_ae, opt_disc, sched_ae, sched_disc


def _start_fp16_fix(cfg: Config, ae: AutoencoderWrapper) -> None:
    """loss.fp16_fix: scale the init_from VAE's residual streams down to the activation limit
    (exact, kl_ae.fp16_fix), measured on the first images of data.train, which every rank reads
    alike; then hook the penalty on its activations. On resume the checkpoint's weights replace
    the rescaled ones."""
    limit = cfg.loss.fp16_fix_activation_limit
    x = first_images(cfg.data.train, cfg.data.resolution, FP16_FIX_CALIBRATION_IMAGES)
    factors = rescale_for_fp16(ae.vae, x, limit)
    scaled = {k: round(v, 6) for k, v in factors.items() if v < 1.0}
    logger.info("fp16-fix: residual streams and conv1 outputs scaled to at most %g on %d images of data.train: %s",
                limit, x.shape[0], scaled or "nothing above the limit")
    ae.activation_penalty = ActivationPenalty(ae.vae, limit)


def _move_aside(run_dir: Path) -> Path:
    """Rename an existing run directory to RUN.old-YYYYmmdd-HHMMSS (never deleted). Returns the new name."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
    run_dir.rename(target)
    return target


def train(cfg: Config, resume: str | None = None, overwrite: bool = False) -> Path:
    """Train, checkpoint, export (and evaluate if ``data.val``). Returns the run directory.

    resume: 'latest' (the run directory's latest checkpoint), a checkpoint directory, or None.
    overwrite: when train.output_dir already holds a run, move it aside (RUN.old-<time>) and
    start a new one there; without it (and without ``resume``) such a directory is refused.
    Raises, at start-up: ConfigError when train.output_dir holds a run and neither is given, when
    model.init_from is missing or does not match the model section, or when the model differs
    from the checkpoint to resume (naming the keys); LPIPSWeightsError when LPIPS is asked for
    and its VGG16 trunk is missing; DataError when the training data is unusable.
    """
    t = cfg.train
    run_dir = Path(t.output_dir)
    if resume and overwrite:
        raise ConfigError("--resume continues the run in train.output_dir and --overwrite moves it aside: "
                          "pass one of them")
    # Unusable data, a VAE to fine-tune that is missing or does not match, a checkpoint this
    # model cannot load, or missing LPIPS weights: fail before Accelerate, models or any write.
    if cfg.model.init_from:
        check_init_from(cfg.model)
    check_tracker_packages(t.tracker)
    check_run_start(cfg)
    if not resume and not overwrite and _holds_a_run(run_dir):
        raise ConfigError(f"train.output_dir={str(run_dir)!r} already holds a run (config.yaml or checkpoints); "
                          "continue it with --resume latest, choose a new train.output_dir, or pass --overwrite "
                          "to move the old run aside (training over it would mix two runs' checkpoints and logs)")
    ckpt = _checkpoint_to_resume(resume, run_dir)
    if ckpt is not None:
        check_resume(cfg, ckpt)
    batches = TrainBatches(cfg.data, t.batch_size, seed=t.seed)
    if cfg.data.val:  # evaluated during and after training: a wrong path should not wait for it
        try:
            image_source(cfg.data.val)
        except DataError as err:
            raise DataError(f"data.val: {err}") from None
    frozen = _Frozen()
    if cfg.loss.perceptual_weight > 0:
        frozen.perceptual, frozen.perceptual_name = build_lpips(cfg.loss.lpips_trunk)
    if cfg.loss.fp16_fix:
        frozen.original = load_or_build_autoencoder(cfg.model).requires_grad_(False).eval()
    if cfg.loss.vf_weight > 0:
        frozen.teacher, frozen.teacher_name = build_teacher(cfg.loss.vf_teacher_arch, cfg.loss.vf_teacher,
                                                            cfg.loss.vf_teacher_resolution)
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
    aside = None
    if accelerator.is_main_process:
        if overwrite and _holds_a_run(run_dir):
            logger.warning("--overwrite: moved the run in %s aside to %s", run_dir, _move_aside(run_dir))
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / RUN_CONFIG)
        if ckpt is not None and ckpt.parent.resolve() == (run_dir / "checkpoints").resolve():
            aside = ckpt_io.set_aside_later_checkpoints(ckpt.parent, ckpt)
    accelerator.wait_for_everyone()
    handler = _add_run_log(run_dir, accelerator.is_main_process)
    if aside is not None:
        logger.warning("resuming from %s, an earlier checkpoint than the run's newest: the later ones were moved "
                       "to %s", ckpt.name, aside)
    logger.log(note_level, precision_note)
    logger.info("CPU: %s", cpu_model())  # benchmarks and bug reports need the machine a figure came from
    try:
        eval_error = _train(cfg, accelerator, run_dir, ckpt, batches, frozen)
    finally:
        batches.close()  # the data workers go now, whatever ended the run
        _remove_run_log(handler)
    if eval_error:
        raise EvaluationFailed(f"trained and exported to {run_dir / 'export'}, but the evaluation on "
                               f"data.val={cfg.data.val!r} failed: {eval_error}")
    return run_dir


def _train(cfg: Config, accelerator: Accelerator, run_dir: Path, ckpt: Path | None, batches: TrainBatches,
           frozen: _Frozen) -> str | None:
    """The run after start-up; returns why the final evaluation failed, or None."""
    t = cfg.train
    set_seed(t.seed)  # identical initial weights on every rank
    ae, disc, opt_ae, opt_disc, sched_ae, sched_disc = _build(cfg, accelerator, frozen)
    vae = ae.vae

    batches.prepare(accelerator)
    # One model (with its optimizer) per call: FSDP2 shards one model per prepare.
    ae, opt_ae, sched_ae = accelerator.prepare(ae, opt_ae, sched_ae)
    disc, opt_disc, sched_disc = accelerator.prepare(disc, opt_disc, sched_disc)
    check_fsdp_units(ae)
    # After prepare, so that under FSDP2 the EMA is sharded like the (DTensor) parameters.
    ema = EMAModel(vae.parameters(), decay=t.ema_decay, foreach=True) if t.ema_decay > 0 else None
    if ema is not None:
        ema.to(accelerator.device)
    models = StepModels(ae, disc, opt_ae, opt_disc, sched_ae, sched_disc, frozen.perceptual, frozen.perceptual_name,
                        frozen.teacher, frozen.teacher_name, frozen.original)

    state = LoopState()
    if ckpt is None:
        set_seed(t.seed, device_specific=True)  # different noise and crops on every rank
    else:
        images_per_step = t.batch_size * t.gradient_accumulation_steps * accelerator.num_processes
        state = restore_checkpoint(accelerator, ckpt, ema, vae, images_per_step)
        o = cfg.optim
        for sched in (sched_ae, sched_disc):  # this run's schedule settings, the checkpoint's progress
            configure(sched, o.lr_schedule, o.lr_warmup_steps, t.max_steps, o.lr_final_ratio)
        batches.load_state_dict(state.data_position())
        logger.info("resumed from %s at step %d (phase %d, epoch %d, batch %d)", ckpt, state.step, state.phase,
                    state.epoch, state.batches_in_epoch)

    if accelerator.is_main_process and tracker_names(t.tracker):
        accelerator.init_trackers("kl-ae", config=flat_config(cfg), init_kwargs=init_kwargs(run_dir))
    try:
        return _loop(cfg, accelerator, models, ema, vae, batches, run_dir, state)
    except BaseException as err:  # a stop by signal, a NaN stop, an error: _loop's frame holds them too
        traceback.clear_frames(err.__traceback__)
        raise
    finally:
        # The DDP wrappers go before the process group. Otherwise a wrapper's Reducer can hold
        # the group's last reference, and freeing the wrapper destroys the group while holding
        # the GIL. A gloo worker thread that is still releasing a finished collective's tensors
        # needs the GIL, and the destructor waits for that thread: the process hangs at exit.
        # It hung 1 launch in 5 under load (bench/stress_ddp.py; py-spy: ~ProcessGroupGloo
        # joining a thread blocked in decref_pyobject). Freed first, the wrappers drop a
        # reference that is not the last; destroy_process_group then drops the group.
        del models, ae, disc, opt_ae, opt_disc, sched_ae, sched_disc
        accelerator.free_memory()
        accelerator.end_training()


def _loop(cfg, accelerator, models, ema, vae, batches: TrainBatches, run_dir, state: LoopState) -> str | None:
    t = cfg.train
    counters = RunCounters()
    clock = TrainingClock(state.train_seconds)
    budget_s, every_s = t.max_minutes * 60.0, t.checkpoint_every_minutes * 60.0
    seconds = _synced_seconds(accelerator, clock)  # rank 0's: every rank must take the same decisions
    next_mark = (math.floor(seconds / every_s) + 1) * every_s if every_s else math.inf
    scalars: dict = {}
    images_since_log, t_log = 0, time.perf_counter()
    # with a time budget the bar counts steps without a total (tqdm's ETA would be by max_steps)
    # and the postfix shows the training time left
    bar = tqdm(total=None if budget_s else t.max_steps, initial=state.step, desc="train", unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    last_saved = state.step
    final_from = 1.0 - cfg.data.final_fraction if cfg.data.final_resolution else math.inf

    def first_phase_over() -> bool:  # same answer on every rank: step and rank 0's clock
        return max(state.step / t.max_steps, seconds / budget_s if budget_s else 0.0) >= final_from

    def checkpoint(seconds: float) -> None:
        state.train_seconds = seconds
        state.set_data_position(batches.state_dict())
        with clock.pause():
            save_checkpoint(accelerator, run_dir, state, ema, vae, trained_with, t.keep_last)

    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    trained_with = config_yaml(cfg)  # stored in every checkpoint
    stream = batches.batches(first_phase_over)
    signals = StopSignals(announce=accelerator.is_main_process)
    stopped_by = None
    with signals:
        for x in stream if state.step < t.max_steps and seconds < (budget_s or math.inf) else ():
            step = state.step  # the step being taken (0-based); state.step counts the finished ones
            for sched in (models.sched_ae, models.sched_disc):  # this step's LR, whatever each scheduler skipped
                start_step(sched, step)
            x = x.to(accelerator.device, non_blocking=True, memory_format=memory_format)
            if cfg.data.channel_shuffle:
                x = shuffle_channels(x).contiguous(memory_format=memory_format)
            with accelerator.accumulate(models.autoencoder, models.discriminator):
                rec, scalars_ae = autoencoder_step(accelerator, models, x, step, cfg.loss, cfg.optim.max_grad_norm)
                scalars_d = discriminator_step(accelerator, models, x, rec, step, cfg.loss, cfg.optim.max_grad_norm)
            images_since_log += x.shape[0] * accelerator.num_processes
            state.images_seen += x.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            state.step = step = step + 1
            ae_ok = check_finite(scalars_ae, scalars_d, counters, step, t.max_nonfinite_steps, run_dir)
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
                metrics = log_metrics(accelerator, scalars, state, counters, batches, images_since_log / elapsed, models,
                                       seconds)
                live = {"loss": f"{metrics['loss/total']:.4g}", "l1": f"{metrics['loss/l1']:.4f}",
                        "img/s": f"{metrics['perf/images_per_s']:.1f}"}
                if budget_s:
                    live["left"] = str(datetime.timedelta(seconds=round(max(0.0, budget_s - seconds))))
                bar.set_postfix(live)
                images_since_log, t_log = 0, time.perf_counter()
            stopped_by = signals.agreed(accelerator)  # every rank, every step: the same answer
            if stopped_by:
                break
            with clock.pause():
                if accelerator.is_main_process and (step % t.image_every == 0 or step == t.max_steps):
                    save_sample_grid(accelerator, run_dir, x, rec, step)
                if t.eval_every and step % t.eval_every == 0 and step != t.max_steps:
                    periodic_eval(cfg, accelerator, vae, ema, step)
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
        log_data_summary(accelerator, batches)
        check_replicas(accelerator, models)
        if last_saved != state.step:
            checkpoint(seconds)
        # a signal during the last step's grid, evaluation or checkpoint: stop here too (the export
        # and evaluation could outlast a scheduler's grace period); resuming then exports
        stopped_by = stopped_by or signals.agreed(accelerator)
    if stopped_by:
        config_file = run_dir / RUN_CONFIG
        if accelerator.is_main_process:
            logger.warning("stopped by %s after step %d with a checkpoint; resume with: kl-ae train %s --resume "
                           "latest", signal_name(stopped_by), state.step, config_file)
        raise TrainingInterrupted(stopped_by, f"stopped by {signal_name(stopped_by)} after step {state.step}; "
                                  f"resume with: kl-ae train {config_file} --resume latest")
    if accelerator.is_fsdp2:  # every rank gathers its shards; the main process exports a plain copy
        vae, ema = unsharded_autoencoder(vae, ema, accelerator.is_main_process)
    eval_error = finish_run(cfg, run_dir, vae, ema, state.step) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    return eval_error


def _synced_seconds(accelerator: Accelerator, clock: TrainingClock) -> float:
    """Rank 0's training seconds on every rank: the budget, the time marks and the time-decayed LR
    must agree across ranks (a per-rank clock would give DDP replicas different learning rates)."""
    if accelerator.num_processes == 1:  # nothing to agree on: no tensor, no device synchronisation
        return clock.seconds()
    from accelerate.utils import broadcast

    seconds = torch.tensor([clock.seconds()], dtype=torch.float64, device=accelerator.device)
    return float(broadcast(seconds, from_process=0).item())
