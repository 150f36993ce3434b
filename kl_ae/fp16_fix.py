"""The fp16-fix fine-tune (``loss.fp16_fix``): make an existing VAE encode and decode in float16
without overflow while keeping its outputs and its latent space.

Where a VAE overflows fp16 (SDXL's does, in its decoder), the large values live in the residual
streams: conv_in starts a stream, every resnet and attention block adds to it, and it is read only
through GroupNorm (scale-invariant), the next block's addition, a shortcut/up/downsample
convolution (linear), and finally ``conv_norm_out`` (GroupNorm again). Two changes are therefore
exact, up to GroupNorm's eps:

- **stream rescaling**: multiply a network's residual stream by ``c`` by scaling conv_in's weight
  and bias, every resnet's conv2 and every attention's output projection (weight and bias) by
  ``c``, and the bias of every convolution applied to the stream (conv_shortcut, up/downsamplers)
  by ``c``. Its output, and so the image or the posterior, is unchanged;
- **pre-norm rescaling**: each resnet's conv1 feeds only its norm2, so its weight and bias can
  take any positive factor.

:func:`rescale_for_fp16` measures the peaks on calibration images and applies both so that no
stream and no conv1 output exceeds ``limit``; the fine-tune then trains against the frozen
original (its reconstruction and posterior mean) with :class:`ActivationPenalty` on every module
output, for what rescaling does not reach. The community "fp16-fix" VAEs (madebyollin's
SDXL-VAE-FP16-Fix) were made by a fine-tune that keeps the output while scaling weights and biases
down; the exact rescaling is kl-ae's, derived from diffusers' Encoder/Decoder code
(diffusers/models/autoencoders/vae.py, resnet.py ResnetBlock2D, attention_processor.py).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from kl_ae.eval.fp16 import FP16_MAX

logger = logging.getLogger("kl_ae")


def _blocks(net: nn.Module) -> list[nn.Module]:
    """A diffusers Encoder's (down blocks, mid block) or Decoder's (mid block, up blocks) blocks
    in forward order."""
    blocks = ([*net.down_blocks, net.mid_block] if hasattr(net, "down_blocks")
              else [net.mid_block, *net.up_blocks])
    return [b for b in blocks if b is not None]


def _children(block: nn.Module, name: str) -> list[nn.Module]:
    """A block's ``resnets`` / ``attentions`` / ``downsamplers`` / ``upsamplers`` (absent or None: [])."""
    return [m for m in (getattr(block, name, None) or []) if m is not None]


def _resnets(net: nn.Module) -> list[nn.Module]:
    return [r for b in _blocks(net) for r in _children(b, "resnets")]


