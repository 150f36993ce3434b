"""Quality per compute: PSNR/SSIM/LPIPS on held-out images against training minutes and images seen.

    python bench/quality.py --quick                       # builtin photos, 3 minutes, kl-ae only
    python bench/quality.py --config configs/quickstart.yaml \\
        --data ../shared/data/photos/train --val ../shared/data/photos/val \\
        --minutes 10 --every 2 --plain --peer /path/to/train_autoencoderkl.py \\
        --peer-python /path/to/peer/python --out results/quality/quickstart-10min

Each trainer trains for the same wall-clock budget (``--minutes`` of training, start-up and
checkpoint writes left out), one after another on the same machine, never at the same time:

  kl-ae      ``kl-ae train CONFIG`` with ``train.max_minutes`` = the budget and a checkpoint every
             ``--every`` minutes (``train.checkpoint_every_minutes``); ``--variant NAME=KEY=VALUE,...``
             adds runs with other ``--set`` overrides
  plain      bench/plain_loop.py (LDM's Adam betas, LR 2e-4, fp32, eager), saving its model at the
             same time marks; with LPIPS its VGG trunk is random, so the bench refuses --plain when
             the config's perceptual_weight > 0
  peer       the diffusers research-project trainer (train_autoencoderkl.py, a file you fetch), same
             architecture, resolution, batch and loss terms; it has no time limit, so a short run
             first measures its step rate and the real run gets the steps that fill the budget;
             its final model is evaluated at its measured training time

The data pipelines are each trainer's own, not matched: kl-ae takes random crops of photos
resized to ``data.short_side_range`` (with its config's channel shuffle, final phase, dead
leaves); the peer resizes each whole photo to the resolution and centre-crops it (no flip), and
the plain loop does the same with a random crop. The peer trains on L1 alone where kl-ae's
config may add L2 (the peer has no L2 term).

Every saved model is then evaluated on ``--val`` with ``kl-ae eval``'s protocol (kl_ae.eval.evaluate:
short side resized to 256, centre crop, PSNR on 8-bit images, SSIM, LPIPS only with the real
VGG16 weights) and its two baselines (mean colour, bicubic down/up by the model's factor).
Writes result.json, table.md and quality.png (PSNR against minutes and against images seen,
baselines as horizontal lines) to ``--out`` and prints the table and the plot's path.
A trainer that fails keeps what it saved before failing; its error is in the table's notes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from throughput import _pythonpath, _random_vgg_cache, split_overrides  # noqa: E402  (bench/ is not a package)


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", default=str(REPO / "configs/quickstart.yaml"), help="kl-ae config")
    p.add_argument("--data", default="builtin:train", help="training images: folder, shards or builtin:train")
    p.add_argument("--val", default="builtin:val", help="held-out images: folder, shards or builtin:val")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget per trainer (minutes)")
    p.add_argument("--every", type=float, default=2.0, help="minutes between evaluated checkpoints")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                   help="an extra kl-ae run with --set overrides (repeatable)")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                   help="--set override for every kl-ae run (e.g. train.batch_size=16)")
    p.add_argument("--no-base", action="store_true", help="leave out the kl-ae run without variant overrides")
    p.add_argument("--plain", action="store_true", help="also run bench/plain_loop.py")
    p.add_argument("--plain-lr", type=float, default=2e-4, help="the plain loop's Adam LR (kl-ae's LDM-style quickstart LR until 2026-12)")
    p.add_argument("--peer", help="path to train_autoencoderkl.py (left out: no peer)")
    p.add_argument("--peer-python", default=sys.executable, help="python with the peer's packages")
    p.add_argument("--peer-precision", choices=["same", "no", "bf16", "fp16"], default="same",
                   help="the peer's --mixed_precision (same: kl-ae's resolved precision). Its bf16 casts the "
                        "weights themselves to bf16, unlike kl-ae's autocast over fp32 weights")
    p.add_argument("--peer-lr", type=float, default=2e-4, help="the peer's --learning_rate (its default 4.5e-6 is for 50k+ steps)")
    p.add_argument("--lpips-trunk", default="auto",
                   help="VGG16 weights for the LPIPS column (auto: torchvision's cache; none: no LPIPS)")
    p.add_argument("--out", help="directory for result.json, table.md, quality.png (default: a temporary one)")
    p.add_argument("--keep-runs", action="store_true", help="keep the run directories (in --out/runs)")
    p.add_argument("--quick", action="store_true", help="builtin photos, 3 minutes, a checkpoint every minute")
    p.add_argument("--dry-run", action="store_true",
                   help="toy size (tiny model, 32 px, 0.1 minute budget, builtin photos): checks the pipeline")
    a = p.parse_args(argv)
    if a.quick:
        a.minutes, a.every = 3.0, 1.0
    if a.dry_run:
        a.minutes, a.every = 0.1, 0.05
        a.sets = ["model.block_out_channels=[8,16]", "model.norm_num_groups=8", "data.resolution=32",
                  "data.short_side_range=[]", "data.num_workers=0", "train.batch_size=2",
                  "train.scaling_images=2", *a.sets]
    if a.peer and not Path(a.peer).is_file():
        p.error(f"--peer {a.peer}: no such file (fetch train_autoencoderkl.py from the diffusers repository)")
    if a.every <= 0 or a.minutes <= 0:
        p.error("--minutes and --every must be positive")
    return a


def _short(spec: str) -> str:
    """The last two parts of a path (``photos/val``), for titles that should not carry a home folder."""
    return "/".join(Path(spec).parts[-2:]) if "/" in spec else spec


def _run(cmd: list[str], log: Path, env: dict) -> dict:
    """Run ``cmd`` (output to ``log``); returns {"returncode", "wall_s", "error"} and never raises.

    On Ctrl-C or a time limit's SIGINT (``timeout`` signals the whole process group) the trainer
    is left to stop as it does on a signal (kl-ae writes a checkpoint first, kl_ae.interrupt),
    not killed after 0.25 s as ``subprocess.run`` does; the result then has ``"interrupted":
    True``, and main() evaluates what was saved and starts no further trainer."""
    t0 = time.perf_counter()
    interrupted = False
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            proc.wait()
        except KeyboardInterrupt:
            interrupted = True
            print("  interrupted: waiting for the trainer to save and stop (Ctrl-C again to abort)", flush=True)
            proc.send_signal(signal.SIGINT)  # a repeat within a second counts as the same request there
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    out = {"returncode": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1),
           **({"interrupted": True} if interrupted else {})}
    if proc.returncode != 0:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        out["error"] = lines[-1][:300] if lines else f"exit {proc.returncode}"
    return out


def _kl_ae_settings(a: argparse.Namespace, run_dir: Path) -> list[str]:
    return [f"data.train={a.data}", "data.val=", f"train.max_minutes={a.minutes}", "train.max_steps=100000000",
            f"train.checkpoint_every_minutes={a.every}", "train.checkpoint_every=100000000", "train.keep_last=0",
            "train.image_every=100000000", "train.tracker=none", f"train.output_dir={run_dir}", *a.sets]


def _kl_ae_points(run_dir: Path) -> list[dict]:
    """(path, step, images_seen, minutes) of every checkpoint of a kl-ae run."""
    from kl_ae.checkpoint import LOOP_STATE

    points = []
    for ckpt in sorted((run_dir / "checkpoints").glob("step-*")):
        if (ckpt / LOOP_STATE).is_file():
            state = json.loads((ckpt / LOOP_STATE).read_text())
            points.append({"path": str(ckpt), "step": state["step"], "images_seen": state.get("images_seen"),
                           "minutes": state.get("train_seconds", math.nan) / 60})
    return points


def _saved_points(folder: Path) -> list[dict]:
    """Models saved by the plain loop (DIR/min-NNN.N/, DIR/final/, each with meta.json)."""
    points = []
    for d in sorted(folder.glob("*/meta.json")):
        meta = json.loads(d.read_text())
        points.append({"path": str(d.parent), "step": meta["step"], "images_seen": meta["images_seen"],
                       "minutes": meta["train_seconds"] / 60})
    unique = {p["step"]: p for p in points}  # the final save may repeat the last time mark
    return sorted(unique.values(), key=lambda p: p["step"])


def _peer_command(a: argparse.Namespace, cfg, vae_dir: Path, data: Path, out_dir: Path, steps: int, every: int,
                  precision: str) -> list[str]:
    loss, t = cfg.loss, cfg.train
    return [a.peer_python, str(HERE / "steptimer.py"), str(out_dir / "steps.json"), a.peer,
            "--model_config_name_or_path", str(vae_dir), "--train_data_dir", str(data),
            "--resolution", str(cfg.data.resolution), "--train_batch_size", str(t.batch_size),
            "--max_train_steps", str(steps), "--mixed_precision", precision,
            "--disc_start", str(loss.disc_start), "--rec_loss", "l1",
            "--perceptual_scale", str(loss.perceptual_weight), "--kl_scale", str(loss.kl_weight),
            "--disc_scale", str(loss.disc_weight), "--learning_rate", str(a.peer_lr), "--lr_warmup_steps", "0",
            "--dataloader_num_workers", str(cfg.data.num_workers), "--seed", "0",
            *(["--use_ema"] if t.ema_decay > 0 else []),
            "--validation_image", str(next(_image_files(data))), "--validation_steps", "100000000",
            "--checkpointing_steps", str(every), "--report_to", "wandb",
            "--output_dir", str(out_dir / "model"), "--cache_dir", str(out_dir / "hf-cache")]


def _image_files(folder: Path):
    return (p for p in sorted(folder.rglob("*")) if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


def _training_times(times: list[float], pauses_after: list[int]) -> list[float]:
    """Step end times with the interval after each step in ``pauses_after`` (1-based: the peer
    validates after step 1 and saves a checkpoint after step N) replaced by the median interval,
    so the peer's clock leaves out validation and checkpoint writes as kl-ae's does."""
    import statistics

    gaps = [b - a for a, b in zip(times, times[1:])]
    paused = {n - 1 for n in pauses_after if 1 <= n <= len(gaps)}  # gaps[n - 1]: from step n to step n + 1
    plain = [g for i, g in enumerate(gaps) if i not in paused]
    if not plain:
        return list(times)
    typical = statistics.median(plain)
    for i in paused:
        gaps[i] = typical
    out = [times[0]]
    for g in gaps:
        out.append(out[-1] + g)
    return out


def _step_times(steps_json: Path) -> list[float]:
    """Seconds at which each optimizer step ended, recorded by bench/steptimer.py."""
    return json.loads(steps_json.read_text())["times_s"]


def peer_images_seen(kinds: list[str], n_images: int, batch: int) -> int:
    """Images the peer's autoencoder updates saw: each loop iteration over its DataLoader (which
    keeps the last, partial batch of an epoch) is one optimizer step, ``kinds[i]`` 'ae' or 'd';
    the last of each epoch's ceil(n/batch) batches holds n - (ceil(n/batch) - 1) * batch images."""
    per_epoch = -(-n_images // batch)
    last = n_images - (per_epoch - 1) * batch
    return sum(last if i % per_epoch == per_epoch - 1 else batch for i, kind in enumerate(kinds) if kind == "ae")


def _materialise(spec: str, folder: Path) -> Path:
    """An image folder for trainers that only read folders (the peer, the plain loop)."""
    if Path(spec).is_dir():
        return Path(spec)
    from PIL import Image

    from kl_ae.data.sources import list_image_files

    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(list_image_files(spec)):
        Image.open(path).convert("RGB").save(folder / f"img{i:04d}.png")
    return folder


def _evaluate(points: list[dict], val: str, lpips_trunk: str | None, val_resolution: int,
              after_each=lambda: None) -> dict | None:
    """Fill each point with PSNR/SSIM(/LPIPS), calling ``after_each()`` after each; return the
    baselines of the first evaluation. A point not reached (a signal stopped the evaluation) keeps
    the eval_error 'not evaluated'."""
    from kl_ae.eval.evaluate import evaluate
    from kl_ae.model import load_autoencoder

    for point in points:
        point.setdefault("eval_error", "not evaluated")
    baselines = None
    for point in points:
        try:
            vae = load_autoencoder(point["path"])
            report = evaluate(vae, val, resolution=val_resolution, lpips_trunk=lpips_trunk,
                              baselines=baselines is None, progress=False, latent=False)
        except Exception as err:  # one bad checkpoint must not lose the others' figures
            point["eval_error"] = f"{type(err).__name__}: {err}"[:300]
            print(f"  {Path(point['path']).name}: evaluation failed: {point['eval_error']}", flush=True)
            continue
        m = report["metrics"]
        point.pop("eval_error")
        point.update({"psnr": m["psnr"], "ssim": m["ssim"], "lpips": m.get("lpips")})
        if baselines is None:
            baselines = {k: {"psnr": v["psnr"], "ssim": v["ssim"]} for k, v in report["baselines"].items()}
            point["lpips_note"] = report.get("lpips_skipped", "")
        print(f"  {Path(point['path']).name}: {point['minutes']:.2f} min, {point['images_seen']} images, "
              f"PSNR {point['psnr']:.2f} dB, SSIM {point['ssim']:.3f}", flush=True)
        after_each()
    return baselines


def _table(a: argparse.Namespace, results: dict, baselines: dict | None, meta: dict) -> str:
    lines = [f"config {Path(a.config).name}, train {_short(a.data)}, val {_short(a.val)}, budget {a.minutes:g} min, "
             f"precision {meta['precision']} ({meta['cpu_capability']}), {meta['device']}, {meta.get('cpu', '')}, "
             f"model {meta.get('block_out_channels')} (before --variant overrides)", "",
             "| trainer | minutes | images seen | step | PSNR (dB) | SSIM | LPIPS |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for p in r["points"]:
            if p.get("psnr") is None:
                error = p.get("eval_error", "?")
                lines.append(f"| {name} | {p['minutes']:.2f} | {p['images_seen']} | {p['step']} | "
                             f"{error if error == 'not evaluated' else 'evaluation failed: ' + error} | | |")
                continue
            lpips = f"{p['lpips']:.4f}" if p.get("lpips") is not None else "-"
            lines.append(f"| {name} | {p['minutes']:.2f} | {p['images_seen']} | {p['step']} | {p['psnr']:.2f} | "
                         f"{p['ssim']:.4f} | {lpips} |")
    for name, b in (baselines or {}).items():
        lines.append(f"| baseline: {name} | - | - | - | {b['psnr']:.2f} | {b['ssim']:.4f} | - |")
    notes = [f"- {name}: {r['error']}" for name, r in results.items() if r.get("error")]
    notes += [f"- {name}: {r['note']}" for name, r in results.items() if r.get("note")]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines)


def _plot(results: dict, baselines: dict | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, label in ((axes[0], "minutes", "training minutes"), (axes[1], "images_seen", "images seen")):
        for name, r in results.items():
            pts = [p for p in r["points"] if p.get("psnr") is not None]
            if pts:
                ax.plot([p[key] for p in pts], [p["psnr"] for p in pts], marker="o", label=name)
        for i, (name, b) in enumerate((baselines or {}).items()):
            ax.axhline(b["psnr"], linestyle="--", color=f"C{7 + i}", label=f"baseline: {name}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PSNR on held-out images (dB)")
    if axes[1].get_legend_handles_labels()[0]:  # none before the first evaluation (write() runs then too)
        axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_peer(a: argparse.Namespace, cfg, work: Path, env: dict, precision: str) -> dict:
    """Calibrate the peer's step rate, then run it for the steps that fill the budget, saving a
    checkpoint (its ``checkpoint-N/autoencoderkl[_ema]/`` is a loadable AutoencoderKL) about every
    ``--every`` minutes. Times come from bench/steptimer.py (first optimizer step = 0)."""
    from kl_ae.data.sources import list_image_files
    from kl_ae.model import build_autoencoder

    env = {**env, "TORCH_HOME": str(work / "peer-torch")}
    _random_vgg_cache(work / "peer-torch")  # the peer builds LPIPS even at --perceptual_scale 0 (timing-only weights)
    vae_dir = work / "peer-vae-config"
    build_autoencoder(cfg.model).save_config(vae_dir)
    data = _materialise(a.data, work / "peer-data")
    calib = work / "peer-calibration"
    calib.mkdir()
    n_calib = 12
    res = _run(_peer_command(a, cfg, vae_dir, data, calib, n_calib, n_calib, precision), calib / "log.txt", env)
    times = _step_times(calib / "steps.json") if (calib / "steps.json").is_file() else []
    if res.get("interrupted"):
        return {"points": [], "run": res, "error": "interrupted during its calibration run"}
    if len(times) < 3:
        return {"points": [], "error": f"calibration run failed after {len(times)} steps: {res.get('error')}"}
    rate = (len(times) - 2) / (times[-1] - times[1]) if len(times) > 2 and times[-1] > times[1] else 1.0
    steps = max(2, int(rate * a.minutes * 60))
    every = max(1, round(rate * a.every * 60))
    out = work / "peer"
    out.mkdir()
    print(f"peer: {rate:.2f} optimizer steps/s after its first step in a {n_calib}-step calibration run; "
          f"{steps} steps for {a.minutes:g} min, a checkpoint every {every}", flush=True)
    res = _run(_peer_command(a, cfg, vae_dir, data, out, steps, every, precision), out / "log.txt", env)
    result: dict = {"points": [], "run": res, "peer_lr": a.peer_lr, "peer_precision": precision,
                    "note": "optimizer steps (AE and D updates) sized by a calibration run; minutes from "
                            "its first optimizer step (bench/steptimer.py), its start-up left out"}
    if (out / "steps.json").is_file():
        rec = json.loads((out / "steps.json").read_text())
        kinds = rec["kinds"]
        n_images = len(list_image_files(str(data)))  # the peer's epoch length, for images_seen
        dirs = sorted(out.glob("model/checkpoint-*"), key=lambda d: int(d.name.split("-")[1]))
        times = _training_times(rec["times_s"], [1, *(int(d.name.split("-")[1]) for d in dirs)])
        final = out / "model" if (out / "model" / "config.json").is_file() else None
        for d, n in [(d, int(d.name.split("-")[1])) for d in dirs] + ([(final, len(times))] if final else []):
            sub = d / ("autoencoderkl_ema" if (d / "autoencoderkl_ema").is_dir() else "autoencoderkl")
            path = sub if d != final else d
            if n <= len(times) and (path / "config.json").is_file():
                result["points"].append({"path": str(path), "step": n,
                                         "images_seen": peer_images_seen(kinds[:n], n_images,
                                                                         cfg.train.batch_size),
                                         "minutes": (times[n - 1] - times[0]) / 60})
        result["points"] = list({p["step"]: p for p in result["points"]}.values())
    if res.get("error"):
        saved = "after saving its final model" if (out / "model" / "config.json").is_file() else "before its final save"
        result["error"] = f"exit {res['returncode']} {saved}: {res['error']}"
    return result


def main(argv: list[str] | None = None) -> dict:
    a = _parse(argv)
    sys.path.insert(0, str(REPO))
    # Python keeps SIGINT ignored when it starts so (a background job of a non-interactive shell,
    # as bench/gpu.sh's steps can be); the bench's time limits and Ctrl-C rely on it (_run)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    from kl_ae.config import load_config
    from kl_ae.distributed import process_state
    from kl_ae.precision import machine_info, resolve_mixed_precision

    cfg = load_config(a.config, _kl_ae_settings(a, Path("unused")))
    if a.plain and cfg.loss.perceptual_weight > 0:  # its trunk would be random against kl-ae's real one
        raise SystemExit("--plain: bench/plain_loop.py's LPIPS has a random VGG trunk; leave --plain out or set "
                         "loss.perceptual_weight=0 in the config")
    precision, note, _ = resolve_mixed_precision(cfg.train.mixed_precision, process_state().device)
    meta = {"argv": sys.argv[1:] if argv is None else argv, **machine_info(),
            "precision": precision, "precision_note": note, "date": time.strftime("%Y-%m-%d %H:%M"),
            # the config's on_cpu_without_bf16 section may have chosen it on this machine
            "block_out_channels": list(cfg.model.block_out_channels)}
    print(note, flush=True)
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="kl-ae-quality-"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kl-ae-quality-work-"))
    runs_dir = out / "runs" if a.keep_runs else work / "runs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": _pythonpath(REPO)}
    lpips_trunk = None if a.lpips_trunk == "none" else a.lpips_trunk
    from kl_ae.data.sources import iter_images

    try:  # a bad --val would otherwise surface only after the whole training budget
        next(iter_images(a.val))
    except Exception as err:
        raise SystemExit(f"--val {a.val}: no readable image ({type(err).__name__}: {err})") from None
    results: dict[str, dict] = {}
    baselines = None

    def write() -> str:
        """result.json, table.md and quality.png as they stand (after every trainer, so a run cut
        short by a time limit keeps what it measured)."""
        table = _table(a, results, baselines, meta)
        _plot(results, baselines, out / "quality.png",
              f"{Path(a.config).name}: {_short(a.data)} -> {_short(a.val)}, {a.minutes:g} min, {precision}")
        (out / "result.json").write_text(json.dumps({"meta": meta, "baselines": baselines, "results": results},
                                                    indent=2) + "\n")
        (out / "table.md").write_text(table + "\n")
        return table

    def evaluate(name: str) -> bool:
        """Evaluate this trainer's points, writing after each; True if a signal stopped it (then
        the points not reached stay 'not evaluated' in the files, and main() starts nothing more)."""
        nonlocal baselines
        write()  # the trainer's points, before their evaluation
        try:
            baselines = _evaluate(results[name]["points"], a.val, lpips_trunk, cfg.data.val_resolution,
                                  after_each=write) or baselines
        except KeyboardInterrupt:
            print(f"  {name}: evaluation interrupted; the files keep the points evaluated so far", flush=True)
            note = results[name].get("note")
            results[name]["note"] = (f"{note}; " if note else "") + "evaluation interrupted (a signal or time limit)"
            results[name]["eval_interrupted"] = True
            write()
            return True
        write()
        return False

    trainers: list[tuple[str, list[str]]] = [] if a.no_base else [("kl-ae", [])]
    for spec in a.variant:
        name, _, sets = spec.partition("=")
        trainers.append((f"kl-ae[{name}]", split_overrides(sets)))
    for name, extra in trainers:
        run_dir = runs_dir / name
        cmd = [sys.executable, "-m", "kl_ae.cli", "train", a.config,
               *sum((["--set", s] for s in [*_kl_ae_settings(a, run_dir), *extra]), [])]
        print(f"{name}: training {a.minutes:g} min ...", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        res = _run(cmd, run_dir.parent / f"{name}.log", env)
        if not a.keep_runs:  # the trainer's log goes with the results; its run folder does not
            shutil.copy(run_dir.parent / f"{name}.log", out / f"{name}.log")
        results[name] = {"points": _kl_ae_points(run_dir), "run": res, "overrides": extra,
                         **({"error": res["error"]} if res.get("error") else {})}
        if evaluate(name) or res.get("interrupted"):
            break
    stopped = any(r.get("run", {}).get("interrupted") or r.get("eval_interrupted") for r in results.values())
    if a.plain and not stopped:
        from kl_ae.model import build_autoencoder

        vae_dir = work / "plain-vae-config"
        build_autoencoder(cfg.model).save_config(vae_dir)
        saved = runs_dir / "plain"
        c, d = cfg.train, cfg.data
        cmd = [sys.executable, str(HERE / "plain_loop.py"), "--vae-config", str(vae_dir),
               "--data", str(_materialise(a.data, work / "plain-data")), "--resolution", str(d.resolution),
               "--batch", str(c.batch_size), "--steps", "100000000", "--workers", str(d.num_workers),
               "--disc-start", str(cfg.loss.disc_start), "--lpips-weight", str(cfg.loss.perceptual_weight),
               "--lr", str(a.plain_lr), "--minutes", str(a.minutes), "--every", str(a.every), "--save", str(saved)]
        print(f"plain: training {a.minutes:g} min ...", flush=True)
        saved.mkdir(parents=True, exist_ok=True)
        res = _run(cmd, runs_dir / "plain.log", env)
        results["plain"] = {"points": _saved_points(saved), "run": res,
                            **({"error": res["error"]} if res.get("error") else {})}
        stopped = evaluate("plain") or bool(res.get("interrupted"))
    if a.peer and not stopped:
        print(f"peer: training {a.minutes:g} min ...", flush=True)
        results["peer"] = _run_peer(a, cfg, work, env, precision if a.peer_precision == "same" else a.peer_precision)
        evaluate("peer")

    table = write()
    print(table)
    print(f"plot: {out / 'quality.png'}")
    shutil.rmtree(work, ignore_errors=True)
    return {"meta": meta, "baselines": baselines, "results": results}


if __name__ == "__main__":
    main()
