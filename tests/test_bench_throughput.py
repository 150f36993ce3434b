"""The throughput benchmark's clock and arithmetic (no timing is asserted: that is the benchmark's job)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_steptimer_records_each_update_and_tells_autoencoder_from_discriminator(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(
        "import torch\n"
        "decoder_out = torch.nn.Conv2d(8, 3, 3)  # like decoder.conv_out: 3 output channels\n"
        "patch_gan = torch.nn.Conv2d(3, 64, 4)\n"
        "opt_ae = torch.optim.Adam(decoder_out.parameters())\n"
        "opt_d = torch.optim.Adam(patch_gan.parameters())\n"
        "for _ in range(3):\n"
        "    opt_ae.step()\n"
        "    opt_d.step()\n"
        "opt_ae.step()\n"
    )
    out = tmp_path / "steps.json"
    subprocess.run([sys.executable, str(BENCH / "steptimer.py"), str(out), str(script)], check=True)
    record = json.loads(out.read_text())
    assert record["kinds"] == ["ae", "disc"] * 3 + ["ae"]
    assert record["times_s"] == sorted(record["times_s"]) and record["times_s"][0] == 0.0
    assert record["peak_rss_mb"] > 0


def test_images_per_s_counts_autoencoder_updates_after_warmup():
    throughput = _load("throughput")
    # AE updates at 0, 1, 3, 5, 7 s (alternating with D as the peer does), batch 4, warmup 1:
    # 3 updates x 4 images in 6 s after the warm-up update.
    record = {"kinds": ["ae", "ae", "disc", "ae", "disc", "ae", "disc", "ae"],
              "times_s": [0, 1, 2, 3, 4, 5, 6, 7]}
    images_per_s, disc_updates = throughput._images_per_s(record, batch=4, warmup=1)
    assert images_per_s == pytest.approx(12 / 6)
    assert disc_updates == 3
    with pytest.raises(RuntimeError, match="autoencoder updates"):
        throughput._images_per_s({"kinds": ["ae", "ae"], "times_s": [0, 1]}, batch=4, warmup=1)


def test_a_trainer_that_fails_after_its_steps_keeps_its_timings(tmp_path):
    """The peer in bf16 crashes in its final validation after its last step; the run stands."""
    throughput = _load("throughput")
    script = tmp_path / "crashes_late.py"
    script.write_text(
        "import torch\n"
        "decoder_out = torch.nn.Conv2d(8, 3, 3)\n"
        "opt = torch.optim.SGD(decoder_out.parameters(), lr=0.1)\n"
        "for _ in range(4):\n"
        "    opt.step()\n"
        "raise TypeError('Got unsupported ScalarType BFloat16')\n"
    )
    rec = throughput._run("peer", [sys.executable, str(script)], tmp_path, None, 0)
    assert rec["kinds"] == ["ae"] * 4
    assert "BFloat16" in rec["failed_after_training"] and rec["failed_after_training"].startswith("exit 1")
    never = tmp_path / "crashes_early.py"
    never.write_text("raise SystemExit('no step at all')\n")
    with pytest.raises(RuntimeError, match="before recording any step"):
        throughput._run("peer", [sys.executable, str(never)], tmp_path, None, 1)


@pytest.mark.slow
def test_repeats_each_train_in_a_fresh_run_folder(tmp_path):
    """kl-ae refuses to train over an existing run, so a second repeat needs its own folder."""
    config = tmp_path / "toy.yaml"
    config.write_text("model: {block_out_channels: [8, 16], layers_per_block: 1, norm_num_groups: 8, "
                      "mid_block_add_attention: false}\ndata: {num_workers: 0}\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(BENCH / "throughput.py"), "--config", str(config),
                           "--resolution", "32", "--batch", "2", "--steps", "1", "--warmup", "1", "--repeats", "2",
                           "--lpips", "off", "--gan", "off", "--no-plain", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "result.json").read_text())["summary"]
    assert len(summary["kl-ae"]["runs"]) == 2


def test_results_are_written_after_every_run_and_leave_out_trainers_not_run(tmp_path):
    """bench/gpu.sh may stop the benchmark between trainers: the files then hold the ones measured."""
    throughput = _load("throughput")
    a = throughput._parse(["--out", str(tmp_path), "--steps", "4", "--repeats", "1"])
    rec = {"images_per_s": 10.0, "peak_rss_mb": 100.0, "disc_updates": 4}
    table = throughput._write(a, {"argv": []}, {"kl-ae": [rec], "peer": []}, final=False)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert list(saved["summary"]) == ["kl-ae"] and saved["meta"]["complete"] is False
    assert "| kl-ae | 10.000 |" in table and "peer" not in table
    throughput._write(a, {"argv": []}, {"kl-ae": [rec], "peer": [{**rec, "images_per_s": 5.0}]}, final=True)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["meta"]["complete"] is True and saved["summary"]["peer"]["kl-ae / this"] == 2.0
