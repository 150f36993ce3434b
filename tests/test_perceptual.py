"""LPIPS trunk resolution, hash check, key mapping and the random-trunk naming (all offline)."""

import hashlib
import logging

import pytest
import torch

import kl_ae  # noqa: F401  (torchvision import fix)
import torchvision

from kl_ae.perceptual import (
    VGG16_FILENAME,
    VGG16_SHA256,
    LPIPSWeightsError,
    build_lpips,
    resolve_vgg16_trunk,
)

VGG_CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def synthetic_trunk(tmp_path_factory):
    """torchvision's VGG16 state dict with random weights, without the 120 M classifier weights
    (keeps the file at 59 MB instead of 553 MB; one small classifier tensor stays, to show that
    tensors outside the trunk are ignored)."""
    path = tmp_path_factory.mktemp("vgg") / VGG16_FILENAME
    torch.manual_seed(0)
    full = torchvision.models.vgg16(weights=None).state_dict()
    state = {k: v for k, v in full.items() if k.startswith("features.") or k == "classifier.6.bias"}
    torch.save(state, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return path, digest, state


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def random_lpips():
    """One random-trunk build shared by the tests below (a build costs ~2 s); returns
    (model, name, log records emitted while building)."""
    handler = _Records()
    log = logging.getLogger("kl_ae.perceptual")
    log.addHandler(handler)
    try:
        model, name = build_lpips("random")
    finally:
        log.removeHandler(handler)
    return model, name, handler.records


def _images(seed, n=2, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_auto_without_cached_file_says_what_to_do(empty_torch_home):
    expected_path = empty_torch_home / "hub" / "checkpoints" / VGG16_FILENAME
    with pytest.raises(LPIPSWeightsError) as info:
        resolve_vgg16_trunk("auto")
    msg = str(info.value)
    assert str(expected_path) in msg
    assert VGG16_SHA256 in msg
    assert "loss.lpips_trunk=" in msg and "loss.perceptual_weight=0" in msg
    assert "lpips_random_trunk" in msg
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(LPIPSWeightsError):
        build_lpips("auto")


def test_missing_explicit_path(tmp_path):
    missing = tmp_path / "nowhere" / VGG16_FILENAME
    with pytest.raises(LPIPSWeightsError, match=str(missing)):
        resolve_vgg16_trunk(str(missing))


def test_wrong_hash_raises_with_expected_and_actual(empty_torch_home):
    cache = empty_torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    bad = cache / VGG16_FILENAME
    bad.write_bytes(b"not the vgg16 weights")
    actual = hashlib.sha256(b"not the vgg16 weights").hexdigest()
    for trunk in ("auto", str(bad)):
        with pytest.raises(ValueError) as info:
            resolve_vgg16_trunk(trunk)
        assert isinstance(info.value, LPIPSWeightsError)
        assert VGG16_SHA256 in str(info.value) and actual in str(info.value)
    with pytest.raises(LPIPSWeightsError):
        build_lpips(str(bad))


def test_synthetic_trunk_loads_into_lpips_slices(synthetic_trunk, empty_torch_home):
    path, digest, state = synthetic_trunk
    model, name = build_lpips(str(path), expected_sha256=digest)
    assert name == "lpips"
    trunk = dict(model.net.named_parameters())
    assert len(trunk) == 2 * len(VGG_CONV_INDICES)
    for i in VGG_CONV_INDICES:
        for kind in ("weight", "bias"):
            (key,) = [k for k in trunk if k.endswith(f".{i}.{kind}")]
            assert torch.equal(trunk[key], state[f"features.{i}.{kind}"]), key
    assert all(not p.requires_grad for p in model.parameters())
    assert not model.training
    # 'auto' finds the same file in torchvision's cache
    cache = empty_torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / VGG16_FILENAME).symlink_to(path)
    assert resolve_vgg16_trunk("auto", expected_sha256=digest) == cache / VGG16_FILENAME


def test_trunk_file_with_wrong_keys(tmp_path):
    path = tmp_path / VGG16_FILENAME
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(LPIPSWeightsError, match="features.2.weight"):
        build_lpips(str(path), expected_sha256=digest)


def test_random_trunk_is_named_and_warned(random_lpips):
    _, name, records = random_lpips
    assert name == "lpips_random_trunk"
    assert any("RANDOM" in r.getMessage() and r.levelno == logging.WARNING for r in records)


def test_random_trunk_values_and_frozen(random_lpips):
    model, _, _ = random_lpips
    x, y = _images(0), _images(1)
    with torch.no_grad():
        same = model(x, x.clone())
        diff = model(x, y)
    assert same.shape == (2, 1, 1, 1) and diff.shape == (2, 1, 1, 1)
    assert torch.allclose(same, torch.zeros_like(same), atol=1e-6)
    assert torch.all(diff > 0)
    assert all(not p.requires_grad for p in model.parameters())


def test_lpips_passes_gradient_and_ignores_train_mode(random_lpips):
    model, _, _ = random_lpips
    x, y = _images(2), _images(3).requires_grad_(True)
    model.train()  # a parent module calling .train() must not switch on dropout
    try:
        a = model(x, y)
        b = model(x, y)
    finally:
        model.eval()
    torch.testing.assert_close(a, b)
    a.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_channels_last_trunk_gives_the_same_values_and_gradients(random_lpips):
    """train.channels_last only changes the memory format of the trunk's convolutions."""
    model, _, _ = random_lpips
    x, y = _images(4), _images(5)
    results = []
    try:
        for memory_format in (torch.contiguous_format, torch.channels_last):
            model.to(memory_format=memory_format)
            assert model.net.slice1[2].weight.is_contiguous(memory_format=memory_format)
            y_ = y.clone().requires_grad_(True)
            value = model(x, y_)
            value.sum().backward()
            results.append((value.detach(), y_.grad))
    finally:
        model.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-6)
    # Gradients: the same direction. Not elementwise equal: NHWC kernels sum in another order, and
    # a pre-activation within rounding of 0 (or of a max-pool window's runner-up) can switch which
    # path the gradient takes (here 1.3 % of the gradient's norm moved; random 32 px inputs).
    (_, g_nchw), (_, g_nhwc) = results
    assert torch.nn.functional.cosine_similarity(g_nhwc.flatten(), g_nchw.flatten(), dim=0) > 0.999


