"""Published VAE layouts as named presets (``model.preset``), with their published latent factors.

Each preset holds the ``ModelConfig`` values of a released diffusers ``AutoencoderKL`` (its
vae/config.json) that differ from kl-ae's defaults (which are the SD 1.x VAE), plus the
``scaling_factor`` / ``shift_factor`` its diffusion model was trained with. A config names one as
``model: {preset: sdxl}``; the preset's values replace the model defaults and the YAML file's and
``--set`` values apply on top of them. Sources: the vae/config.json of each repository below (see
../shared/REFERENCE.md, "diffusers AutoencoderKL layouts"); tests/test_presets.py builds each on
the meta device and checks it against the published layout and parameter count.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    source: str  # the Hub repository whose vae/config.json this is
    scaling_factor: float  # published: the diffusion model trains on z * scaling_factor ...
    shift_factor: float | None = None  # ... or (z - shift_factor) * scaling_factor (SD3, FLUX.1)
    model: dict = field(default_factory=dict)  # ModelConfig values that differ from the defaults


_NO_QUANT_CONVS_16 = {"latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
                      "use_shift_factor": True}

PRESETS: dict[str, Preset] = {
    # the defaults are this layout: LDM kl-f8, 4 latent channels, quant convs, 83.65 M parameters
    "sd1": Preset("stable-diffusion-v1-5/stable-diffusion-v1-5", 0.18215),
    # the SD 1.x architecture retrained; its decoder overflows fp16 (train in bf16)
    "sdxl": Preset("stabilityai/stable-diffusion-xl-base-1.0", 0.13025),
    # 16 latent channels, no quant convs, a shift factor: 83.82 M parameters
    "sd3": Preset("stabilityai/stable-diffusion-3-medium-diffusers", 1.5305, 0.0609, _NO_QUANT_CONVS_16),
    "flux": Preset("black-forest-labs/FLUX.1-dev", 0.3611, 0.1159, _NO_QUANT_CONVS_16),
    # FLUX.2: the SD layout with 32 latent channels and quant convs, as diffusers' AutoencoderKLFlux2,
    # whose BatchNorm statistics (not a scaling factor) normalise the 2x2-patchified latent
    "flux2": Preset("black-forest-labs/FLUX.2-dev", 1.0, None,
                    {"architecture": "AutoencoderKLFlux2", "latent_channels": 32}),
}
