"""LPIPS (Zhang et al. 2018) with a VGG16 or AlexNet trunk that is loaded from a checked file.

The ``lpips`` wheel ships only the linear heads (weights/v0.1/{vgg,alex}.pth). Its trunk normally
comes from torchvision's download (``vgg16-397923af.pth`` / ``alexnet-owt-7be5be79.pth``); offline
that download fails, and a random trunk would silently turn "LPIPS" into a different number. So
the trunk is read from torchvision's cache or from a path given in the config, and its sha256 is
checked. The only way to run without it is ``loss.lpips_trunk=random`` (smoke tests), whose
values are named ``lpips_random_trunk`` (``lpips_alex_random_trunk``) and never ``lpips``.

VGG (``net="vgg"``) is the LDM/SD training loss and the default everywhere. AlexNet
(``net="alex"``) is the LPIPS authors' recommended variant for evaluation; its values differ from
LPIPS-VGG, so they are named ``lpips_alex``, never ``lpips``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_SHA256 = "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0"
ALEXNET_FILENAME = "alexnet-owt-7be5be79.pth"
# torchvision names only the first 8 hex digits (7be5be79). The full sha256 below is the one that
# independent public projects pin for this file (244,408,911 bytes = torchvision's _file_size
# 233.087 MiB); it starts with torchvision's prefix. Not re-hashed here (no network).
ALEXNET_SHA256 = "7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02"

logger = logging.getLogger(__name__)

# lpips' vgg16 / alexnet wrappers keep torchvision's features indices inside their slices:
# net.slice{k}.{i}.weight <-> features.{i}.weight
_SLICE_PARAM = re.compile(r"^slice\d+\.(\d+)\.(weight|bias)$")


@dataclass(frozen=True)
class _Trunk:
    label: str  # for messages
    filename: str  # torchvision's cache file name
    sha256: str
    builder: str  # torchvision.models.<builder>(weights="IMAGENET1K_V1") downloads it
    metric_name: str  # the name LPIPS values with this (checked) trunk are reported under


TRUNKS = {
    "vgg": _Trunk("VGG16", VGG16_FILENAME, VGG16_SHA256, "vgg16", "lpips"),
    "alex": _Trunk("AlexNet", ALEXNET_FILENAME, ALEXNET_SHA256, "alexnet", "lpips_alex"),
}


class LPIPSWeightsError(FileNotFoundError):
    """The trunk file for LPIPS is missing or is not the expected file.

    The message says which file to put where, and the config alternatives.
    """


class LPIPSWeightsHashError(LPIPSWeightsError, ValueError):
    """The trunk file exists but its sha256 is not the expected one."""


def _trunk(net: str) -> _Trunk:
    if net not in TRUNKS:
        raise ValueError(f"LPIPS net must be one of {sorted(TRUNKS)} ('vgg': the LDM loss), got {net!r}")
    return TRUNKS[net]


def default_trunk_path(net: str = "vgg") -> Path:
    """torchvision's cache file of the trunk: ``torch.hub.get_dir()/checkpoints/<file>``
    (``$TORCH_HOME/hub/checkpoints/...``, ``~/.cache/torch/hub/checkpoints/...`` by default)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _trunk(net).filename


def default_vgg16_path() -> Path:
    """:func:`default_trunk_path` of the VGG16 trunk (vgg16-397923af.pth)."""
    return default_trunk_path("vgg")


