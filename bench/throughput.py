"""Training throughput, side by side: kl-ae against the diffusers example trainer and a plain loop.

    python bench/throughput.py --quick --peer /path/to/train_autoencoderkl.py
    python bench/throughput.py --config configs/sd-f8c4.yaml --resolution 256 --batch 2 \\
        --peer /path/to/train_autoencoderkl.py --out results/throughput/sd-f8c4-256

Every trainer runs unmodified in its own process under bench/steptimer.py, which records when
each optimizer step ends; runs are interleaved (ours, peer, plain, ours, ...) with the order
rotated every repeat, so drift on a shared machine hits all of them alike. The figure is
autoencoder updates x batch per second after ``--warmup`` updates: the peer alternates
autoencoder and discriminator steps once the GAN is on, kl-ae and the plain loop update both
every step, so raw steps/s would not compare like with like. Medians over ``--repeats``.

Trainers:
  kl-ae   ``kl-ae train CONFIG`` with the benchmark's settings (plus ``--variant`` changes)
  kl-ae@base  the same command run with another checkout's kl_ae (``--baseline-repo DIR``): the
          speed of a change against the code before it, in one interleaved run
  peer    the diffusers research-project trainer (examples/research_projects/autoencoderkl/
          train_autoencoderkl.py), a file you fetch yourself, run with the same architecture,
          resolution, batch, precision and loss terms; it needs ``pip install datasets
          transformers taming-transformers`` in ``--peer-python``'s environment
  plain   bench/plain_loop.py: AutoencoderKL + lpips + PatchGAN, fp32, eager

LPIPS runs with an untrained VGG16 trunk everywhere (same cost as the real one). No quality
figure comes from this benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", default=str(REPO / "configs/quickstart.yaml"), help="kl-ae config (architecture)")
    p.add_argument("--peer", help="path to train_autoencoderkl.py (left out: no peer column)")
    p.add_argument("--peer-python", default=sys.executable, help="python with the peer's packages")
    p.add_argument("--no-plain", action="store_true", help="leave out the plain loop")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--precision", choices=["auto", "bf16", "no"], default="auto",
                   help="kl-ae and peer precision (the plain loop is always fp32); auto: bf16 where the "
                        "device has bf16 arithmetic, else no (kl_ae/precision.py)")
    p.add_argument("--gan", choices=["on", "off"], default="on",
                   help="on: discriminator active from step 0 (disc_start=0); off: before disc_start")
    p.add_argument("--lpips", choices=["on", "off"], default="on")
    p.add_argument("--workers", type=int, default=1, help="data loader workers, every trainer")
    p.add_argument("--warmup", type=int, default=2, help="autoencoder updates left out of the timing")
    p.add_argument("--steps", type=int, help="timed autoencoder updates per run (default 6; --quick 4)")
    p.add_argument("--repeats", type=int, help="runs of each trainer (default 3; --quick 2)")
    p.add_argument("--data", help="image folder (default: the scikit-image photos, 32 files)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                   help="an extra kl-ae run with --set overrides, e.g. fp32=train.mixed_precision=no")
    p.add_argument("--baseline-repo", metavar="DIR",
                   help="also run kl-ae from this checkout (e.g. `git worktree add DIR <commit>`) as "
                        "kl-ae@base, interleaved with this one: does a change keep the speed?")
    p.add_argument("--only", help="comma-separated trainer names to run (default: all)")
    p.add_argument("--out", help="directory for result.json and table.md")
    p.add_argument("--quick", action="store_true", help="quickstart model, 128 px, batch 4, 2 repeats")
    a = p.parse_args(argv)
    if a.quick:
        a.config, a.resolution, a.batch = str(REPO / "configs/quickstart.yaml"), 128, 4
    a.steps = a.steps or (4 if a.quick else 6)
    a.repeats = a.repeats or (2 if a.quick else 3)
    if a.peer and not Path(a.peer).is_file():
        p.error(f"--peer {a.peer}: no such file (fetch train_autoencoderkl.py from the diffusers repository)")
    return a


def _materialise_data(folder: Path, n: int = 32) -> Path:
    """n JPEG files cycling through the scikit-image photos (offline, shipped with the install)."""
    from PIL import Image

    from kl_ae.data.sources import list_image_files

    folder.mkdir(parents=True)
    photos = list_image_files("builtin:train")
    for i in range(n):
        Image.open(photos[i % len(photos)]).convert("RGB").save(folder / f"img{i:03d}.jpg", quality=95)
    return folder


def _random_vgg_cache(torch_home: Path) -> None:
    """An untrained VGG16 at torchvision's cache path, so the peer's lpips.LPIPS() runs offline at
    its true cost (torchvision does not check cached files). Timing only."""
    import torch
    import torchvision

    dest = torch_home / "hub" / "checkpoints" / "vgg16-397923af.pth"
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), dest)


def _commands(a: argparse.Namespace, work: Path, data: Path, vae_dir: Path, val_image: Path) -> dict:
    total = a.warmup + a.steps + 1
    disc_start = 0 if a.gan == "on" else 10**9
    lpips_w = 1.0 if a.lpips == "on" else 0.0
    ours = [
        f"data.train={data}", "data.val=", f"data.resolution={a.resolution}", "data.short_side_range=[]",
        f"data.num_workers={a.workers}", f"train.batch_size={a.batch}", "train.gradient_accumulation_steps=1",
        f"train.mixed_precision={a.precision}", f"train.max_steps={total}", f"loss.disc_start={disc_start}",
        f"loss.perceptual_weight={lpips_w}", "loss.lpips_trunk=random", "train.checkpoint_every=1000000",
        "train.image_every=1000000", "train.log_every=1000000", "train.tracker=none",
        f"train.scaling_images={a.batch}",
        "data.final_resolution=0", "data.final_fraction=0",  # the config's final phase would change the batch
    ]
    runs: dict[str, list[str]] = {}

    def kl_ae(name: str, extra: list[str]) -> None:
        sets = [*ours, *extra]  # train.output_dir: one per repeat, added in main()
        runs[name] = [sys.executable, "-m", "kl_ae.cli", "train", a.train_config,
                      *sum((["--set", s] for s in sets), [])]

    kl_ae("kl-ae", [])
    if a.baseline_repo:  # the same command; main() points its PYTHONPATH at that checkout's kl_ae
        kl_ae("kl-ae@base", [])
    for spec in a.variant:
        name, _, sets = spec.partition("=")
        kl_ae(f"kl-ae[{name}]", split_overrides(sets))
    if a.peer:
        # The peer alternates AE and D steps once the GAN is on: twice the steps for as many AE updates.
        peer_steps = total * (2 if a.gan == "on" else 1)
        runs["peer"] = [a.peer_python, a.peer,
                        "--model_config_name_or_path", str(vae_dir), "--train_data_dir", str(data),
                        "--resolution", str(a.resolution), "--train_batch_size", str(a.batch),
                        "--max_train_steps", str(peer_steps), "--mixed_precision", a.precision,
                        "--disc_start", str(disc_start), "--rec_loss", "l1", "--perceptual_scale", str(lpips_w),
                        "--kl_scale", "1e-6", "--disc_scale", "0.5", "--lr_warmup_steps", "0",
                        "--dataloader_num_workers", str(a.workers), "--use_ema", "--seed", "0",
                        "--validation_image", str(val_image), "--validation_steps", "1000000",
                        "--checkpointing_steps", "1000000", "--report_to", "wandb",
                        "--output_dir", str(work / "runs" / "peer"), "--cache_dir", str(work / "hf-cache")]
    if not a.no_plain:
        runs["plain"] = [sys.executable, str(HERE / "plain_loop.py"), "--vae-config", str(vae_dir),
                         "--data", str(data), "--resolution", str(a.resolution), "--batch", str(a.batch),
                         "--steps", str(total), "--workers", str(a.workers),
                         "--disc-start", "0" if a.gan == "on" else str(10**9), "--lpips-weight", str(lpips_w)]
    return runs


def _images_per_s(record: dict, batch: int, warmup: int) -> tuple[float, int]:
    """Autoencoder updates x batch per second after ``warmup`` updates; also the D updates seen."""
    ae = [t for k, t in zip(record["kinds"], record["times_s"]) if k == "ae"]
    if len(ae) < warmup + 2:
        raise RuntimeError(f"only {len(ae)} autoencoder updates recorded; need {warmup + 2}")
    n_disc = sum(1 for k, t in zip(record["kinds"], record["times_s"]) if k == "disc" and ae[warmup] < t <= ae[-1])
    return batch * (len(ae) - 1 - warmup) / (ae[-1] - ae[warmup]), n_disc


def split_overrides(sets: str) -> list[str]:
    """'a=1,b=[2,3]' -> ['a=1', 'b=[2,3]']: commas inside brackets belong to the value."""
    out, depth, cur = [], 0, ""
    for ch in sets:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [s for s in out + [cur] if s]


def _pythonpath(first: Path) -> str:
    """``first`` ahead of the caller's PYTHONPATH (which may hold packages installed with
    ``pip install --target``, as on the GPU machine: bench/gpu.sh)."""
    return os.pathsep.join(p for p in (str(first), os.environ.get("PYTHONPATH")) if p)


def _run(name: str, cmd: list[str], work: Path, env: dict, index: int, expected_ae: int | None = None) -> dict:
    """Run one trainer under steptimer. A trainer that exits with an error after its timed steps
    (the peer in bf16 crashes in its final validation: wandb.Image on a bf16 tensor) is kept:
    its step times stand, and the record's "failed_after_training" says what failed."""
    out = work / f"{name}-{index}.json"
    log = work / f"{name}-{index}.log"
    full = [cmd[0], str(HERE / "steptimer.py"), str(out), *cmd[1:]]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(full, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    tail = log.read_text(errors="replace")[-3000:]
    rec = json.loads(out.read_text()) if out.is_file() else {}
    if not rec.get("times_s"):  # steptimer writes its file at exit even when no step ran
        raise RuntimeError(f"{name} failed (exit {proc.returncode}) before recording any step; log {log}:\n{tail}")
    rec["wall_s"] = time.perf_counter() - t0
    if proc.returncode != 0 and expected_ae is not None and rec["kinds"].count("ae") < expected_ae:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}) after {rec['kinds'].count('ae')} of "
                           f"{expected_ae} autoencoder updates; log {log}:\n{tail}")
    if proc.returncode != 0:
        last = [ln for ln in tail.splitlines() if ln.strip()]
        rec["failed_after_training"] = f"exit {proc.returncode}: {last[-1][:300] if last else '?'}"
        print(f"{name}: exit {proc.returncode} after {len(rec['times_s'])} optimizer steps; steps kept "
              f"({rec['failed_after_training']})", flush=True)
    return rec


