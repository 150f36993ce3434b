"""The LDM loss formulas against hand computations on small tensors."""

import math

import pytest
import torch
from torch import nn

import kl_ae  # noqa: F401  (import fixes before diffusers)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from kl_ae.losses import (
    adaptive_generator_weight,
    disc_factor_at,
    discriminator_loss,
    generator_loss,
    hinge_d_loss,
    kl_loss,
    nll_loss,
    reconstruction_loss,
    vanilla_d_loss,
)


class StubPerceptual(nn.Module):
    """Returns per-image values ``scale * mean(|x - y|)`` as (B, 1, 1, 1); records what it saw."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, y):
        self.calls.append((x.dtype, y.dtype, torch.is_autocast_enabled("cpu")))
        return (x - y).abs().mean(dim=(1, 2, 3), keepdim=True) * 10.0


def _pair(seed=0, shape=(2, 3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g) * 2 - 1
    x_hat = torch.rand(shape, generator=g) * 2 - 1
    return x, x_hat


# ---- reconstruction -------------------------------------------------------------------------

def test_reconstruction_l1_only_elementwise():
    x, x_hat = _pair()
    rec = reconstruction_loss(x, x_hat)
    assert rec.shape == x.shape and rec.dtype == torch.float32
    for idx in [(0, 0, 0, 0), (1, 2, 3, 1), (0, 1, 2, 3)]:
        assert rec[idx].item() == pytest.approx(abs(x[idx].item() - x_hat[idx].item()), abs=1e-6)


def test_reconstruction_broadcasts_perceptual_to_every_pixel():
    x, x_hat = _pair()
    stub = StubPerceptual()
    rec = reconstruction_loss(x, x_hat, perceptual=stub, perceptual_weight=2.0)
    l1 = (x - x_hat).abs()
    for b in range(2):
        p_b = 10.0 * l1[b].mean().item()  # what the stub returns for image b
        expected = l1[b] + 2.0 * p_b  # the same scalar added to all 3*4*4 entries
        torch.testing.assert_close(rec[b], expected, rtol=1e-6, atol=1e-6)
    assert len(stub.calls) == 1


def test_reconstruction_weight_zero_skips_perceptual():
    x, x_hat = _pair()
    stub = StubPerceptual()
    rec = reconstruction_loss(x, x_hat, perceptual=stub, perceptual_weight=0.0)
    torch.testing.assert_close(rec, (x - x_hat).abs())
    assert stub.calls == []


def test_reconstruction_is_float32_under_autocast_and_has_gradient():
    x, x_hat = _pair()
    x_hat = x_hat.to(torch.bfloat16).requires_grad_(True)
    stub = StubPerceptual()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rec = reconstruction_loss(x, x_hat, perceptual=stub, perceptual_weight=1.0)
    assert rec.dtype == torch.float32
    assert stub.calls == [(torch.float32, torch.float32, False)]
    rec.sum().backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0


def test_reconstruction_rejects_wrong_perceptual_shape():
    x, x_hat = _pair()

    class Bad(nn.Module):
        def forward(self, a, b):
            return (a - b).abs().mean(dim=1, keepdim=True)  # (B, 1, H, W): spatial map

    with pytest.raises(ValueError, match=r"\(B, 1, 1, 1\)"):
        reconstruction_loss(x, x_hat, perceptual=Bad())


# ---- NLL --------------------------------------------------------------------------------------

@pytest.mark.parametrize("logvar", [0.0, 0.5])
def test_nll_loss_elementwise(logvar):
    rec = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2) / 7.0
    total = 0.0
    for b in range(2):
        for c in range(3):
            for h in range(2):
                for w in range(2):
                    total += rec[b, c, h, w].item() / math.exp(logvar) + logvar
    expected = total / 2  # sum over C*H*W, mean over the batch of 2
    got = nll_loss(rec, torch.tensor(logvar))
    assert got.dim() == 0 and got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_nll_loss_gradient_reaches_logvar():
    rec = torch.full((2, 3, 2, 2), 0.5)
    logvar = torch.tensor(0.0, requires_grad=True)
    nll_loss(rec, logvar).backward()
    # d/dlogvar sum(r e^-l + l) / B = (sum(-r e^-l) + N) / B = (-0.5 * 12 + 12) / 1 per image
    assert logvar.grad.item() == pytest.approx((-0.5 * 24 + 24) / 2)


# ---- KL ----------------------------------------------------------------------------------------

def test_kl_loss_matches_hand_computation():
    mean = torch.tensor([[[[0.5, -1.0]], [[0.0, 2.0]]], [[[1.5, 0.0]], [[-0.5, 0.25]]]])  # (2,2,1,2)
    logvar = torch.tensor([[[[0.0, -1.0]], [[1.0, 0.5]]], [[[-2.0, 0.0]], [[0.3, -0.7]]]])
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    total = 0.0
    for m, lv in zip(mean.flatten().tolist(), logvar.flatten().tolist()):
        total += 0.5 * (m * m + math.exp(lv) - 1.0 - lv)
    expected = total / 2
    got = kl_loss(posterior)
    assert got.dim() == 0
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert got.item() == pytest.approx(posterior.kl().mean().item(), rel=1e-6)


def test_kl_loss_standard_normal_is_zero_and_clamp_applies():
    zeros = torch.zeros(3, 8, 2, 2)  # mean 0 and logvar 0 for 4 channels
    assert kl_loss(DiagonalGaussianDistribution(zeros)).item() == 0.0
    params = torch.zeros(1, 2, 1, 1)
    params[0, 1] = 25.0  # logvar beyond diffusers' clamp to [-30, 20]
    expected = 0.5 * (math.exp(20.0) - 1.0 - 20.0)
    assert kl_loss(DiagonalGaussianDistribution(params)).item() == pytest.approx(expected, rel=1e-5)


def test_kl_loss_float32_from_bf16_posterior():
    params = torch.randn(2, 8, 2, 2).to(torch.bfloat16)
    got = kl_loss(DiagonalGaussianDistribution(params))
    assert got.dtype == torch.float32


# ---- adversarial -------------------------------------------------------------------------------

REAL = [2.0, 0.5, -1.0, 1.0]
FAKE = [-2.0, 0.3, 1.0, -0.5]


def _logits(values):
    return torch.tensor(values).reshape(1, 1, 2, 2)


def test_hinge_d_loss_hand_values():
    # relu(1 - real) = [0, .5, 2, 0] -> mean .625 ; relu(1 + fake) = [0, 1.3, 2, .5] -> mean .95
    expected = 0.5 * (0.625 + 0.95)
    assert hinge_d_loss(_logits(REAL), _logits(FAKE)).item() == pytest.approx(expected)
    assert hinge_d_loss(torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)).item() == pytest.approx(1.0)


def test_vanilla_d_loss_hand_values():
    def softplus(v):
        return math.log1p(math.exp(v))

    expected = 0.5 * (
        sum(softplus(-r) for r in REAL) / len(REAL) + sum(softplus(f) for f in FAKE) / len(FAKE)
    )
    assert vanilla_d_loss(_logits(REAL), _logits(FAKE)).item() == pytest.approx(expected, rel=1e-6)
    assert vanilla_d_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).item() == pytest.approx(math.log(2))


def test_discriminator_loss_dispatch():
    real, fake = _logits(REAL), _logits(FAKE)
    assert discriminator_loss(real, fake, "hinge").item() == hinge_d_loss(real, fake).item()
    assert discriminator_loss(real, fake, "vanilla").item() == vanilla_d_loss(real, fake).item()
    with pytest.raises(ValueError, match="hinge"):
        discriminator_loss(real, fake, "wgan")


def test_generator_loss():
    assert generator_loss(_logits(FAKE)).item() == pytest.approx(-sum(FAKE) / 4)
    assert generator_loss(_logits(FAKE).to(torch.bfloat16)).dtype == torch.float32


# ---- adaptive weight ---------------------------------------------------------------------------

class TinyDecoder(nn.Module):
    """y = W z with W (3, 2): the 'last layer'."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.0, 3.0]]))
        self.pre = nn.Parameter(torch.tensor([1.0, -2.0]))  # upstream parameter (encoder stand-in)

    def forward(self):
        z = self.pre * 1.5
        return self.W @ z, z


