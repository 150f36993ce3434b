"""Stress test of the 2-process teardown: launch a tiny 2-process training many times, under load.

    python bench/stress_ddp.py --runs 70 --busy 1 --out results/stress_ddp

Each launch is ``accelerate launch --multi_gpu --num_processes 2`` on CPU (gloo) of a tiny model
for a few steps with everything a real run does at the end: a checkpoint, the export, the
evaluation on ``data.val`` on the main process while the other waits, TensorBoard, DataLoader
workers. ``--busy N`` keeps N extra processes spinning so the ranks compete for the cores (the
hang seen once in about 70 launches showed under load). A launch that has not ended after
``--timeout`` seconds counts as a hang: the stacks of every Python process of it are dumped with
py-spy (``pip install py-spy``; without it only the process tree is recorded) into
``OUT/hang-NNN.txt`` before it is killed. Writes ``OUT/stress.json``: launches, hangs, failures,
and the wall time of each launch. Not part of the test suite (minutes, and timing-dependent);
tests/test_distributed.py runs the same launch once.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _spin(stop) -> None:  # the load: one busy core
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def _descendants(pid: int) -> list[int]:
    """pid and every process below it (from /proc; Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _dump(pid: int, file: Path) -> None:
    """Stacks of every process of the launch (py-spy dump), or at least their command lines."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    lines = []
    for p in _descendants(pid):
        try:
            cmd = (Path("/proc") / str(p) / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:300]
        except OSError:
            continue
        lines.append(f"=== pid {p}: {cmd}")
        if Path(py_spy).exists():
            dump = subprocess.run([py_spy, "dump", "--native", "--pid", str(p)], capture_output=True, text=True, timeout=60)
            lines.append(dump.stdout + dump.stderr)
    file.write_text("\n".join(lines))


def launch_command(work: Path, run_dir: Path) -> list[str]:
    overrides = [
        "model.block_out_channels=[8,16]", "model.layers_per_block=1", "model.norm_num_groups=8",
        f"data.train={work / 'photos'}", f"data.val={work / 'photos'}", "data.resolution=32",
        "data.val_resolution=32", "data.num_workers=1", f"train.output_dir={run_dir}", "train.max_steps=4",
        "train.batch_size=2", "train.gradient_accumulation_steps=1", "train.checkpoint_every=2",
        "train.log_every=1", "train.mixed_precision=no", "train.scaling_images=4", "loss.disc_start=1",
        "loss.disc_channels=8", "loss.disc_num_layers=2", "loss.perceptual_weight=0", "loss.lpips_trunk=random",
    ]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kl_ae.cli", "train"]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=70)
    p.add_argument("--busy", type=int, default=1, help="extra busy processes (the load)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a launch counts as hung")
    p.add_argument("--out", default="results/stress_ddp")
    a = p.parse_args()
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    import kl_ae  # noqa: F401  (before helpers: kl_ae fixes torchvision's import)
    import helpers

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(a.busy)]
    for s in spinners:
        s.start()
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    results = {"runs": a.runs, "busy": a.busy, "timeout_s": a.timeout, "hangs": [], "failures": [], "wall_s": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            helpers.write_noise_photos(work / "photos", 8)
            for i in range(a.runs):
                run_dir = work / f"run{i}"
                log = out / f"launch-{i:03d}.log"
                t0 = time.monotonic()
                with open(log, "w") as f:
                    proc = subprocess.Popen(launch_command(work, run_dir), env=env, stdout=f, stderr=subprocess.STDOUT,
                                            start_new_session=True, cwd=REPO)
                    try:
                        code = proc.wait(timeout=a.timeout)
                    except subprocess.TimeoutExpired:
                        _dump(proc.pid, out / f"hang-{i:03d}.txt")
                        for pid in _descendants(proc.pid):  # torch elastic starts ranks in sessions of their own
                            try:
                                os.kill(pid, signal.SIGKILL)
                            except ProcessLookupError:
                                pass
                        proc.wait()
                        code = None
                wall = time.monotonic() - t0
                results["wall_s"].append(round(wall, 2))
                if code is None:
                    results["hangs"].append(i)
                elif code != 0:
                    results["failures"].append({"launch": i, "exit_code": code})
                else:
                    log.unlink()  # keep only the logs of launches that went wrong
                shutil.rmtree(run_dir, ignore_errors=True)
                print(f"launch {i}: {'HUNG' if code is None else f'exit {code}'} in {wall:.1f} s", flush=True)
    finally:
        stop.set()
        for s in spinners:
            s.join(timeout=5)
    walls = sorted(results["wall_s"])
    results["median_wall_s"] = walls[len(walls) // 2] if walls else None
    results["max_wall_s"] = walls[-1] if walls else None
    (out / "stress.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "wall_s"}, indent=2))
    sys.exit(1 if results["hangs"] or results["failures"] else 0)


if __name__ == "__main__":
    main()
