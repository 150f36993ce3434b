#!/usr/bin/env bash
# Every GPU figure kl-ae still lacks, in one command that keeps inside BUDGET_S (575 s) on one H100/H200:
#   1. a 5-minute quality-per-compute run (bench/quality.py): the SD-size f8c4 model with the
#      quickstart's recipe on photographs, PSNR/SSIM at four time marks against the baselines
#   2. sd-f8c4 at 256² training throughput against the peer (bench/throughput.py)
#   3. the largest batch at 256² and 512², with and without gradient checkpointing (bench/max_batch.py)
#   and FLOPs per training image (bench/flops.py, counted on the CPU during 1-2) with the MFU
#   they imply at the images/s of 2.
# Every raw output lands under one folder (default results/gpu/<date>); a step that fails or runs
# out of its time slot is recorded in status.txt and the next step still runs; a step the budget
# has no room for is skipped and recorded (ONLY=name,... runs the steps named, e.g. in a second call).
#
#   bash bench/gpu.sh --prepare                    # here, first: what the GPU machine lacks, into .gpu/
#   bash bench/gpu.sh [--pack FILE.tgz] [OUT]      # on the GPU machine
#   bash bench/gpu.sh --dry-run [OUT]              # the same steps at toy size on a CPU (about a minute; tested)
#
# --prepare (where pip reaches a package registry and the photos are) fills the git-ignored folder
# .gpu/: wheels of the packages the GPU image lacks (kl-ae's diffusers, lpips, webdataset,
# braceexpand, torch-fidelity; the peer's datasets and taming-transformers), the photographs
# (train/ with short sides capped at 512 px, the most the recipe's crops use, so that they fit the
# device's 64 MiB; val/ as it is) and, given PEER, the peer's script. On the GPU machine this
# script installs .gpu/whl with --no-deps into a folder on PYTHONPATH, checks the imports before it
# starts, and takes its photos and peer from .gpu/. --pack FILE writes the output folder into one
# tar.gz after every step, so a device that returns few files, or a run cut short, still brings
# back everything measured so far. The device call: `bash bench/gpu.sh --pack $OUT/gpu.tgz`,
# carrying .gpu.
#
# Environment (all optional):
#   PEER=/path/to/train_autoencoderkl.py  PEER_PYTHON=python   the diffusers example trainer (on the
#                       GPU machine default .gpu/peer/train_autoencoderkl.py; no peer column without)
#   PHOTOS=DIR          a folder with train/ and val/ (default .gpu/photos, else ../shared/data/photos,
#                       else the builtin photos)
#   PEAK_TFLOPS=989     the device's dense bf16 peak (989 for an H100 SXM or H200)
#   QUALITY_MINUTES=5   the quality run's training budget
#   BUDGET_S=575        seconds the whole script keeps inside (each step's limit is cut to what is left)
#   ONLY=quality,throughput,max_batch   the steps to run
#   ALLOW_BUILTIN=1     let --prepare go on without PHOTOS (the GPU run then trains on the builtin photos)
#   PYTHON=python3      GPU_PYTHON_VERSION=3.12 (the GPU machine's Python, for --prepare's wheels)
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
KIT=.gpu
# The versions this repository's CI and benchmarks ran with; all pure Python (multiprocess's wheel
# is per Python version, hence GPU_PYTHON_VERSION)
WHEELS=(diffusers==0.42.1 lpips==0.1.4 webdataset==1.0.2 braceexpand==0.1.7 torch-fidelity==0.4.0
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 taming-transformers==0.0.1)

if [[ "${1:-}" == "--prepare" ]]; then
  set -e
  SRC="${PHOTOS:-../shared/data/photos}"
  if [[ ! ( -d "$SRC/train" && -d "$SRC/val" ) && -z "${ALLOW_BUILTIN:-}" ]]; then  # before touching .gpu/
    echo "no photos at $SRC: set PHOTOS to a folder with train/ and val/ (or ALLOW_BUILTIN=1 to train the GPU" \
         "run on the 7 builtin photos)" >&2
    exit 1
  fi
  "$PY" -c "import PIL" || { echo "$PY has no Pillow: set PYTHON to kl-ae's Python" >&2; exit 1; }
  rm -rf "$KIT"; mkdir -p "$KIT/whl" "$KIT/photos"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON_VERSION:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$KIT/whl" "${WHEELS[@]}"
  if [[ -d "$SRC/train" && -d "$SRC/val" ]]; then
    cp -r "$SRC/val" "$KIT/photos/val"
    "$PY" - "$SRC/train" "$KIT/photos/train" <<'PYEOF'
