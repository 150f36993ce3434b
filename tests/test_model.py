import pytest
import torch
from accelerate import Accelerator

from kl_ae.config import LossConfig, ModelConfig
from kl_ae.model import AutoencoderWrapper, build_autoencoder, build_discriminator
from kl_ae.step import StepModels, autoencoder_step, discriminator_step

TINY = ModelConfig(block_out_channels=[8, 16], layers_per_block=1, latent_channels=4, norm_num_groups=8)


def tiny_models(disc_start=0, learn_logvar=False):
    torch.manual_seed(0)
    loss_cfg = LossConfig(disc_start=disc_start, disc_channels=8, disc_num_layers=2, perceptual_weight=0.0,
                          learn_logvar=learn_logvar)
    ae = AutoencoderWrapper(build_autoencoder(TINY), learn_logvar=learn_logvar)
    disc = build_discriminator(loss_cfg)
    opt_ae = torch.optim.Adam([p for p in ae.parameters() if p.requires_grad], lr=1e-3, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt_ae, lambda s: 1.0)
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lambda s: 1.0)
    return StepModels(ae, disc, opt_ae, opt_d, sched, sched_d, None, "lpips"), loss_cfg


def test_wrapper_samples_the_posterior():
    m, _ = tiny_models()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    first = m.autoencoder(x)
    rec1, posterior = first.reconstruction, first.posterior
    rec2 = m.autoencoder(x).reconstruction
    assert rec1.shape == x.shape
    assert posterior.mean.shape == (2, 4, 16, 16)
    assert not torch.equal(rec1, rec2)  # z ~ q(z|x), not the mode
    assert m.autoencoder.last_layer is m.autoencoder.vae.decoder.conv_out.weight


def _params_snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def test_autoencoder_step_leaves_no_gradient_on_discriminator():
    m, cfg = tiny_models(disc_start=0)
    acc = Accelerator(cpu=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    before = _params_snapshot(m.autoencoder.vae)
    rec, out = autoencoder_step(acc, m, x, step=0, cfg=cfg)
    assert "loss/g" in out and "disc/adaptive_weight" in out  # the GAN term was active
    assert all(p.grad is None for p in m.discriminator.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, m.autoencoder.vae.parameters()))
    assert not rec.requires_grad


def test_discriminator_step_leaves_no_gradient_on_autoencoder():
    m, cfg = tiny_models(disc_start=0)
    acc = Accelerator(cpu=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rec = m.autoencoder(x).reconstruction  # NOT detached: the step itself must detach it
    before = _params_snapshot(m.discriminator)
    out = discriminator_step(acc, m, x, rec, step=0, cfg=cfg)
    assert {"disc/loss", "disc/logits_real", "disc/logits_fake", "optim/disc_grad_norm",
            "optim/disc_fp16_overflow"} == set(out)
    assert out["optim/disc_fp16_overflow"].item() == 0.0  # no GradScaler, so never a scaler overflow
    assert all(p.grad is None for p in m.autoencoder.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, m.discriminator.parameters()))