def test_only_vgg_and_alex_supported():
    with pytest.raises(ValueError, match="vgg"):
        build_lpips("random", net="squeeze")


# --- AlexNet trunk (net="alex") -----------------------------------------------------------------

from kl_ae.perceptual import ALEXNET_FILENAME, ALEXNET_SHA256, resolve_trunk  # noqa: E402

ALEX_CONV_INDICES = [0, 3, 6, 8, 10]


@pytest.fixture(scope="module")
def synthetic_alex_trunk(tmp_path_factory):
    """torchvision's AlexNet state dict with random weights, classifier dropped (10 MB)."""
    path = tmp_path_factory.mktemp("alex") / ALEXNET_FILENAME
    torch.manual_seed(1)
    full = torchvision.models.alexnet(weights=None).state_dict()
    state = {k: v for k, v in full.items() if k.startswith("features.")}
    torch.save(state, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest(), state


def test_alexnet_hash_has_torchvision_prefix():
    assert ALEXNET_SHA256.startswith(ALEXNET_FILENAME.removesuffix(".pth").rsplit("-", 1)[1])
    assert len(ALEXNET_SHA256) == 64 and set(ALEXNET_SHA256) <= set("0123456789abcdef")


def test_synthetic_alex_trunk_loads_into_lpips_slices(synthetic_alex_trunk, empty_torch_home):
    path, digest, state = synthetic_alex_trunk
    model, name = build_lpips(str(path), net="alex", expected_sha256=digest)
    assert name == "lpips_alex"
    trunk = dict(model.net.named_parameters())
    assert len(trunk) == 2 * len(ALEX_CONV_INDICES)
    for i in ALEX_CONV_INDICES:
        for kind in ("weight", "bias"):
            (key,) = [k for k in trunk if k.endswith(f".{i}.{kind}")]
            assert torch.equal(trunk[key], state[f"features.{i}.{kind}"]), key
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
    x, y = _images(4), _images(5)
    with torch.no_grad():
        assert torch.allclose(model(x, x.clone()), torch.zeros(2, 1, 1, 1), atol=1e-6)
        assert torch.all(model(x, y) > 0)
    # 'auto' finds the same file in torchvision's cache
    cache = empty_torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / ALEXNET_FILENAME).symlink_to(path)
    assert resolve_trunk("auto", "alex", expected_sha256=digest) == cache / ALEXNET_FILENAME


def test_missing_alex_file_names_the_alexnet_file(empty_torch_home):
    with pytest.raises(LPIPSWeightsError) as info:
        build_lpips("auto", net="alex")
    msg = str(info.value)
    assert str(empty_torch_home / "hub" / "checkpoints" / ALEXNET_FILENAME) in msg
    assert ALEXNET_SHA256 in msg and "alexnet(weights='IMAGENET1K_V1')" in msg
    assert VGG16_FILENAME not in msg


def test_alex_wrong_hash_and_random_name(synthetic_alex_trunk):
    path, _, _ = synthetic_alex_trunk
    with pytest.raises(LPIPSWeightsError, match=ALEXNET_SHA256):
        build_lpips(str(path), net="alex")  # the real file's hash is expected by default
    _, name = build_lpips("random", net="alex")
    assert name == "lpips_alex_random_trunk"
