"""Dead-leaves images (Lee, Mumford & Huang 2001): occluding disks, radius density ~ r^-3, uniform random RGB.

The script that made s12's training set, kept with its results (it is not part of kl-ae):
    python dead_leaves.py DIR 7        # seed 0: deadleaves-000.png .. deadleaves-006.png, 384 x 384
DIR also held links to the 7 files of builtin:train, so half the images (and crops) were dead leaves.
"""
import sys, numpy as np
from PIL import Image, ImageDraw
def dead_leaves(size, rng, rmin=2.0, rmax=80.0, n=3000, ss=2):
    S = size * ss
    img = Image.new("RGB", (S, S), tuple(int(v) for v in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(img)
    # inverse-CDF sampling of p(r) ~ r^-3 on [rmin, rmax]
    u = rng.random(n)
    r = (rmin ** -2 - u * (rmin ** -2 - rmax ** -2)) ** -0.5
    for i in range(n):
        cx, cy = rng.random(2) * S
        rr = r[i] * ss
        d.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img.resize((size, size), Image.LANCZOS)
out, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0
rng = np.random.default_rng(seed)
for k in range(count):
    dead_leaves(384, rng).save(f"{out}/deadleaves-{k:03d}.png")
