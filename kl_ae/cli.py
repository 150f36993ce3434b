"""``kl-ae`` command line: train, config, export, eval, factors, bench, shards. Each command parses and makes one library call."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from kl_ae import __version__


def _train(args: argparse.Namespace) -> None:
    from kl_ae.config import load_config
    from kl_ae.trainer import train

    cfg = load_config(args.config, args.set or [])
    run_dir = train(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"run directory: {run_dir}")


def _config(args: argparse.Namespace) -> None:
    from kl_ae.config import CPU_WITHOUT_BF16_SECTION, applies_on_this_cpu, find_config, load_config
    from kl_ae.config_docs import describe, list_configs

    if args.list:
        print(list_configs(), end="")
        return
    cfg = load_config(args.config, args.set or [])
    layers = ["defaults"]
    if args.config:
        path = find_config(args.config)
        layers.append(str(path))
        if applies_on_this_cpu(path):
            layers.append(f"its {CPU_WITHOUT_BF16_SECTION} section (this CPU has no bf16 arithmetic)")
    layers += [f"--set {s}" for s in args.set or []]
    print(describe(cfg, "kl-ae config: " + " + ".join(layers) + ". Train with it: save this output to a file "
                        "and run kl-ae train FILE."), end="")


def _export(args: argparse.Namespace) -> None:
    from kl_ae.export import export_checkpoint

    out = export_checkpoint(args.run, args.out, force=args.force, images=args.images)
    print(f"exported to {out}")
    if args.push_to_hub:
        from kl_ae.hub import prepare_hub_folder, push_to_hub

        folder = prepare_hub_folder(out, f"{out}-hub", args.push_to_hub)
        print(f"model card and files for the Hub in {folder}")
        push_to_hub(folder, args.push_to_hub, token=args.hub_token)
        print(f"uploaded to https://huggingface.co/{args.push_to_hub}")


def _factors(args: argparse.Namespace) -> None:
    from kl_ae.export import compute_latent_factors, format_factors
    from kl_ae.model import load_autoencoder

    vae = load_autoencoder(args.model)
    factors = compute_latent_factors(vae, args.images, resolution=args.resolution, num_images=args.num_images,
                                     use_shift=True)
    print(format_factors(factors))
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(json.dumps({"model": str(args.model), **factors}, indent=2) + "\n")
        print(f"written to {args.out}")


def _eval(args: argparse.Namespace) -> None:
    from kl_ae.eval.evaluate import run

    from kl_ae.distributed import process_state

    state = process_state()
    try:
        run(args.model, args.images, out=args.out, resolution=args.resolution, batch_size=args.batch_size,
            lpips_trunk=args.lpips_trunk, baselines=args.baselines, max_images=args.max_images,
            full_size=args.full_size, tile_size=args.tile_size, tile_above=args.tile_above,
            lpips_net=args.lpips_net, rfid_weights=args.rfid_weights, max_image_pixels=args.max_image_pixels,
            fp16_audit=args.fp16_audit)
        if args.grid and state.is_main_process:
            from kl_ae.model import load_autoencoder
            from kl_ae.eval.grids import reconstruction_grid

            path = reconstruction_grid(load_autoencoder(args.model), args.images, args.grid,
                                       resolution=args.resolution, max_images=args.grid_images,
                                       amplify=args.grid_amplify)
            print(f"input | reconstruction{' | amplified difference' if args.grid_amplify else ''} grid: {path}")
    finally:
        # Under accelerate launch: end the process group here, as Accelerator.end_training does for
        # training. Left to interpreter exit, the gloo group's destructor aborted a rank once in CI
        # ("terminate called without an active exception", exit -6). No barrier before it: after
        # the gather only the main process works, and a rank that failed must not wait for others.
        if state.num_processes > 1:
            state.destroy_process_group()


def _bench(args: argparse.Namespace) -> None:
    from kl_ae.rd.benchmark import run_bench

    run_bench(args.models, args.images, args.out, resolution=args.resolution, batch_size=args.batch_size,
              max_images=args.max_images, lpips_trunk=args.lpips_trunk,
              codecs=[c.strip() for c in args.codecs.split(",") if c.strip()], grid_images=args.grid_images)


def _shards(args: argparse.Namespace) -> None:
    from kl_ae.data.shards import pack_shards

    result = pack_shards(args.src, args.out, max_count=args.max_count, max_image_pixels=args.max_image_pixels)
    print(json.dumps(result, indent=2))
    print(f"train on them with: --set data.train='{result['pattern']}'")


# Exit codes of every command (README "Exit codes"); 130 / 143 after SIGINT / SIGTERM
EXIT_USAGE = 2  # a config, data, file or weights error: nothing was trained
EXIT_DIVERGED = 3  # training stopped on persistent non-finite losses; the last good checkpoint is kept
EXIT_EVAL_FAILED = 4  # trained, checkpointed and exported; the evaluation on data.val failed
EXIT_SIGINT = 130  # 128 + SIGINT, the shell's convention (SIGTERM: 143, kl_ae.interrupt)


class _ConsoleHandler(logging.Handler):
    """Log lines printed with ``tqdm.write``, above a running progress bar instead of through it
    (tqdm's own logging bridge is private API and drops handler filters)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 (logging's contract: report, never raise)
            self.handleError(record)


