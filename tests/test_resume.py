"""Exact resume: N steps straight == N/2 steps + --resume latest + N/2 steps, bit for bit."""

import pytest
from safetensors.torch import load_file

from kl_ae.config import load_config
from kl_ae.data.shards import pack_shards
from kl_ae.trainer import train
import helpers


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    photos = helpers.write_noise_photos(root / "photos", 5, size=(40, 48))
    shards = pack_shards(photos, root / "shards", max_count=2)["pattern"]  # 3 shards
    return {"folder": (str(photos), 0), "shards": (shards, 2)}


def overrides(data, workers, run_dir, steps):
    return [
        "model.block_out_channels=[8,16]", "model.layers_per_block=1", "model.norm_num_groups=8",
        f"data.train={data}", "data.resolution=32", f"data.num_workers={workers}", "data.shuffle_buffer=3",
        f"train.output_dir={run_dir}", f"train.max_steps={steps}", "train.batch_size=2",
        "train.gradient_accumulation_steps=1", "train.checkpoint_every=3", "train.log_every=1",
        "train.mixed_precision=no", "train.scaling_images=3", "train.tracker=none", "train.ema_decay=0.9",
        "loss.perceptual_weight=0", "loss.disc_start=2", "loss.disc_channels=8", "loss.disc_num_layers=2",
        "optim.scale_lr=false", "optim.base_learning_rate=1e-3",
    ]


def phased(fraction):
    """A resolution schedule: 16-px crops of 2, then 32-px crops of 1 for the run's last ``fraction``."""
    return ["data.resolution=16", "data.final_resolution=32", f"data.final_fraction={fraction}"]


@pytest.mark.slow
@pytest.mark.parametrize("source,schedule", [("folder", False), ("shards", False), ("folder", True),
                                             ("shards", True)])
def test_split_run_is_bit_identical(sources, source, schedule, tmp_path):
    data, workers = sources[source]
    straight, split = tmp_path / "straight", tmp_path / "split"
    if schedule:  # both switch after step 3 (3/6 >= 0.5, 3/4 >= 0.75); the split one resumes in the final phase
        train(load_config(None, overrides(data, workers, straight, 6) + phased(0.5)))
        train(load_config(None, overrides(data, workers, split, 4) + phased(0.25)))
        train(load_config(None, overrides(data, workers, split, 6) + phased(0.5)), resume="latest")
        assert '"phase": 1' in (split / "checkpoints/step-0000004/loop_state.json").read_text()
    else:
        train(load_config(None, overrides(data, workers, straight, 6)))
        train(load_config(None, overrides(data, workers, split, 3)))  # stops mid-epoch, discriminator active
        train(load_config(None, overrides(data, workers, split, 6)), resume="latest")
    assert "resumed from" in (split / "train.log").read_text()
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):  # AE, D, EMA
        a = load_file(str(straight / "checkpoints/step-0000006" / name))
        b = load_file(str(split / "checkpoints/step-0000006" / name))
        assert a.keys() == b.keys()
        different = [k for k in a if not (a[k] == b[k]).all()]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"
    export = "export/diffusion_pytorch_model.safetensors"
    assert (straight / export).read_bytes() == (split / export).read_bytes()
