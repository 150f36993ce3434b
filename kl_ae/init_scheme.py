"""``model.init_scheme: block_means``: start a random AutoencoderKL as a block-mean codec.

At step 0 the encoder writes each 8x8 block's mean colour (RGB in [-1, 1]) into latent channels
0-2 and the decoder paints each block that colour (nearest-neighbour upsampling), so the model
reconstructs every image's colours and coarse layout from the first step, and training adds the
detail. The network is diffusers' AutoencoderKL unchanged: only its initial weights differ, so
checkpoints and exports are the same files as with PyTorch's init.

Why: with PyTorch's init the short runs of the quickstart learn the structure of images well but
not their colour map (BENCHMARKS.md, "What the colour error is"); a wrong colour map costs them
3-5 dB on unseen images. DC-AE (Chen et al. 2025, "Deep Compression Autoencoder for Efficient
High-Resolution Diffusion Models", arXiv:2410.10733) adds non-parametric space-to-channel
shortcuts so that the network learns a residual over a fixed down/upsampling; here the same
starting point is written into the weights of the standard layout instead, and the residual
branches start at zero (guided-diffusion's ``zero_module``, Dhariwal & Nichol 2021), so each
ResNet block starts as the identity.

How the main path (everything outside the residual branches) carries a colour through
GroupNorm + SiLU, which are not linear: in each GroupNorm group, channel pairs (s, -s) carry a
colour s and one pair (B, -B) a constant; a group's mean is then 0 and its RMS is
``sqrt(2 (B**2 + mean(s**2)) / k)``, dominated by the constant, so the normalisation is a fixed
scale to within ``mean(s**2) / (2 B**2)``: at most 3 % with B = 4 and |s| <= 1. With fewer than
3 groups, colours share a group and their squares add: the RMS is then up to
``sqrt(1 + n / B**2)`` times the constant's for n colours in a group, at most 6 % (2 groups) or
9 % (1 group) on a saturated image, where one colour per group gives 3 %. Before the SiLU the
norm's bias shifts both channels of a pair to +BETA, where SiLU is nearly linear, and the next
conv takes their difference, which cancels SiLU's even-order terms. Downsamplers average each
2x2 block, upsamplers copy (nearest neighbour); the 1x1 ``quant_conv``/``post_quant_conv`` and
ResNet shortcuts pass the carriers on. Every other weight keeps PyTorch's init, and no weight
is left where both it and its gradient are zero for good (each channel that is off on the main
path at step 0 gets a gradient through a non-zero weight or activation).

This needs at least 4 channels per GroupNorm group at every level (one constant pair and one
colour pair) and room for the 3 colour pairs in all (8 channels in 2 groups have room for 2), at
least 3 latent channels and the AutoencoderKL class; :func:`block_means_problem`
says what is wrong.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEMES = ("pytorch", "block_means")

CONSTANT = 4.0  # B: amplitude of the constant pair in each group
COLOUR = 1.0  # amplitude of a colour channel on the main path (colours are in [-1, 1])
BETA = 4.0  # pre-SiLU shift of the colour pairs at the encoder's and decoder's last norm
LATENT_LOGVAR = -8.0  # posterior log-variance at step 0 when model.posterior_logvar_init is unset


def block_means_problem(block_out_channels, norm_num_groups: int, latent_channels: int,
                        architecture: str) -> str | None:
    """Why model.init_scheme='block_means' cannot build this model, or None when it can."""
    if architecture != "AutoencoderKL":
        return (f"it is written for AutoencoderKL, not model.architecture={architecture!r}; "
                f"set model.init_scheme=pytorch")
    if latent_channels < 3:
        return f"it needs model.latent_channels >= 3 (a colour), got {latent_channels}"
    # each group holds a constant pair, and the groups together three colour pairs (_layout)
    small = [c for c in block_out_channels if c // norm_num_groups < 4
             or norm_num_groups * ((c // norm_num_groups - 2) // 2) < 3]
    if small:
        return (f"it needs at least 4 channels per GroupNorm group and room for 3 colour pairs beside one "
                f"constant pair per group at every level, but model.block_out_channels {small} with "
                f"model.norm_num_groups={norm_num_groups} have less; lower model.norm_num_groups, widen the levels "
                f"(8 channels or more each), or set model.init_scheme=pytorch")
    return None


def _layout(channels: int, groups: int) -> list[tuple | None]:
    """What each channel of a level carries on the main path: ``("c", sign)`` the constant,
    ``("s", colour, sign)`` a colour (0-2: R, G, B), None nothing. Group g starts with a constant
    pair; colour i takes the first free pair of group i, i+1, ... (round robin)."""
    k = channels // groups
    layout: list[tuple | None] = [None] * channels
    free = []
    for g in range(groups):
        layout[g * k], layout[g * k + 1] = ("c", 1.0), ("c", -1.0)
        free.append([g * k + 2 + 2 * p for p in range((k - 2) // 2)])
    for colour in range(3):
        g = next(g % groups for g in range(colour, colour + groups) if free[g % groups])
        c = free[g].pop(0)
        layout[c], layout[c + 1] = ("s", colour, 1.0), ("s", colour, -1.0)
    return layout


def _zero(*modules: nn.Module) -> None:
    for m in modules:
        nn.init.zeros_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _conv_in(conv: nn.Conv2d, layout) -> None:
    """Colour ``i`` of the input (image channel or latent channel i) onto its pair; the constants from the bias."""
    _zero(conv)
    mid = conv.kernel_size[0] // 2
    for c, what in enumerate(layout):
        if what is None:
            continue
        if what[0] == "c":
            conv.bias[c] = what[1] * CONSTANT
        else:
            conv.weight[c, what[1], mid, mid] = what[2] * COLOUR


def _main_path(conv: nn.Conv2d, layout_out, layout_in, taps) -> None:
    """A conv on the main path: each carrier of ``layout_out`` from the same carrier of
    ``layout_in`` through the kernel ``taps`` (k x k); no bias. Weights from an empty channel of
    ``layout_in`` keep their random init: that channel is zero at step 0, so they change nothing
    yet, and without them the channel would get no gradient and stay empty for good."""
    empty = [c for c, what in enumerate(layout_in) if what is None]
    random_columns = conv.weight[:, empty].clone()
    _zero(conv)
    source = {what: c for c, what in enumerate(layout_in) if what is not None}
    for c, what in enumerate(layout_out):
        if what is not None:
            conv.weight[c, source[what]] = taps
    conv.weight[:, empty] = random_columns


def _resnets_and_attention(block: nn.Module) -> None:
    for resnet in block.resnets:
        _zero(resnet.conv2)
    for attention in getattr(block, "attentions", None) or []:
        if attention is not None:
            _zero(attention.to_out[0])


def _levels(blocks, layouts, resamplers: str, taps) -> None:
    """The encoder's down blocks or the decoder's up blocks, level by level: residual branches
    zero, shortcuts between levels carry the carriers, each resampler's conv applies ``taps``."""
    previous = layouts[0]
    for layout, block in zip(layouts, blocks):
        _resnets_and_attention(block)
        for resnet in block.resnets:
            if resnet.conv_shortcut is not None:
                _main_path(resnet.conv_shortcut, layout, previous, torch.ones(1, 1))
            previous = layout
        for resampler in getattr(block, resamplers) or []:
            _main_path(resampler.conv, layout, layout, torch.tensor(taps))


