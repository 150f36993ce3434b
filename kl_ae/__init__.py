"""kl-ae: train, evaluate and export KL-regularized image autoencoders (the LDM/SD first stage)."""

from kl_ae import _compat  # noqa: F401  (must run before diffusers / lpips / torchvision imports)

__version__ = "0.1.0"
