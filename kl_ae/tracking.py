"""Experiment trackers, all through Accelerate's tracker API (``train.tracker``).

Scalars go through ``accelerator.log`` (kl_ae.monitor.log_metrics); sample grids through
:func:`log_images`; the names and their validation live in :mod:`kl_ae.config`. Nothing else in
the package knows which tracker is on.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator

from kl_ae.config import Config, config_to_dict

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


def flat_config(cfg: Config) -> dict:
    """The resolved config as ``{"section.key": scalar}`` (lists as strings), the hyperparameters
    every tracker accepts."""
    flat = {}
    for section, values in config_to_dict(cfg).items():
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
