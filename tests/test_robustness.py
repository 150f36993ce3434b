"""Non-finite losses: skipped, counted and logged; persistent ones stop the run with the last good checkpoint intact."""

import pytest
import torch
from safetensors.torch import load_file

from kl_ae import losses
from kl_ae.config import load_config
from kl_ae.monitor import TrainingDiverged
from kl_ae.trainer import train
import helpers


@pytest.fixture()
def photos(tmp_path):
    return helpers.write_noise_photos(tmp_path, 4)


def config(photos, run_dir, steps, **extra):
    return load_config(None, helpers.tiny_train_overrides(photos, run_dir, steps, **extra))


def nan_kl_on_calls(monkeypatch, bad_calls):
    calls = {"n": 0}
    real = losses.kl_loss

    def kl(posterior):
        calls["n"] += 1
        value = real(posterior)
        return value * float("nan") if calls["n"] in bad_calls else value

    monkeypatch.setattr(losses, "kl_loss", kl)


def test_a_nan_step_is_skipped_counted_and_logged(photos, tmp_path, monkeypatch):
    nan_kl_on_calls(monkeypatch, {2})
    run_dir = tmp_path / "run"
    train(config(photos, run_dir, 3))
    step1 = load_file(str(run_dir / "checkpoints/step-0000001/model.safetensors"))
    step2 = load_file(str(run_dir / "checkpoints/step-0000002/model.safetensors"))
    step3 = load_file(str(run_dir / "checkpoints/step-0000003/model.safetensors"))
    assert all(torch.equal(step1[k], step2[k]) for k in step1)  # the NaN update was not applied
    assert any(not torch.equal(step2[k], step3[k]) for k in step2)  # training went on
    assert all(torch.isfinite(v).all() for v in step3.values())
    log = (run_dir / "train.log").read_text()
    assert "step 2: non-finite loss or gradient in the autoencoder; update skipped" in log
    step3_line = next(line for line in log.splitlines() if "INFO kl_ae: step 3 " in line)
    assert "optim/nonfinite_ae_steps=1 " in step3_line


def test_persistent_nans_stop_with_the_last_good_checkpoint(photos, tmp_path, monkeypatch):
    nan_kl_on_calls(monkeypatch, set(range(3, 100)))
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="2 consecutive steps"):
        train(config(photos, run_dir, 10, **{"train.max_nonfinite_steps": 2}))
    # step 3 skipped its update (a good state, saved); step 4 was the second bad one: not saved
    assert (run_dir / "checkpoints/latest").read_text().strip() == "step-0000003"
    assert not (run_dir / "checkpoints/step-0000004").exists()
    good = load_file(str(run_dir / "checkpoints/step-0000003/model.safetensors"))
    assert all(torch.isfinite(v).all() for v in good.values())
    assert not (run_dir / "export").exists()


def test_unusable_training_images_are_skipped_and_counted_by_reason(photos, tmp_path):
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "text.png").write_text("not an image")
    run_dir = tmp_path / "run"
    train(config(photos, run_dir, 3))  # 6 files, batch 2: the first epoch draws every file
    log = (run_dir / "train.log").read_text()
    assert "training data, counted over all epochs: skipped" in log
    assert "empty_file=" in log and "not_an_image=" in log


@pytest.mark.parametrize("resolution,warned", [(32, False), (64, True)])
def test_crops_from_upscaled_images_are_counted_and_warned_about(photos, tmp_path, resolution, warned):
    """The photos are 40 x 40 px: 64-px crops need every one upscaled."""
    run_dir = tmp_path / "run"
    train(config(photos, run_dir, 2, **{"data.resolution": resolution}))
    log = (run_dir / "train.log").read_text()
    assert f"{4 if warned else 0} of 4 crops came from images upscaled" in log
    assert ("WARNING kl_ae: 4 of 4 training crops (100%) came from images smaller than the 64-px crop"
            in log) == warned


def test_no_usable_training_image_is_one_clear_error(tmp_path, capsys):
    from kl_ae.cli import main

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"")
    (bad / "b.png").write_text("text")
    code = main(["train", "--set", f"data.train={bad}", "--set", f"train.output_dir={tmp_path / 'run'}",
                 "--set", "model.block_out_channels=[8,16]", "--set", "model.norm_num_groups=8",
                 "--set", "data.resolution=32", "--set", "data.num_workers=0", "--set", "loss.perceptual_weight=0",
                 "--set", "train.mixed_precision=no"])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kl-ae train: error:")]
    assert len(errors) == 1 and "no usable training image" in errors[0]
    assert "empty_file" in errors[0] and "not_an_image" in errors[0]  # why each image was skipped
    assert not (tmp_path / "run" / "checkpoints").exists()
