#!/usr/bin/env bash
# GDPS with the same total number of updates as the baseline:
#   1. probe: a shared model (the baseline's network, --task speech_to_text_gdps) trained for
#      STAGE1 updates while the per-language gradients of every FFN block are recorded;
#   2. analyse: gdps-analyze ranks the blocks by conflict, groups the languages, picks the ratio;
#   3. split: the chosen FFN(s) partitioned into shared + per-group units, initialised from the
#      stage-1 weights (function-preserving, optimizer state split alike), trained on from update
#      STAGE1 to TOTAL;
#   4. decode every test utterance and score each language.
# By default 1-3 are one fairseq-train (--gdps-split-at-update STAGE1: OUT/checkpoints, the analysis
# in OUT/checkpoints/gdps_analysis). --two-stage runs them as separate commands (stage-1
# fairseq-train, gdps-analyze, gdps-split-checkpoint, stage-2 fairseq-train: OUT/stage1,
# OUT/analysis, OUT/stage2), the same computation (bit for bit, tests/test_single_run.py), needed
# for data-parallel or mixed-precision training and by every option below that reuses or replaces
# stage 1's decision (--stage1-from, --split-modules, --no-split), which imply it.
#
#   run_gdps.sh DATA_DIR OUT_DIR [--max-update TOTAL] [--stage1-updates N] [--probe-interval K]
#               [--seed S] [--analyze-args "..."] [--two-stage] [--stage1-from DIR]
#               [--split-modules M --groups G --shared-ratio R] [--init energy|svd|random]
#               [--lang-embedding] [--no-split] [--decode-args "..."] [-- extra fairseq-train flags]
# --stage1-from DIR reuses another run's stage 1 and analysis (DIR/stage1, DIR/analysis) instead of
# training them again; --split-modules/--groups/--shared-ratio replace the plan's split (e.g. a
# ratio of 0 for a full split); --decode-args go to decode_and_score.sh. --lang-embedding gives both
# stages --gdps-lang-embedding (a learned vector per language added to the encoder input, carried
# from stage 1 into stage 2), the information the tagged baseline (run_baseline.sh --tagged) has;
# a stage 1 reused with --stage1-from must have been trained the same way. --no-split: stage 2
# continues the stage-1 model unchanged (no analysis needed); with --lang-embedding and
# --stage1-from this is the tagged baseline sharing GDPS's stage 1 (the probe leaves training
# untouched, so the first STAGE1 updates are the tagged baseline's own).
set -euo pipefail
source "$(dirname "$0")/common.sh"
[ $# -ge 2 ] || { echo "usage: $0 DATA_DIR OUT_DIR [--max-update TOTAL] [--stage1-updates N] [--probe-interval K] [--seed S]" >&2; exit 2; }
DATA=$(cd "$1" && pwd); OUT=$2; shift 2
TOTAL=1600; STAGE1=; PROBE_INTERVAL=1; SEED=1; ANALYZE_ARGS=; EXTRA=(); STAGE1_FROM=
SPLIT_MODULES=; LANG_GROUPS=; SHARED_RATIO=; INIT=energy; DECODE_ARGS=; LANG_EMBEDDING=(); NO_SPLIT=0; TWO_STAGE=0
while [ $# -gt 0 ]; do
  case $1 in
    --max-update) TOTAL=$2; shift 2 ;;
    --stage1-updates) STAGE1=$2; shift 2 ;;
    --probe-interval) PROBE_INTERVAL=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --analyze-args) ANALYZE_ARGS=$2; shift 2 ;;
    --stage1-from) STAGE1_FROM=$(cd "$2" && pwd); shift 2 ;;
    --split-modules) SPLIT_MODULES=$2; shift 2 ;;
    --groups) LANG_GROUPS=$2; shift 2 ;;
    --shared-ratio) SHARED_RATIO=$2; shift 2 ;;
    --init) INIT=$2; shift 2 ;;
    --decode-args) DECODE_ARGS=$2; shift 2 ;;
    --lang-embedding) LANG_EMBEDDING=(--gdps-lang-embedding); shift ;;
    --no-split) NO_SPLIT=1; shift ;;
    --two-stage) TWO_STAGE=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
