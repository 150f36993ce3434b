"""Representation alignment: VA-VAE's VF loss between the latent and a frozen vision model.

Source (formulas, not code): Yao et al. 2025, "Reconstruction vs. Generation: Taming Optimization
Dilemma in Latent Diffusion Models", arXiv 2501.01423 (hustvl/LightningDiT ``vavae/``). A 1x1
projection W (trainable, part of the autoencoder wrapper) maps the latent z (B, c, h, w) to the
teacher's width D; the teacher's patch features f are resized to h x w. With z'_i = (W z)_i at
position i:

    L_mcos  = mean_i ReLU(1 - m1 - cos(z'_i, f_i))
    L_mdms  = mean_{i,j} ReLU(|cos(z'_i, z'_j) - cos(f_i, f_j)| - m2)     (per image, then batch mean)
    L_vf    = L_mcos + L_mdms, weighted by loss.vf_weight and, with loss.vf_adaptive,
              ||grad nll|| / ||grad L_vf|| at the encoder's last layer (as the GAN weight).

The teacher is a timm model (``loss.vf_teacher_arch``, DINOv2 by default) built without weights
and loaded from the local file ``loss.vf_teacher``; nothing is downloaded. timm rather than
transformers: its DINOv2 ViTs take any image size (dynamic_img_size), expose ``forward_features``
and ``num_prefix_tokens`` the same way for every ViT, and load a plain state dict; it is an
optional dependency (``pip install timm``), needed only when the VF term is on.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kl_ae.parsing import ConfigError

RANDOM = "random"
_ADAPTIVE_EPS, _ADAPTIVE_MAX = 1e-4, 1e4  # as the GAN's adaptive weight (kl_ae.losses)


class Teacher(nn.Module):
    """A frozen timm ViT in eval mode: ``forward(x)`` takes (B, 3, H, W) in [-1, 1] and returns
    its patch features (B, D, R/p, R/p) at ``resolution`` R (patch size p), float32, no graph."""

    def __init__(self, model: nn.Module, resolution: int):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.resolution = resolution
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.patch = int(model.patch_embed.patch_size[0])
        self.dim = int(model.num_features)

    def train(self, mode: bool = True) -> "Teacher":  # always in eval mode (frozen)
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.resolution
        x = F.interpolate(x.float(), size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std
        tokens = self.model.forward_features(x)[:, self.model.num_prefix_tokens:]  # (B, N, D)
        n = r // self.patch
        return tokens.float().transpose(1, 2).reshape(x.shape[0], -1, n, n)


def build_teacher(arch: str, weights: str, resolution: int) -> tuple[Teacher, str]:
    """The VF teacher and the name its term is logged under: 'vf', or 'vf_random_teacher' for
    ``weights='random'`` (an untrained model, seeded with 0, for smoke runs and tests).

    Raises ConfigError (at start-up, before any model is built) when timm is missing, the
    architecture is unknown, the file is missing or does not hold the architecture's weights,
    or ``resolution`` is not a multiple of the patch size."""
    try:
        import timm
    except ImportError as err:
        raise ConfigError("loss.vf_weight > 0 needs timm for the teacher's architecture: pip install timm") from err
    if weights != RANDOM and not Path(weights).is_file():
        raise ConfigError(f"loss.vf_teacher={weights!r}: no such file. Put the teacher's weights there (for "
                          f"{arch}: timm's {arch}.lvd142m model.safetensors from the Hugging Face Hub, copied by "
                          "hand; kl-ae never downloads), or use 'random' for a smoke run")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True)
    except RuntimeError as err:  # timm: "Unknown model"
        raise ConfigError(f"loss.vf_teacher_arch={arch!r}: {err}") from None
    if weights != RANDOM:
        state = _read_state(Path(weights))
        expected = model.state_dict()
        missing = [k for k in expected if k not in state and not k.startswith("head")]
        unexpected = [k for k in state if k not in expected and not k.startswith("head")]
        wrong = [k for k in state if k in expected and state[k].shape != expected[k].shape]
        if missing or unexpected or wrong:
            raise ConfigError(f"loss.vf_teacher={weights!r} does not hold {arch}'s weights: {len(missing)} missing, "
                              f"{len(unexpected)} unexpected, {len(wrong)} of another shape (e.g. "
                              f"{(missing + unexpected + wrong)[:2]}); check loss.vf_teacher_arch")
        model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    teacher = Teacher(model, resolution)
    if resolution % teacher.patch:
        raise ConfigError(f"loss.vf_teacher_resolution={resolution} is not a multiple of {arch}'s patch size "
                          f"{teacher.patch}")
    return teacher, "vf_random_teacher" if weights == RANDOM else "vf"


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file (weights only, no pickle code), with a
    leading 'model.' / 'module.' stripped and a {'model': ...} / {'state_dict': ...} unwrapped."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("model", "state_dict", "teacher"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def vf_loss(projection: torch.Tensor, features: torch.Tensor, margin_cos: float = 0.5,
            margin_distmat: float = 0.25) -> torch.Tensor:
    """L_mcos + L_mdms (module docstring) of the projected latent (B, D, h, w) against the
    teacher's features (B, D, h', w'), which are resized to h x w (bilinear). 0-dim float32."""
    b, d, h, w = projection.shape
    if features.shape[-2:] != (h, w):
        features = F.interpolate(features, size=(h, w), mode="bilinear", align_corners=False)
    z = F.normalize(projection.float().flatten(2).transpose(1, 2), dim=-1)  # (B, hw, D)
    f = F.normalize(features.float().flatten(2).transpose(1, 2), dim=-1)
    l_mcos = F.relu(1.0 - margin_cos - (z * f).sum(-1)).mean()
    l_mdms = F.relu((z @ z.transpose(1, 2) - f @ f.transpose(1, 2)).abs() - margin_distmat).mean()
    return l_mcos + l_mdms


def adaptive_vf_weight(nll_grad: torch.Tensor, vf_grad: torch.Tensor) -> torch.Tensor:
    """||nll_grad|| / (||vf_grad|| + 1e-4), clamped to [0, 1e4], detached: VA-VAE's adaptive_vf,
    the same construction as the GAN's adaptive weight (both gradients w.r.t. the encoder's last
    layer)."""
    ratio = torch.linalg.vector_norm(nll_grad.float()) / (torch.linalg.vector_norm(vf_grad.float()) + _ADAPTIVE_EPS)
    return torch.clamp(ratio, 0.0, _ADAPTIVE_MAX).detach()
