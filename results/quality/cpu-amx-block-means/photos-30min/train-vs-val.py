"""PSNR of one run's checkpoints (EMA weights) on the training photos and on the validation
photos, with kl-ae eval's protocol (256 px centre crops), to tell underfitting from overfitting.

    python train-vs-val.py OUT/runs/kl-ae PHOTOS   # PHOTOS holds train/ and val/; writes train-vs-val.json here
"""
import json
import sys
from pathlib import Path

import kl_ae  # noqa: F401  (imported before diffusers, as in the bench scripts)
from kl_ae.eval.evaluate import evaluate
from kl_ae.model import load_autoencoder

run, photos = Path(sys.argv[1]), Path(sys.argv[2])
out = {}
for ckpt in sorted((run / "checkpoints").glob("step-*")):
    vae = load_autoencoder(str(ckpt))
    row = {}
    for split in ["train", "val"]:
        r = evaluate(vae, str(photos / split), resolution=256, lpips_trunk="none",
                     baselines=(split == "train" and not out), progress=False, latent=False)
        row[split] = r["metrics"]["psnr"]
        if r.get("baselines"):
            row["train_baselines"] = {k: v["psnr"] for k, v in r["baselines"].items()}
    out[ckpt.name] = row
    print(ckpt.name, row, flush=True)
(Path(__file__).parent / "train-vs-val.json").write_text(json.dumps(out, indent=1))