STAGE1=${STAGE1:-$(( TOTAL / 2 ))}
STAGE2=$(( TOTAL - STAGE1 ))
[ "$STAGE2" -gt 0 ] || { echo "--stage1-updates ($STAGE1) must be below --max-update ($TOTAL)" >&2; exit 2; }
mkdir -p "$OUT"
if [ -n "$STAGE1_FROM$SPLIT_MODULES$LANG_GROUPS$SHARED_RATIO" ] || [ "$NO_SPLIT" = 1 ]; then TWO_STAGE=1; fi

COMMON=(--user-dir "$USER_DIR" --task speech_to_text_gdps --train-subset train --valid-subset dev
  --config-yaml config.yaml --arch "$GDPS_ARCH" "${LANG_EMBEDDING[@]}" "${SIZE_ARGS[@]}" "${DATA_ARGS[@]}" --seed "$SEED"
  --log-format simple --log-interval 50 --no-epoch-checkpoints)

if [ "$TWO_STAGE" = 0 ]; then
  echo "[gdps] one run: probe to update $STAGE1 (every $PROBE_INTERVAL), analysis, split, on to $TOTAL"
  # gdps-train is fairseq-train with a Trainer that wraps the split model anew, so that this form
  # also trains data-parallel (-- --distributed-world-size N); single-process runs are identical
  gdps-train "$DATA" "${COMMON[@]}" "${OPTIM_ARGS[@]}" \
    --criterion label_smoothed_cross_entropy_gdps --gdps-probe-interval "$PROBE_INTERVAL" \
    --gdps-stats "$OUT/checkpoints/gdps_stats.pt" --gdps-split-at-update "$STAGE1" --gdps-init "$INIT" \
    --gdps-analyze-args="$ANALYZE_ARGS" --max-update "$TOTAL" --save-dir "$OUT/checkpoints" "${EXTRA[@]}" \
    > "$OUT/train.log" 2>&1 || { tail -n 30 "$OUT/train.log"; exit 1; }
  grep -E "GDPS single run|^(split|groups|shared ratio): " "$OUT/train.log" || true
  echo "[gdps] decoding and scoring"
  # shellcheck disable=SC2086
  bash "$RECIPE_DIR/decode_and_score.sh" "$DATA" "$OUT" --task speech_to_text_gdps --checkpoint "$OUT/checkpoints/checkpoint_best.pt" $DECODE_ARGS
  exit 0
fi

if [ -n "$STAGE1_FROM" ]; then
  [ -f "$STAGE1_FROM/stage1/checkpoint_last.pt" ] && { [ "$NO_SPLIT" = 1 ] || [ -f "$STAGE1_FROM/analysis/plan.json" ]; } \
    || { echo "--stage1-from $STAGE1_FROM: no stage1/checkpoint_last.pt and analysis/plan.json there" >&2; exit 1; }
  echo "[gdps] stage 1 reused from $STAGE1_FROM"
  mkdir -p "$OUT/stage1"
  cp "$STAGE1_FROM/stage1/checkpoint_last.pt" "$OUT/stage1/checkpoint_last.pt"
  cp "$STAGE1_FROM/stage1.log" "$OUT/stage1.log"
  if [ "$NO_SPLIT" = 0 ]; then mkdir -p "$OUT/analysis"; cp "$STAGE1_FROM/analysis/plan.json" "$OUT/analysis/plan.json"; fi
