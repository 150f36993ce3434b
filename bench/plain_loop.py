"""The loop a user writes by hand: diffusers AutoencoderKL + lpips + PatchGAN, fp32, eager.

A baseline for bench/throughput.py and bench/quality.py, not a trainer: no checkpoints, no EMA,
no logging; LDM's optimizer settings (Adam, betas (0.5, 0.9), constant LR). It is correct where
the diffusers example is not (LPIPS sends gradients, the discriminator sees detached
reconstructions, both models are updated every step), so a ratio against it measures what
kl-ae's engineering and recipe buy, not what the peer's bugs cost.

    python bench/plain_loop.py --vae-config DIR --data DIR --resolution 128 --batch 4 --steps 8
    python bench/plain_loop.py ... --minutes 10 --every 2 --save DIR --lpips-weight 0 --disc-start 1000000

With --save, the weights are written in the diffusers layout to DIR/step-NNNNNNNN/ each time
--every training minutes have passed and at the end (DIR/final/), each with a meta.json
(step, images_seen, train_seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

import kl_ae  # noqa: F401  (first: its torchvision import fix on CPU-only machines)
import lpips
from diffusers import AutoencoderKL
from kl_ae.discriminator import PatchDiscriminator
from torchvision import transforms


class Folder(torch.utils.data.Dataset):
    def __init__(self, root: str, resolution: int):
        self.files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        self.tf = transforms.Compose([
            transforms.Resize(resolution), transforms.RandomCrop(resolution),
            transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize([0.5], [0.5]),
        ])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.tf(Image.open(self.files[i]).convert("RGB"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae-config", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--disc-start", type=int, default=0)
    p.add_argument("--lpips-weight", type=float, default=1.0, help="0: L1 only (no LPIPS forward)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--minutes", type=float, default=0.0, help="wall-clock budget of the loop (0: --steps only)")
    p.add_argument("--every", type=float, default=0.0, help="minutes between saved models (needs --save)")
    p.add_argument("--save", help="directory for the saved models (diffusers layout)")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(a.vae_config)).to(device).train()
    disc = PatchDiscriminator().to(device).train()
    # pnet_rand: random VGG trunk, same cost as the real one (timing only)
    perceptual = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).to(device).eval().requires_grad_(False)
    opt_ae = torch.optim.Adam(vae.parameters(), lr=a.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=a.lr, betas=(0.5, 0.9))
    loader = torch.utils.data.DataLoader(Folder(a.data, a.resolution), batch_size=a.batch, shuffle=True,
                                         drop_last=True, num_workers=a.workers, persistent_workers=a.workers > 0)
    step, paused, start = 0, 0.0, time.perf_counter()
    budget = a.minutes * 60 or math.inf
    next_mark = a.every * 60 or math.inf

    def save(name: str, seconds: float) -> float:
        """Save the model; returns the seconds it took (left out of the training time)."""
        t0 = time.perf_counter()
        if a.save:
            out = Path(a.save) / name
            vae.save_pretrained(out)
            (out / "meta.json").write_text(json.dumps({"step": step, "images_seen": step * a.batch,
                                                       "train_seconds": round(seconds, 3)}))
        return time.perf_counter() - t0

    seconds = 0.0
    while step < a.steps and seconds < budget:
        for x in loader:
            x = x.to(device)
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample()).sample
            rec_loss = torch.abs(x - rec)
            if a.lpips_weight:
                rec_loss = rec_loss + a.lpips_weight * perceptual(x, rec)
            nll = rec_loss.sum() / x.shape[0]
            kl = posterior.kl().sum() / x.shape[0]
            loss = nll + 1e-6 * kl
            gan_on = step >= a.disc_start
            if gan_on:
                disc.requires_grad_(False)
                g_loss = -disc(rec).mean()
                disc.requires_grad_(True)
                last = vae.decoder.conv_out.weight
                g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
                g_g = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
                weight = (g_nll.norm() / (g_g.norm() + 1e-4)).clamp(0, 1e4).detach() * 0.5
                loss = loss + weight * g_loss
            opt_ae.zero_grad(set_to_none=True)
            loss.backward()
            opt_ae.step()
            if gan_on:
                d_loss = 0.5 * (F.relu(1 - disc(x)).mean() + F.relu(1 + disc(rec.detach())).mean())
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
            step += 1
            seconds = time.perf_counter() - start - paused
            if seconds >= next_mark:
                paused += save(f"step-{step:08d}", seconds)
                while next_mark <= seconds:
                    next_mark += a.every * 60
            if step >= a.steps or seconds >= budget:
                break
    save("final", seconds)


if __name__ == "__main__":
    main()
