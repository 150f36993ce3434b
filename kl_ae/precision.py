"""Which mixed precision a run uses: ``train.mixed_precision: auto`` picks bf16 only where the
device computes it natively.

bf16 autocast pays where the hardware has bf16 arithmetic: CUDA GPUs from Ampere on, and CPUs
with AVX512-BF16 or AMX (measured: a quickstart training step 1.24x faster than fp32 on such a
CPU). On a CPU without them PyTorch emulates bf16 convolutions, and the same step ran 15.7x
*slower* than fp32 on a 2-core AMD EPYC with AVX2 only (BENCHMARKS.md has both figures and their
commands). So ``auto`` chooses bf16 on such devices and fp32 ('no') everywhere else.
It never chooses fp16: the SDXL-class decoders overflow it, so fp16 is only used when asked for.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import torch

CHOICES = ("auto", "no", "bf16", "fp16")


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` has bf16 arithmetic, and what was found (for the log).

    CUDA: ``torch.cuda.is_bf16_supported()`` (compute capability 8.0+). CPU: AVX512-BF16 or AMX
    tiles, read through ``torch.cpu``'s capability checks (private helpers: where a torch release
    lacks them the answer is False, which only costs speed). Other devices: False.
    """
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"CUDA device {torch.cuda.get_device_name(device)}" + ("" if ok else " without bf16")
    if device.type == "cpu":
        found = [name for name, check in (("AVX512-BF16", "_is_avx512_bf16_supported"),
                                          ("AMX", "_is_amx_tile_supported"))
                 if getattr(torch.cpu, check, lambda: False)()]
        if found:
            return True, "CPU with " + " and ".join(found)
        return False, "CPU without AVX512-BF16 or AMX (bf16 would be emulated)"
    return False, f"{device.type} device (bf16 not assumed; set train.mixed_precision=bf16 to use it)"


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU as benchmarks record it, e.g. 'AMD EPYC (family 26, model 2, AVX512)': the model
    name, family and model of the first processor in ``cpuinfo`` (the text of /proc/cpuinfo, read
    when None) and torch's CPU capability. Cloud CPUs often name themselves only 'AMD EPYC', and
    their generations differ in the bf16 arithmetic that decides ``auto``, so the family and model
    go with the name. Parsed here because only these three fields are needed (py-cpuinfo would be
    a dependency for them). Where /proc/cpuinfo is missing (not Linux): ``platform.processor()``.
    """
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.is_file() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    ids = [f"{k.split()[-1]} {fields[k]}" for k in ("cpu family", "model") if fields.get(k)]
    return f"{name} ({', '.join(ids + [torch.backends.cpu.get_cpu_capability()])})"


def machine_info() -> dict:
    """The machine a benchmark figure came from, for its result.json: torch version, CPU threads,
    device (the CUDA device's name, else 'cpu'), torch's CPU capability and :func:`cpu_model`."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": cpu_model()}


def cpu_without_bf16() -> bool:
    """Whether this machine trains on a CPU without bf16 arithmetic: no CUDA device, and
    :func:`native_bf16` false for the CPU (no AVX512-BF16 or AMX). Such a CPU trains in fp32 under
    ``train.mixed_precision: auto``, and a config's ``on_cpu_without_bf16`` section applies there."""
    return not torch.cuda.is_available() and not native_bf16(torch.device("cpu"))[0]


def resolve_mixed_precision(requested: str, device: torch.device) -> tuple[str, str, int]:
    """``train.mixed_precision`` -> (value for Accelerate: 'no', 'bf16' or 'fp16', a message for
    the run log, its logging level).

    'auto' becomes 'bf16' where :func:`native_bf16` holds, else 'no'. An explicit value is kept;
    an explicit 'bf16' on a device that would emulate it comes with a WARNING-level message.
    Raises ValueError for a value outside :data:`CHOICES` (config validation catches it earlier).
    """
    if requested not in CHOICES:
        raise ValueError(f"mixed precision must be one of {CHOICES}, got {requested!r}")
    native, what = native_bf16(device)
    if requested == "auto":
        resolved = "bf16" if native else "no"
        return resolved, f"mixed precision: {resolved} (train.mixed_precision=auto on a {what})", logging.INFO
    if requested == "bf16" and not native:
        return requested, (f"mixed precision: bf16 on a {what}: expect it to be much slower than fp32 "
                           "(a training step ran 16x slower on an AVX2-only CPU); use train.mixed_precision=auto or no"
                           ), logging.WARNING
    return requested, f"mixed precision: {requested}", logging.INFO
