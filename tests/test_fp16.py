"""The fp16 safety audit (issue 15, point 3): passes a small VAE, flags one that overflows fp16."""

import json

import torch

from kl_ae.cli import main
from kl_ae.eval.fp16 import FP16_MAX, fp16_audit
import helpers


def test_the_audit_passes_a_small_vae_and_flags_an_overflowing_one(tmp_path, capsys):
    photos = helpers.write_noise_photos(tmp_path / "photos", 2, size=(32, 32))
    vae = helpers.tiny_vae(4)
    safe = fp16_audit(vae, str(photos), resolution=32)
    assert safe["fp16_safe"] and safe["fp16_finite"] and not safe["blocks_over_fp16_max"]
    assert 0 < safe["max_abs_activation"] < FP16_MAX and safe["psnr_fp16_vs_fp32"] > 30
    assert "decoder.up_blocks.0" in safe["max_abs_per_block"]
    with torch.no_grad():  # the decoder's first convolution now outputs values far above 65504
        vae.decoder.conv_in.weight.mul_(1e6)
        vae.decoder.conv_in.bias.add_(1e5)
    broken = fp16_audit(vae, str(photos), resolution=32)
    assert not broken["fp16_safe"] and "decoder.conv_in" in broken["blocks_over_fp16_max"]
    assert not broken["fp16_finite"] and broken["psnr_fp16_vs_fp32"] is None
    vae.save_pretrained(tmp_path / "vae")
    assert main(["eval", str(tmp_path / "vae"), str(photos), "--resolution", "32", "--fp16-audit",
                 "--lpips-trunk", "none", "--rfid-weights", "none", "--out", str(tmp_path / "m.json")]) == 0
    assert "NOT fp16-safe" in capsys.readouterr().out
    assert json.loads((tmp_path / "m.json").read_text())["fp16_audit"]["blocks_over_fp16_max"]


def test_the_audit_sees_the_residual_stream_not_only_the_leaf_outputs(tmp_path):
    """Two ResNet blocks each adding 30000 through conv2: every leaf output stays near 30000, but
    the stream the second block returns is near 60000, under fp16's 65504 with a headroom of ~1.1."""
    photos = helpers.write_noise_photos(tmp_path / "photos", 2, size=(32, 32))
    vae = helpers.tiny_vae(4)
    with torch.no_grad():
        for resnet in vae.decoder.up_blocks[-1].resnets:
            resnet.conv2.bias.fill_(30000.0)
    audit = fp16_audit(vae, str(photos), resolution=32)
    assert audit["max_abs_per_block"]["decoder.up_blocks.1"] > 59000
    assert audit["headroom"] < 1.15
