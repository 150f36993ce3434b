"""bench/gpu.sh --dry-run: every step of the GPU script (quality per minute, throughput, FLOPs/MFU,
largest batch) at toy size on the CPU. Checks that each runs and writes its raw output; no
figure is asserted (timing and quality are the benchmarks' job)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_script_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable, "PHOTOS": str(tmp_path / "none")}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--dry-run", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = (out / "status.txt").read_text()
    for name in ("quality", "throughput", "flops", "max_batch"):
        assert f"   {name}: exit 0 " in status, status
    quality = json.loads((out / "quality" / "result.json").read_text())
    points = quality["results"]["kl-ae"]["points"]
    assert len(points) >= 2 and all(p["psnr"] > 0 and p["images_seen"] > 0 for p in points)
    assert [p["minutes"] for p in points] == sorted(p["minutes"] for p in points)
    assert set(quality["baselines"]) == {"mean_colour", "bicubic"}
    assert (out / "quality" / "quality.png").stat().st_size > 0
    assert "| kl-ae |" in (out / "quality" / "table.md").read_text()
    assert json.loads((out / "throughput" / "result.json").read_text())["summary"]["kl-ae"]["images_per_s"] > 0
    flops = json.loads((out / "flops.json").read_text())
    assert flops["flops_per_image"] > 0 and "mfu" in flops
    runs = json.loads((out / "max_batch.json").read_text())["runs"]
    assert [(r["resolution"], r["gradient_checkpointing"]) for r in runs] == [(32, False), (32, True)]
    assert all(r["largest_batch"] == 2 and r["capped_at_max_batch"] for r in runs)
    assert json.loads((out / "machine.json").read_text())["device"] == "cpu"
