"""``kl-ae bench``: autoencoders against classical codecs at matched bits per pixel (bpp).

Images, crops and metrics follow ``kl_ae.eval.evaluate`` exactly (R x R centre crops, PSNR/SSIM/LPIPS
on 8-bit images through :func:`kl_ae.eval.metrics.image_metrics`, per-image values averaged), so a
bench row and a ``kl-ae eval`` number agree. What is added here is the rate of each method:

- Autoencoder: decode(posterior mode) of an R x R image whose latent has c · (R/f)² elements.
  Three storages of that latent, each one a row, each one measured (the latent is rounded as
  stored, then decoded):
  ``fp32`` 32·c/f² bpp (the ``kl-ae eval`` number); ``bf16`` 16·c/f² bpp (latent rounded to
  bfloat16); ``8bit`` 8·c/f² bpp: per image and channel, min and max (rounded to bf16) span 256
  uniform levels, each element rounded to the nearest level. The 8-bit side information
  (2 bf16 numbers per channel per image, 32·c/R² bpp) is listed in ``side_info_bpp``, not added.
  These are raw element counts without entropy coding: an upper bound on what the latent needs.
- Codec (kl_ae.rd.codecs): the whole file, headers included, in bits per pixel; for each target
  rate (the autoencoders' bf16 and 8-bit rates) every image gets the quality whose rate is the
  largest not above the target (:func:`kl_ae.rd.codecs.match_bpp`), or the closest when even the
  lowest quality is above it (counted in ``images_over_target``). The curves of ``rd.png`` sweep
  fixed qualities and average bpp and PSNR over images at each quality.
- Speed: encode / decode images per second of the fp32 autoencoder pass
  (:class:`kl_ae.eval.evaluate.AutoencoderReconstructor`: first batch excluded as warm-up); for
  codecs, single-threaded Pillow encode / decode at the matched quality, per image.
- Peak memory (MiB) of one encode + decode of the first batch, after one warm-up call: on
  CUDA ``torch.cuda.max_memory_allocated`` (weights + activations, torch allocator only); on
  Linux CPU the growth of the process's resident set size at its peak (VmHWM, reset through
  /proc/self/clear_refs) over the resident size just before (weights already loaded):
  activations and workspace, approximate because the C allocator keeps and reuses memory;
  elsewhere the growth of ``ru_maxrss`` (a lower bound: 0 when an earlier peak was higher).
"""

from __future__ import annotations

import csv
import ctypes
import gc
import itertools
import json
import re
import resource
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from kl_ae.rd import codecs as cx
from kl_ae.data.sources import iter_images
from kl_ae.eval.evaluate import (
    EVAL_DTYPE, AutoencoderReconstructor, _load_lpips, _protocol, model_summary,
    score_reconstructors, summarise,
)
from kl_ae.data.images import SkipCounter, eval_transform
from kl_ae.eval.metrics import SSIM_KERNEL_SIZE
from kl_ae.model import downsampling_factor, reconstruct as decode_mode

LATENT_BITS = {"fp32": 32, "bf16": 16, "8bit": 8}  # bits stored per latent element
TARGET_STORAGES = ("bf16", "8bit")  # the autoencoder rates the codecs are matched to and plotted
METRIC_KEYS = ("psnr", "ssim", "lpips", "lpips_random_trunk", "psnr_infinite")
CSV_COLUMNS = [
    "method", "kind", "latent_storage", "bpp", "side_info_bpp", "target_bpp", "quality_mean",
    "images_over_target", "psnr", "ssim", "lpips", "lpips_random_trunk", "encode_img_s",
    "decode_img_s", "peak_mem_mb", "latent_shape", "f", "c", "compression_ratio", "parameters",
    "num_images", "matched_to",
]


# --- latent storage and memory -------------------------------------------------------------


