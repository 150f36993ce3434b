#!/bin/bash
# Resume the shipped recipe's 30-min run (f30) earlier, with the 128-px phase starting at the resume point.
set -u
export HF_HUB_OFFLINE=1
SRC=F30/runs/kl-ae
PY=python
cd REPO
run() {
  name=$1; step=$2; shift 2
  d=OUT/$name
  rm -rf $d; mkdir -p $d/checkpoints
  cp $SRC/config.yaml $d/
  cp -r $SRC/checkpoints/$step $d/checkpoints/
  echo "== $name $(date +%T)" >> OUT/log
  $PY -m kl_ae.cli train $d/config.yaml --resume $d/checkpoints/$step \
     --set train.output_dir=$d --set train.checkpoint_every_minutes=2.5 "$@" > $d/console.log 2>&1
  echo "train rc=$? $(date +%T)" >> OUT/log
  rm -rf $d/checkpoints/$step
  $PY bench/train_vs_val.py ../shared/data/photos $d --out $d/tvv.json > $d/tvv.log 2>&1
  echo "tvv rc=$? $(date +%T)" >> OUT/log
  tail -8 $d/tvv.log >> OUT/log
}
run p50 step-0002002 --set data.final_fraction=0.5
run p67 step-0001345 --set data.final_fraction=0.67
# p20 ran later, after the wider-model runs, with the same function:
# run p20 step-0002611 --set data.final_fraction=0.2
echo ALLDONE >> OUT/log
