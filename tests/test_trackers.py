"""train.tracker: names checked against Accelerate's before any model is built; a real offline WandB
run (next to TensorBoard) records the scalars and the sample grids the trainer logs."""

import json
import re
import sys
import time
from pathlib import Path

import pytest
from accelerate.tracking import LOGGER_TYPE_TO_CLASS

from helpers import write_noise_photos
from kl_ae.config import load_config
from kl_ae.parsing import ConfigError
from kl_ae.tracking import tracker_names
from kl_ae.trainer import train


def test_tracker_names():
    assert tracker_names("tensorboard") == ["tensorboard"]
    assert tracker_names("tensorboard, wandb") == ["tensorboard", "wandb"]
    assert tracker_names("none") == []


def test_unknown_tracker_is_a_config_error_naming_the_known_ones():
    for spec in ("tensorbord", "none,wandb", "tensorboard,", ""):
        with pytest.raises(ConfigError, match="unknown tracker") as err:
            load_config(None, [f"train.tracker={spec}"])
        assert "'tensorboard'" in str(err.value) and "'wandb'" in str(err.value) and "'none'" in str(err.value)
    assert {"tensorboard", "wandb", "mlflow", "comet_ml"} <= set(LOGGER_TYPE_TO_CLASS)  # names we document


def test_tracker_without_its_package_says_what_to_install_when_training_starts(monkeypatch, tmp_path):
    """A saved config naming wandb still loads (export, eval, resume with another tracker where
    wandb is missing); training with it stops before any write, saying what to install."""
    from kl_ae.trainer import train

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, as if not installed
    cfg = load_config(None, ["train.tracker=tensorboard,wandb", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=re.escape("pip install wandb")):
        train(cfg)
    assert not (tmp_path / "run").exists()
    assert load_config(None, ["train.tracker=none"]).train.tracker == "none"


def _wandb_records(path: Path) -> list:
    """The protobuf records of a run-*.wandb file: a 7-byte ':W&B' header, then the LevelDB log
    format (32 KiB blocks of chunks, each with a 7-byte crc32 | length | type header)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk, records = 7, 32 * 1024, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too short for a chunk header: zero padding up to the next block
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0 or pos + 7 + length > len(data):  # end of the records, or a chunk still being written
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def _complete_wandb_records(path: Path, timeout_s: float = 120.0) -> list:
    """The records of a run-*.wandb file once its writer has closed it (the last record is 'exit').
    wandb-core, a separate process, writes the file. One CI run read a file without its config
    record, which a write still under way after ``wandb.finish()`` would explain (not reproduced).
    So poll until the 'exit' record is there; fail naming what was read if it never comes."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = _wandb_records(path)
        kinds = [record.WhichOneof("record_type") for record in records]
        if "exit" in kinds:
            return records
        if time.monotonic() > deadline:
            pytest.fail(f"{path} has no 'exit' record {timeout_s:.0f} s after wandb.finish(); records: {kinds}")
        time.sleep(0.5)


def _history(records: list) -> dict:
    """``{step: {key: value}}`` of the wandb.log rows (keys with '/' are stored as nested_key)."""
    rows = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows[record.history.step.num] = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                             for item in record.history.item}
    return rows


def test_offline_wandb_run_records_scalars_and_grids(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))  # nothing written to ~/.config or ~/.cache
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network, no account
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # default: the run directory
    photos = write_noise_photos(tmp_path / "photos", 4)
    run_dir = tmp_path / "run"
    cfg = load_config(None, [
        "model.block_out_channels=[8,16]", "model.layers_per_block=1", "model.norm_num_groups=8",
        "model.mid_block_add_attention=false", f"data.train={photos}", "data.resolution=32",
        "data.num_workers=0", f"train.output_dir={run_dir}", "train.max_steps=2", "train.batch_size=2",
        "train.gradient_accumulation_steps=1", "train.log_every=1", "train.image_every=1", "train.ema_decay=0",
        "train.scaling_images=2", "train.mixed_precision=no", "loss.perceptual_weight=0", "loss.disc_start=1000",
        "train.tracker=tensorboard,wandb",
    ])
    train(cfg)

    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = _complete_wandb_records(log)
    # the config reaches the file as 'config' records (wandb.config.update after init, as Accelerate
    # does) or, if wandb-core merges an early update into the run, in the 'run' record's config
    updates = [r.config.update for r in records if r.WhichOneof("record_type") == "config"]
    updates += [r.run.config.update for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key or ".".join(item.nested_key): json.loads(item.value_json) for update in updates
              for item in update}
    kinds = [r.WhichOneof("record_type") for r in records]
    assert config.get("train.max_steps") == 2 and config.get("model.block_out_channels") == "[8, 16]", (
        f"config keys {sorted(config)[:8]} ({len(config)} in all); records {kinds}")
    history = _history(records)
    assert sorted(history) == [1, 2]
    # the values train.log prints (4 significant digits) are the ones WandB stored
    logged = dict(re.findall(r"step (\d+) .*loss/l1=(\S+)", (run_dir / "train.log").read_text()))
    for step, row in history.items():
        assert row["loss/l1"] == pytest.approx(float(logged[str(step)]), rel=1e-3)
        assert {"loss/total", "loss/kl", "latent/mu_mean", "optim/lr", "perf/images_per_s"} <= set(row)
        (image,) = row["samples/input_reconstruction/filenames"]
        assert (log.parent / "files" / image).is_file()
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step-0000001.png", "step-0000002.png"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs" / "kl-ae")).Reload()
    assert [e.step for e in events.Scalars("loss/l1")] == [1, 2]
    assert [e.step for e in events.Images("samples/input_reconstruction")] == [1, 2]
