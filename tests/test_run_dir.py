"""The run directory is never corrupted: each checkpoint carries its config, a resume with another
model is refused before anything is written, --overwrite moves an old run aside."""

import pytest
import torch
from diffusers import AutoencoderKL

from kl_ae.cli import main
from kl_ae.config import load_config
from kl_ae.model import autoencoder_from_checkpoint
from kl_ae.parsing import ConfigError
from kl_ae.trainer import train
import helpers


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step run (checkpoints step-1 and step-2) on 4 noise photos."""
    root = tmp_path_factory.mktemp("rundir")
    photos = helpers.write_noise_photos(root / "photos", 4)
    run_dir = root / "run"
    train(load_config(None, helpers.tiny_train_overrides(photos, run_dir, 2)))
    return photos, run_dir


def snapshot(run_dir):
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_each_checkpoint_stores_the_config_it_was_trained_with(run):
    _, run_dir = run
    for step in (1, 2):
        stored = load_config(run_dir / f"checkpoints/step-000000{step}/config.yaml")
        assert stored.model.block_out_channels == [8, 16] and stored.train.output_dir == str(run_dir)


def test_a_resume_with_another_model_is_refused_naming_the_keys_before_any_write(run):
    photos, run_dir = run
    before = snapshot(run_dir)
    cfg = load_config(None, helpers.tiny_train_overrides(photos, run_dir, 4, **{
        "model.latent_channels": 8, "loss.disc_channels": 16}))
    with pytest.raises(ConfigError) as err:
        train(cfg, resume="latest")
    message = str(err.value)
    assert "model.latent_channels: checkpoint 4, this run 8" in message
    assert "loss.disc_channels: checkpoint 64, this run 16" in message
    assert "model.layers_per_block" not in message  # only the keys that differ
    assert snapshot(run_dir) == before  # config.yaml, checkpoints and log untouched


def test_export_and_eval_read_the_checkpoints_config_not_the_run_directorys(run, tmp_path):
    """A run whose config.yaml was rewritten (or lost) still exports and evaluates."""
    photos, run_dir = run
    work = tmp_path / "copy"
    import shutil

    shutil.copytree(run_dir, work)
    (work / "config.yaml").write_text("model:\n  latent_channels: 16\n")  # another model
    vae, cfg, state = autoencoder_from_checkpoint(work)
    assert vae.config.latent_channels == 4 and cfg.model.block_out_channels == [8, 16] and state["step"] == 2
    assert main(["export", str(work), str(tmp_path / "export"), "--images", str(photos)]) == 0
    assert AutoencoderKL.from_pretrained(tmp_path / "export").config.latent_channels == 4
    (work / "config.yaml").unlink()
    assert main(["eval", str(work), str(photos), "--resolution", "32"]) == 0


def test_a_checkpoint_without_a_config_uses_the_run_directorys(run, tmp_path):
    """Checkpoints written before they carried config.yaml still load."""
    _, run_dir = run
    import shutil

    work = tmp_path / "old"
    shutil.copytree(run_dir, work)
    for file in (work / "checkpoints").glob("step-*/config.yaml"):
        file.unlink()
    vae, _, _ = autoencoder_from_checkpoint(work)
    reference, _, _ = autoencoder_from_checkpoint(run_dir)
    for (name, a), (_, b) in zip(vae.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_overwrite_moves_the_old_run_aside(run, tmp_path, capsys):
    photos, run_dir = run
    import shutil

    work = tmp_path / "run"
    shutil.copytree(run_dir, work)
    before = snapshot(work)
    overrides = helpers.tiny_train_overrides(photos, work, 1)
    assert main(["train", "--resume", "latest", "--overwrite"] + [a for o in overrides for a in ("--set", o)]) == 2
    assert "--resume continues the run in train.output_dir and --overwrite moves it aside" in capsys.readouterr().err
    assert main(["train", "--overwrite"] + [a for o in overrides for a in ("--set", o)]) == 0
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and snapshot(moved[0]) == before  # kept whole, not deleted
    assert (work / "checkpoints/latest").read_text().strip() == "step-0000001"
    assert not (work / "checkpoints/step-0000002").exists()  # the new run holds only its own


def test_a_wrong_data_val_is_refused_before_anything_is_written(tmp_path, capsys):
    photos = helpers.write_noise_photos(tmp_path / "photos", 2)
    overrides = helpers.tiny_train_overrides(photos, tmp_path / "run", 1, **{"data.val": tmp_path / "nope"})
    assert main(["train"] + [a for o in overrides for a in ("--set", o)]) == 2
    assert "data.val:" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_failing_evaluation_keeps_the_checkpoint_and_export_and_exits_4(tmp_path, monkeypatch, capsys):
    """The periodic evaluation's failure is a warning; the final one's is exit code 4 after the export."""
    from kl_ae.eval import evaluate

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(evaluate, "evaluate", broken)
    photos = helpers.write_noise_photos(tmp_path / "photos", 2)
    run_dir = tmp_path / "run"
    overrides = helpers.tiny_train_overrides(photos, run_dir, 2, **{"data.val": photos, "train.eval_every": 1})
    assert main(["train"] + [a for o in overrides for a in ("--set", o)]) == 4
    err = capsys.readouterr().err
    assert "evaluation at step 1 on data.val" in err and "training goes on" in err
    assert "evaluation failed: trained and exported" in err and "out of memory (simulated)" in err
    assert (run_dir / "checkpoints/latest").read_text().strip() == "step-0000002"
    assert AutoencoderKL.from_pretrained(run_dir / "export").config.latent_channels == 4
    assert not (run_dir / "eval.json").exists()
    assert "Traceback" in (run_dir / "train.log").read_text()


def test_export_runs_nothing_from_a_received_config_and_is_deterministic(run, tmp_path, capsys):
    """A received run whose data.train is a pipe: command: export never reads it."""
    import json
    import shutil

    photos, run_dir = run
    work = tmp_path / "received"
    shutil.copytree(run_dir, work)
    marker = tmp_path / "ran"
    for file in [work / "config.yaml", *(work / "checkpoints").glob("step-*/config.yaml")]:
        file.write_text(file.read_text().replace(f"train: {photos}", f"train: 'pipe:touch {marker}'"))
    assert "pipe:touch" in (work / "checkpoints/step-0000002/config.yaml").read_text()

    # the final checkpoint: the trainer's own measurement, stored with it
    assert main(["export", str(work), str(tmp_path / "final")]) == 0
    stored = json.loads((run_dir / "export/config.json").read_text())["scaling_factor"]
    assert json.loads((tmp_path / "final/config.json").read_text())["scaling_factor"] == stored
    # an earlier checkpoint has none: measured only on images named on the command line
    assert main(["export", str(work / "checkpoints/step-0000001"), str(tmp_path / "early")]) == 2
    assert "pass --images" in capsys.readouterr().err
    factors = []
    for out in ("a", "b"):
        assert main(["export", str(work / "checkpoints/step-0000001"), str(tmp_path / out), "--images",
                     str(photos)]) == 0
        factors.append(json.loads((tmp_path / out / "config.json").read_text())["scaling_factor"])
    assert factors[0] == factors[1]  # the same checkpoint gives the same factors
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated weights", "foreign weights", "bad loop_state", "truncated optimizer"])
def test_a_damaged_checkpoint_is_one_clear_error_naming_the_file(run, tmp_path, capsys, damage):
    import shutil

    from safetensors.torch import save_file

    photos, run_dir = run
    work = tmp_path / "run"
    shutil.copytree(run_dir, work)
    ckpt = work / "checkpoints/step-0000002"
    file = {"truncated weights": "model.safetensors", "foreign weights": "ema.safetensors",
            "bad loop_state": "loop_state.json", "truncated optimizer": "optimizer.bin"}[damage]
    if damage == "foreign weights":
        save_file({"encoder.other.weight": torch.zeros(3)}, str(ckpt / file))
    elif damage == "bad loop_state":
        (ckpt / file).write_text('{"step": 2, "epoch"')
    else:
        (ckpt / file).write_bytes((ckpt / file).read_bytes()[:200])
    if damage != "truncated optimizer":  # export and eval read the weights and the loop state
        assert main(["export", str(work), str(tmp_path / "out"), "--images", str(photos)]) == 2
        err = capsys.readouterr().err
        assert file in err and "step-0000001" in err  # the file, and the run's other checkpoint to use
        assert "Traceback" not in err
    overrides = helpers.tiny_train_overrides(photos, work, 3)
    assert main(["train", "--resume", "latest"] + [a for o in overrides for a in ("--set", o)]) == 2
    err = capsys.readouterr().err
    assert "step-0000002" in err and "step-0000001" in err and "Traceback" not in err
    if damage == "truncated optimizer":
        assert "cannot be loaded" in err


def test_an_export_without_its_weights_is_a_clear_error(run, tmp_path, capsys):
    import shutil

    photos, run_dir = run
    export = tmp_path / "export"
    shutil.copytree(run_dir / "export", export)
    (export / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({}, export / "diffusion_pytorch_model.bin")  # a pickle is never a fallback
    assert main(["eval", str(export), str(photos), "--resolution", "32"]) == 2
    err = capsys.readouterr().err
    assert "diffusion_pytorch_model.safetensors" in err and "kl-ae export" in err and "Traceback" not in err


def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside(run, tmp_path):
    """Another timeline from step 1: step-2 of the old one is kept, in abandoned-*/, not mixed with
    the new checkpoints, counted by train.keep_last or overwritten."""
    import shutil

    photos, run_dir = run
    work = tmp_path / "run"
    shutil.copytree(run_dir, work)
    old_step_2 = snapshot(work / "checkpoints/step-0000002")
    cfg = load_config(None, helpers.tiny_train_overrides(photos, work, 3, **{"train.keep_last": 2}))
    train(cfg, resume=str(work / "checkpoints/step-0000001"))
    aside = [p for p in (work / "checkpoints").iterdir() if p.name.startswith("abandoned-")]
    assert len(aside) == 1 and snapshot(aside[0] / "step-0000002") == old_step_2
    assert sorted(p.name for p in (work / "checkpoints").glob("step-*")) == ["step-0000002", "step-0000003"]
    assert (work / "checkpoints/latest").read_text().strip() == "step-0000003"
    assert "the later ones were moved to" in (work / "train.log").read_text()