def _without_cpu_section(config: str, work: Path) -> Path:
    """A copy of ``config`` without its ``on_cpu_without_bf16`` section (the file itself when it
    has none): a throughput figure compares trainers at the model the file states, on every
    machine, and a ``--baseline-repo`` checkout from before that section would reject the key."""
    import yaml

    from kl_ae.config import find_config, read_config_file

    path = find_config(config)
    values, section = read_config_file(path)
    if section is None:
        return path
    pinned = work / path.name
    pinned.write_text(yaml.safe_dump(values, sort_keys=False))
    return pinned


def main() -> None:
    a = _parse()
    sys.path.insert(0, str(REPO))

    from kl_ae.config import load_config
    from kl_ae.distributed import process_state
    from kl_ae.model import build_autoencoder
    from kl_ae.precision import machine_info, resolve_mixed_precision

    # the device kl-ae train will pick; one resolved value for kl-ae and the peer
    a.precision, note, _ = resolve_mixed_precision(a.precision, process_state().device)
    print(note, flush=True)
    work = Path(tempfile.mkdtemp(prefix="kl-ae-throughput-"))
    data = Path(a.data) if a.data else _materialise_data(work / "data")
    val_image = next(p for p in sorted(data.rglob("*")) if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    vae_dir = work / "vae-config"
    a.train_config = str(_without_cpu_section(a.config, work))
    build_autoencoder(load_config(a.train_config).model).save_config(vae_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TORCH_HOME": str(work / "torch"), "PYTHONPATH": _pythonpath(REPO)}
    runs = _commands(a, work, data, vae_dir, val_image)
    if "peer" in runs:
        _random_vgg_cache(work / "torch")

    names = [n for n in runs if not a.only or n in a.only.split(",")]
    results: dict[str, list[dict]] = {n: [] for n in names}
    meta = {"argv": sys.argv[1:], **machine_info(), "precision": a.precision, "precision_note": note,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    try:
        for r in range(a.repeats):
            order = names[r % len(names):] + names[: r % len(names)]  # rotate: no trainer always goes first
            for name in order:
                run_env = ({**env, "PYTHONPATH": _pythonpath(Path(a.baseline_repo).resolve())}
                           if name == "kl-ae@base" else env)
                cmd = runs[name]
                if name.startswith("kl-ae"):  # a fresh run folder per repeat: kl-ae refuses to train over a run
                    cmd = [*cmd, "--set", f"train.output_dir={work / 'runs' / f'{name}-{r}'}"]
                rec = _run(name, cmd, work, run_env, r, expected_ae=a.warmup + a.steps + 1)
                rec["images_per_s"], rec["disc_updates"] = _images_per_s(rec, a.batch, a.warmup)
                results[name].append(rec)
                print(f"repeat {r + 1}/{a.repeats} {name:>18}: {rec['images_per_s']:.3f} img/s "
                      f"(peak RSS {rec['peak_rss_mb']:.0f} MB, wall {rec['wall_s']:.0f} s)", flush=True)
                _write(a, meta, results, final=False)  # a run cut short keeps every trainer measured so far
    except KeyboardInterrupt:  # bench/gpu.sh's time slot: keep what was measured
        print("interrupted: the table holds the runs that finished", flush=True)
        meta["interrupted"] = True
    print(_write(a, meta, results, final=True))
    shutil.rmtree(work, ignore_errors=True)


def _write(a: argparse.Namespace, meta: dict, results: dict[str, list[dict]], final: bool) -> str:
    """The summary of the runs so far (median images/s per trainer, ratios to kl-ae) as a table;
    written to --out as result.json and table.md when given. Trainers with no run yet are left out."""
    summary = {n: {"images_per_s": statistics.median(x["images_per_s"] for x in v),
                   "runs": [round(x["images_per_s"], 4) for x in v],
                   "peak_rss_mb": max(x["peak_rss_mb"] for x in v),
                   **({"peak_cuda_mb": max(x["peak_cuda_mb"] for x in v)} if "peak_cuda_mb" in v[0] else {}),
                   "disc_updates_per_ae_update": v[0]["disc_updates"] / a.steps,
                   **({"failed_after_training": sorted({x["failed_after_training"] for x in v
                                                        if "failed_after_training" in x})}
                      if any("failed_after_training" in x for x in v) else {})}
               for n, v in results.items() if v}
    base = summary["kl-ae"]["images_per_s"] if "kl-ae" in summary else float("nan")
    for n, s in summary.items():
        s["kl-ae / this"] = base / s["images_per_s"]
    table = _table(a, summary)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps({"meta": {**meta, "complete": final and not meta.get("interrupted")},
                                                     "summary": summary}, indent=2))
        (out / "table.md").write_text(table + "\n")
    return table


def _table(a: argparse.Namespace, summary: dict) -> str:
    lines = [f"config {Path(a.config).name}, {a.resolution} px, batch {a.batch}, precision {a.precision}, "
             f"GAN {a.gan}, LPIPS {a.lpips}, workers {a.workers}, {a.steps} timed AE updates x {a.repeats} repeats",
             "", "| trainer | images/s (median) | runs | D updates per AE update | peak RSS MB | kl-ae / this |",
             "|---|---|---|---|---|---|"]
    for n, s in summary.items():
        lines.append(f"| {n} | {s['images_per_s']:.3f} | {', '.join(f'{x:.3f}' for x in s['runs'])} | "
                     f"{s['disc_updates_per_ae_update']:.2f} | {s['peak_rss_mb']:.0f} | {s['kl-ae / this']:.2f}x |")
    failed = [f"- {n} failed after its timed steps (steps kept): {'; '.join(s['failed_after_training'])}"
              for n, s in summary.items() if s.get("failed_after_training")]
    return "\n".join(lines + ([""] + failed if failed else []))


if __name__ == "__main__":
    main()
