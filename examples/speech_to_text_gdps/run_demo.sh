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
# runs of this small model finish sooner than the same two runs one after the other.
stamp "training the shared baseline and GDPS ($MAX_UPDATE updates each, in parallel) and decoding"
OMP_NUM_THREADS=1 bash "$RECIPE_DIR/run_baseline.sh" "$WORK/data" "$WORK/baseline" --max-update "$MAX_UPDATE" --seed "$SEED" \
  > "$WORK/baseline.log" 2>&1 &
baseline_pid=$!
OMP_NUM_THREADS=1 bash "$RECIPE_DIR/run_gdps.sh" "$WORK/data" "$WORK/gdps" --max-update "$MAX_UPDATE" --seed "$SEED" \
  --probe-interval 8 > "$WORK/gdps.log" 2>&1 &
gdps_pid=$!
wait $baseline_pid || { tail -n 30 "$WORK/baseline.log"; echo "[demo] baseline failed: $WORK/baseline.log" >&2; exit 1; }
wait $gdps_pid || { tail -n 30 "$WORK/gdps.log"; echo "[demo] GDPS failed: $WORK/gdps.log" >&2; exit 1; }

python -m fairseq_gdps.cli.learning_curve "$WORK/baseline/train.log" "$WORK/gdps/stage1.log" \
  --labels baseline,gdps-stage1 --out "$WORK/learning_curve" > /dev/null
stamp "done. GDPS analysis: $WORK/gdps/analysis/report.md"
grep -E "^(split|groups|shared ratio)" "$WORK/gdps.log" || true
echo
echo "Per-language test scores (shared baseline vs GDPS):"
gdps-score --compare baseline="$WORK/baseline/scores.json" gdps="$WORK/gdps/scores.json" --out "$WORK/comparison"

# results.md: everything above in one file, with the machine and the time it took
{
  echo "# Demo results ($PROFILE profile, seed $SEED, $MAX_UPDATE updates per system)"
  echo
  echo "Measured $(date -u +%Y-%m-%d) on $(nproc) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)),"
  echo "torch $(python -c 'import torch; print(torch.__version__)'), total wall time $(( $(date +%s) - t0 )) s"
  echo "(baseline and GDPS trained in parallel, one thread each)."
  echo
  echo "## Test scores per language"
  echo
  cat "$WORK/comparison.md"
  echo
  echo "## Shared baseline, every metric"
  echo
  sed '/^sacrebleu signatures/,$d' "$WORK/baseline/scores.md"
  echo "## GDPS, every metric"
  echo
  cat "$WORK/gdps/scores.md"
  echo
  echo "## GDPS analysis (stage 1, $(( MAX_UPDATE / 2 )) updates)"
  echo
  grep -E "^(split|groups|shared ratio)" "$WORK/gdps.log" | sed 's/^/- /'
  echo
  echo "## Learning curve (dev set)"
  echo
  echo "| system | updates | wall s | dev loss | dev accuracy % |"
  echo "|---|---:|---:|---:|---:|"
  tail -n +2 "$WORK/learning_curve.tsv" | awk -F'\t' '{printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $6}'
} > "$WORK/results.md"
stamp "results: $WORK/results.md, learning curve: $WORK/learning_curve.png"
