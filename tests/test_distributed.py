"""Two-process DDP on CPU (gloo) through ``accelerate launch``: the documented multi-GPU path."""

import json
import os
import subprocess
import sys

import pytest

from kl_ae.data.shards import pack_shards
import helpers


@pytest.mark.slow
@pytest.mark.parametrize("source", ["folder", "shards"])
def test_two_process_training_runs_and_writes_once(tmp_path, source):
    photos = helpers.write_noise_photos(tmp_path / "photos", 8)
    data = str(photos)
    if source == "shards":
        data = pack_shards(photos, tmp_path / "shards", max_count=2)["pattern"]  # 4 shards, 2 per rank
    run_dir = tmp_path / "run"
    overrides = [
        "model.block_out_channels=[8,16]", "model.layers_per_block=1", "model.norm_num_groups=8",
        f"data.train={data}", "data.resolution=32", "data.num_workers=0", f"train.output_dir={run_dir}",
        "train.max_steps=3", "train.batch_size=2", "train.gradient_accumulation_steps=1",
        "train.checkpoint_every=2", "train.log_every=1", "train.mixed_precision=no", "train.scaling_images=4",
        "loss.disc_start=1", "loss.disc_channels=8", "loss.disc_num_layers=2", "loss.perceptual_weight=0",
        "train.tracker=none",
    ]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "kl_ae.cli", "train"]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "world size 2" in log
    assert "parameters identical on all 2 ranks" in log and "DIFFER" not in log
    # rank 0 alone writes the log and the checkpoints: each step is logged once, each save once
    assert log.count("INFO kl_ae: step 3 ") == 1
    assert log.count("saved checkpoint") == 2  # steps 2 and 3
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-0000002", "step-0000003"]
    assert (run_dir / "checkpoints/step-0000003/random_states_1.pkl").exists()  # both ranks saved RNG state
    config = json.loads((run_dir / "export/config.json").read_text())
    assert config["scaling_factor"] > 0
    # resume with two processes
    resumed = subprocess.run(cmd + ["--resume", "latest", "--set", "train.max_steps=5"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert (run_dir / "checkpoints/latest").read_text().strip() == "step-0000005"
