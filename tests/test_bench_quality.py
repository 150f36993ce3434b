"""bench/gpu.sh --dry-run: every step of the GPU script (quality per minute, throughput, FLOPs/MFU,
largest batch) at toy size on the CPU. Checks that each runs and writes its raw output; no
figure is asserted (timing and quality are the benchmarks' job)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variant_overrides_keep_commas_inside_brackets():
    quality = _load("quality")
    assert quality.split_overrides("model.block_out_channels=[48,96,192,192],loss.l2_weight=0") == [
        "model.block_out_channels=[48,96,192,192]", "loss.l2_weight=0"]
    assert quality.split_overrides("") == []


def test_quality_table_lists_every_point_and_both_baselines():
    quality = _load("quality")
    a = quality._parse(["--minutes", "4", "--every", "2"])
    results = {"kl-ae": {"points": [{"minutes": 2.0, "images_seen": 100, "step": 10, "psnr": 20.0, "ssim": 0.5},
                                    {"minutes": 4.0, "images_seen": 200, "step": 20, "psnr": 21.0, "ssim": 0.6,
                                     "lpips": 0.25}]},
               "peer": {"points": [], "error": "exit 1 after saving its final model: TypeError"}}
    meta = {"precision": "bf16", "cpu_capability": "AVX512", "device": "cpu"}
    baselines = {"mean_colour": {"psnr": 18.0, "ssim": 0.4}, "bicubic": {"psnr": 21.9, "ssim": 0.55}}
    table = quality._table(a, results, baselines, meta)
    assert "| kl-ae | 2.00 | 100 | 10 | 20.00 | 0.5000 | - |" in table
    assert "| kl-ae | 4.00 | 200 | 20 | 21.00 | 0.6000 | 0.2500 |" in table
    assert "| baseline: mean_colour | - | - | - | 18.00 | 0.4000 | - |" in table
    assert "| baseline: bicubic | - | - | - | 21.90 | 0.5500 | - |" in table
    assert "- peer: exit 1 after saving its final model: TypeError" in table


@pytest.mark.slow
def test_gpu_script_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable, "PHOTOS": str(tmp_path / "none")}
    pack = tmp_path / "gpu.tgz"
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--dry-run", "--pack", str(pack), str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = (out / "status.txt").read_text()
    for name in ("quality", "throughput", "max_batch"):
        assert f"   {name}: exit 0 " in status, status
    assert "   flops count: exit 0 " in status
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
    with tarfile.open(pack) as tar:  # what a device that returns few files brings back: everything
        names = set(tar.getnames())
    assert {"gpu/status.txt", "gpu/quality/result.json", "gpu/throughput/result.json", "gpu/flops.json",
            "gpu/max_batch.json"} <= names
    assert "data: builtin:train -> builtin:val; peer: none" in status


@pytest.mark.slow
@pytest.mark.parametrize("setting, ran, skipped", [
    ({"ONLY": "max_batch"}, ["max_batch"], []),
    ({"BUDGET_S": "1"}, [], ["quality", "throughput", "max_batch"]),  # the setup alone outlasts it
])
def test_gpu_script_runs_the_steps_asked_for_within_its_budget(tmp_path, setting, ran, skipped):
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable, "PHOTOS": str(tmp_path / "none"), **setting}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--dry-run", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = (out / "status.txt").read_text()
    for name in ("quality", "throughput", "max_batch"):
        assert (f"   {name}: exit 0 " in status) == (name in ran), status
        assert (f"== {name}: skipped, " in status) == (name in skipped), status
    assert "   flops count: exit 0 " in status


def test_peer_minutes_leave_out_its_validation_and_checkpoint_writes():
    quality = _load("quality")
    # steps every 1 s; validation after step 1 took 10 s, a checkpoint after step 3 took 5 s
    times = [0.0, 11.0, 12.0, 18.0, 19.0]
    assert quality._training_times(times, [1, 3]) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert quality._training_times([0.0], [1]) == [0.0]


_TRAINER = """
import signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
stop = []
signal.signal(signal.SIGINT, lambda *_: stop.append(1))
(out / "ready").touch()
while not stop:
    time.sleep(0.05)