def store_latent(z: torch.Tensor, storage: str) -> torch.Tensor:
    """The latent as it is after storing it: (B, C, h, w) float -> same shape and dtype.

    "fp32": unchanged; "bf16": rounded to bfloat16; "8bit": per image and channel, lo/hi =
    min/max rounded to bf16, 256 uniform levels on [lo, hi], round to nearest, dequantised.
    """
    if storage == "fp32":
        return z
    if storage == "bf16":
        return z.to(torch.bfloat16).to(z.dtype)
    if storage != "8bit":
        raise ValueError(f"unknown latent storage {storage!r} (known: {', '.join(LATENT_BITS)})")
    lo = z.amin(dim=(2, 3), keepdim=True).to(torch.bfloat16).to(z.dtype)
    hi = z.amax(dim=(2, 3), keepdim=True).to(torch.bfloat16).to(z.dtype)
    step = (hi - lo).clamp_min(1e-12) / 255
    return torch.round((z - lo) / step).clamp(0, 255) * step + lo


def latent_bpp(c: int, f: int, storage: str) -> float:
    """Bits per image pixel of a c-channel latent at 1/f resolution: bits(storage) · c / f²."""
    return LATENT_BITS[storage] * c / (f * f)


class _LatentCache:
    """Stands in for the autoencoder inside AutoencoderReconstructor: passes encode/decode
    through and keeps the last posterior mode, so the bf16 / 8-bit rows decode the same latent
    without encoding the batch again."""

    def __init__(self, vae):
        self.vae, self._x, self._z = vae, None, None

    def encode(self, x: torch.Tensor):
        out = self.vae.encode(x)
        self._x, self._z = x, out.latent_dist.mode()
        return out

    def decode(self, z: torch.Tensor):
        return self.vae.decode(z)

    def stored(self, x: torch.Tensor, storage: str) -> torch.Tensor:
        """decode(store_latent(mode(x))), encoding only when x is not the last batch seen."""
        if x is not self._x:
            self.encode(x)
        return self.vae.decode(store_latent(self._z, storage)).sample


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> tuple[float, str]:
    """(peak memory of ``fn()`` in MiB, what it measures); see the module docstring."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    gc.collect()
    try:  # hand freed heap back to the OS first, so the growth below is this call's (glibc only)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # Linux >= 4.0: resets the peak resident set size (VmHWM)
        before = _proc_status_kib("VmRSS")
        fn()
        return (_proc_status_kib("VmHWM") - before) / 1024, "cpu peak RSS growth (VmHWM - VmRSS)"
    except (OSError, StopIteration):
        unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
        fn()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
        return (after - before) / 2**20, "cpu ru_maxrss growth (lower bound)"


# --- the autoencoder pass ------------------------------------------------------------------


def image_batches(images: str, resolution: int, batch_size: int, max_images: int | None,
                  counter: SkipCounter) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(names, (b, 3, R, R) float in [-1, 1]): the first ``max_images`` usable images of
    ``images`` in kl_ae.data.loaders order, through the eval crop; undecodable ones counted in ``counter``."""
    stream = itertools.islice(iter_images(images, counter), max_images)
    while chunk := list(itertools.islice(stream, batch_size)):
        crops = [eval_transform(img, resolution) for _, img in chunk]
        yield [name for name, _ in chunk], torch.stack(crops)


