"""Single-file VAE checkpoints in the LDM/SGM key layout as ``model.init_from``.

The files the original code bases write (``first_stage_model.*`` inside an SD ``.ckpt`` or
``.safetensors``, an LDM autoencoder training ``.ckpt``, a standalone ``vae-ft-mse-*.safetensors``)
name tensors ``encoder.down.0.block.0.norm1.weight``, ``encoder.mid.attn_1.q.weight``, ...
Their keys are renamed by diffusers' own converter, ``convert_ldm_vae_checkpoint`` from
``diffusers.loaders.single_file_utils`` (what ``AutoencoderKL.from_single_file`` runs), into a model
built from a local config. ``from_single_file`` itself is not called: offline it needs a config
*directory*, and a file missing tensors ends in a meta-tensor error (or, with
``low_cpu_mem_usage=False``, silently random weights), so the keys and shapes are checked here
first and the weights go in with a strict ``load_state_dict``.
"""

from __future__ import annotations

import logging
import pickle
import re
import zipfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import LDM_VAE_KEYS, convert_ldm_vae_checkpoint
from safetensors import safe_open

from kl_ae.parsing import ConfigError

logger = logging.getLogger(__name__)

_VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_DIFFUSERS_MARKERS = (".down_blocks.", ".up_blocks.", ".mid_block.")


def _vae_keys(keys: list[str]) -> tuple[str, list[str]]:
    """The prefix ('first_stage_model.', 'vae.' or '') and the keys of the VAE among ``keys``;
    training checkpoints also hold ``loss.*`` (LPIPS, discriminator), full SD files the UNet and
    text encoder: those are left out."""
    prefix = next((p for p in LDM_VAE_KEYS if any(k.startswith(p + _VAE_ROOTS[0]) for k in keys)), "")
    return prefix, [k for k in keys if k.startswith(tuple(prefix + r for r in _VAE_ROOTS))]


def _torch_load(path: Path) -> dict:
    try:  # weights_only: tensors and plain containers only, no code from the file is run
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n\n|$)", str(err), re.S)
        raise ConfigError(
            f"model.init_from={str(path)!r}: torch.load(weights_only=True) refused it "
            f"({reason.group(1).strip() if reason else 'not a tensor-only pickle'}), and kl-ae never unpickles "
            "arbitrary objects; if you trust the file, re-save its state dict as .safetensors") from err
    except Exception as err:
        raise ConfigError(f"model.init_from={str(path)!r} cannot be read as a torch checkpoint: {err}") from err


def read_ldm_vae_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], int]:
    """The VAE tensors of a single-file checkpoint, prefix removed, and the count of other tensors.

    path: ``.safetensors`` (only the VAE tensors are read), or ``.ckpt``/``.pt``/``.pth`` read with
    ``torch.load(weights_only=True)`` (memory-mapped when zip-format), unnested from ``"state_dict"``.
    Raises ConfigError for an unreadable or unsafe file and for keys that are not an LDM/SGM VAE
    (a diffusers-layout file, or no ``encoder.``/``decoder.`` tensors).
    """
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                prefix, vae_keys = _vae_keys(keys)
                tensors = {k: f.get_tensor(k) for k in vae_keys}
        except Exception as err:
            raise ConfigError(f"model.init_from={str(path)!r} cannot be read as safetensors: {err}") from err
    else:
        state = _torch_load(path)
        while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # Lightning .ckpt
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ConfigError(f"model.init_from={str(path)!r} holds a {type(state).__name__}, not a state dict")
        keys = [k for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)]
        prefix, vae_keys = _vae_keys(keys)
        tensors = {k: state[k] for k in vae_keys}
    tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    if any(m in k for k in tensors for m in _DIFFUSERS_MARKERS):
        raise ConfigError(
            f"model.init_from={str(path)!r} is in the diffusers layout (keys like encoder.down_blocks.0...), not the "
            "LDM one; save it as diffusion_pytorch_model.safetensors next to its config.json and set "
            "model.init_from to that directory")
    if not any(k.startswith("encoder.down.0.") for k in tensors) or "decoder.conv_in.weight" not in tensors:
        raise ConfigError(
            f"model.init_from={str(path)!r} holds no LDM/SGM VAE: expected keys like "
            "encoder.down.0.block.0.norm1.weight and decoder.conv_in.weight (optionally under first_stage_model. "
            f"or vae.), found e.g. {sorted(keys)[:3]}")
    return tensors, len(keys) - len(tensors)


def load_ldm_vae_weights(vae: AutoencoderKL, path: str | Path) -> AutoencoderKL:
    """Load an LDM/SGM-layout single file into ``vae`` (its architecture: model.init_config or the
    model section), converted with diffusers' ``convert_ldm_vae_checkpoint``; returns ``vae``.

    Raises ConfigError before any weight is copied when the file's latent channels differ from
    ``vae.config.latent_channels``, when a tensor is missing or left over (another number of levels,
    layers, quant convs or attention), or when a shape differs (naming the first key, both shapes).
    """
    ldm, n_other = read_ldm_vae_state_dict(path)
    where = f"model.init_from={str(path)!r}"
    latent = ldm["decoder.conv_in.weight"].shape[1]  # (C, latent_channels, 3, 3)
    if latent != vae.config.latent_channels:
        raise ConfigError(f"{where} has {latent} latent channels (decoder.conv_in.weight "
                          f"{tuple(ldm['decoder.conv_in.weight'].shape)}) but model.latent_channels="
                          f"{vae.config.latent_channels}; set model.latent_channels={latent} and that VAE's "
                          "architecture")
    converted = convert_ldm_vae_checkpoint(ldm, vae.config)
    # The converter renames (and reshapes 1x1-conv attention weights as views), so a tensor's
    # storage address tells which file key it came from, for messages in the file's own names.
    ldm_name = {t.data_ptr(): k for k, t in ldm.items()}
    expected = vae.state_dict()
    for key, tensor in expected.items():
        if key in converted and converted[key].shape != tensor.shape:
            name = ldm_name.get(converted[key].data_ptr(), key)
            name += f" (diffusers key {key})" if name != key else ""
            raise ConfigError(
                f"{where}: {name} has shape {tuple(converted[key].shape)} but the model config needs "
                f"{tuple(tensor.shape)}; set the model section (or model.init_config) to that VAE's architecture")
    missing = [k for k in expected if k not in converted]
    extra = sorted(set(ldm) - {ldm_name.get(t.data_ptr()) for k, t in converted.items() if k in expected})
    if missing or extra:
        raise ConfigError(
            f"{where} does not have the architecture of the model config: {len(missing)} tensors missing "
            f"(e.g. {missing[:3]}), {len(extra)} left over (e.g. {extra[:3]}); set the model section (or "
            "model.init_config) to that VAE's block_out_channels, layers_per_block, quant convs and attention")
    vae.load_state_dict(converted, strict=True)  # copies into the fp32 parameters (fp16 files are upcast)
    logger.info("initialised from single file %s (LDM layout, %d tensors converted by diffusers' "
                "convert_ldm_vae_checkpoint; %d non-VAE tensors ignored)", path, len(converted), n_other)
    return vae
