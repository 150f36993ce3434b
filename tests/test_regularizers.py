"""The 2025-2026 recipe terms (issue 14): formulas against hand computations, where their
gradients go, the VF teacher's loading, the diffusability report, and exact resume with all on."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from kl_ae import alignment, regularizers
from kl_ae.config import load_config
from kl_ae.eval.diffusability import high_frequency_energy
from kl_ae.parsing import ConfigError
from kl_ae.trainer import train
import helpers

TEACHER = "vit_small_patch14_dinov2"  # with a random init and 28-px inputs (2 x 2 patches): cheap


def test_eq_transforms_on_latent_and_image():
    z = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    x = torch.rand(1, 3, 32, 32)
    rot = regularizers.EqTransform("rot90", 1)
    assert torch.equal(rot.latent(z), torch.rot90(z, 1, dims=(-2, -1)))
    assert torch.equal(rot.image(x, 8), torch.rot90(x, 1, dims=(-2, -1)))
    half = regularizers.EqTransform("scale", 0.5)
    assert half.latent(z).shape == (1, 2, 2, 2) and half.image(x, 8).shape == (1, 3, 16, 16)
    # an antialiased (triangle-filter) downscale keeps a constant map and the mean of a ramp
    torch.testing.assert_close(half.latent(torch.full((1, 2, 4, 4), 3.0)), torch.full((1, 2, 2, 2), 3.0))
    torch.testing.assert_close(half.latent(z).mean(dim=(-2, -1)), z.mean(dim=(-2, -1)))
    three_q = regularizers.EqTransform("scale", 0.75)
    assert three_q.latent(z).shape[-1] == 3 and three_q.image(x, 8).shape[-1] == 24


def test_eq_draws_follow_the_probability_and_the_rng():
    torch.manual_seed(0)
    draws = [regularizers.draw_eq_transform(["scale", "rot90"], [0.5], 0.5) for _ in range(400)]
    applied = [d for d in draws if d is not None]
    assert 150 < len(applied) < 250 and {d.kind for d in applied} == {"scale", "rot90"}
    assert {d.value for d in applied if d.kind == "rot90"} == {1, 2, 3}
    torch.manual_seed(0)
    assert [regularizers.draw_eq_transform(["scale", "rot90"], [0.5], 0.5) for _ in range(400)] == draws
    assert regularizers.draw_eq_transform(["rot90"], [0.5], 0.0) is None


def test_equivariance_loss_is_the_pixel_loss_summed_per_image():
    target, rec = torch.rand(2, 3, 4, 4) * 2 - 1, torch.rand(2, 3, 4, 4) * 2 - 1
    d = target - rec
    expected = (0.5 * d.abs() + 2.0 * d * d).sum() / 2
    torch.testing.assert_close(regularizers.equivariance_loss(target, rec, 0.5, 2.0), expected)


def test_noisy_latent_is_relative_to_the_latent_std():
    torch.manual_seed(0)
    z = torch.randn(64, 4, 8, 8) * 5
    noisy, strength = regularizers.noisy_latent(z, 0.5)
    assert strength.shape == (64,) and 0 <= strength.min() and strength.max() <= 0.5
    per_image = ((noisy - z).flatten(1).std(dim=1) / z.std())
    torch.testing.assert_close(per_image, strength, atol=0.05, rtol=0.1)
    same, zero = regularizers.noisy_latent(z, 0.0)
    assert torch.equal(same, z) and not zero.any()


def test_r1_penalty_of_a_linear_discriminator():
    w = torch.randn(1, 3, 4, 4, requires_grad=True)  # D's parameter
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    logits = (x * w).sum(dim=(1, 2, 3))  # grad_x = w for every image
    penalty = regularizers.r1_penalty(logits, x, gamma=10.0)
    torch.testing.assert_close(penalty, 0.5 * 10.0 * w.detach().square().sum())
    penalty.backward()  # create_graph: D's parameter gets the penalty's gradient, 10 * w
    torch.testing.assert_close(w.grad, 10.0 * w.detach())


def test_lecam_loss_and_anchor_update():
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 0.0])
    a_real, a_fake = torch.tensor(0.5), torch.tensor(-0.5)
    expected = ((real + 0.5) ** 2).mean() + ((fake - 0.5) ** 2).mean()
    torch.testing.assert_close(regularizers.lecam_loss(real, fake, a_real, a_fake), expected)
    regularizers.update_anchor(a_real, real, 0.9)
    torch.testing.assert_close(a_real, torch.tensor(0.9 * 0.5 + 0.1 * 2.0))


def test_vf_loss_against_a_hand_computation():
    torch.manual_seed(0)
    proj, feats = torch.randn(2, 5, 2, 3), torch.randn(2, 5, 2, 3)
    m1, m2 = 0.1, 0.05
    cos_terms, dist_terms = [], []
    for b in range(2):
        z = [proj[b, :, i, j] for i in range(2) for j in range(3)]
        f = [feats[b, :, i, j] for i in range(2) for j in range(3)]
        for zi, fi in zip(z, f):
            cos_terms.append(max(0.0, 1 - m1 - F.cosine_similarity(zi, fi, dim=0).item()))
        for zi, fi in zip(z, f):
            for zj, fj in zip(z, f):
                gap = abs(F.cosine_similarity(zi, zj, dim=0).item() - F.cosine_similarity(fi, fj, dim=0).item())
                dist_terms.append(max(0.0, gap - m2))
    expected = sum(cos_terms) / len(cos_terms) + sum(dist_terms) / len(dist_terms)
    assert alignment.vf_loss(proj, feats, m1, m2).item() == pytest.approx(expected, rel=1e-5)
    # features at another size are resized to the latent's (bilinear): a 2x nearest upsampling of
    # feats comes back as feats, so the loss is the same
    assert alignment.vf_loss(proj, F.interpolate(feats, size=(4, 6)), m1, m2).item() == pytest.approx(expected, rel=1e-5)


def test_adaptive_vf_weight():
    assert alignment.adaptive_vf_weight(torch.full((4,), 3.0), torch.full((4,), 1.0)).item() == pytest.approx(
        6.0 / (2.0 + 1e-4))
    assert alignment.adaptive_vf_weight(torch.ones(4), torch.zeros(4)).item() == pytest.approx(1e4)


def test_the_teacher_loads_from_a_file_and_is_frozen(tmp_path):
    teacher, name = alignment.build_teacher(TEACHER, "random", 28)
    assert name == "vf_random_teacher" and teacher.dim == 384
    teacher.train()
    assert not teacher.training and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.parameters())
    features = teacher(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert features.shape == (2, 384, 2, 2) and not features.requires_grad
    file = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.model.state_dict().items()}, str(file))
    loaded, name = alignment.build_teacher(TEACHER, str(file), 28)
    assert name == "vf"
    torch.testing.assert_close(loaded(torch.zeros(1, 3, 28, 28)), teacher(torch.zeros(1, 3, 28, 28)))
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="does not hold"):
        alignment.build_teacher(TEACHER, str(tmp_path / "other.safetensors"), 28)
    with pytest.raises(ConfigError, match="multiple of"):
        alignment.build_teacher(TEACHER, "random", 30)


def test_a_missing_teacher_stops_before_anything_is_built(tmp_path):
    photos = helpers.write_noise_photos(tmp_path / "photos", 2)
    missing = tmp_path / "dinov2.safetensors"
    cfg = load_config(None, helpers.tiny_train_overrides(photos, tmp_path / "run", 1, **{
        "loss.vf_weight": 0.1, "loss.vf_teacher": missing}))
    with pytest.raises(ConfigError, match=f"{missing}.*no such file.*never downloads"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="loss.vf_teacher"):
        load_config(None, ["loss.vf_weight=0.1"])


def all_terms(photos, run_dir, steps, **extra):
    return helpers.tiny_train_overrides(photos, run_dir, steps, **{
        "loss.eq_weight": 0.5, "loss.eq_probability": 0.7, "loss.latent_noise": 0.3, "loss.vf_weight": 0.5,
        "loss.vf_teacher": "random", "loss.vf_teacher_resolution": 28, "loss.disc_start": 1,
        "loss.disc_channels": 8, "loss.disc_num_layers": 2, "loss.disc_r1_gamma": 1.0,
        "loss.disc_lecam_weight": 0.1, "train.checkpoint_every": 2, "train.ema_decay": 0.9,
        "data.resolution": 32, **extra})


@pytest.mark.slow
def test_every_term_is_logged_trained_and_resumed_bit_identically(tmp_path):
    photos = helpers.write_noise_photos(tmp_path / "photos", 5, size=(40, 48))
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(load_config(None, all_terms(photos, straight, 4)))
    log = (straight / "train.log").read_text()
    for key in ("loss/eq=", "loss/vf_random_teacher=", "loss/vf_adaptive_weight=", "latent/noise_strength=",
                "disc/r1=", "disc/lecam=", "alignment: vf_random_teacher"):
        assert key in log, key
    assert "loss/vf=" not in log  # a random teacher's figures never carry the real name
    ckpt = straight / "checkpoints/step-0000004"
    assert any(k.startswith("vf_projection.") for k in load_file(str(ckpt / "model.safetensors")))
    assert {"lecam_real", "lecam_fake"} <= set(load_file(str(ckpt / "model_1.safetensors")))
    exported = load_file(str(straight / "export/diffusion_pytorch_model.safetensors"))
    assert not any("vf_projection" in k for k in exported)  # the export is the AutoencoderKL alone

    train(load_config(None, all_terms(photos, split, 2)))
    train(load_config(None, all_terms(photos, split, 4)), resume="latest")
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):
        a, b = load_file(str(ckpt / name)), load_file(str(split / "checkpoints/step-0000004" / name))
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert a.keys() == b.keys() and not different, f"{name}: {different[:3]}"


def test_resuming_with_a_term_switched_on_is_refused(tmp_path):
    photos = helpers.write_noise_photos(tmp_path / "photos", 2)
    run_dir = tmp_path / "run"
    train(load_config(None, helpers.tiny_train_overrides(photos, run_dir, 1)))
    cfg = load_config(None, all_terms(photos, run_dir, 2))
    with pytest.raises(ConfigError, match=r"loss.vf_weight > 0: checkpoint False, this run True.*"
                                          r"loss.disc_lecam_weight > 0: checkpoint False, this run True"):
        train(cfg, resume="latest")


def test_the_step_sends_each_gradient_where_it_belongs():
    """EQ, latent noise and VF train the autoencoder (and the projection); nothing reaches the
    teacher; the discriminator's R1 and LeCam train D only."""
    from accelerate import Accelerator

    from kl_ae.config import LossConfig, ModelConfig
    from kl_ae.model import AutoencoderWrapper, build_autoencoder, build_discriminator
    from kl_ae.step import StepModels, autoencoder_step, discriminator_step

    torch.manual_seed(0)
    cfg = LossConfig(perceptual_weight=0, disc_start=0, disc_channels=8, disc_num_layers=2, eq_weight=1.0,
                     eq_probability=1.0, eq_transforms=["rot90"], latent_noise=0.5, vf_weight=1.0,
                     vf_teacher="random", vf_teacher_resolution=28, disc_r1_gamma=1.0, disc_lecam_weight=0.5)
    teacher, name = alignment.build_teacher(TEACHER, "random", 28)
    vae = build_autoencoder(ModelConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=8))
    ae = AutoencoderWrapper(vae, latent_noise=cfg.latent_noise, vf_dim=teacher.dim)
    disc = build_discriminator(cfg)
    opt_ae = torch.optim.Adam([p for p in ae.parameters() if p.requires_grad], lr=1e-3)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_ae, lambda s: 1.0)
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lambda s: 1.0)
    m = StepModels(ae, disc, opt_ae, opt_d, sched, sched_d, None, "lpips", teacher, name)
    acc = Accelerator(cpu=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    before = {n: p.detach().clone() for n, p in ae.named_parameters()}
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    d_before = [p.detach().clone() for p in disc.parameters()]
    rec, out = autoencoder_step(acc, m, x, step=0, cfg=cfg)
    assert out["loss/eq"] > 0 and math.isfinite(out["loss/vf_random_teacher"].item())
    changed = {n for n, p in ae.named_parameters() if not torch.equal(p, before[n])}
    assert {"vf_projection.weight", "vae.encoder.conv_out.weight", "vae.decoder.conv_out.weight"} <= changed
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(d_before, disc.parameters()))  # the generator side leaves D alone
    ae_after = [p.detach().clone() for p in ae.parameters()]
    d_out = discriminator_step(acc, m, x, rec, step=0, cfg=cfg)
    assert d_out["disc/r1"] > 0 and "disc/lecam" in d_out
    assert any(not torch.equal(a, b) for a, b in zip(d_before, disc.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ae_after, ae.parameters()))


