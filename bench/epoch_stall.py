"""How long the training step waits for data on a small folder: a new DataLoader pass per epoch
against kl-ae's one pass across epochs, in one run.

    python bench/epoch_stall.py ../shared/data/photos/train --resolution 256 --short-side 256 512 \\
        --batch 16 --workers 2 --step-s 0.15 --out results/throughput/epoch-stall.json

A folder of n images gives n // batch batches an epoch (53 photos, batch 16: 3). A DataLoader
pass ends with its epoch: its workers fetch nothing of the next epoch until the step has taken
the last batch, so each epoch starts with the step waiting for a whole batch to be decoded and
cropped, and at most one batch per worker is in flight however many workers there are.
kl-ae's TrainLoader (since 2026-12-03) iterates one DataLoader pass over all epochs, so the
workers run ahead across the boundary. Both modes here load the same samples (the same
:class:`kl_ae.data.samplers.EpochSampler` order, crops and decode cache); the step is
``time.sleep(--step-s)``, which stands for a GPU step that leaves the CPU to the workers (on a
CPU, the step competes with the workers for the cores instead: measure there with
bench/quality.py). The first ``--warmup`` batches (worker start-up, filling the decode caches)
are not counted. Printed and written: per mode, the seconds the step waited for its batches and
their share of the wall time, and the ratio of the two wall times.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _timed(batches, step_s: float, warmup: int, count: int) -> dict:
    """Consume ``warmup + count`` batches with a simulated step; time the last ``count``."""
    waited, it = 0.0, iter(batches)
    for _ in range(warmup):
        next(it)
        time.sleep(step_s)
    t0 = time.perf_counter()
    for _ in range(count):
        t = time.perf_counter()
        next(it)
        waited += time.perf_counter() - t
        time.sleep(step_s)
    wall = time.perf_counter() - t0
    return {"batches": count, "wall_s": round(wall, 3), "waited_s": round(waited, 3),
            "waited_share": round(waited / wall, 3)}


def _per_epoch_passes(loader):
    """kl-ae's folder loading before 2026-12-03: a new pass of the same DataLoader every epoch."""
    from torch.utils.data import DataLoader

    old = loader._loader
    sampler = loader._sampler.epochs  # the per-epoch EpochSampler inside the endless one
    dl = DataLoader(old.dataset, sampler=sampler, batch_size=old.batch_size, drop_last=True,
                    num_workers=old.num_workers, collate_fn=old.collate_fn, persistent_workers=old.num_workers > 0,
                    worker_init_fn=old.worker_init_fn, generator=old.generator)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from dl
        epoch += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="image folder or builtin:train")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--short-side", type=int, nargs=2, default=None, metavar=("MIN", "MAX"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--decode-cache-mb", type=int, default=2048)
    p.add_argument("--step-s", type=float, default=0.15, help="simulated step: seconds of sleep per batch")
    p.add_argument("--warmup", type=int, default=12, help="batches not timed")
    p.add_argument("--batches", type=int, default=36, help="batches timed")
    p.add_argument("--out")
    a = p.parse_args()
    sys.path.insert(0, str(REPO))
    from kl_ae.config import DataConfig
    from kl_ae.data.loaders import TrainLoader
    from kl_ae.precision import machine_info

    cfg = DataConfig(train=a.data, resolution=a.resolution, short_side_range=list(a.short_side or []),
                     num_workers=a.workers, decode_cache_mb=a.decode_cache_mb)
    if a.workers < 1:
        p.error("--workers must be at least 1: with none, the step itself loads the data either way")
    result = {"settings": {k: v for k, v in vars(a).items() if k != "out"}, "machine": machine_info()}
    for mode, batches in (("per_epoch_passes", _per_epoch_passes), ("one_pass", iter)):
        loader = TrainLoader(cfg, batch_size=a.batch, seed=0)  # fresh workers and caches for each mode
        result["settings"]["batches_per_epoch"] = loader.batches_per_epoch
        result[mode] = _timed(batches(loader), a.step_s, a.warmup, a.batches)
        loader.close()
        r = result[mode]
        print(f"{mode:17s} {r['batches']} batches in {r['wall_s']:.1f} s, waited {r['waited_s']:.1f} s "
              f"({100 * r['waited_share']:.0f} %)")
    result["speedup"] = round(result["per_epoch_passes"]["wall_s"] / result["one_pass"]["wall_s"], 3)
    print(f"{result['settings']['batches_per_epoch']} batches an epoch, step {a.step_s} s, {a.workers} workers: "
          f"one pass is {result['speedup']:.2f}x as fast as a pass per epoch")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
