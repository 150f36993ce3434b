"""Publish an export on the Hugging Face Hub: the upload folder with its model card, and the upload.

:func:`prepare_hub_folder` is offline and tested; :func:`push_to_hub` is the only function here that
touches the network (``huggingface_hub.create_repo`` + ``upload_folder``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from kl_ae.eval.fp16 import FP16_AUDIT, format_fp16_audit

CARD_TAGS = ["kl-ae", "autoencoder", "vae"]
EXPORT_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
CARD_CLASSES = ("AutoencoderKL", "AutoencoderKLFlux2")  # the classes kl-ae trains and exports
LATENT_STATS = "latent_stats.json"


def prepare_hub_folder(export_dir: str | Path, out_dir: str | Path, repo_id: str, *,
                       license: str = "apache-2.0") -> Path:
    """Assemble in ``out_dir`` what ``kl-ae export --push-to-hub`` uploads to ``repo_id``.

    Copies every file of ``export_dir`` (config.json, diffusion_pytorch_model.safetensors,
    latent_stats.json) and writes README.md, a model card: YAML front matter (library_name
    diffusers, tags kl-ae/autoencoder/vae, ``license``), the latent layout, scaling/shift factors,
    the latent statistics and how to load the model. Returns ``out_dir``.

    Raises FileNotFoundError when ``export_dir`` is not a diffusers export, ValueError for a
    config.json of a class other than AutoencoderKL or AutoencoderKLFlux2 (FLUX.2), FileExistsError
    for a non-empty ``out_dir``.
    """
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    missing = [name for name in EXPORT_FILES if not (export_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{export_dir} is not a diffusers AutoencoderKL export: missing {', '.join(missing)}")
    config = json.loads((export_dir / "config.json").read_text())
    if config.get("_class_name") not in CARD_CLASSES:
        raise ValueError(f"{export_dir}/config.json holds a {config.get('_class_name')!r}, not one of {CARD_CLASSES}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; choose another directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    for file in sorted(export_dir.iterdir()):
        if file.is_file() and file.name != "README.md":  # the card below replaces any old one
            shutil.copy2(file, out_dir / file.name)
    stats_file = export_dir / LATENT_STATS
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else None
    audit_file = export_dir / FP16_AUDIT
    audit = json.loads(audit_file.read_text()) if audit_file.is_file() else None
    (out_dir / "README.md").write_text(model_card(config, stats, repo_id, license=license, fp16_audit=audit))
    return out_dir


def model_card(config: dict, stats: dict | None, repo_id: str, *, license: str = "apache-2.0",
               fp16_audit: dict | None = None) -> str:
    """README.md of a Hub repository holding one AutoencoderKL or AutoencoderKLFlux2 export
    (config: its config.json; stats: its latent_stats.json, or None when the export has none;
    fp16_audit: its fp16_audit.json, kl_ae.eval.fp16, or None when it was not audited)."""
    front = yaml.safe_dump({"library_name": "diffusers", "license": license, "tags": list(CARD_TAGS)},
                           sort_keys=False)
    channels = config["latent_channels"]
    f = 2 ** (len(config["block_out_channels"]) - 1)
    scale, shift = config.get("scaling_factor"), config.get("shift_factor")
    quant = config.get("use_quant_conv", True) and config.get("use_post_quant_conv", True)
    cls = config["_class_name"]
    per_channel = config.get("latents_mean") is not None and config.get("latents_std") is not None
    factor_rows = (_flux2_rows(config, channels) if cls == "AutoencoderKLFlux2" else
                   _per_channel_rows(config) if per_channel else [
        f"| scaling_factor | {scale!r} |",
        f"| shift_factor | {'none' if shift is None else repr(shift)} |", "",
        "A diffusion model is trained on `(z - shift_factor) * scaling_factor` and decodes "
        "`z / scaling_factor + shift_factor` (no shift when shift_factor is none). diffusers pipelines "
        "read the factors from config.json: the SD3 and FLUX.1 pipelines both, the SD 1.x, SDXL and "
        "DiT pipelines scaling_factor only.", ""])
    lines = [
        f"---\n{front}---", "",
        f"# {repo_id}", "",
        "A KL-regularized image autoencoder (the \"VAE\" first stage of latent diffusion) trained with "
        f"kl-ae and saved in the diffusers `{cls}` layout.", "",
        "## Latent layout", "",
        "| | |", "|---|---|",
        f"| latent | {channels} channels at 1/{f} of the image size: (B, 3, H, W) -> (B, {channels}, H/{f}, W/{f}) |",
        f"| compression | 3·f²/c = {3 * f * f / channels:g}x |",
        f"| encoder/decoder | block_out_channels {list(config['block_out_channels'])}, "
        f"layers_per_block {config.get('layers_per_block')}, "
        f"mid-block attention {'on' if config.get('mid_block_add_attention', True) else 'off'} |",
        f"| quant convs | {'yes (SD 1.x / SDXL / FLUX.2 layout)' if quant else 'no (SD3 / FLUX.1 layout)'} |",
        *factor_rows,
        *_stats_section(stats, flux2=cls == "AutoencoderKLFlux2", per_channel=per_channel),
        *_fp16_section(fp16_audit, config.get("force_upcast", True)),
        "## Use", "",
        "```python",
        "import torch",
        f"from diffusers import {cls}",
        "",
        f"vae = {cls}.from_pretrained({json.dumps(repo_id)})",
        f"images = torch.rand(1, 3, 256, 256) * 2 - 1  # RGB in [-1, 1], sides divisible by {f}",
        *(["with torch.no_grad():",
           "    z = vae.encode(images).latent_dist.mode()  # FLUX.2 pipelines encode the mode",
           "    reconstruction = vae.decode(z).sample"] if cls == "AutoencoderKLFlux2" else [
          f"mean = torch.tensor(vae.config.latents_mean).view(1, {channels}, 1, 1)",
          f"std = torch.tensor(vae.config.latents_std).view(1, {channels}, 1, 1)",
          "s = vae.config.scaling_factor",
          "with torch.no_grad():",
          "    z = (vae.encode(images).latent_dist.sample() - mean) * s / std",
          "    reconstruction = vae.decode(z * std / s + mean).sample"] if per_channel else [
          "shift = vae.config.shift_factor or 0.0",
          "with torch.no_grad():",
          "    z = (vae.encode(images).latent_dist.sample() - shift) * vae.config.scaling_factor",
          "    reconstruction = vae.decode(z / vae.config.scaling_factor + shift).sample"]),
        "```", "",
        f"In a pipeline with an {cls} `vae` component whose diffusion model was trained on these "
        "latents: `DiffusionPipeline.from_pretrained(base, vae=vae)`.", "",
    ]
    return "\n".join(lines)


def _per_channel_rows(config: dict) -> list[str]:
    """The SDXL-family convention (config.json's latents_mean / latents_std, e.g. with
    model.latents_mean_std): per-channel normalisation, which those pipelines apply with the
    scaling_factor (diffusers pipeline_stable_diffusion_xl: (z - mean_c) * scaling_factor / std_c)."""
    vec = lambda values: "[" + ", ".join(f"{v:.4g}" for v in values) + "]"  # noqa: E731
    return [f"| scaling_factor | {config.get('scaling_factor')!r} |",
            f"| latents_mean | {vec(config['latents_mean'])} |",
            f"| latents_std | {vec(config['latents_std'])} |", "",
            "A diffusion model is trained on `(z - latents_mean_c) * scaling_factor / latents_std_c`, per "
            "channel c, and decodes `z * latents_std_c / scaling_factor + latents_mean_c`. The SDXL-family "
            "pipelines read all three from config.json; pipelines that read scaling_factor alone (SD 1.x, "
            "SD3, FLUX.1) do not normalise these latents per channel.", ""]


def _flux2_rows(config: dict, channels: int) -> list[str]:
    """The latent convention of an AutoencoderKLFlux2 (FLUX.2): no factors in config.json; its
    pipelines (diffusers pipeline_flux2) patchify the posterior mode 2x2 and normalise it with the
    BatchNorm running statistics stored in the weights."""
    p = config.get("patch_size") or [2, 2]
    c = channels * p[0] * p[1]
    return [f"| diffusion latent | {c} channels: the latent patchified {p[0]}x{p[1]}, then "
            f"`(z_p - bn.running_mean) / sqrt(bn.running_var + {config.get('batch_norm_eps', 1e-4):g})` |", "",
            "FLUX.2 pipelines read no scaling_factor or shift_factor: they normalise the patchified "
            "posterior mode with the BatchNorm running statistics in the weights (where they come "
            "from: Latent statistics, below).", ""]


def _stats_section(stats: dict | None, flux2: bool = False, per_channel: bool = False) -> list[str]:
    if stats is None:
        return ["## Latent statistics", "", "The export has no latent_stats.json.", ""]
    lines = ["## Latent statistics", ""]
    if "source" in stats:  # a decoder-only fine-tune keeps its original VAE's factors
        lines += [f"Factors {stats['source']}.", ""]
    if flux2 and stats.get("flux2_bn_mean") is not None:
        lines += [
            f"BatchNorm running statistics measured on {stats.get('num_images')} images ({stats.get('images')}) "
            f"centre-cropped to {stats.get('resolution')} px, over the 2x2-patchified posterior mode "
            f"({len(stats['flux2_bn_mean'])} channels).", "",
        ]
    elif "std" in stats:
        lines += [
            f"Measured on {stats.get('num_images')} images ({stats.get('images')}) centre-cropped to "
            f"{stats.get('resolution')} px, over latent {stats.get('latent', 'samples')}s: "
            f"mean {stats['mean']:.6g}, std {stats['std']:.6g}; "
            + ("latents_mean / latents_std: the per-channel mean and std, with scaling_factor 1."
               if per_channel else "scaling_factor = 1/std"
               + (", shift_factor = mean." if stats.get("shift_factor") is not None else ".")), "",
        ]
    if stats.get("step") is not None:
        lines += [f"Weights: training step {stats['step']}{' (EMA)' if stats.get('ema') else ''}.", ""]
    lines += [f"All values: `{LATENT_STATS}`.", ""]
    return lines


def _fp16_section(audit: dict | None, force_upcast: bool) -> list[str]:
    lines = ["## float16", ""]
    if audit is None:
        return lines + ["Not audited: `kl-ae eval EXPORT IMAGES --fp16-audit` says whether it encodes and decodes "
                        "in float16 without overflow.", ""]
    lines += ["kl-ae's " + "; ".join(line.strip() for line in format_fp16_audit(audit)) + ".", ""]
    if audit["fp16_safe"]:
        lines += ["It can be loaded with `torch_dtype=torch.float16`"
                  + (" (config.json keeps `force_upcast: true`, so SDXL pipelines still decode it in float32)."
                     if force_upcast else "; config.json says `force_upcast: false`, so SDXL pipelines keep it "
                     "in float16."), ""]
    else:
        lines += ["**Do not run it in float16** (NaN or black images): use float32 or bfloat16.", ""]
    return lines


def push_to_hub(folder: str | Path, repo_id: str, token: str | None = None):
    """Upload a folder made by :func:`prepare_hub_folder` to the model repository ``repo_id``
    (created if missing). token: a Hub token, or None for the cached login / $HF_TOKEN.

    Returns huggingface_hub's CommitInfo. Raises FileNotFoundError when ``folder`` lacks the
    model card or the export files; network and permission errors come from huggingface_hub.
    """
    import huggingface_hub

    folder = Path(folder)
    missing = [name for name in (*EXPORT_FILES, "README.md") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a prepared Hub folder: missing {', '.join(missing)} "
                                "(make it with kl_ae.hub.prepare_hub_folder)")
    huggingface_hub.create_repo(repo_id, token=token, repo_type="model", exist_ok=True)
    return huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(folder), token=token,
                                         repo_type="model", commit_message="Upload kl-ae AutoencoderKL export")
