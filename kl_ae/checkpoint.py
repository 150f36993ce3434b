"""Run-directory checkpoints: ``checkpoints/step-NNNNNNN/`` plus a ``checkpoints/latest`` pointer.

A checkpoint holds Accelerate's state (models as safetensors, optimizers, schedulers, RNG states),
the EMA weights as ``ema.safetensors``, the resolved config it was trained with as ``config.yaml``
(export, eval and resume read it, not the run directory's, which a later resume may rewrite)
and the loop state as ``loop_state.json``. It is written
to a temporary directory and renamed into place, and ``latest`` is replaced only afterwards, so
``latest`` always names a complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

logger = logging.getLogger(__name__)

LATEST = "latest"
LOOP_STATE = "loop_state.json"
EMA_WEIGHTS = "ema.safetensors"
CONFIG = "config.yaml"  # the resolved config, in each checkpoint and at the top of the run directory
AE_WEIGHTS = "model.safetensors"  # Accelerate's name for the first prepared model (the AE wrapper)
AE_FSDP_SHARDS = "pytorch_model_fsdp_0"  # the same under FSDP with fsdp_state_dict_type SHARDED_STATE_DICT


class CheckpointError(ValueError):
    """A checkpoint (or export) file that exists but cannot be used: truncated, damaged, or
    holding something else. The message names the file and what to do."""


def _what_to_do(checkpoint: Path) -> str:
    """Advice for a damaged checkpoint: the other complete checkpoints of its run, if any."""
    checkpoint = Path(checkpoint)
    others = sorted(p for p in checkpoint.parent.glob("step-*") if p != checkpoint and (p / LOOP_STATE).is_file())
    if not others:
        return "copy the checkpoint again from where it came from"
    return (f"copy it again, or use another checkpoint of the run (--resume DIR, kl-ae export DIR): "
            f"{', '.join(str(p) for p in others[-3:])}")


def load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with a :class:`CheckpointError` naming the file when it is
    truncated or not safetensors."""
    try:
        return load_file(str(file))
    except Exception as err:  # noqa: BLE001 (safetensors raises its own SafetensorError, OSError, ...)
        raise CheckpointError(f"{file} cannot be read ({type(err).__name__}: {err}): it is truncated or not a "
                              f"safetensors file; {_what_to_do(Path(file).parent)}") from None


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def write_latest(checkpoints_dir: Path, name: str) -> None:
    tmp = checkpoints_dir / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, checkpoints_dir / LATEST)


def resolve_checkpoint(path: str | Path, run_dir: str | Path | None = None) -> Path:
    """Find a checkpoint directory.

    ``path`` may be 'latest' (in ``run_dir``), a run directory (its latest checkpoint) or a
    checkpoint directory. Raises FileNotFoundError with what was looked for.
    """
    if str(path) == LATEST:
        if run_dir is None:
            raise FileNotFoundError("'latest' needs a run directory")
        path = Path(run_dir)
    path = Path(path)
    if (path / LOOP_STATE).is_file():
        return path
    pointer = path / "checkpoints" / LATEST
    if pointer.is_file():
        ckpt = path / "checkpoints" / pointer.read_text().strip()
        if (ckpt / LOOP_STATE).is_file():
            return ckpt
        raise FileNotFoundError(f"{pointer} names {ckpt}, which is not a complete checkpoint")
    raise FileNotFoundError(
        f"no checkpoint at {path}: expected a checkpoint directory (with {LOOP_STATE}) "
        f"or a run directory with checkpoints/{LATEST}"
    )


def run_dir_of(checkpoint: Path) -> Path:
    """``RUN/checkpoints/step-N`` -> ``RUN``."""
    return Path(checkpoint).resolve().parent.parent


def config_file_of(checkpoint: Path) -> Path:
    """The config a checkpoint was trained with: its own config.yaml, or for a checkpoint written
    before checkpoints carried one, its run directory's. Raises FileNotFoundError when neither exists."""
    for file in (Path(checkpoint) / CONFIG, run_dir_of(checkpoint) / CONFIG):
        if file.is_file():
            return file
    raise FileNotFoundError(f"checkpoint {checkpoint} has no {CONFIG}, nor has its run directory "
                            f"{run_dir_of(checkpoint)}: it is not a kl-ae checkpoint")


