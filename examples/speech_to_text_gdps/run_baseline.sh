#!/usr/bin/env bash
# Shared multilingual baseline with stock fairseq: task speech_to_text, arch s2t_transformer.
# Trains on all languages at once, decodes every test utterance and scores each language.
#
#   run_baseline.sh DATA_DIR OUT_DIR [--max-update N] [--seed S] [--tagged] [--decode-args "..."]
#                   [-- extra fairseq-train flags]
# (a bilingual model: -- --train-subset train_et --valid-subset dev_et, --decode-args "--splits test_et")
# --tagged: the tagged baseline (docs/tagged_baseline.md): the same shared network, which also
# knows each utterance's language (--task speech_to_text_gdps, --arch $GDPS_ARCH with no split,
# --gdps-lang-embedding), as GDPS's routing does; compare it with run_gdps.sh --lang-embedding.
#
# DATA_DIR is what gdps-prep wrote (config.yaml, train/dev/test.tsv, test_<lang>.tsv).
set -euo pipefail
source "$(dirname "$0")/common.sh"
[ $# -ge 2 ] || { echo "usage: $0 DATA_DIR OUT_DIR [--max-update N] [--seed S] [-- fairseq flags]" >&2; exit 2; }
DATA=$(cd "$1" && pwd); OUT=$2; shift 2
MAX_UPDATE=1500; SEED=1; EXTRA=(); DECODE_ARGS=; TAGGED=0
while [ $# -gt 0 ]; do
  case $1 in
    --max-update) MAX_UPDATE=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --decode-args) DECODE_ARGS=$2; shift 2 ;;
    --tagged) TAGGED=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
# stock fairseq reads the features through config.yaml's absolute audio_root: after the data
# folder was moved or renamed, point it at the new place (nothing changes otherwise)
gdps-prep --out "$DATA" --relocate --quiet
TASK=speech_to_text; ARCH=$BASELINE_ARCH; MODEL_ARGS=()
if [ "$TAGGED" = 1 ]; then TASK=speech_to_text_gdps; ARCH=$GDPS_ARCH; MODEL_ARGS=(--gdps-lang-embedding); fi
fairseq-train "$DATA" --user-dir "$USER_DIR" --task "$TASK" \
  --train-subset train --valid-subset dev --config-yaml config.yaml \
  --arch "$ARCH" "${MODEL_ARGS[@]}" "${SIZE_ARGS[@]}" "${OPTIM_ARGS[@]}" "${DATA_ARGS[@]}" \
  --max-update "$MAX_UPDATE" --seed "$SEED" \
  --save-dir "$OUT/checkpoints" --no-epoch-checkpoints --keep-last-epochs 1 \
  --log-format simple --log-interval 50 "${EXTRA[@]}" 2>&1 | tee "$OUT/train.log"

# shellcheck disable=SC2086
bash "$RECIPE_DIR/decode_and_score.sh" "$DATA" "$OUT" --task "$TASK" $DECODE_ARGS
