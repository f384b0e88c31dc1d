#!/usr/bin/env bash
# `make study`: does the distilled student recover clean representations, or compensate for the one
# distortion it saw? Every recipe is a distillation from the demo's teacher, then the same fine-tune
# (10 % labels) and evaluation; the supervised baseline is fine-tuned on the same distortion.
#   recipes: fixed strong severity and a severity range (up to it) per family (mask, noise, blur);
#            mixed (all three); leave one family out (x3); the loss ablations at the best recipe;
#            the convergence check: the fixed noise recipe and its baseline at 1 % and 10 % labels,
#            fine-tuned for study.long_steps (4x the budget every recipe gets, study.steps).
#   SEEDS=3  seeds 0..SEEDS-1 of every distillation and fine-tune (the paired tests pair on them)
#   FAST=1   smoke version: one family, few images and steps; runs and report under experiments/study/fast
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
SEEDS=${SEEDS:-3}
FAST=${FAST:-0}
seeds=$(seq -s, 0 $((SEEDS - 1)))
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# glibc malloc thresholds that keep freed activations in the heap (see experiments/demo/run.sh)
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold=268435456}

fixed=mask_strong,noise_strong,blur_demo        # the strong presets: fine-tune target of fixed and range
mixes=study_mixed,study_lofo_mask,study_lofo_noise,study_lofo_blur  # fine-tuned on their own mix
ranges=study_range_mask,study_range_gaussian_noise,study_range_gaussian_blur
curve=noise_strong                               # also fine-tuned at 1 % labels (budget curves)
images=300                                       # test images of every evaluation cell
fast=() teacher=() finetune=() budget=()
if [ "$FAST" = 1 ]; then  # every stage on a few cells (what the slow test runs)
  export DISTORTKD_RUNS=${DISTORTKD_RUNS:-experiments/study/fast/runs}
  export DISTORTKD_TEACHER_RUNS=${DISTORTKD_TEACHER_RUNS:-$DISTORTKD_RUNS}  # its own tiny teacher
  OUT=${STUDY_OUT:-experiments/study/fast}
  fixed=noise_strong mixes=study_lofo_noise ranges=study_range_gaussian_noise curve=noise_strong images=100
  fast=(data.limit_train=300 data.limit_eval=100 trainer.limit_val_batches=1)
  teacher=(trainer.max_steps=10 trainer.max_epochs=1)
  budget=(study.steps=4 study.long_steps=8)
  finetune=(trainer.val_check_interval=2)
fi
export DISTORTKD_RUNS=${DISTORTKD_RUNS:-experiments/study/runs}
export DISTORTKD_TEACHER_RUNS=${DISTORTKD_TEACHER_RUNS:-experiments/demo/runs}
OUT=${STUDY_OUT:-experiments/study}
root=$DISTORTKD_RUNS/study

start=$(date +%s)
step() { echo; echo "== $1 ($(( $(date +%s) - start ))s elapsed)"; }
step "1/6 the demo's teacher (skipped when the demo made it: $DISTORTKD_TEACHER_RUNS)"
DISTORTKD_RUNS=$DISTORTKD_TEACHER_RUNS $BIN/distortkd-finetune experiment=demo_teacher "${fast[@]}" "${teacher[@]}"
step "2/6 distillation: every recipe x seeds $seeds, no labels"
$BIN/distortkd-distill -m experiment=study_distill seed="$seeds" distortion="$fixed,$ranges,$mixes" "${fast[@]}"
# From here two lanes, one per core (every stage runs one thread: threads=1 in the demo's config).
# Lane B, in the background: the budget check (1 % labels at the study's budget, then both label
# fractions at study.long_steps), which needs only the fixed noise student of stage 2. Lane A: the
# rest. The report waits for both; a failed lane B fails the study after lane A is done.
lane_b() {
  step "5/6 [lane B] 1 % labels for the fixed noise recipe and its baseline (accuracy vs fine-tune steps)" &&
  $BIN/distortkd-finetune -m experiment=study_finetune seed="$seeds" method=supervised,ours \
    distortion="$curve" data.label_fraction=0.01 "${fast[@]}" "${budget[@]}" "${finetune[@]}" &&
  step "5a [lane B] convergence: the same recipe and its baseline, 1 % and 10 % labels, at study.long_steps" &&
  $BIN/distortkd-finetune -m experiment=study_finetune seed="$seeds" method=supervised,ours \
    distortion="$curve" data.label_fraction=0.01,0.1 'trainer.max_steps=${study.long_steps}' \
    "${fast[@]}" "${budget[@]}" "${finetune[@]}"
}
{ lane_b 2>&1 | sed -u "s/^/[B] /"; exit "${PIPESTATUS[0]}"; } &
lane_b_pid=$!
killtree() { local c; for c in $(pgrep -P "$1"); do killtree "$c"; done; kill "$1" 2>/dev/null || true; }
trap '[ -z "${lane_b_pid:-}" ] || killtree "$lane_b_pid"' EXIT  # lane A failed: stop lane B too
step "3/6 fine-tuning, 10 % labels: supervised baseline and fixed/mixed students on their distortion"
$BIN/distortkd-finetune -m experiment=study_finetune seed="$seeds" method=supervised,ours \
  distortion="$fixed,$mixes" "${fast[@]}" "${budget[@]}" "${finetune[@]}"
step "3b range students, fine-tuned on their family's strong preset (as the fixed ones)"
$BIN/distortkd-finetune -m experiment=study_finetune seed="$seeds" method=ours distortion="$fixed" \
  'pretrain.distortion=study_range_${distortion.family}' "${fast[@]}" "${budget[@]}" "${finetune[@]}"
step "4/6 evaluation (10 % labels): every fine-tune on the same corrupted test images (3 families x 5 severities, held-out suite)"
$BIN/python -m distortkd.study evaluate "$root" --images "$images" "${budget[@]}"
# An interim report of what is done so far (a failure here must not cost the rest of the study).
$BIN/distortkd-report "$root" --layout study --out "$OUT" > /dev/null || echo "interim report failed"
read -r best_ft best_pre < <($BIN/python -m distortkd.study best "$root")
step "5b loss ablations at the best recipe ($best_pre, fine-tuned on $best_ft)"
$BIN/distortkd-distill -m experiment=study_distill seed="$seeds" distortion="$best_pre" \
  loss=global,global_local,global_attn "${fast[@]}"
$BIN/distortkd-finetune -m experiment=study_finetune seed="$seeds" method=ours distortion="$best_ft" \
  pretrain.distortion="$best_pre" loss=global,global_local,global_attn "${fast[@]}" "${budget[@]}" "${finetune[@]}"
$BIN/python -m distortkd.study evaluate "$root" --images "$images" "${budget[@]}"
step "waiting for lane B (the budget check)"
wait "$lane_b_pid" || { lane_b_pid=; echo "lane B (the budget check) failed: see its [B] lines"; exit 1; }
lane_b_pid=
step "6/6 report"
$BIN/distortkd-report "$root" --layout study --out "$OUT"
echo "study finished in $(( $(date +%s) - start ))s; report: $OUT/results.md"