def _norm_silu_conv_out(norm: nn.GroupNorm, conv: nn.Conv2d, layout, outputs: int) -> None:
    """``conv(silu(norm(h)))[i] ~= colour i`` for i < outputs; the other outputs keep their init.

    A colour pair (s, -s) leaves the norm as ``BETA +- s / rms`` and the conv takes half their
    difference; ``silu(BETA + t) - silu(BETA - t) = 2 t silu'(BETA) + O(t**3)``. The other channels
    get the norm's identity affine (gamma 1, beta 0). A constant channel has no weight to the
    colour outputs but a non-zero activation, so its weights learn; an empty channel (zero at
    step 0) keeps its random weights, through which it gets a gradient."""
    k = len(layout) // norm.num_groups
    rms = CONSTANT * math.sqrt(2.0 / k)  # the group's RMS with a colour of 0: the constant pair alone
    sigmoid = torch.sigmoid(torch.tensor(BETA)).item()
    slope = sigmoid * (1.0 + BETA * (1.0 - sigmoid))  # silu'(BETA)
    mid = conv.kernel_size[0] // 2
    nn.init.ones_(norm.weight)
    nn.init.zeros_(norm.bias)
    conv.bias[:outputs].zero_()
    for c, what in enumerate(layout):
        if what is None:
            continue  # zero at step 0, so its random weights change nothing yet
        if what[0] == "c":
            conv.weight[:outputs, c].zero_()
            continue
        norm.bias[c] = BETA
        conv.weight[:, c].zero_()  # no output but its own colour sees BETA
        if what[1] < outputs:
            conv.weight[what[1], c, mid, mid] = what[2] * rms / (2.0 * slope * COLOUR)


