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
# glibc's malloc returns freed activations to the kernel and page-faults them back every step; a
# higher mmap/trim threshold keeps them in the heap: -2 % per train step, half the system time
# (README demo "Time"). Other C libraries ignore the variable.
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold=268435456}
# Every stage runs one torch thread per process (threads=1 in the demo's config) and two processes
# at a time; the teacher, alone, uses every core (2 threads: 1.7x faster than 1 for this model,
# `python experiments/demo/bench_cpu.py`).
cores=$(nproc)

fast=() teacher=() finetune=() evaluate=() knn=() heldout=()
# The students each lane distils: the three the fine-tunes start from (lane A), the mixed one that
# only k-NN scores (lane B, which has the lighter load).
distill_a=(distortion=mask_strong,noise_strong,blur_demo) distill_b=(distortion=mixed_demo)
if [ "$FAST" = 1 ]; then  # a smoke run of every stage on a few cells (what the slow test runs)
  fast=(data.limit_train=1000 data.limit_eval=500 trainer.max_epochs=1 trainer.limit_val_batches=1)
  teacher=(trainer.max_steps=20)
  distill_a=(distortion=noise_strong)
  finetune=(distortion=noise_strong data.label_fraction=0.5 trainer.max_steps=6 trainer.val_check_interval=3)
  evaluate=(distortion=noise_strong data.label_fraction=0.5)
  knn=(distortion=noise_strong pretrain.distortion=noise_strong,mixed_demo)
  heldout=(data.label_fraction=0.5 method=ours)
fi

start=$(date +%s)
step() { echo; echo "== $1 ($(( $(date +%s) - start ))s elapsed)"; }
# Each stage's wall and CPU time (bash's `time`: this shell's children), so a busy machine's
# inflated wall time can be told from the work done.
timed() { local TIMEFORMAT="-- $1: %R s wall, %U s user, %S s sys"; shift; time "$@"; }
# Two lanes, one per core (the tiny model runs fastest on one thread per process; two processes use
# both cores). Each lane's lines carry its letter; a failed lane leaves $sync/failed, and the script
# stops after the stage. Commands in a lane are chained with && (errexit does not reach into them).
sync=$(mktemp -d); trap 'rm -rf "$sync"' EXIT
lane() { local tag=$1; shift; { ( "$@" ) 2>&1 | sed -u "s/^/[$tag] /"; } || { touch "$sync/failed"; return 1; }; }
both() {
  lane A $1 & local a=$!
  lane B $2 & local b=$!
  local ra=0 rb=0; wait $a || ra=$?; wait $b || rb=$?
  [ $ra = 0 ] && [ $rb = 0 ] || { echo "a lane failed (A: exit $ra, B: exit $rb)"; exit 1; }
}

step "1/5 teacher: tiny ViT on clean images of train[0:20000] (labels used here only)"
timed teacher $BIN/distortkd-finetune experiment=demo_teacher threads="$cores" "${fast[@]}" "${teacher[@]}"

step "2/5, 3/5, 5/5 in two lanes: A distils one student per distortion (train[20000:60000], no
     labels), then fine-tunes them; B distils the mixed student, fine-tunes the supervised
     baseline (1 % and 10 % labels, distorted images), then scores every student with k-NN"
lane_a() {
  timed "distillation (mask, noise, blur)" $BIN/distortkd-distill -m experiment=demo_distill seed="$seeds" \
    "${fast[@]}" "${distill_a[@]}" &&
  touch "$sync/students" &&
  timed "fine-tuning (ours)" $BIN/distortkd-finetune -m experiment=demo_finetune seed="$seeds" method=ours \
    "${fast[@]}" "${finetune[@]}"
}
lane_b() {
  timed "distillation (mixed)" $BIN/distortkd-distill -m experiment=demo_distill seed="$seeds" \
    "${fast[@]}" "${distill_b[@]}" &&
  timed "fine-tuning (supervised)" $BIN/distortkd-finetune -m experiment=demo_finetune seed="$seeds" \
    method=supervised "${fast[@]}" "${finetune[@]}" &&
  students_ready &&
  timed k-NN $BIN/distortkd-finetune -m experiment=demo_knn seed="$seeds" "${fast[@]}" "${knn[@]}"
}
students_ready() {  # k-NN scores every student: wait for lane A's distillation
  until [ -e "$sync/students" ]; do [ -e "$sync/failed" ] && return 1; sleep 2; done
}
both lane_a lane_b

step "4/5 evaluation: A the held-out ImageNet-C style corruptions for the noise-trained models,
     B the 10k test images at the training severity and beyond; each lane scores both methods in
     one process, which share the corrupted images and the teacher's features (memo_mib)"
# The held-out suite is every registered ImageNet-C corruption that applies to grey 28-px images:
# saturate is left out (it changes colour saturation; a grey image has none), and frost unless
# DISTORTKD_FROST_DIR holds the benchmark's frost photographs (the demo ships none).
eval_heldout() {
  timed "held-out (both methods)" $BIN/distortkd-evaluate -m experiment=demo_heldout seed="$seeds" \
    "${fast[@]}" "${heldout[@]}"
}
eval_grid() {
  timed "evaluation (both methods)" $BIN/distortkd-evaluate -m experiment=demo_evaluate seed="$seeds" \
    "${fast[@]}" "${evaluate[@]}"
}
both eval_heldout eval_grid

step "report"
timed report $BIN/distortkd-report "$DISTORTKD_RUNS/demo" --layout demo --out "$OUT"
echo "demo finished in $(( $(date +%s) - start ))s; report: $OUT/results.md"