@torch.inference_mode()
def bench_autoencoder(vae, batches: Callable[[], Iterator], *, lpips, device: torch.device,
                      grid: tuple[Path, torch.Tensor] | None = None, progress: bool = False) -> dict:
    """Memory, speed and the fp32 / bf16 / 8-bit latent metrics of one autoencoder.

    batches: () -> fresh iterator of (names, (B, 3, R, R) in [-1, 1]). grid: (PNG path, images
    (n, 3, R, R) in [-1, 1]) for a :func:`kl_ae.eval.grids.difference_grid`. Returns model_summary
    fields, ``latent_shape`` [c, R/f, R/f], ``peak_mem_mb``/``peak_mem_measure``, ``throughput``,
    ``metrics`` {storage: summarised metrics}, ``bpp`` {storage: bpp}, ``side_info_bpp`` and
    ``num_images``.
    """
    if any(p.dtype != EVAL_DTYPE for p in vae.parameters()):
        vae = vae.to(dtype=EVAL_DTYPE)  # only then: diffusers warns about any dtype cast
    vae = vae.to(device).eval()
    info = model_summary(vae)
    f, c = info["downsampling_factor"], info["latent_channels"]
    x = next(batches())[1].to(device, EVAL_DTYPE)
    info["latent_shape"] = [c, x.shape[-2] // f, x.shape[-1] // f]

    def reconstruct(batch: torch.Tensor) -> torch.Tensor:
        return decode_mode(vae, batch)

    # Warm-up first: one-time library set-up (thread pools, kernel caches) otherwise lands in
    # whichever model is measured first.
    reconstruct(x)
    info["peak_mem_mb"], info["peak_mem_measure"] = peak_memory_mb(lambda: reconstruct(x), device)
    if grid is not None:
        from kl_ae.eval.grids import difference_grid, save_grid

        g = grid[1].to(device, EVAL_DTYPE)
        save_grid(difference_grid(g, reconstruct(g), max_rows=g.shape[0]), grid[0])
    cache = _LatentCache(vae)
    timed = AutoencoderReconstructor(cache, device)  # the fp32 row; its encode fills the cache
    recons = {"fp32": timed, "bf16": lambda b: cache.stored(b, "bf16"),
              "8bit": lambda b: cache.stored(b, "8bit")}
    names, scores = score_reconstructors(recons, batches(), lpips, device, progress)
    info.update(
        num_images=len(names), throughput=timed.throughput(),
        metrics={s: summarise(scores[s]) for s in LATENT_BITS},
        bpp={s: latent_bpp(c, f, s) for s in LATENT_BITS},
        side_info_bpp=32 * c / (x.shape[-2] * x.shape[-1]),
    )
    return info


# --- rows, files and the entry point -------------------------------------------------------


def _metric_fields(metrics: dict) -> dict:
    return {k: metrics[k] for k in METRIC_KEYS if k in metrics}


def _autoencoder_rows(name: str, info: dict) -> list[dict]:
    """One row per latent storage (fp32, bf16, 8bit) of one :func:`bench_autoencoder` result."""
    t = info["throughput"]
    return [{
        "method": f"{name}@{storage}", "kind": "autoencoder", "latent_storage": storage,
        "bpp": info["bpp"][storage], **_metric_fields(info["metrics"][storage]),
        "side_info_bpp": info["side_info_bpp"] if storage == "8bit" else 0.0,
        "encode_img_s": t["encode_images_per_s"], "decode_img_s": t["decode_images_per_s"],
        "peak_mem_mb": info["peak_mem_mb"], "latent_shape": "x".join(map(str, info["latent_shape"])),
        "f": info["downsampling_factor"], "c": info["latent_channels"],
        "compression_ratio": f"{info['compression_ratio']:g}x", "parameters": info["parameters"],
        "num_images": info["num_images"],
    } for storage in LATENT_BITS]


MD_FORMATS = {"psnr": ".2f", "ssim": ".4f", "lpips": ".4f", "lpips_random_trunk": ".4f",
              "bpp": ".4g", "encode_img_s": ".1f", "decode_img_s": ".1f", "peak_mem_mb": ".1f"}


def _cell(row: dict, key: str, lpips_name: str | None, fmt: str = ".6g") -> str:
    """A row value as text: "inf" for infinite PSNR, "skipped" for LPIPS without real weights."""
    v = row.get(key)
    if v is None:
        if key == "psnr" and row.get("psnr_infinite"):
            return "inf"
        return "skipped" if key == "lpips" and lpips_name != "lpips" else ""
    return format(v, fmt) if isinstance(v, float) else str(v)


def write_csv(rows: list[dict], path: Path, lpips_name: str | None) -> None:
    """``bench.csv``: one row per method, columns :data:`CSV_COLUMNS`; empty = not applicable."""
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_COLUMNS)
        writer.writerows([[_cell(r, k, lpips_name) for k in CSV_COLUMNS] for r in rows])


