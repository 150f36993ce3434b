"""The fp16-fix fine-tune (issue 15, point 4): exact stream rescaling, the activation penalty, and a
short fine-tune that turns an fp16-overflowing VAE into one the audit passes, with its outputs
and latent factors kept."""

import json

import pytest
import torch
from diffusers import AutoencoderKL

from kl_ae.config import load_config
from kl_ae.eval.fp16 import FP16_AUDIT, FP16_MAX, first_images, fp16_audit
from kl_ae.eval.metrics import psnr_8bit
from kl_ae.fp16_fix import ActivationPenalty, rescale_for_fp16, rescale_stream
from kl_ae.hub import prepare_hub_folder
from kl_ae.parsing import ConfigError
from kl_ae.trainer import train
import helpers


def _reconstruct(vae, x):
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        return posterior.mean, vae.decode(posterior.mode()).sample


def test_stream_rescaling_keeps_the_outputs_and_scales_the_peaks():
    vae = helpers.tiny_vae(4).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, image = _reconstruct(vae, x)
    with torch.no_grad():
        peak = vae.decoder.mid_block(vae.decoder.conv_in(vae.post_quant_conv(mean))).abs().max()
    rescale_stream(vae.decoder, 1e3)
    rescale_stream(vae.encoder, 10.0)  # up: scaling unit-size streams down would meet GroupNorm's eps
    mean_after, image_after = _reconstruct(vae, x)
    # equal up to GroupNorm's eps (1e-6 against the variance): far below one 8-bit level (2/255)
    torch.testing.assert_close(mean_after, mean, rtol=0, atol=1e-4)
    torch.testing.assert_close(image_after, image, rtol=0, atol=1e-4)
    with torch.no_grad():
        peak_after = vae.decoder.mid_block(vae.decoder.conv_in(vae.post_quant_conv(mean))).abs().max()
    assert float(peak_after) == pytest.approx(1e3 * float(peak), rel=1e-4)
    with pytest.raises(ValueError, match="positive"):
        rescale_stream(vae.decoder, 0.0)


