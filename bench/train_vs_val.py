"""PSNR of runs' checkpoints (EMA weights) on the training photos and on the validation photos,
with ``kl-ae eval``'s protocol (short side 256, centre crop), to tell underfitting from
overfitting: a model that overfits scores far better on the images it trained on.

    python bench/train_vs_val.py ../shared/data/photos OUT/runs/kl-ae [OUT/runs/kl-ae[v] ...] \\
        --out train-vs-val.json

PHOTOS holds train/ and val/. Each RUN is a run directory; every ``checkpoints/step-*`` of it is
scored. Written: ``{"RUN_NAME/step-NNNNNNN": {"train": dB, "val": dB}}``, the first row also with
``train_baselines`` (mean colour and bicubic on train/; ``kl-ae eval --baselines`` gives val/'s).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import kl_ae  # noqa: F401  (imported before diffusers, as in the other bench scripts)
from kl_ae.eval.evaluate import evaluate
from kl_ae.model import load_autoencoder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("photos", type=Path, help="a folder with train/ and val/")
    p.add_argument("runs", type=Path, nargs="+", help="run directories (their checkpoints/step-*)")
    p.add_argument("--out", type=Path, default=Path("train-vs-val.json"))
    a = p.parse_args()
    out = {}
    for run in a.runs:
        for ckpt in sorted((run / "checkpoints").glob("step-*")):
            vae = load_autoencoder(str(ckpt))
            row = {}
            for split in ["train", "val"]:
                r = evaluate(vae, str(a.photos / split), resolution=256, lpips_trunk="none",
                             baselines=(split == "train" and not out), progress=False, latent=False)
                row[split] = r["metrics"]["psnr"]
                if r.get("baselines"):
                    row["train_baselines"] = {k: v["psnr"] for k, v in r["baselines"].items()}
            out[f"{run.name}/{ckpt.name}"] = row
            print(run.name, ckpt.name, row, flush=True)
    a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