import sys
from pathlib import Path

from PIL import Image

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True)
for f in sorted(p for p in src.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"}):
    img = Image.open(f).convert("RGB")
    scale = 512 / min(img.size)
    if scale < 1:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
    img.save(dst / f"{f.stem}.jpg", quality=95)
PYEOF
  else
    echo "no photos at $SRC: the GPU run will train on the builtin photos (ALLOW_BUILTIN is set)"
  fi
  if [[ -n "${PEER:-}" ]]; then mkdir -p "$KIT/peer"; cp "$PEER" "$KIT/peer/"
  else echo "PEER not set: the GPU run will have no peer column (set PEER=/path/to/train_autoencoderkl.py)"; fi
  echo "kit: $(ls "$KIT/photos/train" 2>/dev/null | wc -l) training photos, $(ls "$KIT/photos/val" 2>/dev/null | wc -l)" \
       "validation photos, peer: $(ls "$KIT/peer" 2>/dev/null || echo none)"
  tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
  kit=$(du -sb "$KIT" | cut -f1)
  awk -v t="$tree" -v k="$kit" 'BEGIN { printf "travels to the device: %.1f MiB (working tree %.1f, .gpu %.1f; the limit is 64)\n", (t + k) / 2^20, t / 2^20, k / 2^20 }'
  exit 0
fi

DRY=0; PACK=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --pack) PACK="$2"; shift 2 ;;
    *) break ;;
  esac
done
OUT="${1:-results/gpu/$(date +%Y%m%d-%H%M)}"
PEAK="${PEAK_TFLOPS:-989}"
mkdir -p "$OUT"
: > "$OUT/status.txt"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1

pack() {  # the output folder as one file, replaced after every step
  if [[ -n "$PACK" ]]; then
    tar czf "$PACK.part" -C "$(dirname "$OUT")" "$(basename "$OUT")" && mv "$PACK.part" "$PACK"
  fi
}

if [[ $DRY == 0 ]] && compgen -G "$KIT/whl/*.whl" > /dev/null; then
  SITE=$(mktemp -d /tmp/kl-ae-site.XXXX)
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$KIT"/whl/*.whl; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "wheels: $(ls "$KIT/whl" | tr '\n' ' ')-> $SITE" | tee -a "$OUT/status.txt"
  else
    echo "wheels: pip install of $KIT/whl failed" | tee -a "$OUT/status.txt"
  fi
fi
# One Python start (a cold one costs seconds on a fresh machine): kl-ae's imports (kl_ae first: its
# torchvision import fix, a no-op where torchvision imports normally), machine.json, then the
# peer's imports, which only decide whether the peer runs.
if ! "$PY" - "$OUT/machine.json" "$OUT/peer_imports.txt" 2>> "$OUT/status.txt" <<'EOF'
import json, sys
import kl_ae.cli, diffusers, lpips, webdataset, torch_fidelity, torchmetrics, accelerate  # noqa: F401
import torch
from kl_ae.precision import machine_info
open(sys.argv[1], "w").write(json.dumps({**machine_info(), "cuda": torch.version.cuda}))
try:
    import datasets, taming.modules.losses.vqperceptual  # noqa: F401
    open(sys.argv[2], "w").write("ok\n")
except Exception as err:
    open(sys.argv[2], "w").write(f"{type(err).__name__}: {err}\n")
EOF
then
  echo "kl-ae's packages do not import (above). On a GPU machine without network, run" \
       "'bash bench/gpu.sh --prepare' where pip works, and carry .gpu" | tee -a "$OUT/status.txt"
  pack
  exit 1
fi