def test_no_adversarial_terms_before_disc_start():
    m, cfg = tiny_models(disc_start=10)
    acc = Accelerator(cpu=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    before = _params_snapshot(m.discriminator)
    rec, out = autoencoder_step(acc, m, x, step=9, cfg=cfg)
    assert "loss/g" not in out
    assert discriminator_step(acc, m, x, rec, step=9, cfg=cfg) == {}
    assert all(torch.equal(a, b) for a, b in zip(before, m.discriminator.parameters()))


@pytest.mark.parametrize("learn", [False, True])
def test_logvar_is_trained_only_when_asked(learn):
    m, cfg = tiny_models(disc_start=100, learn_logvar=learn)
    acc = Accelerator(cpu=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    autoencoder_step(acc, m, x, step=0, cfg=cfg)
    changed = m.autoencoder.logvar.item() != 0.0
    assert changed == learn


class _Perceptual(torch.nn.Module):
    """A frozen, differentiable stand-in for LPIPS: (B, 1, 1, 1) feature distance."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3).requires_grad_(False)

    def forward(self, x, y):
        return ((self.conv(x) - self.conv(y)) ** 2).mean(dim=(1, 2, 3), keepdim=True)


@pytest.mark.parametrize("learn_logvar,l1_weight,l2_weight,ramp", [
    (False, 1.0, 0.0, 0), (True, 1.0, 0.0, 0),
    (False, 0.5, 2.0, 4),  # L1 + L2 pixel loss; GAN ramp: factor (1 - 0 + 1) / 4 = 0.5 at step 1
])
def test_step_gradients_equal_backward_of_the_full_loss(learn_logvar, l1_weight, l2_weight, ramp):
    """The step backpropagates LPIPS and D once (gradients w.r.t. the reconstruction, chained to
    the last layer for the adaptive weight); the result must be backward() of the LDM loss."""
    import copy

    from kl_ae import losses

    m, cfg = tiny_models(disc_start=0, learn_logvar=learn_logvar)
    cfg.kl_weight, cfg.perceptual_weight = 0.5, 1.0  # large enough that every term shows
    cfg.l1_weight, cfg.l2_weight, cfg.disc_ramp_steps = l1_weight, l2_weight, ramp
    step = 1 if ramp else 0
    factor = 0.5 if ramp else 1.0
    m.perceptual = _Perceptual()
    with torch.no_grad():
        m.autoencoder.logvar.fill_(0.3)
    ref = copy.deepcopy(m.autoencoder)
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    torch.manual_seed(1)
    forward = ref(x)
    rec, posterior = forward.reconstruction.float(), forward.posterior
    pixel = l1_weight * (x - rec).abs() + l2_weight * (x - rec) ** 2  # written out, not the library's
    nll = losses.nll_loss(pixel + m.perceptual(x, rec), ref.logvar)
    disc = m.discriminator.discriminator.requires_grad_(False)
    g_loss = losses.generator_loss(disc(rec))
    disc.requires_grad_(True)
    d_weight = losses.adaptive_generator_weight(nll, g_loss, ref.last_layer, cfg.disc_weight)
    (nll + cfg.kl_weight * losses.kl_loss(posterior) + factor * d_weight * g_loss).backward()
    expected = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}

    params = dict((n, p) for n, p in m.autoencoder.named_parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in params.items()}
    m.opt_ae = torch.optim.SGD(params.values(), lr=1.0)  # update = -gradient
    m.sched_ae = torch.optim.lr_scheduler.LambdaLR(m.opt_ae, lambda s: 1.0)
    torch.manual_seed(1)
    _, out = autoencoder_step(Accelerator(cpu=True), m, x, step=step, cfg=cfg)
    assert out["disc/adaptive_weight"].item() == pytest.approx(d_weight.item(), rel=1e-4)
    assert out["disc/factor"].item() == factor
    assert ("logvar" in expected) == learn_logvar
    # float32 summation orders differ: tolerance relative to the largest gradient (some biases
    # before a GroupNorm have a true gradient of 0 and carry only rounding noise)
    scale = max(g.abs().max().item() for g in expected.values())
    for n, p in params.items():
        torch.testing.assert_close(before[n] - p.detach(), expected[n], rtol=1e-3, atol=1e-4 * scale,
                                   msg=lambda s, n=n: f"{n}: {s}")


@pytest.mark.parametrize("via_reconstruction", [False, True])
def test_a_new_loss_term_is_logged_and_trained_after_disc_start(monkeypatch, via_reconstruction):
    """A term added to losses.autoencoder_terms reaches the autoencoder's gradient with the GAN
    on (the step backpropagates a surrogate there, not the logged total): the update with the
    term minus the update without it is the term's own gradient."""
    from kl_ae import losses

    original = losses.autoencoder_terms

    def with_dummy(x, reconstruction, posterior, *args, **kwargs):
        terms, parts = original(x, reconstruction, posterior, *args, **kwargs)
        value = (reconstruction.square().mean() if via_reconstruction else posterior.mean.square().mean())
        terms["dummy"] = losses.Term(value, weight=30.0, via_reconstruction=via_reconstruction)
        return terms, parts

    x = torch.rand(2, 3, 32, 32) * 2 - 1

    def sgd_update(add_dummy):
        m, cfg = tiny_models(disc_start=0)
        params = {n: p for n, p in m.autoencoder.named_parameters() if p.requires_grad}
        before = {n: p.detach().clone() for n, p in params.items()}
        m.opt_ae = torch.optim.SGD(params.values(), lr=1.0)  # update = -gradient
        m.sched_ae = torch.optim.lr_scheduler.LambdaLR(m.opt_ae, lambda s: 1.0)
        with monkeypatch.context() as patch:
            if add_dummy:
                patch.setattr(losses, "autoencoder_terms", with_dummy)
            torch.manual_seed(1)
            _, out = autoencoder_step(Accelerator(cpu=True), m, x, step=0, cfg=cfg)
        assert "loss/g" in out  # the GAN term was on
        return {n: before[n] - p.detach() for n, p in params.items()}, out

    plain, _ = sgd_update(False)
    with_term, out = sgd_update(True)
    assert "loss/dummy" in out
    # the dummy term's own gradient, by plain autograd on the same sampled forward pass
    m, _ = tiny_models(disc_start=0)
    torch.manual_seed(1)
    forward = m.autoencoder(x)
    rec, posterior = forward.reconstruction, forward.posterior
    value = rec.float().square().mean() if via_reconstruction else posterior.mean.float().square().mean()
    assert out["loss/dummy"].item() == pytest.approx(value.item(), rel=1e-5)
    (30.0 * value).backward()
    expected = {n: p.grad for n, p in m.autoencoder.named_parameters() if p.requires_grad}
    scale = max(g.abs().max().item() for g in expected.values() if g is not None)
    assert scale > 0
    for n, delta in with_term.items():
        want = expected[n] if expected[n] is not None else torch.zeros_like(delta)
        torch.testing.assert_close(delta - plain[n], want, rtol=1e-3, atol=1e-4 * scale,
                                   msg=lambda s, n=n: f"{n}: {s}")
