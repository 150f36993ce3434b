#!/usr/bin/env bash
# Every GPU figure kl-ae still lacks, in one command that fits in 10 minutes on one H100/H200:
#   1. a 5-minute quality-per-compute run (bench/quality.py): the SD-size f8c4 model with the
#      quickstart's recipe on photographs, PSNR/SSIM at 1-minute marks against the baselines
#   2. sd-f8c4 at 256² training throughput against the peer and a plain loop (bench/throughput.py)
#   3. FLOPs per training image and the MFU they imply at the measured images/s (bench/flops.py)
#   4. the largest batch at 256² and 512², with and without gradient checkpointing (bench/max_batch.py)
# Every raw output lands under one folder (default results/gpu/<date>); a step that fails or runs
# out of its time slot is recorded in status.txt and the next step still runs.
#
#   bash bench/gpu.sh [OUT]              # on the GPU machine
#   bash bench/gpu.sh --dry-run [OUT]    # the same steps at toy size on a CPU (about a minute; tested)
#
# Environment (all optional):
#   PEER=/path/to/train_autoencoderkl.py  PEER_PYTHON=python   the diffusers example trainer (no peer column without)
#   PHOTOS=DIR          a folder with train/ and val/ (default ../shared/data/photos, else the builtin photos)
#   PEAK_TFLOPS=989     the device's dense bf16 peak (989 for an H100 SXM or H200)
#   PYTHON=python3
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT="${1:-results/gpu/$(date +%Y%m%d-%H%M)}"
PY="${PYTHON:-python3}"
PEAK="${PEAK_TFLOPS:-989}"
mkdir -p "$OUT"
: > "$OUT/status.txt"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled

PHOTOS="${PHOTOS:-../shared/data/photos}"
if [[ -d "$PHOTOS/train" && -d "$PHOTOS/val" ]]; then TRAIN="$PHOTOS/train"; VAL="$PHOTOS/val"
else TRAIN=builtin:train; VAL=builtin:val; fi

# The quickstart's recipe on the SD-size model (LR 4e-4 instead of 1e-3: a guess for a 20x larger
# model, not measured), with its block-mean start (32 groups leave 4 channels per group at 128).
# LPIPS off because no VGG16 weights travel to the machine; GAN off as in the quickstart; no
# channel shuffle (53 photos are not 7).
RECIPE=(--set loss.perceptual_weight=0 --set loss.l2_weight=1.0 --set optim.scale_lr=false
        --set optim.base_learning_rate=4e-4 --set "optim.betas=[0.9,0.99]" --set optim.lr_warmup_steps=100
        --set optim.lr_schedule=cosine --set optim.lr_final_ratio=0.05 --set loss.disc_start=100000000
        --set train.batch_size=16 --set train.gradient_accumulation_steps=1 --set train.ema_decay=0.999
        --set data.num_workers=8 --set "data.short_side_range=[256,512]" --set data.decode_cache_mb=2048
        --set model.norm_num_groups=32 --set model.posterior_logvar_init=-8 --set model.init_scheme=block_means)
CONFIG=configs/sd-f8c4.yaml
RES=(256 512); QUALITY_MIN=5; QUALITY_EVERY=1.25; TP=(--resolution 256 --batch 8 --steps 10 --repeats 1 --workers 8)
MAXB=(--max-batch 128); SLOT=(400 90 30 80)  # seconds per step: 600 in all
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
  MAXB=(--max-batch 2); SLOT=(120 120 60 120); TRAIN=builtin:train; VAL=builtin:val; PEER=""
fi

step() {  # step NAME SECONDS COMMAND...: run, log to OUT/NAME.log, record the outcome
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/status.txt"
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local note=""
  if [[ $rc == 124 || $rc == 137 ]]; then note=" (time slot ran out)"; fi
  echo "   $name: exit $rc after $((SECONDS - t0)) s$note" | tee -a "$OUT/status.txt"
  tail -n 25 "$OUT/$name.log"
}

"$PY" - > "$OUT/machine.json" <<'EOF'
import json, torch
from kl_ae.precision import machine_info
print(json.dumps({**machine_info(), "cuda": torch.version.cuda}))
EOF

step quality "${SLOT[0]}" "$PY" bench/quality.py --config "$CONFIG" --data "$TRAIN" --val "$VAL" \
  --minutes "$QUALITY_MIN" --every "$QUALITY_EVERY" --lpips-trunk none "${RECIPE[@]}" --out "$OUT/quality"

PEER_ARGS=()
if [[ -n "${PEER:-}" ]]; then PEER_ARGS=(--peer "$PEER" --peer-python "${PEER_PYTHON:-$PY}"); fi
step throughput "${SLOT[1]}" "$PY" bench/throughput.py --config "$CONFIG" "${TP[@]}" "${PEER_ARGS[@]}" \
  --out "$OUT/throughput"

IPS=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['summary']['kl-ae']['images_per_s'])" \
      "$OUT/throughput/result.json" 2>/dev/null || echo "")
step flops "${SLOT[2]}" "$PY" bench/flops.py "$CONFIG" --resolution "${TP[1]}" \
  ${IPS:+--images-per-s "$IPS" --peak-tflops "$PEAK"} --out "$OUT/flops.json"

step max_batch "${SLOT[3]}" "$PY" bench/max_batch.py "$CONFIG" --resolution "${RES[@]}" "${MAXB[@]}" \
  --out "$OUT/max_batch.json"

echo "all raw outputs: $OUT" | tee -a "$OUT/status.txt"