time.sleep(1.0)  # longer than subprocess.run's 0.25 s grace: a checkpoint being written
(out / "saved").touch()
sys.exit(130)
"""

_BENCH = """
import importlib.util, json, os, signal, sys
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)  # as main() does: a background pytest ignores SIGINT
spec = importlib.util.spec_from_file_location("quality", sys.argv[1])
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)
out = Path(sys.argv[2])
res = quality._run([sys.executable, str(out / "trainer.py"), str(out)], out / "trainer.log", dict(os.environ))
(out / "result.json").write_text(json.dumps(res))
"""


def test_a_time_limit_lets_the_trainer_save_before_it_stops(tmp_path):
    """``timeout --signal=INT`` (bench/gpu.sh) and Ctrl-C signal the whole process group: the
    bench waits for the trainer to finish its checkpoint instead of killing it, and says so."""
    (tmp_path / "trainer.py").write_text(_TRAINER)
    proc = subprocess.Popen([sys.executable, "-c", _BENCH, str(REPO / "bench" / "quality.py"), str(tmp_path)],
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "ready").exists()
    time.sleep(0.3)  # the bench is inside its wait for the trainer
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    assert (tmp_path / "saved").exists()
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["interrupted"] is True and res["returncode"] == 130


class _FakeSetting:
    """bench/max_batch.py's _Setting without models: batches up to ``fits_up_to`` fit, ``broken``
    raise a non-memory error (recorded as not fitting, as a 32-bit indexing failure would be)."""

    fits_up_to, broken = 37, ()

    def __init__(self, *args):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def try_batch(self, batch):
        if batch in self.broken:
            return {"batch": batch, "fits": False, "error": "invalid configuration argument"}
        return {"batch": batch, "fits": batch <= self.fits_up_to}


def test_largest_batch_doubles_from_the_start_then_bisects_to_the_tolerance(monkeypatch):
    max_batch = _load("max_batch")
    monkeypatch.setattr(max_batch, "_Setting", _FakeSetting)
    exact = max_batch.largest_batch("c.yaml", 256, False, max_batch=128, start_batch=16)
    assert exact["largest_batch"] == 37 and not exact["capped_at_max_batch"]
    assert [t["batch"] for t in exact["tries"]][:3] == [16, 32, 64]
    coarse = max_batch.largest_batch("c.yaml", 256, False, max_batch=128, start_batch=16, tolerance=0.25)
    assert coarse["largest_batch"] == 32 and coarse["next_failed"] == 40  # gap 8 <= 0.25 * 32
    assert len(coarse["tries"]) < len(exact["tries"])
    capped = max_batch.largest_batch("c.yaml", 256, False, max_batch=24, start_batch=16)
    assert capped["largest_batch"] == 24 and capped["capped_at_max_batch"]  # 16, then the cap itself
    monkeypatch.setattr(_FakeSetting, "broken", (64,))
    monkeypatch.setattr(_FakeSetting, "fits_up_to", 1000)
    errored = max_batch.largest_batch("c.yaml", 256, False, max_batch=128, start_batch=16)
    assert errored["largest_batch"] == 63 and "invalid configuration" in errored["tries"][2]["error"]


def test_an_interrupted_evaluation_keeps_the_points_evaluated_so_far(monkeypatch):
    """A time limit's SIGINT during the evaluation (bench/gpu.sh): the points evaluated are in the
    files already (``after_each``), the others say 'not evaluated' in the table."""
    quality = _load("quality")
    import kl_ae.eval.evaluate
    import kl_ae.model

    calls = []

    def fake_evaluate(vae, val, **kw):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(vae)
        return {"metrics": {"psnr": 20.0, "ssim": 0.5}, "baselines": {"bicubic": {"psnr": 19.0, "ssim": 0.4}}}

    monkeypatch.setattr(kl_ae.model, "load_autoencoder", lambda path: path)
    monkeypatch.setattr(kl_ae.eval.evaluate, "evaluate", fake_evaluate)
    points = [{"path": f"step-{i}", "minutes": float(i), "images_seen": 10 * i, "step": i} for i in (1, 2, 3)]
    written = []
    with pytest.raises(KeyboardInterrupt):
        quality._evaluate(points, "val", None, 256, after_each=lambda: written.append([p.get("psnr") for p in points]))
    assert written == [[20.0, None, None]]
    assert "eval_error" not in points[0] and points[1]["eval_error"] == points[2]["eval_error"] == "not evaluated"
    table = quality._table(quality._parse(["--minutes", "3"]), {"kl-ae": {"points": points}}, None,
                           {"precision": "bf16", "cpu_capability": "AVX512", "device": "cuda"})
    assert "| kl-ae | 2.00 | 20 | 2 | not evaluated | | |" in table


def test_peer_images_seen_counts_each_epochs_partial_batch():
    """53 photos in batches of 16: 16, 16, 16, 5 per epoch (the peer's DataLoader keeps the last
    batch); with the GAN on, iterations alternate between the autoencoder and the discriminator."""
    quality = _load("quality")
    assert quality.peer_images_seen(["ae"] * 8, 53, 16) == 2 * 53
    assert quality.peer_images_seen(["ae"] * 5, 53, 16) == 53 + 16
    assert quality.peer_images_seen(["ae", "d", "ae", "d"], 53, 16) == 16 + 16  # iterations 0 and 2
    assert quality.peer_images_seen(["d", "ae", "d", "ae"], 53, 16) == 16 + 5  # iteration 3: the partial batch
