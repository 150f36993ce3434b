"""PSNR of the 30-minute runs' checkpoints on the training photos and on the validation photos,
with kl-ae eval's protocol (256 px centre crops), to tell underfitting from overfitting.

    python train-vs-val.py OUT/runs PHOTOS   # PHOTOS holds train/ and val/; writes train-vs-val.json
"""
import json
import sys
from pathlib import Path

import kl_ae  # noqa: F401  (imported before diffusers, as in the bench scripts)
from kl_ae.eval.evaluate import evaluate
from kl_ae.model import load_autoencoder

root, photos = Path(sys.argv[1]), Path(sys.argv[2])
out = {}
for run in ["kl-ae[nodl]", "kl-ae"]:
    for ckpt in sorted((root / run / "checkpoints").glob("step-*")):
        vae = load_autoencoder(str(ckpt))
        row = {}
        for split in ["train", "val"]:
            r = evaluate(vae, str(photos / split), resolution=256, lpips_trunk="none",
                         baselines=(split == "train" and not out), progress=False, latent=False)
            row[split] = r["metrics"]["psnr"]
            if r.get("baselines"):
                row["train_baselines"] = {k: v["psnr"] for k, v in r["baselines"].items()}
        out[f"{run}/{ckpt.name}"] = row
        print(run, ckpt.name, row, flush=True)
Path("train-vs-val.json").write_text(json.dumps(out, indent=1))