def _quiet(record: logging.LogRecord) -> bool:
    """The console of ``kl-ae train``: the progress bar and one line per checkpoint, evaluation
    or warning. The per-step figures (records marked ``file_only``, see kl_ae.monitor) and
    Accelerate's informational lines (one per file a checkpoint writes) go to RUN/train.log only."""
    if getattr(record, "file_only", False):
        return False
    return record.levelno >= logging.WARNING or not record.name.startswith("accelerate")


def _console_logging(quiet: bool) -> None:
    """INFO and above to stderr through :class:`_ConsoleHandler`; ``quiet``: filtered by :func:`_quiet`."""
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if quiet:
        handler.addFilter(_quiet)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ConsoleHandler)]:  # main() called again
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kl-ae", description="Train, export and evaluate KL autoencoders.")
    parser.add_argument("--version", action="version", version=f"kl-ae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an autoencoder from a YAML config")
    p.add_argument("config", nargs="?", default=None,
                   help="YAML file overriding the defaults, or a shipped config's name (kl-ae config --list)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=20 (repeatable)")
    p.add_argument("--resume", default=None, metavar="latest|DIR",
                   help="continue from the run's latest checkpoint or from a checkpoint directory")
    p.add_argument("--overwrite", action="store_true",
                   help="train.output_dir holds a run: move it aside to OUTPUT_DIR.old-<time> and start anew")
    p.add_argument("--verbose", action="store_true",
                   help="also print every logged step's figures (always in RUN/train.log)")
    p.set_defaults(func=_train)

    p = sub.add_parser("config", help="print the resolved config: every key with its value, type and documentation")
    p.add_argument("config", nargs="?", default=None, help="YAML file or shipped config name (default: none)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--list", action="store_true", help="list the shipped configs instead")
    p.set_defaults(func=_config)

    p = sub.add_parser("export", help="write a run checkpoint in the diffusers AutoencoderKL layout")
    p.add_argument("run", help="run directory (its latest checkpoint) or checkpoint directory")
    p.add_argument("out", help="output directory (must be empty unless --force)")
    p.add_argument("--images", default=None,
                   help="images to measure scaling_factor on (folder, shard pattern, builtin:...); default: the "
                        "statistics the trainer stored with its final checkpoint (the run's data.train is never read)")
    p.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    p.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="also assemble OUT-hub (export + model card) and upload it to this Hub repo (needs network)")
    p.add_argument("--hub-token", default=None, help="Hub token (default: the logged-in one)")
    p.set_defaults(func=_export)

    p = sub.add_parser("eval", help="reconstruction PSNR / SSIM / LPIPS and throughput")
    p.add_argument("model", help="diffusers AutoencoderKL directory, run directory or checkpoint")
    p.add_argument("images", help="image folder, shard pattern or builtin:val")
    p.add_argument("--out", default=None, help="write the report as JSON to this file")
    p.add_argument("--resolution", type=int, default=256, help="resize short side + center crop size (px)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lpips-trunk", default="auto",
                   help="VGG16 trunk: auto (torchvision cache), a file path, or random (reported as lpips_random_trunk)")
    p.add_argument("--baselines", action="store_true",
                   help="also report the mean-colour and bicubic down/up baselines")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--max-image-pixels", type=int, default=89_478_485, metavar="N",
                   help="skip larger images as decompression bombs (default: Pillow's limit; 0: none)")
    p.add_argument("--lpips-net", default="vgg", choices=["vgg", "alex"],
                   help="LPIPS network (vgg: the LDM loss and most published tables; alex: reported as lpips_alex)")
    p.add_argument("--rfid-weights", default=None, metavar="PATH|none",
                   help="Inception weights for rFID (default: $TORCH_HOME/hub/checkpoints/"
                        "pt_inception-2015-12-05-6726825d.pth); without them rFID is reported as skipped")
    p.add_argument("--full-size", action="store_true",
                   help="also reconstruct at native resolution (tiled above --tile-above) and measure "
                        "the PSNR cost of tiling on images small enough for both")
    p.add_argument("--tile-size", type=int, default=256, help="tile side in pixels for --full-size")
    p.add_argument("--tile-above", type=int, default=1024,
                   help="with --full-size, images with a side above this many pixels are only decoded tiled")
    p.add_argument("--fp16-audit", action="store_true",
                   help="also check fp16 safety: activations per block against 65504, inf/NaN, fp16 vs fp32 PSNR")
    p.add_argument("--grid", default=None, metavar="FILE.png", help="also write an input | reconstruction grid")
    p.add_argument("--grid-images", type=int, default=4, help="images in the grid (the first ones)")
    p.add_argument("--grid-amplify", type=float, default=5.0,
                   help="third grid column: |input - reconstruction| times this (0: two columns only)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("factors", help="measure every latent-normalisation convention of a VAE on images")
    p.add_argument("model", help="diffusers AutoencoderKL directory, run directory or checkpoint")
    p.add_argument("images", help="image folder, shard pattern or builtin:train")
    p.add_argument("--resolution", type=int, default=256, help="resize short side + center crop size (px)")
    p.add_argument("--num-images", type=int, default=64, help="images to encode (the first ones)")
    p.add_argument("--out", default=None, help="also write them as JSON to this file")
    p.set_defaults(func=_factors)

    p = sub.add_parser("bench", help="autoencoders vs JPEG/WebP/... at matched bits per pixel")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="diffusers AutoencoderKL directories, run directories or checkpoints")
    p.add_argument("--images", required=True, help="image folder, shard pattern or builtin:val")
    p.add_argument("--out", required=True, help="output folder: bench.md, bench.csv, bench.json, rd.png, grids")
    p.add_argument("--resolution", type=int, default=256, help="resize short side + center crop size (px)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--lpips-trunk", default="auto",
                   help="VGG16 trunk: auto (torchvision cache), a file path, none, or random (reported as lpips_random_trunk)")
    p.add_argument("--codecs", default="jpeg,webp",
                   help="comma-separated codec baselines: jpeg, webp, avif, jpeg2000 (unavailable ones are skipped)")
    p.add_argument("--grid-images", type=int, default=4,
                   help="images in each grid_<model>.png (input | reconstruction | 5x difference); 0 disables")
    p.set_defaults(func=_bench)

    p = sub.add_parser("shards", help="pack a folder of images into webdataset shards")
    p.add_argument("src", help="folder of images (searched recursively)")
    p.add_argument("out", help="output folder for shard-NNNNNN.tar")
    p.add_argument("--max-count", type=int, default=1000, help="images per shard")
    p.add_argument("--max-image-pixels", type=int, default=89_478_485, metavar="N",
                   help="skip larger images as decompression bombs (default: Pillow's limit; 0: none)")
    p.set_defaults(func=_shards)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing we run needs the Hub; avoids retry stalls
    args = build_parser().parse_args(argv)
    _console_logging(quiet=not getattr(args, "verbose", True))
    from kl_ae.parsing import ConfigError

    from kl_ae.interrupt import TrainingInterrupted

    try:
        args.func(args)
    except TrainingInterrupted as err:  # the trainer logged how to resume
        return err.exit_code
    except KeyboardInterrupt:
        print(f"kl-ae {args.command}: interrupted", file=sys.stderr)
        return EXIT_SIGINT
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"kl-ae {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as err:
        from kl_ae.monitor import EvaluationFailed, TrainingDiverged

        if isinstance(err, EvaluationFailed):
            print(f"kl-ae {args.command}: evaluation failed: {err}", file=sys.stderr)
            return EXIT_EVAL_FAILED
        if not isinstance(err, TrainingDiverged):
            raise
        print(f"kl-ae {args.command}: stopped: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


if __name__ == "__main__":
    sys.exit(main())
