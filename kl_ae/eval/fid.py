"""rFID: the Fréchet Inception Distance between images and their reconstructions, offline.

rFID = FID (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
Nash Equilibrium", NeurIPS 2017) between the set of original images and the set of their
reconstructions. Computed by torchmetrics' ``FrechetInceptionDistance`` with torch-fidelity's
port of the TF InceptionV3 FID network (2048-d pool3 features), so the statistics, the matrix
square root and the multi-process sync are theirs, not ours.

Weights. The FID network's weights are the 2015-12-05 TF Inception graph converted to PyTorch:
pytorch-fid publishes them as ``pt_inception-2015-12-05-6726825d.pth`` and torch-fidelity as
``weights-inception-2015-12-05-6726825d.pth``; both names carry the same file (sha256 below,
95,628,359 bytes). Left alone, torch-fidelity downloads it to torch hub's cache; here it is read
only from a local file, whose sha256 is checked before it is unpickled, and nothing touches the
network. Without the file rFID is skipped (:class:`FIDWeightsError`), never computed with other
weights.

Protocol (:data:`RFID_PROTOCOL`): x and x̂ clamped to [-1, 1] and rounded to uint8 (k/255, as
``kl_ae.eval.metrics.to_8bit``); resized to 299 x 299 with TF1-compatible bilinear interpolation
(torch-fidelity's resize, that of the original TF implementation; torchmetrics >= 1.8 would
default to antialiased torch resizing, which changes the numbers); 2048-d features.

Sample size: FID is biased upwards at finite n and the bias depends on n (Chong & Forsyth,
"Effectively Unbiased FID and Inception Score and where to find them", CVPR 2020); with fewer
images than feature dimensions (2048) the covariance estimates are singular. rFID on a few
hundred images is only comparable to rFID on the same number of images (published tables use
5k COCO or 50k ImageNet val images): every report carries ``rfid_images``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from kl_ae.perceptual import file_sha256

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's name
TORCH_FIDELITY_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"  # same bytes
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILENAME
FID_FEATURES = 2048  # pool3 features, the standard FID layer
FEW_IMAGES = 2048  # below this many images the feature covariances are singular

RFID_PROTOCOL = (
    "rFID: FID (Heusel et al. 2017) between the originals and their reconstructions; "
    "torchmetrics FrechetInceptionDistance with torch-fidelity's TF InceptionV3 "
    f"(inception-2015-12-05, sha256 {FID_WEIGHTS_SHA256[:16]}...), 2048-d pool3 features; "
    "images clamped to [-1, 1] and rounded to uint8, resized to 299x299 by TF1-compatible "
    "bilinear interpolation (no antialias); biased upward at small n: compare only at equal n"
)


class FIDWeightsError(FileNotFoundError):
    """The FID Inception weights file is missing (or, as :class:`FIDWeightsHashError`, wrong)."""


class FIDWeightsHashError(FIDWeightsError, ValueError):
    """The weights file exists but its sha256 is not the expected one."""


def fid_weights_path(path: str | Path | None = None) -> Path:
    """The FID weights file to use: ``path`` if given, else in torch hub's cache
    (``torch.hub.get_dir()/checkpoints``, i.e. ``$TORCH_HOME/hub/checkpoints``, by default
    ``~/.cache/torch/hub/checkpoints``) the first existing of pytorch-fid's and torch-fidelity's
    file names, else the pytorch-fid name there (a path that does not exist)."""
    if path is not None:
        return Path(path).expanduser()
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for name in (FID_WEIGHTS_FILENAME, TORCH_FIDELITY_WEIGHTS_FILENAME):
        if (cache / name).is_file():
            return cache / name
    return cache / FID_WEIGHTS_FILENAME


def check_fid_weights(path: str | Path | None = None, expected_sha256: str = FID_WEIGHTS_SHA256) -> Path:
    """Resolve (:func:`fid_weights_path`) and check the weights file; returns its path.

    Raises FIDWeightsError when it does not exist, FIDWeightsHashError (also a ValueError)
    when its sha256 differs. Both messages start with "rFID: skipped" and say what to do.
    """
    file = fid_weights_path(path)
    how = (
        f"put {FID_WEIGHTS_FILENAME} (sha256 {FID_WEIGHTS_SHA256}, from {FID_WEIGHTS_URL}; "
        f"torch-fidelity caches the same file as {TORCH_FIDELITY_WEIGHTS_FILENAME}) there, "
        f"or pass its path as the rFID weights"
    )
    if not file.is_file():
        raise FIDWeightsError(f"rFID: skipped, no weights at {file} ({how})")
    actual = file_sha256(file)
    if actual != expected_sha256:
        raise FIDWeightsHashError(
            f"rFID: skipped, {file} has sha256 {actual}, expected {expected_sha256} ({how})"
        )
    return file


def to_uint8(x: Tensor) -> Tensor:
    """(B, 3, H, W) float in [-1, 1] (clamped) -> uint8 in [0, 255], round((x + 1) * 127.5):
    the same levels as ``kl_ae.eval.metrics.to_8bit`` times 255."""
    return torch.round((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).to(torch.uint8)


class RFID:
    """Streaming rFID: :meth:`update` with batches of (x, x̂), then :meth:`compute`.

    Args:
        weights: the Inception weights file (None: :func:`fid_weights_path`'s default).
        device: where the network and the float64 feature statistics live.
        feature: a feature network to use INSTEAD of Inception (tests, other feature spaces):
            an ``nn.Module`` mapping (B, 3, H, W) uint8 to (B, d) features; then ``weights``
            is not read and the numbers are not FID.
        expected_sha256: the sha256 the weights file must have.

    Raises:
        FIDWeightsError / FIDWeightsHashError: see :func:`check_fid_weights`.

    Under torch.distributed each rank updates with its own images; :meth:`compute` sums the
    feature statistics over ranks (torchmetrics' sync) and returns the global value on all.
    """

    def __init__(self, weights: str | Path | None = None, device: torch.device | str = "cpu", *,
                 feature: nn.Module | None = None, expected_sha256: str = FID_WEIGHTS_SHA256):
        from torchmetrics.image.fid import FrechetInceptionDistance

        if feature is None:
            self.weights: Path | None = check_fid_weights(weights, expected_sha256)
            metric = FrechetInceptionDistance(
                feature=FID_FEATURES,
                feature_extractor_weights_path=str(self.weights),  # never the download
                antialias=False,  # torch-fidelity's / TF's resize, the FID reference
            )
        else:
            self.weights = None
            metric = FrechetInceptionDistance(feature=feature)
        self.metric = metric.to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor) -> None:
        """x, x_hat: (B, 3, H, W) float in [-1, 1], the originals and their reconstructions."""
        if x.shape != x_hat.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x and x_hat must both be (B, 3, H, W), got {tuple(x.shape)}, {tuple(x_hat.shape)}")
        self.metric.update(to_uint8(x).to(self.device), real=True)
        self.metric.update(to_uint8(x_hat).to(self.device), real=False)

    @property
    def num_images(self) -> int:
        """Images seen so far on THIS process (pairs of x and x̂); see :meth:`report` for all."""
        return int(self.metric.real_features_num_samples.item())

    def compute(self) -> float:
        """rFID over all images so far. Raises RuntimeError (torchmetrics) under 2 images."""
        return float(self.metric.compute().item())

    def report(self) -> dict:
        """{"rfid": value, "rfid_images": n, "rfid_protocol": text} (+ "rfid_note" when
        n < 2048: a small-sample value, comparable only at equal n). n is summed over ranks."""
        value = self.compute()  # sums the feature statistics over ranks
        count = self.metric.real_features_num_samples.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(count)  # compute() restored the local state: sum n too
        n = int(count.item())
        out = {"rfid": value, "rfid_images": n, "rfid_protocol": RFID_PROTOCOL}
        if self.weights is None:
            out["rfid_protocol"] = "custom feature network: NOT FID; " + RFID_PROTOCOL
        if n < FEW_IMAGES:
            out["rfid_note"] = (
                f"only {n} images (< {FEW_IMAGES} feature dimensions): FID is strongly biased "
                "upward at this size; compare only with rFID on the same number of images"
            )
        return out

    def reset(self) -> None:
        self.metric.reset()
