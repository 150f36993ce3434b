"""End to end on a tiny model: train, checkpoint, resume, export, reload, evaluate."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from kl_ae.checkpoint import read_loop_state
from kl_ae.cli import main
from kl_ae.config import load_config
from kl_ae.eval.fp16 import FP16_AUDIT
from kl_ae.model import autoencoder_from_checkpoint
from kl_ae.trainer import scaled_learning_rate, train


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(6):
        h, w = (48, 64) if i % 2 else (40, 40)  # 40 px images are smaller than nothing: no upscaling at 32
        base = rng.integers(0, 255, size=(1, 1, 3))
        img = np.clip(base + rng.normal(0, 30, size=(h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"img{i}.{'png' if i % 3 else 'jpg'}")
    return root


def tiny_overrides(photos, run_dir, steps=4):
    return [
        "model.block_out_channels=[8,16]", "model.layers_per_block=1", "model.norm_num_groups=8",
        "model.mid_block_add_attention=false",
        f"data.train={photos}", f"data.val={photos}", "data.resolution=32", "data.val_resolution=32",
        "data.num_workers=0", f"train.output_dir={run_dir}", f"train.max_steps={steps}",
        "train.batch_size=2", "train.gradient_accumulation_steps=1", "train.checkpoint_every=2",
        "train.image_every=2", "train.log_every=1", "train.ema_decay=0.9", "train.scaling_images=4",
        "train.mixed_precision=no", "loss.disc_start=2", "loss.disc_channels=8", "loss.disc_num_layers=2",
        "loss.perceptual_weight=1.0", "loss.lpips_trunk=random", "optim.scale_lr=false",
        "optim.base_learning_rate=1e-3", "train.eval_every=2",
    ]


def test_lr_scaling_rule_matches_ldm():
    cfg = load_config(None, [])  # batch 12, accumulation 2, base 4.5e-6
    assert scaled_learning_rate(cfg, 1) == pytest.approx(1.08e-4)
    assert scaled_learning_rate(cfg, 4) == pytest.approx(4.32e-4)


@pytest.fixture(scope="module")
def trained_run(photos, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "run"
    cfg = load_config(None, tiny_overrides(photos, run_dir))
    train(cfg)
    return run_dir


def test_run_directory_describes_itself(trained_run):
    for name in ["config.yaml", "train.log", "checkpoints/latest", "checkpoints/step-0000002/loop_state.json",
                 "checkpoints/step-0000004/ema.safetensors", "samples/step-0000004.png",
                 "export/config.json", "export/diffusion_pytorch_model.safetensors", "eval.json"]:
        assert (trained_run / name).exists(), name
    assert (trained_run / "checkpoints/latest").read_text().strip() == "step-0000004"
    log = (trained_run / "train.log").read_text()
    assert "loss/lpips_random_trunk" in log and "loss/lpips=" not in log
    assert "disc/loss" in log  # the discriminator was active from step 2
    assert "step 2 val/psnr=" in log  # train.eval_every=2 (the final step is evaluated after the export)
    assert "perf/rss_mb=" in log
    assert list((trained_run / "logs").rglob("events.out.tfevents*"))
    report = json.loads((trained_run / "eval.json").read_text())
    assert report["num_images"] == 6 and np.isfinite(report["metrics"]["psnr"])


def test_export_reloads_with_same_reconstruction(trained_run):
    config = json.loads((trained_run / "export/config.json").read_text())
    assert config["scaling_factor"] > 0 and config["shift_factor"] is None
    exported = AutoencoderKL.from_pretrained(trained_run / "export").eval()
    trained, _, state = autoencoder_from_checkpoint(trained_run)  # EMA weights of the last checkpoint
    assert state["ema"] and state["step"] == 4
    trained.eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a = exported.decode(exported.encode(x).latent_dist.mode()).sample
        b = trained.decode(trained.encode(x).latent_dist.mode()).sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_export_command_and_force(trained_run, photos, tmp_path):
    out = tmp_path / "out"
    assert main(["export", str(trained_run), str(out)]) == 0
    vae = AutoencoderKL.from_pretrained(out)
    assert vae.config.scaling_factor > 0
    # the trainer's fp16 audit of these weights goes with the export (the model card states it)
    assert (out / FP16_AUDIT).read_text() == (trained_run / "export" / FP16_AUDIT).read_text()
    assert main(["export", str(trained_run), str(out)]) == 2  # non-empty: refused without --force
    (out / FP16_AUDIT).unlink()
    assert main(["export", str(trained_run), str(out), "--force", "--images", str(photos)]) == 0
    audit = json.loads((out / FP16_AUDIT).read_text())  # measured again, on the images given
    assert audit["images"] >= 1 and isinstance(audit["fp16_safe"], bool)


def test_eval_command_writes_psnr_ssim(trained_run, photos, tmp_path):
    out = tmp_path / "m.json"
    grid = tmp_path / "grid.png"
    assert main(["eval", str(trained_run / "export"), str(photos), "--out", str(out), "--resolution", "32",
                 "--grid", str(grid), "--grid-images", "3"]) == 0
    assert Image.open(grid).size == (2 + 3 * 34, 2 + 3 * 34)  # input | reconstruction | 5x difference, 3 rows
    report = json.loads(out.read_text())
    assert len(report["per_image"]) == 6
    assert {"psnr", "ssim"} <= set(report["metrics"])


def test_resume_continues_from_latest(trained_run, photos, tmp_path):
    run = tmp_path / "run"  # a copy: the module's other tests read the 4-step run
    shutil.copytree(trained_run, run)
    cfg = load_config(run / "config.yaml", ["train.max_steps=6", f"train.output_dir={run}"])
    train(cfg, resume="latest")
    assert (run / "checkpoints/latest").read_text().strip() == "step-0000006"
    state = json.loads((run / "checkpoints/step-0000006/loop_state.json").read_text())
    assert state["step"] == 6


def test_cli_reports_config_errors(capsys):
    assert main(["train", "--set", "train.max_stepz=3"]) == 2
    assert "train.max_stepz" in capsys.readouterr().err


def test_gradient_accumulation_steps_count_optimizer_steps(photos, tmp_path):
    run_dir = tmp_path / "acc"
    overrides = tiny_overrides(photos, run_dir, steps=2) + [
        "train.gradient_accumulation_steps=2", "train.checkpoint_every=100", "data.val=",
        "loss.perceptual_weight=0", "train.tracker=none", "train.eval_every=0"]
    train(load_config(None, overrides))
    assert (run_dir / "checkpoints/latest").read_text().strip() == "step-0000002"
    log = (run_dir / "train.log").read_text()
    assert "step 2 " in log and "step 3 " not in log
    assert not (run_dir / "eval.json").exists()
    # 6 photos at batch 2 are 3 batches an epoch: the second step takes epoch 0's last batch and
    # epoch 1's first. (A DataLoader pass per epoch made Accelerate sync at the epoch's end, and
    # the second step took one batch.)
    state = read_loop_state(run_dir / "checkpoints/step-0000002")
    assert state["images_seen"] == 2 * 2 * 2
    assert (state["epoch"], state["batches_in_epoch"]) == (1, 1)


def test_missing_data_or_lpips_weights_stop_at_start_up(tmp_path, monkeypatch, capsys):
    run = str(tmp_path / "run")
    assert main(["train", "--set", f"data.train={tmp_path / 'nowhere'}", "--set", f"train.output_dir={run}"]) == 2
    assert "nowhere" in capsys.readouterr().err
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    assert main(["train", "--set", "data.train=builtin:train", "--set", f"train.output_dir={run}",
                 "--set", "loss.perceptual_weight=1.0"]) == 2
    err = capsys.readouterr().err
    assert "vgg16-397923af.pth" in err and str(tmp_path / "empty_torch_home") in err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("verbose", [False, True])
def test_console_shows_the_bar_and_checkpoints_and_train_log_every_step(photos, tmp_path, verbose):
    """`kl-ae train` prints the progress bar and one line per checkpoint; the per-step figures
    (and Accelerate's per-file lines) go to train.log, and to the console only with --verbose."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    sets = [a for kv in tiny_overrides(photos, run_dir, steps=4) for a in ("--set", kv)]
    sets += ["--set", "loss.perceptual_weight=0", "--set", "train.eval_every=0"]
    cmd = [sys.executable, "-m", "kl_ae.cli", "train", *sets, *(["--verbose"] if verbose else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console, log = proc.stderr, (run_dir / "train.log").read_text()
    assert "step 4 " in log and "optim/lr=" in log  # every logged step's figures in the file
    assert "saved checkpoint" in console and "train: " in console  # checkpoint lines, tqdm's bar
    assert ("optim/lr=" in console) == verbose
    assert ("accelerate.checkpointing" in console) == verbose
    assert "accelerate.checkpointing" in log  # Accelerate's save lines are kept in the file


def test_training_over_an_existing_run_is_refused(trained_run):
    """Without --resume, a second run into the same directory would mix two runs' checkpoints."""
    from kl_ae.parsing import ConfigError

    before = sorted(p.name for p in (trained_run / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="already holds a run.*--resume latest"):
        train(load_config(trained_run / "config.yaml"))
    assert sorted(p.name for p in (trained_run / "checkpoints").iterdir()) == before