if [[ -z "${PHOTOS:-}" ]]; then
  if [[ -d "$KIT/photos/train" ]]; then PHOTOS="$KIT/photos"; else PHOTOS=../shared/data/photos; fi
fi
if [[ -d "$PHOTOS/train" && -d "$PHOTOS/val" ]]; then TRAIN="$PHOTOS/train"; VAL="$PHOTOS/val"
else TRAIN=builtin:train; VAL=builtin:val; fi
if [[ -z "${PEER:-}" && -f "$KIT/peer/train_autoencoderkl.py" ]]; then PEER="$KIT/peer/train_autoencoderkl.py"; fi

# The quickstart's recipe on the SD-size model (LR 4e-4 instead of 1e-3: a guess for a 20x larger
# model, not measured), with its block-mean start (32 groups leave 4 channels per group at 128).
# LPIPS off because no VGG16 weights travel to the machine; GAN off as in the quickstart; no
# channel shuffle (53 photos are not 7).
RECIPE=(--set loss.perceptual_weight=0 --set loss.l2_weight=1.0 --set optim.scale_lr=false
        --set optim.base_learning_rate=4e-4 --set "optim.betas=[0.9,0.99]" --set optim.lr_warmup_steps=100
        --set optim.lr_schedule=cosine --set optim.lr_final_ratio=0.05 --set loss.disc_start=100000000
        --set train.batch_size=16 --set train.gradient_accumulation_steps=1 --set train.ema_decay=0.999
        --set data.num_workers=8 --set "data.short_side_range=[256,512]" --set data.decode_cache_mb=2048
        --set model.norm_num_groups=32 --set model.posterior_logvar_init=-8 --set model.init_scheme=block_means
        --set train.scaling_images=4)
CONFIG=configs/sd-f8c4.yaml
QUALITY_MIN="${QUALITY_MINUTES:-5}"
QUALITY_EVERY=$(awk -v m="$QUALITY_MIN" 'BEGIN { print m / 4 }')
RES=(256 512); TP=(--resolution 256 --batch 8 --steps 10 --repeats 1 --workers 8 --no-plain)
MAXB=(--start-batch 16 --max-batch 128 --tolerance 0.25)
# Seconds per step (quality, throughput, max_batch). The quality slot is its training budget plus
# 60 s for start-up, checkpoint writes, the export and evaluating each checkpoint. The whole script
# keeps inside BUDGET_S from its start (default 575: a device call's 600 s less a margin): each
# step's limit is cut to what is left, grace included, and a step with under 20 s left is skipped
# and recorded so. FLOPs are counted on the CPU while the GPU trains; the MFU is added at the end.
# What a budget skips can run in a second call: ONLY=max_batch, for example.
SLOT=($(awk -v m="$QUALITY_MIN" 'BEGIN { print int(m * 60 + 60) }') 100 75)
GRACE=20  # after a slot's SIGINT: a trainer writes its checkpoint, the quality bench evaluates it
BUDGET_ENV="${BUDGET_S:-}"; BUDGET_S="${BUDGET_ENV:-575}"
if [[ $DRY == 1 ]]; then
  CONFIG="$OUT/toy.yaml"
  cat > "$CONFIG" <<'EOF'
# toy size for bench/gpu.sh --dry-run
model: {block_out_channels: [8, 16], layers_per_block: 1, norm_num_groups: 8, mid_block_add_attention: false}
loss: {perceptual_weight: 0.0}
data: {num_workers: 0, short_side_range: []}
train: {scaling_images: 2}
EOF
  RECIPE=(--set data.resolution=32 --set train.batch_size=2 --set loss.l2_weight=1.0 --set optim.lr_schedule=cosine)
  RES=(32); QUALITY_MIN=0.1; QUALITY_EVERY=0.05; TP=(--resolution 32 --batch 2 --steps 2 --warmup 1 --repeats 1 --lpips off)
  MAXB=(--max-batch 2); SLOT=(120 120 120); TRAIN=builtin:train; VAL=builtin:val; PEER=""; BUDGET_S="${BUDGET_ENV:-100000}"