def _losses(dec, t, a, s=1.0):
    y, z = dec()
    nll = s * ((y - t) ** 2).sum()  # grad_W = 2 s (y - t) z^T
    g = -(a * y).mean()  # grad_W = -(a z^T) / 3
    return nll, g, y.detach(), z.detach()


def _fro(m):
    return math.sqrt(sum(v * v for row in m for v in row))


def test_adaptive_weight_against_hand_gradients():
    dec = TinyDecoder()
    t = torch.tensor([0.5, 1.0, -1.0])
    a = torch.tensor([0.3, -0.2, 0.1])
    nll, g, y, z = _losses(dec, t, a)
    n_nll = _fro([[2 * (y[i] - t[i]).item() * z[j].item() for j in range(2)] for i in range(3)])
    n_g = _fro([[-a[i].item() * z[j].item() / 3 for j in range(2)] for i in range(3)])
    expected = n_nll / (n_g + 1e-4) * 0.5
    w = adaptive_generator_weight(nll, g, dec.W, disc_weight=0.5)
    assert w.dim() == 0 and not w.requires_grad
    assert w.item() == pytest.approx(expected, rel=1e-5)
    # no gradient accumulated anywhere, and the graph is still usable afterwards
    assert all(p.grad is None for p in dec.parameters())
    (nll + w * g).backward()
    expected_grad = 2 * torch.outer(y - t, z) - w * torch.outer(a, z) / 3
    torch.testing.assert_close(dec.W.grad, expected_grad)  # exactly one backward's worth
    assert dec.pre.grad is not None