def test_rescale_for_fp16_brings_every_stream_under_the_limit_and_nothing_up():
    vae = helpers.tiny_vae(4).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    _, image = _reconstruct(vae, x)
    rescale_stream(vae.decoder, 1e6)  # same function, decoder stream far above fp16's range
    with torch.no_grad():
        conv1 = vae.encoder.down_blocks[0].resnets[0].conv1  # feeds norm2 only: exact too
        conv1.weight.mul_(1e6)
        conv1.bias.mul_(1e6)
    _, image_big = _reconstruct(vae, x)
    factors = rescale_for_fp16(vae, x, limit=1000.0)
    assert factors["encoder"] == 1.0 and factors["decoder"] < 1e-3  # the encoder stream was within it
    assert factors["encoder.conv1.0"] < 1e-3 and "encoder.conv1.1" not in factors
    _, image_fixed = _reconstruct(vae, x)
    torch.testing.assert_close(image_fixed, image_big, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(image_fixed, image, rtol=1e-3, atol=1e-4)


def test_activation_penalty_formula_and_collection():
    net = torch.nn.Sequential(torch.nn.Identity())
    penalty = ActivationPenalty(net, limit=2.0)
    a = torch.tensor([1.0, 3.0, -4.0, 2.0], requires_grad=True)
    net(a)  # not collecting: nothing recorded
    assert float(penalty.penalty()) == 0.0 and penalty.max_activation == 0.0
    with penalty.collecting():
        net(a)
    # relu(|a| / 2 - 1)^2 = [0, 0.25, 1, 0], mean 0.3125 (the root module is not hooked: counted once)
    value = penalty.penalty()
    assert value.item() == pytest.approx(0.3125)
    assert penalty.max_activation == 4.0
    assert penalty.penalty().item() == 0.0  # handed over: the penalty holds no graph afterwards
    value.backward()
    assert a.grad[0] == 0 and a.grad[1] > 0 and a.grad[2] < 0  # pushes |a| down where above the limit
    with pytest.raises(ValueError, match="limit"):
        ActivationPenalty(net, limit=1e6)


def test_activation_penalty_gradient_lowers_the_activations():
    vae = helpers.tiny_vae(4)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    penalty = ActivationPenalty(vae, limit=FP16_MAX)

    def measure():
        with penalty.collecting():
            vae.decode(vae.encode(x).latent_dist.mode())
        return penalty.penalty()

    measure()
    penalty.limit = penalty.max_activation / 4  # a quarter of the largest activation: well exceeded
    opt = torch.optim.SGD(vae.parameters(), lr=0.05)
    first = measure().item()
    assert first > 0
    for _ in range(8):
        opt.zero_grad()
        measure().backward()
        opt.step()
    assert measure().item() < 0.7 * first  # 0.53 -> 0.29 after 5 steps when written
    penalty.remove()


def test_fp16_fix_needs_init_from():
    with pytest.raises(ConfigError, match="fp16_fix needs model.init_from"):
        load_config(None, ["loss.fp16_fix=true"])
    with pytest.raises(ConfigError, match="fp16_fix_activation_limit"):
        load_config(None, ["loss.fp16_fix=true", "model.init_from=x", "loss.fp16_fix_activation_limit=1e6"])


def test_fp16_fix_fine_tune_passes_the_audit_and_keeps_outputs_and_factors(tmp_path):
    photos = helpers.write_noise_photos(tmp_path / "photos", 4)
    vae = helpers.tiny_vae(4, scaling_factor=0.123, sample_size=32)
    rescale_stream(vae.decoder, 1e6)  # the same model, but its decoder overflows fp16
    vae.save_pretrained(tmp_path / "original")
    before = fp16_audit(vae, str(photos), resolution=32)
    assert not before["fp16_safe"] and before["max_abs_activation"] > FP16_MAX

    overrides = helpers.tiny_train_overrides(photos, tmp_path / "run", 6, **{
        "model.init_from": tmp_path / "original", "loss.fp16_fix": "true", "train.ema_decay": 0,
        "optim.base_learning_rate": 1e-4, "optim.scale_lr": "false"})
    train(load_config(None, overrides))

    fixed = AutoencoderKL.from_pretrained(tmp_path / "run/export")
    after = fp16_audit(fixed, str(photos), resolution=32)
    assert after["fp16_safe"] and after["max_abs_activation"] <= 4096 * 1.5
    x = first_images(str(photos), 32, 4)
    original = AutoencoderKL.from_pretrained(tmp_path / "original").eval()
    mean_o, image_o = _reconstruct(original, x)
    mean_f, image_f = _reconstruct(fixed.eval(), x)
    assert psnr_8bit(image_o.clamp(-1, 1), image_f.clamp(-1, 1)).mean() > 35  # the output is kept
    assert (mean_f - mean_o).abs().max() < 0.05 * mean_o.abs().max()  # and the latent space
    config = json.loads((tmp_path / "run/export/config.json").read_text())
    assert config["scaling_factor"] == 0.123  # the original's factors, not re-measured
    assert config["force_upcast"] is False  # it passed the audit: SDXL pipelines may keep it in fp16
    log = (tmp_path / "run/train.log").read_text()
    assert "fp16-fix: residual streams" in log and "loss/fp16_fix_latent" in log
    assert "loss/fp16_fix_activation" in log

    # the export's audit is written and the model card states it
    audit = json.loads((tmp_path / "run/export" / FP16_AUDIT).read_text())
    assert audit["fp16_safe"]
    card = (prepare_hub_folder(tmp_path / "run/export", tmp_path / "hub", "me/vae") / "README.md").read_text()
    assert "fp16-safe" in card and "torch_dtype=torch.float16" in card and "force_upcast: false" in card


def test_a_hooked_model_deep_copies_after_a_step_that_built_penalty_terms():
    """The audit and EMA copies deep-copy the model with its hooks: the penalty keeps no graph."""
    import copy

    vae = helpers.tiny_vae(4)
    penalty = ActivationPenalty(vae, limit=1e-3)  # every activation exceeds it
    with penalty.collecting():
        vae.decode(vae.encode(torch.rand(1, 3, 16, 16)).latent_dist.mode())
    penalty.penalty().backward()
    copied = copy.deepcopy(vae)
    assert copied is not vae and torch.equal(copied.decoder.conv_in.weight, vae.decoder.conv_in.weight)


def test_fp16_fix_refuses_gradient_checkpointing():
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        load_config(None, ["loss.fp16_fix=true", "model.init_from=x", "train.gradient_checkpointing=true"])
