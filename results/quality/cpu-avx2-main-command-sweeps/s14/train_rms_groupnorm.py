"""Diagnostic only: kl-ae train with every GroupNorm replaced by a group RMS norm (no mean subtraction).

The script that made s14, kept with its results (it is not part of kl-ae, and its models do not
load as diffusers' AutoencoderKL computes them):
    python train_rms_groupnorm.py train configs/quickstart.yaml --set train.output_dir=RUN
"""
import sys, torch
import torch.nn.functional as F
def rms_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    shape = x.shape
    g = x.reshape(shape[0], num_groups, -1)
    y = (g * torch.rsqrt(g.float().pow(2).mean(-1, keepdim=True) + eps).to(g.dtype)).reshape(shape)
    view = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None: y = y * weight.view(view)
    if bias is not None: y = y + bias.view(view)
    return y
F.group_norm = rms_group_norm
from kl_ae.cli import main
sys.exit(main())
