#!/usr/bin/env bash
# The main job on the built-in demo corpus: synthesise the corpus, prepare features, train the
# shared multilingual baseline, decode every test utterance and print per-language scores.
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
  quick) MAX_UPDATE=${MAX_UPDATE:-1600} ;;
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
stamp "training the shared baseline ($MAX_UPDATE updates) and decoding"
bash "$RECIPE_DIR/run_baseline.sh" "$WORK/data" "$WORK/baseline" --max-update "$MAX_UPDATE" --seed "$SEED" > "$WORK/baseline.log" 2>&1 \
  || { tail -n 30 "$WORK/baseline.log"; exit 1; }
python -m fairseq_gdps.cli.learning_curve "$WORK/baseline/train.log" --labels baseline --out "$WORK/baseline/learning_curve" > /dev/null
stamp "done. Per-language test scores of the shared baseline:"
cat "$WORK/baseline/scores.md"
