#!/usr/bin/env bash
# Write WORK/results.md from a finished run_demo.sh run: machine, time, GDPS's decision, scores of
# both systems and the learning curves.   write_demo_results.sh WORK
set -euo pipefail
source "$(dirname "$0")/common.sh"
WORK=$1
# shellcheck disable=SC1091
source "$WORK/run.env"   # CORPUS PROFILE SEED MAX_UPDATE STAGE1 PROBE_INTERVAL WALL_S TRAIN_THREADS (run_demo.sh)
# what a reader needs to compare two runs: hashes of the corpus and features, versions, CPU, threads
python -m fairseq_gdps.data.fingerprint --corpus "$WORK/corpus" --data "$WORK/data" \
  --train-threads "${TRAIN_THREADS:-1}" --json "$WORK/fingerprint.json" --markdown > "$WORK/fingerprint.md"
python -m fairseq_gdps.cli.learning_curve "$WORK/tagged/train.log" "$WORK/gdps/train.log" \
  --labels tagged,gdps --update-offsets 0,0 --out "$WORK/learning_curve" > /dev/null
{
  echo "# Demo results ($CORPUS corpus, seed $SEED, $MAX_UPDATE updates per system)"
  echo
  echo "Measured on $(nproc) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)),"
  echo "torch $(python -c 'import torch; print(torch.__version__)'), total wall time of run_demo.sh $WALL_S s"
  echo "(corpus, features, the tagged baseline and GDPS trained in parallel with one thread each, decoding, scoring)."
  echo
  echo "## GDPS's decision (one fairseq-train: probe every $PROBE_INTERVAL updates to update $STAGE1, then analysis and split)"
  echo
  grep -E "^(split|groups|shared ratio): " "$WORK/gdps.log" | sed 's/^/- /'
  grep -E "GDPS single run: (split at|no conflict)" "$WORK/gdps.log" | sed 's/^.*GDPS single run: /- /'
  echo
  echo "## Test scores per language"
  echo
  cat "$WORK/comparison.md"
  echo
  echo "GDPS against the tagged baseline, paired bootstrap per language (p: the probability of a difference"
  echo "this large by chance; one seed):"
  echo
  sed -n '/^| language | metric |/,/^$/p' "$WORK/gdps/scores_vs_tagged.md"
  echo "## Tagged baseline, every metric"
  echo
  sed '/^sacrebleu signatures/,$d' "$WORK/tagged/scores.md"
  echo "## GDPS, every metric"
  echo
  cat "$WORK/gdps/scores.md"
  echo
  echo "## Learning curve (dev set; wall s counts from the start of each log)"
  echo
  echo "| system | updates | wall s | dev loss | dev accuracy % |"
  echo "|---|---:|---:|---:|---:|"
  tail -n +2 "$WORK/learning_curve.tsv" | awk -F'\t' '{printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $6}'
  echo
  echo "## What this run used (compare these before comparing two runs' scores)"
  echo
  echo "Same hashes, versions, CPU kernels and threads: the scores should match to the last digit."
  echo "Anything different (another espeak-ng changes the audio; another CPU or thread count changes"
  echo "the floating-point sums) and differences of a few BLEU are expected: see docs/benchmarks.md,"
  echo "\"Reproducibility\". Full hashes: fingerprint.json."
  echo
  cat "$WORK/fingerprint.md"
} > "$WORK/results.md"