def test_adaptive_weight_epsilon_and_clamp():
    dec = TinyDecoder()
    t = torch.tensor([0.5, 1.0, -1.0])
    # generator gradient with norm exactly 1e-4: weight = n_nll / 2e-4 * disc_weight
    _, z = dec()
    z_norm = torch.linalg.vector_norm(z.detach()).item()
    a = torch.tensor([1.0, 0.0, 0.0]) * (3 * 1e-4 / z_norm)  # |grad_W g| = |a| |z| / 3 = 1e-4
    nll, g, y, z = _losses(dec, t, a, s=1e-5)
    n_nll = _fro([[2e-5 * (y[i] - t[i]).item() * z[j].item() for j in range(2)] for i in range(3)])
    assert n_nll / 2e-4 < 1e4  # stays below the clamp
    w = adaptive_generator_weight(nll, g, dec.W, disc_weight=1.0)
    assert w.item() == pytest.approx(n_nll / 2e-4, rel=1e-3)
    # zero generator gradient: ratio n_nll / 1e-4 > 1e4 is clamped to 1e4, times disc_weight
    nll, g, y, z = _losses(dec, t, torch.zeros(3))
    n_nll = _fro([[2 * (y[i] - t[i]).item() * z[j].item() for j in range(2)] for i in range(3)])
    assert n_nll / 1e-4 > 1e4
    assert adaptive_generator_weight(nll, g, dec.W, disc_weight=0.5).item() == pytest.approx(0.5e4)
    assert all(p.grad is None for p in dec.parameters())


def test_adaptive_weight_matches_independent_backward():
    torch.manual_seed(0)
    last = nn.Conv2d(4, 3, 3, padding=1)
    h = torch.randn(2, 4, 5, 5)
    r = torch.randn(2, 3, 5, 5)

    def nll_of():
        return last(h).abs().sum()

    def g_of():
        return -(last(h) * r).mean()

    w = adaptive_generator_weight(nll_of(), g_of(), last.weight, disc_weight=0.5)
    assert last.weight.grad is None and last.bias.grad is None
    # independent: ordinary backward into .grad, one loss and one fresh graph at a time
    nll_of().backward()
    n_nll = last.weight.grad.norm().item()
    last.weight.grad = None
    g_of().backward()
    n_g = last.weight.grad.norm().item()
    assert w.item() == pytest.approx(n_nll / (n_g + 1e-4) * 0.5, rel=1e-5)


# ---- disc factor -------------------------------------------------------------------------------

def test_disc_factor_at_boundaries():
    assert disc_factor_at(0, 50001) == 0.0
    assert disc_factor_at(50000, 50001) == 0.0
    assert disc_factor_at(50001, 50001) == 1.0
    assert disc_factor_at(10**6, 50001, factor=0.5) == 0.5
    assert disc_factor_at(0, 0) == 1.0


def test_a_term_marked_via_reconstruction_must_depend_on_it():
    from kl_ae.losses import Term, reconstruction_grads

    reconstruction = torch.zeros(1, 3, 2, 2, requires_grad=True)
    other = torch.ones(1, requires_grad=True)
    terms = {"wrong": Term((other * 2).sum(), via_reconstruction=True)}
    with pytest.raises(ValueError, match="'wrong' is marked via_reconstruction"):
        reconstruction_grads(terms, reconstruction, torch.zeros(()))
