"""FSDP2 through ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` with 2 CPU processes.

Accelerate runs DDP instead of FSDP on CPU, so the launch goes through tests/fsdp_cpu_train.py,
which switches the Accelerator to FSDP (see its docstring); everything else is the shipped config
and the normal training loop: discriminator on, sharded checkpoints, resume, EMA, export.
"""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from diffusers import AutoencoderKL

import helpers
from kl_ae.config import Config
from kl_ae.parsing import ConfigError
from kl_ae.distributed import check_distributed
from kl_ae.model import autoencoder_from_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind, fsdp2", [(DistributedType.DEEPSPEED, False), (DistributedType.FSDP, False),
                                          (DistributedType.MEGATRON_LM, False)])
def test_unsupported_distributed_types_fail_early_naming_what_is_supported(kind, fsdp2):
    with pytest.raises(ConfigError, match="supported: one process, DDP"):
        check_distributed(SimpleNamespace(distributed_type=kind, is_fsdp2=fsdp2), Config())


def test_learned_logvar_is_refused_under_fsdp2():
    cfg = Config()
    cfg.loss.learn_logvar = True
    with pytest.raises(ConfigError, match="learn_logvar"):
        check_distributed(SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True), cfg)


@pytest.mark.slow
def test_fsdp2_two_processes_train_checkpoint_resume_export(tmp_path):
    photos = helpers.write_noise_photos(tmp_path / "photos", 8)
    run_dir = tmp_path / "run"
    overrides = [
        "model.block_out_channels=[8,16]", "model.layers_per_block=1", "model.norm_num_groups=8",
        f"data.train={photos}", "data.resolution=32", "data.num_workers=0", f"train.output_dir={run_dir}",
        "train.max_steps=3", "train.batch_size=2", "train.checkpoint_every=2", "train.log_every=1",
        "train.mixed_precision=no", "train.scaling_images=4", "train.tracker=none",
        "loss.disc_start=1", "loss.disc_channels=8", "loss.disc_num_layers=2", "loss.perceptual_weight=0",
    ]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs/accelerate/fsdp.yaml"), "--num_processes", "2",
           str(REPO / "tests/fsdp_cpu_train.py"), "train"]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "world size 2" in log and "disc/adaptive_weight" in log
    assert "sharded by FSDP2 across 2 ranks" in log
    step3 = run_dir / "checkpoints/step-0000003"
    assert (step3 / "pytorch_model_fsdp_0").is_dir() and not (step3 / "model.safetensors").exists()  # FSDP ran
    assert (step3 / "ema.safetensors").is_file()

    resumed = subprocess.run(cmd + ["--resume", "latest", "--set", "train.max_steps=4"], env=env,
                             capture_output=True, text=True, timeout=300, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert (run_dir / "checkpoints/latest").read_text().strip() == "step-0000004"

    exported = AutoencoderKL.from_pretrained(run_dir / "export")
    assert exported.config.scaling_factor > 0
    # the sharded checkpoint read back in one process: its EMA weights are the exported ones
    from_ckpt, _, state = autoencoder_from_checkpoint(run_dir / "checkpoints/step-0000004")
    assert state["ema"]
    ref = from_ckpt.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in exported.state_dict().items())