def _stream_parts(net: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """For a diffusers Encoder or Decoder: (modules whose weight *and* bias scale with the stream:
    conv_in, each resnet's conv2, each attention's to_out[0]; modules applied to the stream whose
    bias alone scales: conv_shortcut, up/downsampler convolutions)."""
    full, bias_only = [net.conv_in], []
    for block in _blocks(net):
        for resnet in _children(block, "resnets"):
            full.append(resnet.conv2)
            if resnet.conv_shortcut is not None:
                bias_only.append(resnet.conv_shortcut)
        full += [attn.to_out[0] for attn in _children(block, "attentions")]
        bias_only += [s.conv for s in _children(block, "downsamplers") + _children(block, "upsamplers")]
    return full, bias_only


def _stream_outputs(net: nn.Module) -> list[nn.Module]:
    """The modules whose output is the residual stream: conv_in, resnets, attentions, samplers."""
    return [net.conv_in, *(m for b in _blocks(net) for kind in ("resnets", "attentions", "downsamplers", "upsamplers")
                           for m in _children(b, kind))]


@torch.no_grad()
def rescale_stream(net: nn.Module, factor: float) -> None:
    """Multiply the residual stream of a diffusers Encoder or Decoder by ``factor`` (> 0) in place,
    leaving its output unchanged up to GroupNorm's eps (module docstring)."""
    if not factor > 0:
        raise ValueError(f"the stream factor must be positive, got {factor}")
    full, bias_only = _stream_parts(net)
    for m in full:
        m.weight.mul_(factor)
        if m.bias is not None:
            m.bias.mul_(factor)
    for m in bias_only:
        if m.bias is not None:
            m.bias.mul_(factor)


@torch.no_grad()
def _peaks(vae: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Largest |value| of each network's residual stream (the output of every module that
    scales with it: conv_in, resnets, attentions, samplers, and each block's conv2, shortcut and
    attention projection) and of each resnet's conv1 output, on images x."""
    peaks: dict[str, float] = {}
    handles = []

    def record(key):
        def hook(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            peaks[key] = max(peaks.get(key, 0.0), out.detach().float().abs().max().item())
        return hook

    for name in ("encoder", "decoder"):
        net = getattr(vae, name)
        full, bias_only = _stream_parts(net)  # their outputs scale with the stream too (the audit reads them)
        handles += [m.register_forward_hook(record(name)) for m in [*_stream_outputs(net), *full, *bias_only]]
        handles += [r.conv1.register_forward_hook(record(f"{name}.conv1.{i}")) for i, r in enumerate(_resnets(net))]
    try:
        vae.decode(vae.encode(x).latent_dist.mode())
    finally:
        for h in handles:
            h.remove()
    return peaks


@torch.no_grad()
def rescale_for_fp16(vae: nn.Module, x: torch.Tensor, limit: float) -> dict[str, float]:
    """Scale ``vae``'s residual streams and its resnets' conv1 outputs down, in place and exactly
    (module docstring), so that their largest value on images ``x`` ((B, 3, H, W) in [-1, 1]) is
    at most ``limit``; nothing is scaled up. Returns ``{"encoder": c, "decoder": c}`` (1.0: the
    stream was within the limit) plus ``"<net>.conv1.<i>": c`` for each conv1 that was scaled."""
    peaks = _peaks(vae, x)
    factors = {}
    for name in ("encoder", "decoder"):
        net = getattr(vae, name)
        factors[name] = min(1.0, limit / peaks[name]) if peaks[name] > 0 else 1.0
        if factors[name] < 1.0:
            rescale_stream(net, factors[name])
        for i, resnet in enumerate(_resnets(net)):
            key = f"{name}.conv1.{i}"
            f = min(1.0, limit / peaks[key]) if peaks[key] > 0 else 1.0
            if f < 1.0:
                resnet.conv1.weight.mul_(f)
                if resnet.conv1.bias is not None:
                    resnet.conv1.bias.mul_(f)
                factors[key] = f
    return factors


class ActivationPenalty:
    """Penalty on activation magnitudes above ``limit``, collected by forward hooks on every
    submodule of ``vae`` while :meth:`collecting` is active (the training forward only; evaluation,
    grids and the export are not collected). Not usable with gradient checkpointing (train.gradient_checkpointing: a
    config error), whose recomputation would not rebuild the terms saved in the forward.

    penalty = sum over module outputs a of mean(relu(|a| / limit - 1)^2): zero while every value
    is within the limit, quadratic in the excess, independent of the network's size otherwise.
    Each hook first reads max |a| (one host synchronisation per module) and builds the term only
    for outputs that exceed the limit, so that a network within it costs no extra memory.
    """

    def __init__(self, vae: nn.Module, limit: float):
        if not 0 < limit <= FP16_MAX:
            raise ValueError(f"the activation limit must be in (0, {FP16_MAX:g}], got {limit}")
        self.limit = float(limit)
        self._active = False
        self._terms: list[torch.Tensor] = []
        self.max_activation = 0.0
        self._handles = [m.register_forward_hook(self._hook) for name, m in vae.named_modules() if name]

    def _hook(self, module, inputs, output) -> None:
        if not self._active:
            return
        out = output[0] if isinstance(output, tuple) else output
        if not (torch.is_tensor(out) and out.is_floating_point()):
            return
        peak = out.detach().abs().max().float().item()
        self.max_activation = max(self.max_activation, peak)
        if peak > self.limit and out.requires_grad:
            self._terms.append(torch.relu(out.float().abs() / self.limit - 1.0).square().mean())

    @contextlib.contextmanager
    def collecting(self):
        """Collect the terms of one forward pass (earlier ones are dropped)."""
        self._terms, self.max_activation, self._active = [], 0.0, True
        try:
            yield self
        finally:
            self._active = False

    def penalty(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The collected penalty, a scalar tensor (0 when nothing exceeded the limit). The terms
        are handed over: the penalty keeps no reference to the step's autograd graph."""
        terms, self._terms = self._terms, []
        if not terms:
            return torch.zeros((), device=device)
        return torch.stack(terms).sum()

    def __deepcopy__(self, memo):
        # copy.deepcopy of the hooked model (the fp16 audit, EMA copies) copies its hooks, bound to
        # this object: share it (it collects only inside collecting()) rather than copy graph tensors
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