def test_high_frequency_share_of_flat_and_checkerboard_signals():
    flat = torch.ones(1, 1, 8, 8)
    high, total = high_frequency_energy(flat + torch.zeros(1, 1, 8, 8))
    assert total == 0 and high == 0
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1  # Nyquist in both axes
    high, total = high_frequency_energy(checker.view(1, 1, 8, 8).float())
    assert high / total == pytest.approx(1.0)
    ramp = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(1, 1, 64, 64)  # smooth: mostly low frequency
    high, total = high_frequency_energy(ramp)
    assert high / total < 0.05


def test_eval_reports_diffusability(tmp_path):
    from PIL import Image

    from kl_ae.eval.evaluate import evaluate
    from kl_ae.eval.report import format_report

    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(flat / "red.png")  # no energy once its mean is removed
    report = evaluate(helpers.tiny_vae(4), str(flat), resolution=32, lpips_trunk=None, rfid_weights="none",
                      progress=False)
    assert report["diffusability"]["high_frequency_share_images"] is None
    assert "images n/a (flat)" in format_report(report)

    photos = helpers.write_noise_photos(tmp_path / "photos", 3, size=(32, 32))
    report = evaluate(helpers.tiny_vae(4), str(photos), resolution=32, lpips_trunk=None, rfid_weights="none",
                      progress=False)
    d = report["diffusability"]
    assert d["images"] == 3 and 0 < d["high_frequency_share_latent"] < 1
    assert d["equivariance_psnr_scale_0.5"] > 0 and d["equivariance_psnr_rot90_1"] > 0


