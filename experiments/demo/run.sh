#!/usr/bin/env bash
# `make demo`: the whole method on real Fashion-MNIST (Debian's files), on CPU, through the
# project's own CLIs and the experiment=demo_* configs, then the report in experiments/demo/.
#   SEEDS=3  repeat distillation, fine-tuning and evaluation with seeds 0..2 (mean ± std)
#   FAST=1   smoke version (~2 min): few images, few steps; report goes to $DEMO_OUT
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
SEEDS=${SEEDS:-1}
FAST=${FAST:-0}
seeds=$(seq -s, 0 $((SEEDS - 1)))
export DISTORTKD_RUNS=${DISTORTKD_RUNS:-experiments/demo/runs}
OUT=${DEMO_OUT:-experiments/demo}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

fast=() teacher=() distill=() finetune=() evaluate=() knn=() heldout=()
if [ "$FAST" = 1 ]; then  # a smoke run of every stage on a few cells (what the slow test runs)
  fast=(data.limit_train=1000 data.limit_eval=500 trainer.max_epochs=1 trainer.limit_val_batches=1)
  teacher=(trainer.max_steps=20)
  distill=(distortion=noise_strong,mixed_demo)
  finetune=(distortion=noise_strong data.label_fraction=0.5 trainer.max_steps=6 trainer.val_check_interval=3)
  evaluate=(distortion=noise_strong data.label_fraction=0.5)
  knn=(distortion=noise_strong pretrain.distortion=noise_strong,mixed_demo)
  heldout=(data.label_fraction=0.5 method=ours)
fi

start=$(date +%s)
step() { echo; echo "== $1 ($(( $(date +%s) - start ))s elapsed)"; }
step "1/5 teacher: tiny ViT on clean images of train[0:20000] (labels used here only)"
$BIN/distortkd-finetune experiment=demo_teacher "${fast[@]}" "${teacher[@]}"
step "2/5 distillation: one student per distortion + a mixed student, train[20000:60000], no labels"
$BIN/distortkd-distill -m experiment=demo_distill seed="$seeds" "${fast[@]}" "${distill[@]}"
step "3/5 fine-tuning on distorted images, 1 % and 10 % labels: supervised baseline vs distilled"
$BIN/distortkd-finetune -m experiment=demo_finetune seed="$seeds" "${fast[@]}" "${finetune[@]}"
step "4/5 evaluation on the 10k test images, training severity and beyond"
$BIN/distortkd-evaluate -m experiment=demo_evaluate seed="$seeds" "${fast[@]}" "${evaluate[@]}"
step "4b held-out ImageNet-C style corruptions for the noise-trained models (2k test images)"
$BIN/distortkd-evaluate -m experiment=demo_heldout seed="$seeds" "${fast[@]}" "${heldout[@]}"
step "5/5 k-NN: every student (per-distortion and mixed) on every distortion family"
$BIN/distortkd-finetune -m experiment=demo_knn seed="$seeds" "${fast[@]}" "${knn[@]}"
step "report"
$BIN/distortkd-report "$DISTORTKD_RUNS/demo" --layout demo --out "$OUT"
echo "demo finished in $(( $(date +%s) - start ))s; report: $OUT/results.md"
