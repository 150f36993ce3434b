"""Which Accelerate setups the loop supports, and what FSDP2 needs that DDP does not.

Supported: one process, DDP (``MULTI_GPU``, ``MULTI_CPU``, other ``MULTI_*`` device types) and
FSDP2 (``fsdp_version: 2``) with ``fsdp_auto_wrap_policy: NO_WRAP``. Under FSDP2 each of the two
models is one ``fully_shard`` unit: gradients and Adam states are sharded (ZeRO-2-like), the
parameters are gathered for the whole forward and backward. That is what the adaptive GAN weight
needs: it differentiates the loss w.r.t. ``decoder.conv_out.weight`` with ``torch.autograd.grad``,
which only works on the gathered parameter the forward used. With a wrap policy that gives that
layer (or the decoder) its own unit, FSDP2 swaps the sharded DTensor back in after the forward and
autograd raises "The differentiated Tensor at index 0 appears to not have been used in the graph".
"""

from __future__ import annotations

import logging
import os

from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, parse_flag_from_env
from diffusers import AutoencoderKL
from diffusers.training_utils import EMAModel
from torch import nn
from torch.distributed.fsdp import FSDPModule

from kl_ae.checkpoint import full_tensor
from kl_ae.config import Config
from kl_ae.parsing import ConfigError

logger = logging.getLogger(__name__)

SUPPORTED = ("one process, DDP (configs/accelerate/multi-gpu.yaml, multi-node.yaml) and FSDP2 with "
             "fsdp_auto_wrap_policy: NO_WRAP (configs/accelerate/fsdp.yaml)")


def process_state() -> PartialState:
    """Accelerate's process state, built the way ``Accelerator()`` builds it, so it can be asked
    (device, rank) before the Accelerator exists and the Accelerator then reuses it. The CPU flag
    matters: ``accelerate launch --cpu``/``ACCELERATE_USE_CPU=1`` runs (multi-process CPU, gloo)
    are only recognised when it is passed; a plain ``PartialState()`` built first would leave
    every process believing it runs alone."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def check_distributed(accelerator: Accelerator, cfg: Config) -> None:
    """Raise ConfigError, before any model is built, for a setup the loop does not support:
    DeepSpeed (one engine per model needs Accelerate's multi-plugin mode; neither written nor
    tested here), FSDP1 (untestable on CPU here: Accelerate's FSDP1 path needs a GPU-type device),
    Megatron-LM, and FSDP2 with ``loss.learn_logvar`` (fully_shard rejects 0-dim parameters).
    Warns when an FSDP config was given but Accelerate runs DDP (it does so on CPU)."""
    kind = accelerator.distributed_type
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and kind != DistributedType.FSDP:
        logger.warning("an FSDP config was given but Accelerate runs %s (it ignores FSDP on CPU)", kind.value)
    if kind == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ConfigError(f"FSDP1 (fsdp_version: 1) is not supported; supported: {SUPPORTED}")
    if kind in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise ConfigError(f"distributed type {kind.value} is not supported; supported: {SUPPORTED}")
    if accelerator.is_fsdp2 and cfg.loss.learn_logvar:
        raise ConfigError("loss.learn_logvar=true is not supported under FSDP2 (fully_shard rejects the 0-dim "
                          "logvar parameter); use DDP or loss.learn_logvar=false")


def check_fsdp_units(model: nn.Module) -> None:
    """After ``accelerator.prepare``: under FSDP2 the model must be a single ``fully_shard`` unit
    (see the module docstring). Raises ConfigError naming the wrapped submodules."""
    if not isinstance(model, FSDPModule):
        return
    inner = [name for name, m in model.named_modules() if name and isinstance(m, FSDPModule)]
    if inner:
        raise ConfigError(
            f"FSDP2 wrapped submodules of {type(model).__name__} separately ({', '.join(inner[:5])}...): the "
            "adaptive GAN weight needs the gathered decoder.conv_out.weight after the forward; set "
            "fsdp_auto_wrap_policy: NO_WRAP (configs/accelerate/fsdp.yaml)")


def gathered(module: nn.Module) -> nn.Module:
    """``module`` ready to have one of its submodules called directly (below the root that
    Accelerate wrapped): under FSDP2 its parameter shards are gathered first (they are
    resharded after its next backward); a no-op otherwise. Returns ``module``."""
    if isinstance(module, FSDPModule):
        module.unshard()
    return module


def unsharded_autoencoder(vae: AutoencoderKL, ema: EMAModel | None,
                          is_main: bool) -> tuple[AutoencoderKL | None, EMAModel | None]:
    """Plain (unsharded) copies of an FSDP2-sharded ``vae`` and of its EMA, for export and
    evaluation on the main process. A collective: call on every rank. Returns (None, None) on the
    other ranks; the copies live on the device the shards were on."""
    state = {k: full_tensor(v).detach() for k, v in vae.state_dict().items()}
    shadows = [full_tensor(s) for s in ema.shadow_params] if ema is not None else None
    if not is_main:
        return None, None
    from kl_ae.model import autoencoder_class, is_flux2  # here: kl_ae.model imports the training stack

    # not type(vae), FSDP2's wrapper class; an AutoencoderKLFlux2's BatchNorm would not load into
    # an AutoencoderKL
    plain = autoencoder_class("AutoencoderKLFlux2" if is_flux2(vae) else "AutoencoderKL").from_config(vae.config)
    plain.load_state_dict(state)
    plain.to(next(iter(state.values())).device).train(vae.training)
    plain_ema = None
    if ema is not None:
        plain_ema = EMAModel(plain.parameters(), decay=ema.decay, foreach=True)
        for shadow, value in zip(plain_ema.shadow_params, shadows):
            shadow.data.copy_(value)
        plain_ema.optimization_step = ema.optimization_step
    return plain, plain_ema