def write_markdown(report: dict, path: Path) -> None:
    """``bench.md``: protocol lines, then the table of every row."""
    lpips_name = report["lpips_name"]
    columns = {"method": "method", "kind": "kind", "bpp": "bpp", "psnr": "PSNR (dB)",
               "ssim": "SSIM", "lpips": "LPIPS", "encode_img_s": "encode img/s",
               "decode_img_s": "decode img/s", "peak_mem_mb": "peak MiB",
               "latent_shape": "latent c×h×w", "f": "f", "compression_ratio": "ratio"}
    if lpips_name == "lpips_random_trunk":
        columns["lpips_random_trunk"] = "LPIPS (RANDOM trunk, not LPIPS)"
    lines = [f"# kl-ae bench: {report['num_images']} images from {report['images']}", ""]
    lines += [f"- {k}: {v}" for k, v in report["protocol"].items()] + [""]
    lines += ["| " + " | ".join([*columns.values(), "notes"]) + " |",
              "|" + "---|" * (len(columns) + 1)]
    for row in report["rows"]:
        if row["kind"] == "codec":
            note = (f"target {row['target_bpp']:.3g} bpp, mean quality {row['quality_mean']:.1f}, "
                    f"{row['images_over_target']}/{row['num_images']} images over target")
        else:
            note = {"fp32": "kl-ae eval number", "bf16": "latent rounded to bf16",
                    "8bit": f"+ {row['side_info_bpp']:.3g} bpp side info"}[row["latent_storage"]]
        cells = [_cell(row, k, lpips_name, MD_FORMATS.get(k, ".6g")) for k in columns]
        lines.append("| " + " | ".join([*cells, note]) + " |")
    lines += ["", "Rate-distortion plot: rd.png. " + (
        "Grids (input | reconstruction | 5x |difference|): "
        + ", ".join(report["grids"]) if report["grids"] else "")]
    path.write_text("\n".join(lines) + "\n")