def save_ema(ema, named_parameters: list[tuple[str, torch.Tensor]], path: Path, write: bool = True) -> None:
    """Write EMA shadow weights keyed by the autoencoder's parameter names (safetensors, no pickle).

    Under FSDP2 the shadows are sharded like the parameters: call on every rank (each gathers the
    whole tensors) with ``write`` true on one."""
    names = [n for n, _ in named_parameters]
    tensors = {n: full_tensor(p).detach().cpu().contiguous() for n, p in zip(names, ema.shadow_params)}
    if write:
        save_file(tensors, str(path), metadata={"optimization_step": str(ema.optimization_step)})


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank for an FSDP2 DTensor (a collective: every rank
    must call it, in the same order), ``t`` itself otherwise."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def load_ema_into(ema, named_parameters: list[tuple[str, torch.Tensor]], path: Path) -> None:
    """Restore EMA shadow weights written by :func:`save_ema`. Raises KeyError on a missing name."""
    from safetensors import safe_open

    tensors = load_safetensors(path)
    missing = [name for name, _ in named_parameters if name not in tensors]
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} of the autoencoder's weights (e.g. {missing[0]}): it "
                              f"belongs to another model; {_what_to_do(Path(path).parent)}")
    for (name, _), shadow in zip(named_parameters, ema.shadow_params):
        value = tensors[name].to(shadow.device)
        if isinstance(shadow, DTensor):  # FSDP2: keep this rank's shard (no communication)
            value = distribute_tensor(value, shadow.device_mesh, shadow.placements, src_data_rank=None)
        shadow.data.copy_(value)
    with safe_open(str(path), framework="pt") as f:
        ema.optimization_step = int(f.metadata()["optimization_step"])


def load_autoencoder_state(checkpoint: Path, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The ``AutoencoderKL`` state dict stored in a checkpoint (EMA weights when present and asked for)."""
    ema_file = checkpoint / EMA_WEIGHTS
    if use_ema and ema_file.is_file():
        state = load_safetensors(ema_file)
        # EMA covers the trainable parameters only; buffers (none in AutoencoderKL today) come from the raw model.
        raw = _raw_autoencoder_state(checkpoint)
        foreign = [k for k in state if k not in raw or state[k].shape != raw[k].shape]
        if foreign:
            raise CheckpointError(f"{ema_file} holds weights of another model ({len(foreign)} names or shapes not "
                                  f"in {AE_WEIGHTS}, e.g. {foreign[0]}); {_what_to_do(checkpoint)}")
        return {**raw, **state}
    return _raw_autoencoder_state(checkpoint)


def _raw_autoencoder_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    file = checkpoint / AE_WEIGHTS
    if (checkpoint / AE_FSDP_SHARDS).is_dir() and not file.is_file():
        state = _load_sharded(checkpoint / AE_FSDP_SHARDS)
    elif file.is_file():
        state = load_safetensors(file)
    else:
        raise FileNotFoundError(f"checkpoint {checkpoint} has no {AE_WEIGHTS} (nor FSDP's {AE_FSDP_SHARDS}/)")
    return {k[len("vae."):]: v for k, v in state.items() if k.startswith("vae.")}


def _load_sharded(directory: Path) -> dict[str, torch.Tensor]:
    """Whole tensors from Accelerate's FSDP ``SHARDED_STATE_DICT`` directory (torch.distributed.checkpoint),
    read in this one process."""
    import warnings

    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():  # "torch.distributed is unavailable ... assuming ... a single process"
        warnings.simplefilter("ignore", UserWarning)
        return _load_state_dict_from_keys(checkpoint_id=str(directory))["model"]


def finalize_checkpoint(tmp_dir: Path, final_dir: Path, loop_state: dict) -> None:
    """Write loop_state.json last, rename the temporary directory into place, update ``latest``."""
    (tmp_dir / LOOP_STATE).write_text(json.dumps(loop_state, indent=2))
    old = None
    if final_dir.exists():  # a checkpoint of the same step from an earlier attempt: renamed aside
        old = final_dir.with_name(f".old-{final_dir.name}")  # first (two renames, not a slow delete,
        shutil.rmtree(old, ignore_errors=True)                # while `latest` may name it)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    write_latest(final_dir.parent, final_dir.name)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def set_aside_later_checkpoints(checkpoints_dir: Path, resumed: Path) -> Path | None:
    """Resuming from an earlier checkpoint than the run's newest starts another timeline: move the
    later ``step-*`` directories into ``abandoned-<time>/`` beside them (kept, not deleted; left in
    place they would count towards train.keep_last, crowd out the new timeline's checkpoints and
    be replaced one by one) and point ``latest`` at the checkpoint resumed from. Returns the
    folder they went to, or None when no checkpoint was later."""
    step = read_loop_state(resumed)["step"]
    later = sorted(p for p in checkpoints_dir.glob("step-*")
                   if p.is_dir() and p.name != resumed.name and p.name[5:].isdigit() and int(p.name[5:]) > step)
    if not later:
        return None
    stamp = time.strftime("abandoned-%Y%m%d-%H%M%S")
    aside, n = checkpoints_dir / stamp, 1
    while aside.exists():  # a second set-aside within the same second
        n += 1
        aside = checkpoints_dir / f"{stamp}-{n}"
    aside.mkdir()
    for path in later:
        os.replace(path, aside / path.name)
    write_latest(checkpoints_dir, resumed.name)
    return aside


def read_loop_state(checkpoint: Path) -> dict:
    """The checkpoint's loop_state.json as a dict. Raises CheckpointError naming the file when it
    is not a JSON object with an integer ``step``."""
    file = Path(checkpoint) / LOOP_STATE
    try:
        state = json.loads(file.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("not an object with an integer 'step'")
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{file} is damaged ({err}); {_what_to_do(Path(checkpoint))}") from None
    return state


def prune_checkpoints(checkpoints_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the one ``latest``
    names) and leftover temporary directories of interrupted saves. Returns what was deleted."""
    if keep_last <= 0:
        return []
    latest = (checkpoints_dir / LATEST).read_text().strip() if (checkpoints_dir / LATEST).is_file() else None
    complete = sorted(p for p in checkpoints_dir.glob("step-*") if (p / LOOP_STATE).is_file())
    doomed = [p for p in complete[:-keep_last] if p.name != latest]
    doomed += [p for p in checkpoints_dir.glob(".tmp-step-*") if p.is_dir()]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


# --- the training loop's state and the save / restore of a whole checkpoint -----------------


@dataclass
class LoopState:
    """Where a run stands after a step, saved whole as a checkpoint's loop_state.json.

    step: optimizer steps done. phase: 0, or 1 once the resolution schedule's final phase
    (data.final_resolution) has begun. epoch, batches_in_epoch: the data position within that
    phase's loader (batches drawn, empty ones included), for an exact resume. train_seconds: the
    training loop's time so far (train.max_minutes counts it over resumes). images_seen: training
    images over all processes (bench/quality.py's x axis).
    """

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    phase: int = 0
    train_seconds: float = 0.0
    images_seen: int = 0

    @classmethod
    def read(cls, checkpoint: Path, images_per_step: int = 0) -> "LoopState":
        """The state in ``checkpoint``; a checkpoint written before a field existed gets its
        default (images_seen: step * images_per_step). Unknown keys are ignored."""
        raw = read_loop_state(checkpoint)
        state = cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})
        if "images_seen" not in raw:
            state.images_seen = state.step * images_per_step
        return state

    def data_position(self) -> dict:
        """The training data's position, as kl_ae.data.loaders.TrainBatches.load_state_dict takes it."""
        return {"phase": self.phase, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def set_data_position(self, position: dict) -> None:
        """Store TrainBatches.state_dict() (the data position after this step)."""
        self.phase, self.epoch, self.batches_in_epoch = position["phase"], position["epoch"], position["batches_in_epoch"]

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "train_seconds": round(self.train_seconds, 3)}


