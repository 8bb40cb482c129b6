#!/usr/bin/env bash
# Decode each language's test manifest with fairseq-generate and score it with sacrebleu.
#   decode_and_score.sh DATA_DIR OUT_DIR [--task T] [--checkpoint PATH] [--splits "test_et test_sw"]
#                       [--baseline-decode-dir DIR] [--comet-model PATH] [-- extra generate flags]
# Writes OUT_DIR/decode/<split>.txt (fairseq-generate output) and OUT_DIR/scores.json / .md.
# Default splits: every test_<lang>.tsv. --baseline-decode-dir adds paired bootstrap tests against
# the baseline's decodes of the same splits; --comet-model (or $GDPS_COMET_MODEL) a local COMET model.
set -euo pipefail
source "$(dirname "$0")/common.sh"
DATA=$(cd "$1" && pwd); OUT=$2; shift 2
TASK=speech_to_text; CKPT="$OUT/checkpoints/checkpoint_best.pt"; EXTRA=(); SPLITS=
SCORE_ARGS=(); COMET_MODEL=${GDPS_COMET_MODEL:-}
while [ $# -gt 0 ]; do
  case $1 in
    --task) TASK=$2; shift 2 ;;
    --checkpoint) CKPT=$2; shift 2 ;;
    --splits) SPLITS=$2; shift 2 ;;
    --baseline-decode-dir) SCORE_ARGS+=(--baseline-decode-dir "$2"); shift 2 ;;
    --comet-model) COMET_MODEL=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT/decode"
# stock fairseq (--task speech_to_text) reads the features through config.yaml's absolute
# audio_root: after the data folder was moved, point it at the new place (nothing changes otherwise)
gdps-prep --out "$DATA" --relocate --quiet
splits=()
if [ -n "$SPLITS" ]; then read -r -a splits <<< "$SPLITS"
else for f in "$DATA"/test_*.tsv; do splits+=("$(basename "$f" .tsv)"); done; fi
[ ${#splits[@]} -gt 0 ] || { echo "no test_<lang>.tsv manifests in $DATA" >&2; exit 1; }
for split in "${splits[@]}"; do
  # fairseq-generate rebuilds the task from its command line: task flags are passed again.
  fairseq-generate "$DATA" --user-dir "$USER_DIR" --task "$TASK" --config-yaml config.yaml \
    --gen-subset "$split" --path "$CKPT" \
    --max-tokens 50000 --required-batch-size-multiple 1 --num-workers 0 \
    --beam 5 --scoring sacrebleu "${EXTRA[@]}" > "$OUT/decode/$split.txt" 2> "$OUT/decode/$split.log"
done
[ -z "$COMET_MODEL" ] || SCORE_ARGS+=(--comet-model "$COMET_MODEL")
gdps-score --data "$DATA" --decode-dir "$OUT/decode" --out "$OUT/scores" "${SCORE_ARGS[@]}"
