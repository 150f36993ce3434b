"""LPIPS (Zhang et al. 2018) with a VGG16 trunk that is loaded from a checked file.

The ``lpips`` wheel ships only the linear heads (weights/v0.1/vgg.pth). Its VGG16 trunk normally
comes from torchvision's download of ``vgg16-397923af.pth``; offline that download fails, and a
random trunk would silently turn "LPIPS" into a different number. So the trunk is read from
torchvision's cache or from a path given in the config, and its sha256 is checked. The only
way to run without it is ``loss.lpips_trunk=random`` (smoke tests), whose values are named
``lpips_random_trunk`` and never ``lpips``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from pathlib import Path

import torch
from torch import nn

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_SHA256 = "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0"

logger = logging.getLogger(__name__)

# lpips' vgg16 wrapper keeps torchvision's features indices inside its slices:
# net.slice{k}.{i}.weight <-> features.{i}.weight
_SLICE_PARAM = re.compile(r"^slice\d+\.(\d+)\.(weight|bias)$")


class LPIPSWeightsError(FileNotFoundError):
    """The VGG16 trunk file for LPIPS is missing or is not the expected file.

    The message says which file to put where, and the config alternatives.
    """


class LPIPSWeightsHashError(LPIPSWeightsError, ValueError):
    """The trunk file exists but its sha256 is not the expected one."""


def default_vgg16_path() -> Path:
    """torchvision's cache file: ``torch.hub.get_dir()/checkpoints/vgg16-397923af.pth``
    (``$TORCH_HOME/hub/checkpoints/...``, ``~/.cache/torch/hub/checkpoints/...`` by default)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME


def _how_to_fix(expected_sha256: str) -> str:
    return (
        f"LPIPS needs torchvision's ImageNet VGG16 weights: the file {VGG16_FILENAME} "
        f"(sha256 {expected_sha256}, from https://download.pytorch.org/models/{VGG16_FILENAME}). "
        f"Either put it at {default_vgg16_path()} (torchvision's cache, $TORCH_HOME/hub/checkpoints; "
        f"any machine with network gets it there from torchvision.models.vgg16(weights='IMAGENET1K_V1')), "
        f"or set loss.lpips_trunk=/path/to/{VGG16_FILENAME}, "
        f"or set loss.perceptual_weight=0 to train without LPIPS. "
        f"loss.lpips_trunk=random exists only for smoke tests: its values are not LPIPS and are "
        f"reported as lpips_random_trunk."
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_vgg16_trunk(trunk: str, *, expected_sha256: str = VGG16_SHA256) -> Path | None:
    """Find and check the VGG16 trunk file named by ``loss.lpips_trunk``.

    Args:
        trunk: 'auto' (torchvision's cache file, :func:`default_vgg16_path`), a path to the file,
            or 'random' (no file: untrained trunk).
        expected_sha256: the file's sha256 (torchvision's vgg16-397923af.pth by default).

    Returns:
        The checked file's path, or None for 'random'.

    Raises:
        LPIPSWeightsError: the file does not exist (the message says what to put where).
        LPIPSWeightsHashError (also a ValueError): the file's sha256 differs; the message gives
            expected and actual hash.
    """
    if trunk == "random":
        return None
    path = default_vgg16_path() if trunk == "auto" else Path(trunk).expanduser()
    if not path.is_file():
        raise LPIPSWeightsError(f"LPIPS VGG16 trunk file not found: {path}. " + _how_to_fix(expected_sha256))
    actual = _sha256(path)
    if actual != expected_sha256:
        raise LPIPSWeightsHashError(
            f"LPIPS VGG16 trunk file {path} has sha256 {actual}, expected {expected_sha256}. "
            + _how_to_fix(expected_sha256)
        )
    return path


def _load_vgg16_trunk(trunk_net: nn.Module, path: Path, expected_sha256: str) -> None:
    """Copy torchvision ``features.{i}.*`` tensors from ``path`` into lpips' ``slice{k}.{i}.*``.

    Every trunk parameter must be found (strict load); the classifier tensors are ignored.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    mapped, missing = {}, []
    for name in trunk_net.state_dict():
        match = _SLICE_PARAM.match(name)
        if match is None:
            raise RuntimeError(f"unexpected tensor {name!r} in lpips' VGG16 trunk; lpips layout changed?")
        key = f"features.{match.group(1)}.{match.group(2)}"
        if key in state:
            mapped[name] = state[key]
        else:
            missing.append(key)
    if missing:
        raise LPIPSWeightsError(
            f"{path} is not a torchvision VGG16 state dict: missing {missing}. " + _how_to_fix(expected_sha256)
        )
    trunk_net.load_state_dict(mapped, strict=True)


def _check_linear_heads(model: nn.Module) -> None:
    """lpips loads its heads with strict=False; make sure every shipped tensor really landed."""
    import lpips

    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    shipped = torch.load(heads, map_location="cpu", weights_only=True)
    own = model.state_dict()
    bad = [k for k, v in shipped.items() if k not in own or not torch.equal(own[k], v)]
    if bad:
        raise RuntimeError(f"LPIPS linear heads from {heads} were not loaded: {bad}")


def build_lpips(
    trunk: str = "auto", net: str = "vgg", expected_sha256: str = VGG16_SHA256
) -> tuple[nn.Module, str]:
    """A frozen LPIPS-VGG module and the name its values may be reported under.

    Args:
        trunk: ``loss.lpips_trunk``: 'auto', a path to vgg16-397923af.pth, or 'random'
            (see :func:`resolve_vgg16_trunk`).
        net: only 'vgg' (the LDM loss) is supported.
        expected_sha256: sha256 the trunk file must have.

    Returns:
        (module, name): ``lpips.LPIPS`` in eval mode with every parameter frozen, whose
        ``forward(x, y)`` takes (B, 3, H, W) float in [-1, 1] and returns (B, 1, 1, 1);
        name is "lpips" for the checked ImageNet trunk and "lpips_random_trunk" for 'random'.

    Raises:
        ValueError: ``net`` other than 'vgg'.
        LPIPSWeightsError: trunk file missing, wrong hash or wrong keys.
    """
    if net != "vgg":
        raise ValueError(f"only net='vgg' is supported for LPIPS (the LDM loss), got {net!r}")
    path = resolve_vgg16_trunk(trunk, expected_sha256=expected_sha256)

    import lpips

    with warnings.catch_warnings():
        # lpips calls torchvision.models.vgg16(pretrained=False): deprecated-argument noise
        warnings.filterwarnings("ignore", message=".*pretrained.*", category=UserWarning)
        warnings.filterwarnings("ignore", message="Arguments other than a weight enum", category=UserWarning)
        # pnet_rand=True: build the trunk without torchvision's download; we load it ourselves.
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    _check_linear_heads(model)
    if path is None:
        logger.warning(
            "LPIPS uses a RANDOM VGG16 trunk (loss.lpips_trunk=random): for smoke tests only; "
            "its values are reported as lpips_random_trunk and are not LPIPS."
        )
        name = "lpips_random_trunk"
    else:
        _load_vgg16_trunk(model.net, path, expected_sha256)
        name = "lpips"
    # The heads' Dropout layers would switch on if a parent module called .train(); LPIPS is a
    # fixed metric, so drop them (Identity has no tensors: state-dict keys stay the same).
    for lin in model.lins:
        lin.model = nn.Sequential(*[nn.Identity() if isinstance(m, nn.Dropout) else m for m in lin.model])
    model.requires_grad_(False)
    model.eval()
    return model, name
