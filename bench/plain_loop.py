"""The loop a user writes by hand: diffusers AutoencoderKL + lpips + PatchGAN, fp32, eager.

A throughput baseline for bench/throughput.py, not a trainer: no checkpoints, no EMA, no
logging. It is correct where the diffusers example is not (LPIPS sends gradients, the
discriminator sees detached reconstructions, both models are updated every step), so the ratio
against it measures what kl-ae's engineering buys, not what the peer's bugs cost.

    python bench/plain_loop.py --vae-config DIR --data DIR --resolution 128 --batch 4 --steps 8
"""

from __future__ import annotations

import argparse
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
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(a.vae_config)).to(device).train()
    disc = PatchDiscriminator().to(device).train()
    # pnet_rand: random VGG trunk, same cost as the real one (timing only)
    perceptual = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).to(device).eval().requires_grad_(False)
    opt_ae = torch.optim.Adam(vae.parameters(), lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.5, 0.9))
    loader = torch.utils.data.DataLoader(Folder(a.data, a.resolution), batch_size=a.batch, shuffle=True,
                                         drop_last=True, num_workers=a.workers, persistent_workers=a.workers > 0)
    step = 0
    while step < a.steps:
        for x in loader:
            x = x.to(device)
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample()).sample
            nll = (torch.abs(x - rec) + perceptual(x, rec)).sum() / x.shape[0]
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
            if step >= a.steps:
                break


if __name__ == "__main__":
    main()
