#!/usr/bin/env bash
# The main job on the built-in demo corpus: synthesise the corpus, prepare features, train the
# shared multilingual baseline and GDPS (probe, analysis, split) with the same number of
# updates, decode every test utterance and print per-language scores side by side.
#
#   bash examples/speech_to_text_gdps/run_demo.sh [--full] [--work DIR] [--seed S]
#
# Default (quick) profile: under 15 minutes on 2 CPU cores. --full: a larger corpus and longer
# training. Results go to DIR (default: work/demo_<profile>).
set -euo pipefail
source "$(dirname "$0")/common.sh"
PROFILE=quick; SEED=1; WORK=
while [ $# -gt 0 ]; do
  case $1 in
    --full) PROFILE=full; shift ;;
    --work) WORK=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    *) echo "unknown option $1 (use --full, --work DIR, --seed S)" >&2; exit 2 ;;
  esac
done
WORK=${WORK:-$REPO_ROOT/work/demo_$PROFILE}
case $PROFILE in
  # quick: enough updates for the small model to learn the content of the quick corpus, not only
  # its form (fewer stop while it is still being learned); docs/benchmarks.md ("The demo") has the timings
  quick) MAX_UPDATE=${MAX_UPDATE:-1500} ;;
  full) MAX_UPDATE=${MAX_UPDATE:-6000} ;;
esac
mkdir -p "$WORK"
t0=$(date +%s)
stamp() { echo "[demo] $(( $(date +%s) - t0 ))s: $*"; }

if [ ! -f "$WORK/corpus/test.tsv" ]; then
  stamp "synthesising the $PROFILE demo corpus"
  gdps-make-corpus --profile "$PROFILE" --seed "$SEED" --out "$WORK/corpus"
fi
if [ ! -f "$WORK/data/config.yaml" ]; then
  stamp "preparing features, SentencePiece model and manifests"
  gdps-prep --corpus "$WORK/corpus" --out "$WORK/data"
fi
# The baseline and GDPS train at the same time, one thread each: on 2 cores two single-threaded
# runs of this small model finish sooner than the same two runs one after the other. The thread
# count is part of the result: on one thread training is bit-identical from run to run, another
# count changes the floating-point sums (results.md records it).
TRAIN_THREADS=1
# one fairseq-generate per system over the whole test set (scored per language from the
# manifest), not one per language: each start costs seconds of imports and model loading
DECODE_ARGS="--splits test"
stamp "training the shared baseline and GDPS ($MAX_UPDATE updates each, in parallel) and decoding"
OMP_NUM_THREADS=$TRAIN_THREADS bash "$RECIPE_DIR/run_baseline.sh" "$WORK/data" "$WORK/baseline" --max-update "$MAX_UPDATE" --seed "$SEED" \
  --decode-args "$DECODE_ARGS" > "$WORK/baseline.log" 2>&1 &
baseline_pid=$!
OMP_NUM_THREADS=$TRAIN_THREADS bash "$RECIPE_DIR/run_gdps.sh" "$WORK/data" "$WORK/gdps" --max-update "$MAX_UPDATE" --seed "$SEED" \
  --probe-interval 8 --decode-args "$DECODE_ARGS" > "$WORK/gdps.log" 2>&1 &
gdps_pid=$!
wait $baseline_pid || { tail -n 30 "$WORK/baseline.log"; echo "[demo] baseline failed: $WORK/baseline.log" >&2; exit 1; }
wait $gdps_pid || { tail -n 30 "$WORK/gdps.log"; echo "[demo] GDPS failed: $WORK/gdps.log" >&2; exit 1; }

stamp "done. GDPS analysis: $WORK/gdps/analysis/report.md"
grep -E "^(split|groups|shared ratio)" "$WORK/gdps.log" || true
echo
echo "Per-language test scores (shared baseline vs GDPS):"
gdps-score --compare baseline="$WORK/baseline/scores.json" gdps="$WORK/gdps/scores.json" --out "$WORK/comparison"
# paired bootstrap of GDPS against the baseline, per language (one seed: see benchmarks/quality.py for several)
gdps-score --data "$WORK/data" --decode-dir "$WORK/gdps/decode" --baseline-decode-dir "$WORK/baseline/decode" \
  --out "$WORK/gdps/scores_vs_baseline" > /dev/null
echo "GDPS against the baseline, paired bootstrap: $WORK/gdps/scores_vs_baseline.md"

printf 'PROFILE=%s\nSEED=%s\nMAX_UPDATE=%s\nWALL_S=%s\nTRAIN_THREADS=%s\n' "$PROFILE" "$SEED" "$MAX_UPDATE" \
  "$(( $(date +%s) - t0 ))" "$TRAIN_THREADS" > "$WORK/run.env"
bash "$RECIPE_DIR/write_demo_results.sh" "$WORK"
stamp "results: $WORK/results.md, learning curve: $WORK/learning_curve.png"