def _how_to_fix(expected_sha256: str, net: str = "vgg") -> str:
    t = _trunk(net)
    random_name = f"{t.metric_name}_random_trunk"
    if net == "vgg":  # the training loss's trunk: name its config fields
        alternatives = (
            f"or set loss.lpips_trunk=/path/to/{t.filename}, "
            f"or set loss.perceptual_weight=0 to train without LPIPS. "
            f"loss.lpips_trunk=random exists only for smoke tests: its values are not LPIPS and are "
            f"reported as {random_name}."
        )
    else:  # an evaluation-only trunk
        alternatives = (
            f"or pass /path/to/{t.filename} as the LPIPS trunk. A 'random' trunk exists only for "
            f"smoke tests: its values are not LPIPS and are reported as {random_name}."
        )
    return (
        f"LPIPS needs torchvision's ImageNet {t.label} weights: the file {t.filename} "
        f"(sha256 {expected_sha256}, from https://download.pytorch.org/models/{t.filename}). "
        f"Either put it at {default_trunk_path(net)} (torchvision's cache, $TORCH_HOME/hub/checkpoints; "
        f"any machine with network gets it there from torchvision.models.{t.builder}(weights='IMAGENET1K_V1')), "
        + alternatives
    )


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks (weights files are hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_trunk(trunk: str, net: str = "vgg", *, expected_sha256: str | None = None) -> Path | None:
    """Find and check the LPIPS trunk file named by ``trunk`` (``loss.lpips_trunk``).

    Args:
        trunk: 'auto' (torchvision's cache file, :func:`default_trunk_path`), a path to the file,
            or 'random' (no file: untrained trunk).
        net: 'vgg' (vgg16-397923af.pth) or 'alex' (alexnet-owt-7be5be79.pth).
        expected_sha256: the file's sha256 (None: that of torchvision's file for ``net``).

    Returns:
        The checked file's path, or None for 'random'.

    Raises:
        ValueError: unknown ``net``.
        LPIPSWeightsError: the file does not exist (the message says what to put where).
        LPIPSWeightsHashError (also a ValueError): the file's sha256 differs; the message gives
            expected and actual hash.
    """
    t = _trunk(net)
    expected_sha256 = expected_sha256 or t.sha256
    if trunk == "random":
        return None
    path = default_trunk_path(net) if trunk == "auto" else Path(trunk).expanduser()
    if not path.is_file():
        raise LPIPSWeightsError(
            f"LPIPS {t.label} trunk file not found: {path}. " + _how_to_fix(expected_sha256, net)
        )
    actual = file_sha256(path)
    if actual != expected_sha256:
        raise LPIPSWeightsHashError(
            f"LPIPS {t.label} trunk file {path} has sha256 {actual}, expected {expected_sha256}. "
            + _how_to_fix(expected_sha256, net)
        )
    return path


def resolve_vgg16_trunk(trunk: str, *, expected_sha256: str = VGG16_SHA256) -> Path | None:
    """:func:`resolve_trunk` for the VGG16 trunk (the LDM loss)."""
    return resolve_trunk(trunk, "vgg", expected_sha256=expected_sha256)


def _load_trunk(trunk_net: nn.Module, path: Path, expected_sha256: str, net: str) -> None:
    """Copy torchvision ``features.{i}.*`` tensors from ``path`` into lpips' ``slice{k}.{i}.*``.

    Every trunk parameter must be found (strict load); the classifier tensors are ignored.
    """
    label = _trunk(net).label
    state = torch.load(path, map_location="cpu", weights_only=True)
    mapped, missing = {}, []
    for name in trunk_net.state_dict():
        match = _SLICE_PARAM.match(name)
        if match is None:
            raise RuntimeError(f"unexpected tensor {name!r} in lpips' {label} trunk; lpips layout changed?")
        key = f"features.{match.group(1)}.{match.group(2)}"
        if key in state:
            mapped[name] = state[key]
        else:
            missing.append(key)
    if missing:
        raise LPIPSWeightsError(
            f"{path} is not a torchvision {label} state dict: missing {missing}. "
            + _how_to_fix(expected_sha256, net)
        )
    trunk_net.load_state_dict(mapped, strict=True)


def _check_linear_heads(model: nn.Module, net: str) -> None:
    """lpips loads its heads with strict=False; make sure every shipped tensor really landed."""
    import lpips

    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    shipped = torch.load(heads, map_location="cpu", weights_only=True)
    own = model.state_dict()
    bad = [k for k, v in shipped.items() if k not in own or not torch.equal(own[k], v)]
    if bad:
        raise RuntimeError(f"LPIPS linear heads from {heads} were not loaded: {bad}")


def build_lpips(
    trunk: str = "auto", net: str = "vgg", expected_sha256: str | None = None
) -> tuple[nn.Module, str]:
    """A frozen LPIPS module and the name its values may be reported under.

    Args:
        trunk: ``loss.lpips_trunk``: 'auto', a path to the trunk file, or 'random'
            (see :func:`resolve_trunk`).
        net: 'vgg' (the LDM loss; vgg16-397923af.pth) or 'alex' (alexnet-owt-7be5be79.pth).
        expected_sha256: sha256 the trunk file must have (None: torchvision's file for ``net``).

    Returns:
        (module, name): ``lpips.LPIPS`` in eval mode with every parameter frozen, whose
        ``forward(x, y)`` takes (B, 3, H, W) float in [-1, 1] and returns (B, 1, 1, 1);
        name is "lpips" ("lpips_alex") for the checked ImageNet trunk and
        "lpips_random_trunk" ("lpips_alex_random_trunk") for 'random'.

    Raises:
        ValueError: ``net`` other than 'vgg' or 'alex'.
        LPIPSWeightsError: trunk file missing, wrong hash or wrong keys.
    """
    t = _trunk(net)
    expected_sha256 = expected_sha256 or t.sha256
    path = resolve_trunk(trunk, net, expected_sha256=expected_sha256)

    import lpips

    with warnings.catch_warnings():
        # lpips calls torchvision.models.vgg16/alexnet(pretrained=False): deprecated-argument noise
        warnings.filterwarnings("ignore", message=".*pretrained.*", category=UserWarning)
        warnings.filterwarnings("ignore", message="Arguments other than a weight enum", category=UserWarning)
        # pnet_rand=True: build the trunk without torchvision's download; we load it ourselves.
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    _check_linear_heads(model, net)
    if path is None:
        name = f"{t.metric_name}_random_trunk"
        logger.warning(
            "LPIPS uses a RANDOM %s trunk (loss.lpips_trunk=random): for smoke tests only; "
            "its values are reported as %s and are not LPIPS.", t.label, name,
        )
    else:
        _load_trunk(model.net, path, expected_sha256, net)
        name = t.metric_name
    # The heads' Dropout layers would switch on if a parent module called .train(); LPIPS is a
    # fixed metric, so drop them (Identity has no tensors: state-dict keys stay the same).
    for lin in model.lins:
        lin.model = nn.Sequential(*[nn.Identity() if isinstance(m, nn.Dropout) else m for m in lin.model])
    model.requires_grad_(False)
    model.eval()
    return model, name
