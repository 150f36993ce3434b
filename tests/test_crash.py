"""SIGKILL at any moment, including in the middle of a checkpoint save, leaves a resumable run."""

import os
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from kl_ae.checkpoint import read_loop_state, resolve_checkpoint
import helpers


@pytest.mark.slow
def test_sigkill_then_resume_latest_every_time(tmp_path):
    photos = helpers.write_noise_photos(tmp_path / "photos", 4)
    run_dir = tmp_path / "run"
    overrides = [
        "model.block_out_channels=[8,16]", "model.layers_per_block=1", "model.norm_num_groups=8",
        f"data.train={photos}", "data.resolution=32", "data.num_workers=0", f"train.output_dir={run_dir}",
        "train.max_steps=40", "train.batch_size=2", "train.gradient_accumulation_steps=1",
        "train.checkpoint_every=1", "train.log_every=5", "train.mixed_precision=no", "train.scaling_images=2",
        "train.tracker=none", "loss.perceptual_weight=0", "loss.disc_start=3", "loss.disc_channels=8",
        "loss.disc_num_layers=2",
    ]
    cmd = [sys.executable, "-m", "kl_ae.cli", "train", "--resume", "latest"]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    latest = run_dir / "checkpoints" / "latest"
    steps_seen = []
    # Most of each step's wall time is the checkpoint save (every step), so these kills land
    # inside saves as well as between them.
    for delay in (0.0, 0.07, 0.15, 0.23, 0.31):
        before = read_loop_state(resolve_checkpoint("latest", run_dir))["step"] if latest.exists() else 0
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:  # wait for progress past `before`
            if latest.exists() and read_loop_state(resolve_checkpoint("latest", run_dir))["step"] > before:
                break
            time.sleep(0.01)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        ckpt = resolve_checkpoint("latest", run_dir)  # complete: loop_state.json written last
        state = read_loop_state(ckpt)
        assert load_file(str(ckpt / "model.safetensors")) and load_file(str(ckpt / "ema.safetensors"))
        assert state["step"] >= before
        steps_seen.append(state["step"])
    assert steps_seen[-1] > steps_seen[0]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_loop_state(resolve_checkpoint("latest", run_dir))["step"] == 40
    assert (run_dir / "export" / "config.json").exists()


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    from kl_ae.checkpoint import finalize_checkpoint, prune_checkpoints

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for step in (1, 2, 3, 4):
        tmp = ckpts / f".tmp-step-{step:07d}"
        tmp.mkdir()
        finalize_checkpoint(tmp, ckpts / f"step-{step:07d}", {"step": step, "epoch": 0})
    (ckpts / "step-0000005").mkdir()  # incomplete (no loop_state.json): never counted, left alone
    (ckpts / ".tmp-step-0000006").mkdir()  # an interrupted save
    deleted = prune_checkpoints(ckpts, keep_last=2)
    assert sorted(p.name for p in deleted) == [".tmp-step-0000006", "step-0000001", "step-0000002"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-0000003", "step-0000004", "step-0000005"]
    assert prune_checkpoints(ckpts, keep_last=0) == []
