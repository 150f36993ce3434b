"""A kl-ae export is a drop-in diffusers VAE: it generates inside a real pipeline (DiTPipeline).

The export comes from the real path (kl_ae.trainer.train -> export with a measured
scaling_factor); the pipeline is assembled offline from a tiny random DiTTransformer2DModel and a
DDIMScheduler. DiTPipeline (diffusers 0.42, pipeline_dit.py) decodes
``vae.decode(latents / vae.config.scaling_factor)``: no shift_factor, so the test uses a
4-channel export without one.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from kl_ae.config import load_config
from kl_ae.trainer import train
import helpers

RESOLUTION, FACTOR = 32, 2  # block_out_channels [8, 16]: one downsampling
LATENT = RESOLUTION // FACTOR


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    photos = root / "photos"
    helpers.write_noise_photos(photos, 4)
    train(load_config(None, [
        "model.block_out_channels=[8,16]", "model.layers_per_block=1", "model.norm_num_groups=8",
        f"data.train={photos}", "data.val=", f"data.resolution={RESOLUTION}", "data.num_workers=0",
        f"train.output_dir={root / 'run'}", "train.max_steps=2", "train.batch_size=2",
        "train.gradient_accumulation_steps=1", "train.mixed_precision=no", "train.tracker=none",
        "train.scaling_images=4", "loss.perceptual_weight=0", "loss.disc_channels=8", "loss.disc_num_layers=2",
        "optim.scale_lr=false", "optim.base_learning_rate=1e-3",
    ]))
    return root / "run" / "export"


def tiny_dit_pipeline(vae: AutoencoderKL) -> DiTPipeline:
    torch.manual_seed(0)
    channels = vae.config.latent_channels
    # out_channels explicit: DiTPipeline's learned-sigma check reads it (None fails there)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=channels,
                                        out_channels=channels, num_layers=1, sample_size=LATENT, patch_size=2,
                                        num_embeds_ada_norm=10)
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())


def test_export_generates_in_dit_pipeline(export):
    stats = json.loads((export / "latent_stats.json").read_text())
    vae = AutoencoderKL.from_pretrained(export)
    scale = vae.config.scaling_factor
    assert scale == pytest.approx(1 / stats["std"]) and scale != 0.18215  # measured, not diffusers' default
    pipe = tiny_dit_pipeline(vae)
    pipe.set_progress_bar_config(disable=True)

    # record the final latents (last scheduler step) and what the pipeline hands to the VAE
    final, decoded = [], []
    step, decode = pipe.scheduler.step, vae.decode

    def recording_step(*args, **kwargs):
        result = step(*args, **kwargs)
        final.append(result.prev_sample)
        return result

    pipe.scheduler.step = recording_step
    vae.decode = lambda z, *args, **kwargs: decoded.append(z) or decode(z, *args, **kwargs)

    out = pipe(class_labels=[3], guidance_scale=1.0, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0))
    image = out.images[0]
    assert image.shape == (LATENT * FACTOR, LATENT * FACTOR, 3)
    assert np.isfinite(image).all() and 0 <= image.min() and image.max() <= 1
    assert len(final) == 2 and len(decoded) == 1
    assert decoded[0].shape == (1, vae.config.latent_channels, LATENT, LATENT)
    torch.testing.assert_close(decoded[0], final[-1] / scale)  # the export's scaling_factor is used


def test_export_replaces_the_vae_of_a_saved_pipeline(export, tmp_path):
    """The two README recipes: copy the export into a pipeline's vae/, or pass vae= at load time."""
    exported = AutoencoderKL.from_pretrained(export)
    torch.manual_seed(1)
    other = AutoencoderKL.from_config({**exported.config, "scaling_factor": 0.18215})
    tiny_dit_pipeline(other).save_pretrained(tmp_path / "pipe")
    reference = exported.state_dict()

    by_argument = DiTPipeline.from_pretrained(tmp_path / "pipe", vae=exported)
    assert by_argument.vae is exported

    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy(export / name, tmp_path / "pipe" / "vae" / name)
    by_folder = DiTPipeline.from_pretrained(tmp_path / "pipe")
    by_folder.set_progress_bar_config(disable=True)
    assert by_folder.vae.config.scaling_factor == exported.config.scaling_factor != 0.18215
    assert all(torch.equal(v, reference[k]) for k, v in by_folder.vae.state_dict().items())
    image = by_folder(class_labels=[0], guidance_scale=1.0, num_inference_steps=2, output_type="pil").images[0]
    assert image.size == (RESOLUTION, RESOLUTION)
