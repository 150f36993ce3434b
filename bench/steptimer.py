"""Run a training program unchanged and record when each of its optimizer steps ends.

    python bench/steptimer.py OUT.json -m kl_ae.cli train CONFIG --set ...
    python bench/steptimer.py OUT.json path/to/train_autoencoderkl.py --args ...

The clock is a global optimizer step post-hook (``torch.optim.optimizer.
register_optimizer_step_post_hook``): it times our trainer, the peer's unmodified script and the
plain loop the same way, and leaves out everything before the first and after the last update
(model build, data indexing, export, validation). Each step is tagged "ae" when its optimizer
holds a decoder output conv (a 4-d weight with 3 output channels; a PatchGAN has none) and
"disc" otherwise. On CUDA the hook records an event instead of synchronising, so it does not
change how far the host runs ahead. Importing kl_ae first applies its torchvision import fix
(a no-op where torchvision imports normally). OUT.json gets the step times (s, from the first step), the
peak resident memory (MB) and, on CUDA, the peak allocated GPU memory (MB).
"""

from __future__ import annotations

import atexit
import json
import resource
import runpy
import sys
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import kl_ae  # noqa: F401  (its torchvision import fix, for CPU torch next to PyPI's CUDA torchvision)


def _is_autoencoder(optimizer: torch.optim.Optimizer) -> bool:
    return any(p.ndim == 4 and p.shape[0] == 3 for g in optimizer.param_groups for p in g["params"])


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    out_path, target, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    kinds: dict[int, str] = {}
    marks: list[tuple[str, object]] = []  # (kind, perf_counter seconds or CUDA event)

    def hook(optimizer, _args, _kwargs):
        kind = kinds.setdefault(id(optimizer), "ae" if _is_autoencoder(optimizer) else "disc")
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks.append((kind, event))
        else:
            marks.append((kind, time.perf_counter()))

    def write():
        times = []
        if marks and not isinstance(marks[0][1], float):
            torch.cuda.synchronize()
            first = marks[0][1]
            times = [first.elapsed_time(m) / 1000.0 for _, m in marks]
        elif marks:
            times = [m - marks[0][1] for _, m in marks]
        result = {
            "kinds": [k for k, _ in marks],
            "times_s": times,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        with open(out_path, "w") as f:
            json.dump(result, f)

    register_optimizer_step_post_hook(hook)
    atexit.register(write)
    if target == "-m":
        module, rest = args[0], args[1:]
        sys.argv = [module, *rest]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [target, *args]
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()
