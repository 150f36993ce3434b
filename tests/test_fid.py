"""Tests for kl_ae.eval.fid: the offline skip path, the hash check, the Fréchet distance through an
injected feature network against hand values, and the local-weights path of the real network
(random weights in the Inception layout; no network access)."""

from __future__ import annotations

import hashlib

import kl_ae  # noqa: F401  (torchvision import fix before torchmetrics)
import pytest
import torch
import torchvision
from torch import nn

from kl_ae.eval.fid import (
    FID_WEIGHTS_FILENAME,
    FID_WEIGHTS_SHA256,
    TORCH_FIDELITY_WEIGHTS_FILENAME,
    RFID,
    FIDWeightsError,
    FIDWeightsHashError,
    fid_weights_path,
    to_uint8,
)


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path


def test_missing_weights_skip_with_path_in_message(empty_torch_home):
    expected = empty_torch_home / "hub" / "checkpoints" / FID_WEIGHTS_FILENAME
    assert fid_weights_path() == expected
    with pytest.raises(FIDWeightsError) as info:
        RFID()
    msg = str(info.value)
    assert msg.startswith(f"rFID: skipped, no weights at {expected}")
    assert FID_WEIGHTS_FILENAME in msg and FID_WEIGHTS_SHA256 in msg
    assert isinstance(info.value, FileNotFoundError)
    missing = empty_torch_home / "elsewhere.pth"
    with pytest.raises(FIDWeightsError, match=str(missing)):
        RFID(weights=str(missing))


def test_default_path_finds_torch_fidelity_name(empty_torch_home):
    cache = empty_torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / TORCH_FIDELITY_WEIGHTS_FILENAME).write_bytes(b"x")
    assert fid_weights_path() == cache / TORCH_FIDELITY_WEIGHTS_FILENAME
    assert fid_weights_path("~/w.pth").name == "w.pth" and "~" not in str(fid_weights_path("~/w.pth"))


def test_wrong_hash_is_refused_before_loading(empty_torch_home):
    bad = empty_torch_home / FID_WEIGHTS_FILENAME
    bad.write_bytes(b"not the inception weights")
    with pytest.raises(FIDWeightsHashError) as info:
        RFID(weights=str(bad))
    assert isinstance(info.value, ValueError) and isinstance(info.value, FIDWeightsError)
    assert FID_WEIGHTS_SHA256 in str(info.value)
    assert hashlib.sha256(b"not the inception weights").hexdigest() in str(info.value)


def test_to_uint8_levels():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, 10 / 127.5 - 1]).view(1, 1, 2, 3)
    assert to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255, 10]  # round(127.5) = 128
    assert to_uint8(x).dtype == torch.uint8


# --- the Fréchet distance through an injected feature network ---------------------------------


class PixelFeatures(nn.Module):
    """Stub feature network: the RGB values (0..255) of pixel (0, 0) as a 3-d feature."""

    num_features = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.uint8
        return x[:, :, 0, 0].double()


def _images_with_pixel(levels: torch.Tensor, size=8) -> torch.Tensor:
    """(N, 3) integer levels -> (N, 3, size, size) images in [-1, 1] whose pixel (0, 0) has
    those 8-bit levels (the rest is a constant grey)."""
    x = torch.zeros(levels.shape[0], 3, size, size)
    x[:, :, 0, 0] = levels.float() / 127.5 - 1
    return x


def _real_levels(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(60, 121, (n, 3), generator=g)


def test_identical_sets_give_zero():
    fid = RFID(feature=PixelFeatures())
    x = _images_with_pixel(_real_levels())
    fid.update(x[:4], x[:4].clone())
    fid.update(x[4:], x[4:].clone())
    assert fid.num_images == 8
    assert fid.compute() == pytest.approx(0.0, abs=1e-6)


def test_shift_and_scale_match_hand_values():
    real = _real_levels()
    mu = real.double().mean(0)
    cov = torch.cov(real.double().T)  # unbiased, as torchmetrics
    # a pure shift of 7 levels: ||d mu||^2 = 3 * 49, covariance terms cancel
    fid = RFID(feature=PixelFeatures())
    fid.update(_images_with_pixel(real), _images_with_pixel(real + 7))
    assert fid.compute() == pytest.approx(3 * 49.0, rel=1e-6)
    # f' = 2 f - 50: d mu = mu - 50, Sigma' = 4 Sigma, Tr(S + 4S - 2 sqrt(4 S^2)) = Tr(S)
    fid = RFID(feature=PixelFeatures())
    fid.update(_images_with_pixel(real), _images_with_pixel(2 * real - 50))
    hand = ((mu - 50) ** 2).sum().item() + cov.trace().item()
    assert fid.compute() == pytest.approx(hand, rel=1e-6)
    r = fid.report()
    assert r["rfid"] == pytest.approx(hand, rel=1e-6)
    assert r["rfid_images"] == 8 and "rfid_note" in r and "NOT FID" in r["rfid_protocol"]


def test_shape_mismatch_is_an_error():
    fid = RFID(feature=PixelFeatures())
    with pytest.raises(ValueError, match="B, 3, H, W"):
        fid.update(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 16))


# --- the real network from a local file, never the download -----------------------------------


def test_local_weights_load_without_network(tmp_path, monkeypatch):
    """torch-fidelity's InceptionV3 has torchvision's inception_v3(num_classes=1008,
    aux_logits=False) state-dict layout (the layout pytorch-fid loads the same file into), so
    random weights in that layout stand in for the real file; its hash is injected."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download the FID weights")

    monkeypatch.setattr(fidelity_inception, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    torch.manual_seed(0)
    state = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=1008, init_weights=False
    ).state_dict()
    path = tmp_path / FID_WEIGHTS_FILENAME
    torch.save(state, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    fid = RFID(weights=str(path), expected_sha256=digest)
    assert fid.weights == path
    net = fid.metric.inception
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert net.use_antialias is False and not net.training  # torch-fidelity's TF1 resize, eval
    # A forward pass (~3 s per image pair on 2 CPU cores) and compute() (eigenvalues of a
    # 2048 x 2048 matrix, ~20 s here) are torch-fidelity's / torchmetrics' code: not run here.