fi
if [[ -n "${PEER:-}" && -n "${PEER_PYTHON:-}" ]]; then  # another Python: check its imports there
  if "$PEER_PYTHON" -c "import kl_ae, datasets, taming.modules.losses.vqperceptual, diffusers" \
       2>> "$OUT/status.txt"; then echo ok > "$OUT/peer_imports.txt"; else echo "see above" > "$OUT/peer_imports.txt"; fi
fi
if [[ -n "${PEER:-}" && "$(cat "$OUT/peer_imports.txt")" != ok ]]; then
  echo "peer: its packages do not import ($(cat "$OUT/peer_imports.txt")); no peer column" | tee -a "$OUT/status.txt"
  PEER=""
fi

ONLY="${ONLY:-quality,throughput,max_batch}"
step() {  # step NAME SECONDS COMMAND...: run within the budget, log to OUT/NAME.log, record the outcome, pack
  local name="$1" limit="$2"; shift 2
  [[ ",$ONLY," == *",$name,"* ]] || return 0
  local left=$((BUDGET_S - SECONDS - GRACE))
  if (( left < limit )); then limit=$left; fi
  if (( limit < 20 )); then
    echo "== $name: skipped, $((BUDGET_S - SECONDS)) s left of the ${BUDGET_S} s budget (run it alone: ONLY=$name)" \
      | tee -a "$OUT/status.txt"
    pack
    return 0
  fi
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/status.txt"
  timeout --signal=INT --kill-after=$GRACE "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local note=""
  if [[ $rc == 124 || $rc == 137 ]]; then note=" (time slot ran out)"; fi
  echo "   $name: exit $rc after $((SECONDS - t0)) s$note" | tee -a "$OUT/status.txt"
  tail -n 25 "$OUT/$name.log"
  pack
}

echo "data: $TRAIN -> $VAL; peer: ${PEER:-none}; budget ${BUDGET_S} s, setup took ${SECONDS} s" | tee -a "$OUT/status.txt"
# FLOPs per training image, counted on the CPU (the same count on any device) beside the GPU's runs
CUDA_VISIBLE_DEVICES="" "$PY" bench/flops.py "$CONFIG" --resolution "${TP[1]}" --out "$OUT/flops_count.json" \
  > "$OUT/flops.log" 2>&1 &
FLOPS_PID=$!

step quality "${SLOT[0]}" "$PY" bench/quality.py --config "$CONFIG" --data "$TRAIN" --val "$VAL" \
  --minutes "$QUALITY_MIN" --every "$QUALITY_EVERY" --lpips-trunk none "${RECIPE[@]}" --out "$OUT/quality"

PEER_ARGS=()
if [[ -n "${PEER:-}" ]]; then PEER_ARGS=(--peer "$PEER" --peer-python "${PEER_PYTHON:-$PY}"); fi
step throughput "${SLOT[1]}" "$PY" bench/throughput.py --config "$CONFIG" "${TP[@]}" "${PEER_ARGS[@]}" \
  --out "$OUT/throughput"

step max_batch "${SLOT[2]}" "$PY" bench/max_batch.py "$CONFIG" --resolution "${RES[@]}" "${MAXB[@]}" \
  --out "$OUT/max_batch.json"

# the MFU: the CPU's FLOP count at the throughput step's images/s
wait "$FLOPS_PID"; echo "   flops count: exit $? (flops.log)" | tee -a "$OUT/status.txt"
IPS=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['summary']['kl-ae']['images_per_s'])" \
      "$OUT/throughput/result.json" 2>/dev/null || echo "")
if [[ -f "$OUT/flops_count.json" ]]; then
  "$PY" bench/flops.py "$CONFIG" --resolution "${TP[1]}" --counted "$OUT/flops_count.json" \
    ${IPS:+--images-per-s "$IPS" --peak-tflops "$PEAK"} --out "$OUT/flops.json" >> "$OUT/flops.log" 2>&1
  tail -n 2 "$OUT/flops.log"
fi

echo "all raw outputs: $OUT${PACK:+ (packed into $PACK)}" | tee -a "$OUT/status.txt"
pack