def test_diffusability_report_of_an_exact_decode_is_json_safe():
    """A flat black image decoded exactly (the decode clamps to -1): infinite equivariance PSNR is
    written null with a count, as the reconstruction's PSNR is, and the report stays strict JSON."""
    import json
    from types import SimpleNamespace

    from kl_ae.eval.diffusability import DiffusabilityStats

    black = SimpleNamespace(decode=lambda z: SimpleNamespace(sample=torch.full((z.shape[0], 3, 8 * z.shape[-2],
                                                                                8 * z.shape[-1]), -1.0)))
    stats = DiffusabilityStats()
    stats.update(black, torch.full((2, 3, 32, 32), -1.0), torch.zeros(2, 4, 4, 4))
    report = stats.report()
    assert report["equivariance_psnr_scale_0.5"] is None and report["equivariance_psnr_scale_0.5_infinite"] == 2
    assert report["equivariance_psnr_rot90_1"] is None and report["equivariance_psnr_rot90_1_infinite"] == 2
    json.dumps(report, allow_nan=False)  # raises on inf


def test_eq_transforms_work_in_bf16():
    """Training runs under bf16 autocast: the latent reaches the transform in bf16."""
    z = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    out = regularizers.EqTransform("scale", 0.5).latent(z)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4, 4, 4)


def test_the_vf_term_with_a_frozen_encoder_stops_the_run_at_its_start():
    from kl_ae.config import load_config
    from kl_ae.config_checks import check_run_start
    from kl_ae.parsing import ConfigError

    cfg = load_config(None, ["loss.vf_weight=0.1", "loss.vf_teacher=random", "model.train_encoder=false",
                             "model.init_from=vae"])
    with pytest.raises(ConfigError, match="model.train_encoder=false freezes the encoder"):
        check_run_start(cfg)