def plot_rd(curves: dict, models: dict, path: Path) -> None:
    """``rd.png``: PSNR against bpp (log scale); codec curves, autoencoders at bf16 and 8-bit."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for codec, points in curves.items():
        pts = [(p["bpp"], p["psnr"]) for p in points if p.get("psnr") is not None]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=codec)
    for name, info in models.items():
        pts = [(info["bpp"][s], info["metrics"][s].get("psnr")) for s in TARGET_STORAGES]
        pts = [p for p in pts if p[1] is not None]
        if pts:
            ax.plot(*zip(*pts), linestyle=":", marker="o", label=f"{name} (bf16, 8-bit latent)")
    ax.set_xscale("log")
    ax.set(xlabel="bits per pixel (log scale)", ylabel="PSNR (dB, 8-bit images)",
           title="Rate-distortion: codecs (whole file) vs autoencoder latents (raw)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)


def _model_names(paths: list[str]) -> dict[str, Path]:
    """{unique display name: path}; a name is the folder name, suffixed -2, -3... on clashes."""
    names: dict[str, Path] = {}
    for p in map(Path, paths):
        base = p.resolve().name or str(p)
        name, i = base, 1
        while name in names:
            i += 1
            name = f"{base}-{i}"
        names[name] = p
    return names


def run_bench(models: list[str], images: str, out: str | Path, *, resolution: int = 256,
              batch_size: int = 4, max_images: int | None = None, lpips_trunk: str | None = "auto",
              codecs: Sequence[str] = ("jpeg", "webp"), grid_images: int = 4,
              device: str | None = None, progress: bool = True) -> dict:
    """``kl-ae bench``: benchmark ``models`` (export, run or checkpoint directories) and codecs.

    Writes bench.md, bench.csv, bench.json, rd.png and grid_<model>.png (when grid_images > 0)
    into ``out`` and returns the bench.json report. See the module docstring for the protocol.
    Raises ValueError on bad arguments, an unusable resolution or no usable image.
    """
    from kl_ae.model import load_autoencoder

    if not models or batch_size < 1 or (max_images is not None and max_images < 1):
        raise ValueError("need at least one model, batch_size >= 1 and max_images >= 1")
    if resolution < SSIM_KERNEL_SIZE:
        raise ValueError(f"resolution must be at least {SSIM_KERNEL_SIZE} (the SSIM window)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lpips, lpips_reason = _load_lpips(lpips_trunk, device)
    usable = cx.available_codecs(list(codecs))
    counters: list[SkipCounter] = []

    def batches() -> Iterator:
        counters.append(SkipCounter())
        return image_batches(images, resolution, batch_size, max_images, counters[-1])

    if next(batches(), None) is None:
        raise ValueError(f"no usable image in {images!r} ({counters[-1].summary()})")
    grid_x, n_grid = None, min(grid_images, max_images or grid_images)
    if n_grid > 0:
        grid_x = next(image_batches(images, resolution, n_grid, n_grid, SkipCounter()))[1]
    results, grids = {}, []
    for name, path in tqdm(_model_names(models).items(), desc="models", disable=not progress):
        vae = load_autoencoder(path)
        f = downsampling_factor(vae)
        if resolution % f:
            raise ValueError(f"resolution {resolution} is not a multiple of {name}'s factor {f}")
        grid = out / f"grid_{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.png"
        results[name] = {"path": str(path), **bench_autoencoder(
            vae, batches, lpips=lpips, device=device, progress=progress,
            grid=None if grid_x is None else (grid, grid_x))}
        grids += [grid.name] if grid_x is not None else []
        del vae
        gc.collect()
    matched_to: dict[float, list[str]] = {}
    for name, info in results.items():
        for storage in TARGET_STORAGES:
            matched_to.setdefault(info["bpp"][storage], []).append(f"{name}@{storage}")
    codec_rows, curves = cx.bench_codecs(usable, matched_to, batches(), lpips=lpips,
                                         device=device, progress=progress)
    rows = [r for n, i in results.items() for r in _autoencoder_rows(n, i)] + codec_rows
    report = {
        "images": images, "num_images": next(iter(results.values()))["num_images"],
        "skipped": counters[-1].as_dict(), "lpips_name": lpips[1] if lpips else None,
        "codecs": usable, "codecs_skipped": {c: cx.codec_status(c) for c in codecs if c not in usable},
        "models": results, "rows": rows, "rd_curves": curves, "grids": grids,
    }
    report["protocol"] = _bench_protocol(report, resolution, lpips_reason, device, batch_size)
    write_outputs(report, out)
    return report


def write_outputs(report: dict, out: Path) -> None:
    """bench.json, bench.csv, bench.md and rd.png of a :func:`run_bench` report; prints bench.md."""
    (out / "bench.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    write_csv(report["rows"], out / "bench.csv", report["lpips_name"])
    write_markdown(report, out / "bench.md")
    plot_rd(report["rd_curves"], report["models"], out / "rd.png")
    print((out / "bench.md").read_text())


def _bench_protocol(report: dict, resolution: int, lpips_reason: str | None, device,
                    batch_size: int) -> dict:
    base = _protocol(resolution, report["lpips_name"], lpips_reason)
    measures = sorted({info["peak_mem_measure"] for info in report["models"].values()})
    codecs = [f"{c} ({cx.CODECS[c].note})" for c in report["codecs"]]
    codecs += [f"{c} skipped: {why}" for c, why in report["codecs_skipped"].items()]
    return {
        "metrics": base["text"],
        "lpips": base["lpips"],
        "autoencoder rate": "latent elements x bits per element per image pixel, no entropy "
        "coding: fp32 32c/f², bf16 16c/f², 8bit 8c/f² (per image and channel min-max, 256 "
        "uniform levels; side info 32c/R² bpp listed, not added); each decoded as stored",
        "codec rate": "whole file in bits per pixel, headers included (a real cost that weighs "
        "heavily on small images: a JPEG's headers alone are ~600 bytes); per image the quality "
        "with the largest rate not above the target, else the closest (over target)",
        "codecs": "; ".join(codecs) or "none",
        "speed": f"images/s on {device}, batch {batch_size}, fp32 weights, first batch excluded "
        "(autoencoders); codecs single-threaded Pillow, per image at the matched quality",
        "peak memory": f"MiB of one encode + decode of batch {batch_size}: {', '.join(measures)} "
        "(CPU: activations and workspace over the resident size before, approximate)",
    }