else
  echo "[gdps] stage 1: shared model with gradient probe ($STAGE1 updates, every $PROBE_INTERVAL)"
  fairseq-train "$DATA" "${COMMON[@]}" "${OPTIM_ARGS[@]}" \
    --criterion label_smoothed_cross_entropy_gdps --gdps-probe-interval "$PROBE_INTERVAL" \
    --gdps-stats "$OUT/stage1/gdps_stats.pt" \
    --max-update "$STAGE1" --save-dir "$OUT/stage1" "${EXTRA[@]}" > "$OUT/stage1.log" 2>&1 \
    || { tail -n 30 "$OUT/stage1.log"; exit 1; }

  if [ "$NO_SPLIT" = 0 ]; then
    echo "[gdps] analysis"
    # shellcheck disable=SC2086
    gdps-analyze "$OUT/stage1/gdps_stats.pt" --out "$OUT/analysis" $ANALYZE_ARGS
  fi
fi

# Stage 2 continues stage 1: gdps-split-checkpoint splits the model (function-preserving) and
# Adam's moments the same way, keeping the update count, learning-rate schedule and data position,
# so stage 2 sees the baseline's data stream at the baseline's learning rates up to update TOTAL.
if [ "$NO_SPLIT" = 1 ]; then
  [ -z "$SPLIT_MODULES$LANG_GROUPS$SHARED_RATIO" ] || { echo "--no-split takes no --split-modules/--groups/--shared-ratio" >&2; exit 2; }
  echo "[gdps] stage 2: the stage-1 model continued unsplit (updates $STAGE1 -> $TOTAL)"
  fairseq-train "$DATA" "${COMMON[@]}" "${OPTIM_ARGS[@]}" --criterion label_smoothed_cross_entropy_gdps \
    --restore-file "$OUT/stage1/checkpoint_last.pt" --max-update "$TOTAL" --save-dir "$OUT/stage2" "${EXTRA[@]}" \
    > "$OUT/stage2.log" 2>&1 || { tail -n 30 "$OUT/stage2.log"; exit 1; }
else
  echo "[gdps] stage 2: split model (updates $STAGE1 -> $TOTAL)"
  if [ -n "$SPLIT_MODULES$LANG_GROUPS$SHARED_RATIO" ]; then
    [ -n "$SPLIT_MODULES" ] && [ -n "$LANG_GROUPS" ] && [ -n "$SHARED_RATIO" ] \
      || { echo "--split-modules, --groups and --shared-ratio go together" >&2; exit 2; }
    echo "[gdps] split given on the command line: $SPLIT_MODULES | $LANG_GROUPS | ratio $SHARED_RATIO"
    SPLIT_ARGS=(--split-modules "$SPLIT_MODULES" --groups "$LANG_GROUPS" --shared-ratio "$SHARED_RATIO")
    MODEL_SPLIT_ARGS=(--gdps-split-modules "$SPLIT_MODULES" --gdps-groups "$LANG_GROUPS" --gdps-shared-ratio "$SHARED_RATIO")
  else
    SPLIT_ARGS=(--plan "$OUT/analysis/plan.json")
    MODEL_SPLIT_ARGS=(--gdps-plan "$OUT/analysis/plan.json")
  fi
  python -m fairseq_gdps.cli.split_checkpoint "$OUT/stage1/checkpoint_last.pt" "${SPLIT_ARGS[@]}" --init "$INIT" \
    --data "$DATA" --out "$OUT/stage2_init.pt"
  fairseq-train "$DATA" "${COMMON[@]}" "${OPTIM_ARGS[@]}" \
    --criterion label_smoothed_cross_entropy_gdps "${MODEL_SPLIT_ARGS[@]}" --gdps-init "$INIT" \
    --restore-file "$OUT/stage2_init.pt" --max-update "$TOTAL" --save-dir "$OUT/stage2" "${EXTRA[@]}" \
    > "$OUT/stage2.log" 2>&1 || { tail -n 30 "$OUT/stage2.log"; exit 1; }
fi
cat "$OUT/stage1.log" "$OUT/stage2.log" > "$OUT/train.log"

echo "[gdps] decoding and scoring"
# shellcheck disable=SC2086
bash "$RECIPE_DIR/decode_and_score.sh" "$DATA" "$OUT" --task speech_to_text_gdps --checkpoint "$OUT/stage2/checkpoint_best.pt" $DECODE_ARGS
