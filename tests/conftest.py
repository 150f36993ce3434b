import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here: fail fast instead of retrying

import kl_ae  # noqa: E402,F401  (the torchvision import fix runs before any test imports torchvision)