def save_checkpoint(accelerator, run_dir: Path, state: LoopState, ema, vae, config_yaml: str,
                    keep_last: int = 0) -> None:
    """Write checkpoints/step-N atomically (temporary directory, rename, then ``latest``): the
    Accelerate state (models, optimizers, schedulers, RNG), the EMA weights, ``config_yaml`` (the
    resolved config as YAML text) and ``state``.
    A collective: every rank calls it (under FSDP2 each contributes its shards)."""
    ckpts = Path(run_dir) / "checkpoints"
    name = checkpoint_name(state.step)
    tmp = ckpts / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if ema is not None:
        save_ema(ema, list(vae.named_parameters()), tmp / EMA_WEIGHTS, write=accelerator.is_main_process)
    # Every rank has written its files (Accelerate's save_state ends without a barrier: rank 1
    # could still be writing random_states_1.pkl when the main process renamed the directory,
    # bench/stress_ddp.py launch 52) before the checkpoint is completed and named latest.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / CONFIG).write_text(config_yaml)
        finalize_checkpoint(tmp, ckpts / name, state.to_json())
        logger.info("saved checkpoint %s", ckpts / name)
        for path in prune_checkpoints(ckpts, keep_last):
            logger.info("deleted old checkpoint %s (train.keep_last=%d)", path.name, keep_last)
    accelerator.wait_for_everyone()


def restore_checkpoint(accelerator, checkpoint: Path, ema, vae, images_per_step: int) -> LoopState:
    """Load what :func:`save_checkpoint` wrote into the prepared models, optimizers, schedulers
    and every rank's RNG states (Accelerate), and into ``ema``. Returns the loop state."""
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as err:  # noqa: BLE001 (torch.load, safetensors and Accelerate each raise their own)
        raise CheckpointError(f"checkpoint {checkpoint} cannot be loaded ({type(err).__name__}: {err}); a file in "
                              f"it is damaged; {_what_to_do(checkpoint)}") from err
    if ema is not None and (checkpoint / EMA_WEIGHTS).is_file():
        load_ema_into(ema, list(vae.named_parameters()), checkpoint / EMA_WEIGHTS)
    return LoopState.read(checkpoint, images_per_step)