@torch.no_grad()
def init_block_means(vae) -> None:
    """Initialise ``vae`` (a freshly built diffusers AutoencoderKL) in place as a block-mean codec.

    After it, for an image x of shape (N, 3, H, W) in [-1, 1] (H, W multiples of the downsampling
    factor f): ``posterior.mean[:, :3]`` is the f x f block mean of x (to within a few per cent of
    its range), ``posterior.mean[:, 3:]`` near-constant per channel (no image content yet) and
    ``decode(z).sample`` the nearest-neighbour upsampling of ``z[:, :3]``. The posterior
    log-variance is left to ``kl_ae.model.init_posterior_logvar``, which the caller runs after it
    (``load_or_build_autoencoder``: with LATENT_LOGVAR when ``model.posterior_logvar_init`` is
    unset). Raises ValueError when :func:`block_means_problem` finds the model unsuitable.
    """
    cfg = vae.config
    problem = block_means_problem(cfg.block_out_channels, cfg.norm_num_groups, cfg.latent_channels,
                                  type(vae).__name__)
    if problem:
        raise ValueError(f"model.init_scheme=block_means: {problem}")
    layouts = [_layout(c, cfg.norm_num_groups) for c in cfg.block_out_channels]
    latent = cfg.latent_channels
    encoder, decoder = vae.encoder, vae.decoder

    _conv_in(encoder.conv_in, layouts[0])
    # 3x3 stride 2 after a (0, 1, 0, 1) pad: a 2x2 mean
    _levels(encoder.down_blocks, layouts, "downsamplers", [[0.25, 0.25, 0], [0.25, 0.25, 0], [0, 0, 0]])
    _resnets_and_attention(encoder.mid_block)
    _norm_silu_conv_out(encoder.conv_norm_out, encoder.conv_out, layouts[-1], 3)
    encoder.conv_out.weight[3:latent] *= 0.1  # the spare latent channels start small
    if vae.quant_conv is not None:  # the mean half passes on; the log-variance half is the caller's
        vae.quant_conv.weight[:latent].copy_(torch.eye(latent, 2 * latent)[:, :, None, None])
        vae.quant_conv.bias[:latent].zero_()
    if vae.post_quant_conv is not None:
        vae.post_quant_conv.weight.copy_(torch.eye(latent)[:, :, None, None])
        vae.post_quant_conv.bias.zero_()

    layouts = layouts[::-1]
    _conv_in(decoder.conv_in, layouts[0])  # no weight from the spare latent channels yet: they are not zero
    _resnets_and_attention(decoder.mid_block)
    _levels(decoder.up_blocks, layouts, "upsamplers", [[0, 0, 0], [0, 1.0, 0], [0, 0, 0]])  # after nearest x2
    _norm_silu_conv_out(decoder.conv_norm_out, decoder.conv_out, layouts[-1], 3)
