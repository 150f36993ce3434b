"""Data loading rate of one worker: decode + resize + crop images/s, to set against the step's need.

    python bench/dataload.py path/to/photos --resolution 256 --short-side 256 512 --images 64

Runs kl-ae's training dataset (kl_ae.data.loaders, the same decode with JPEG draft mode, short-side
resize into ``--short-side`` and random crop as training) in this process, i.e. what one
DataLoader worker delivers. The loader never starves the step while workers x this rate exceeds
the training images/s from bench/throughput.py; the printout gives the workers needed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="image folder, shard pattern or builtin:train")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--short-side", type=int, nargs=2, default=None, metavar=("MIN", "MAX"))
    p.add_argument("--images", type=int, default=64, help="images to time (after 4 untimed)")
    p.add_argument("--step-images-per-s", type=float, help="training images/s to compare against")
    p.add_argument("--out")
    a = p.parse_args()
    sys.path.insert(0, str(REPO))
    from kl_ae.config import DataConfig
    from kl_ae.data.loaders import TrainLoader

    cfg = DataConfig(train=a.data, resolution=a.resolution, short_side_range=list(a.short_side or []),
                     num_workers=0, shuffle_buffer=8)
    loader = TrainLoader(cfg, batch_size=1, seed=0)
    seen, t0 = 0, None
    while seen < a.images + 4:
        for batch in loader:
            seen += 1
            if seen == 4:
                t0 = time.perf_counter()
            if seen >= a.images + 4:
                break
    rate = a.images / (time.perf_counter() - t0)
    result = {"data": a.data, "resolution": a.resolution, "short_side_range": a.short_side,
              "images_per_s_per_worker": rate}
    print(f"one worker: {rate:.1f} images/s ({a.data}, crop {a.resolution}, short side {a.short_side})")
    if a.step_images_per_s:
        result["workers_needed"] = math.ceil(a.step_images_per_s / rate)
        print(f"training consumes {a.step_images_per_s} images/s: {result['workers_needed']} worker(s) keep up")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
