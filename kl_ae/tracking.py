"""Experiment trackers, all through Accelerate's tracker API (``train.tracker``).

Scalars go through ``accelerator.log`` (kl_ae.monitor.log_metrics); sample grids through
:func:`log_images`; the names and their validation are here too. Nothing else in
the package knows which tracker is on.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from accelerate import Accelerator

from kl_ae.parsing import ConfigError


# Trackers whose Accelerate ``log_images`` takes ``{key: (N, 3, H, W) float batch in [0, 1]}``.
# Aim and ClearML take one (H, W, 3) array instead; MLflow, DVCLive, Comet ML and Trackio log no
# images through Accelerate. Every grid is also written to samples/*.png, whatever the tracker.
IMAGE_TRACKERS = ("tensorboard", "wandb")


def init_kwargs(run_dir: Path) -> dict:
    """Per-tracker ``init_trackers`` arguments: keep local tracker files inside the run directory
    (WandB: RUN/wandb/ unless WANDB_DIR is set; DVCLive: RUN/dvclive/). TensorBoard and Aim already
    write to RUN/logs/ (Accelerate's ``logging_dir``)."""
    return {
        "wandb": {"name": run_dir.name, "dir": os.environ.get("WANDB_DIR", str(run_dir))},
        "dvclive": {"dir": str(run_dir / "dvclive")},
    }


def flat_config(cfg) -> dict:
    """The resolved config (a kl_ae.config.Config) as ``{"section.key": scalar}`` (lists as
    strings), the hyperparameters every tracker accepts."""
    flat = {}
    for section, values in dataclasses.asdict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def log_images(accelerator: Accelerator, images: dict[str, torch.Tensor], step: int) -> None:
    """The one image path: ``images`` ``{key: (3, H, W) float in [0, 1]}`` to every tracker that
    takes images (:data:`IMAGE_TRACKERS`). Call on the main process."""
    batches = {key: image[None] for key, image in images.items()}
    for tracker in accelerator.trackers:
        if tracker.name in IMAGE_TRACKERS:
            tracker.log_images(batches, step=step)


def tracker_names(spec: str) -> list[str]:
    """``train.tracker`` -> tracker names: 'tensorboard,wandb' -> ['tensorboard', 'wandb']; 'none' -> []."""
    return [] if spec.strip() == "none" else [name.strip() for name in spec.split(",")]


def check_trackers(spec: str) -> None:
    """Raise ConfigError unless every name in ``spec`` is a tracker Accelerate knows (part of a
    config's validation: it depends on no package of this machine, so a run's saved config
    reloads anywhere; :func:`check_tracker_packages` is the training run's check)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    known = sorted(LOGGER_TYPE_TO_CLASS)
    for name in tracker_names(spec):
        if name not in known:
            raise ConfigError(f"train.tracker={spec!r}: unknown tracker {name!r}; use 'none' or one or more "
                              f"comma-separated of {known}")


def check_tracker_packages(spec: str) -> None:
    """Raise ConfigError when a tracker's package is not installed (Accelerate itself would drop
    it silently); checked when a training run starts, not when a config loads (a run trained with
    wandb can be exported, evaluated or resumed with train.tracker=none where wandb is missing)."""
    import accelerate.utils

    for name in tracker_names(spec):
        available = getattr(accelerate.utils, f"is_{name}_available", None)  # None: a registered custom tracker
        if available is not None and not available():
            raise ConfigError(f"train.tracker={spec!r}: the {name} package is not installed; pip install {name}")


# ModelConfig field -> diffusers config.json key that must agree when fine-tuning a VAE
