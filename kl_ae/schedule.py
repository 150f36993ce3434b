"""Learning-rate schedules over optimizer steps or a wall-clock budget.

A schedule is a factor of the peak learning rate, applied through ``torch.optim.lr_scheduler.
LambdaLR`` (so Accelerate checkpoints it with the optimizer). The decay follows the run's
*progress*: the larger of the step fraction and the time fraction, so a run limited by
``train.max_minutes`` decays to its final LR at its time budget, and one limited by
``train.max_steps`` at its last step (the time fraction is set by the training loop each step).

diffusers' ``get_scheduler`` offers cosine and linear decay over steps only; a run that ends
on a wall-clock budget does not know its step count in advance, hence this small class.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch

SCHEDULES = ("constant", "cosine", "linear")


class LRFactor:
    """Callable ``step -> factor`` of the peak LR, for ``LambdaLR``.

    Warm-up: ``step / warmup_steps`` for ``step < warmup_steps`` (diffusers' linear warm-up).
    After it, with progress ``p = clamp(max((step - warmup) / (max_steps - warmup), time_fraction), 0, 1)``:

    - 'constant': 1
    - 'cosine': ``final + (1 - final) * 0.5 * (1 + cos(pi * p))`` (SGDR, Loshchilov & Hutter 2017, without restarts)
    - 'linear': ``final + (1 - final) * (1 - p)``

    ``time_fraction`` (elapsed training minutes / train.max_minutes, 0 without a budget) and
    ``global_step`` (the run's optimizer step, used instead of LambdaLR's own count when set) are
    attributes the loop updates: the discriminator's scheduler steps only once the GAN is on, and
    a skipped non-finite update does not step either, so their own counts lag the run's.
    LambdaLR's state_dict stores the attributes; :func:`configure` re-applies the config after a
    resume, so a changed schedule or max_steps takes effect and only the progress carries over.
    """

    def __init__(self, schedule: str, warmup_steps: int, max_steps: int, final_ratio: float = 0.0):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown LR schedule {schedule!r}; use one of {SCHEDULES}")
        self.schedule = schedule
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.final_ratio = final_ratio
        self.time_fraction = 0.0
        self.global_step: int | None = None

    def progress(self, step: int) -> float:
        """Fraction of the decay phase done at ``step``, in [0, 1]."""
        decay_steps = max(1, self.max_steps - self.warmup_steps)
        by_steps = (step - self.warmup_steps) / decay_steps
        return min(1.0, max(0.0, by_steps, self.time_fraction))

    def __call__(self, step: int) -> float:
        if self.global_step is not None:
            step = self.global_step
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        p = self.progress(step)
        shape = 0.5 * (1.0 + math.cos(math.pi * p)) if self.schedule == "cosine" else 1.0 - p
        return self.final_ratio + (1.0 - self.final_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, max_steps: int,
                    final_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over :class:`LRFactor`; ``scheduler.lr_lambdas[0]`` is the factor object."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor(schedule, warmup_steps, max_steps, final_ratio))


def _factors(scheduler) -> list[LRFactor]:
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps it
    return list(inner.lr_lambdas)


def set_progress(scheduler, *, time_fraction: float | None = None, global_step: int | None = None) -> None:
    """Set the time progress and/or the run's step of a (possibly Accelerate-wrapped) scheduler
    built by :func:`build_scheduler`."""
    for factor in _factors(scheduler):
        if time_fraction is not None:
            factor.time_fraction = time_fraction
        if global_step is not None:
            factor.global_step = global_step


def start_step(scheduler, global_step: int) -> None:
    """Before the run's optimizer step ``global_step`` (0-based): set it as the schedule's step and
    write ``base_lr * factor(global_step)`` into the optimizer now. The LR a step uses then never
    depends on how often this scheduler has stepped: the discriminator's first update at
    disc_start gets the run's LR, not the factor of step 0 (0 during warm-up), and an update
    skipped as non-finite or by the fp16 scaler leaves no stale LR behind."""
    set_progress(scheduler, global_step=global_step)
    inner = getattr(scheduler, "scheduler", scheduler)
    for group, base_lr, factor in zip(inner.optimizer.param_groups, inner.base_lrs, inner.lr_lambdas):
        group["lr"] = base_lr * factor(global_step)


def configure(scheduler, schedule: str, warmup_steps: int, max_steps: int, final_ratio: float = 0.0) -> None:
    """Re-apply the config's schedule after ``load_state`` restored a checkpoint's (LambdaLR's
    state_dict carries the factor's settings as well as its progress)."""
    fresh = LRFactor(schedule, warmup_steps, max_steps, final_ratio)
    for factor in _factors(scheduler):
        factor.schedule, factor.warmup_steps = fresh.schedule, fresh.warmup_steps
        factor.max_steps, factor.final_ratio = fresh.max_steps, fresh.final_ratio


class TrainingClock:
    """Seconds of training, counted over resumes; time inside :meth:`pause` is left out.

    ``seconds_before``: what earlier runs of this training counted (the checkpoint's loop state).
    Checkpoint writes, periodic evaluations and sample grids run paused, so ``train.max_minutes``
    and the benchmark's time marks measure training, not bookkeeping.
    """

    def __init__(self, seconds_before: float = 0.0):
        self.before = float(seconds_before)
        self.start = time.perf_counter()
        self.paused_s = 0.0

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.start - self.paused_s

    @contextmanager
    def pause(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t0
