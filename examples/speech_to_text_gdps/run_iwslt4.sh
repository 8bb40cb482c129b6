#!/usr/bin/env bash
# The paper's four-language setting on the real corpora: Tunisian Arabic (aeb), Bemba (bem),
# Irish (ga) and Estonian (et) -> English, from four local release folders:
#   1. gdps-prep-corpus per corpus (cut/resample to 16 kHz mono, one corpus folder each), then merge;
#   2. gdps-prep: one joint data folder (80-dim fbank, one SentencePiece model on all English targets);
#   3. run_baseline.sh and/or run_gdps.sh on it (same total updates), decoding and per-language scores.
#
#   run_iwslt4.sh --aeb LDC2022E01 --aeb-splits iwslt22-dialect --bem bigc/data/bem \
#                 --ga iwslt2023_ga-eng --et iwslt2025_est2eng_data [--et-test test.tsv] \
#                 [--work DIR] [--system both|baseline|gdps] [--max-update N] [--stage1-updates N]
#                 [--probe-interval K] [--seed S] [--vocab-size V] [--jobs J] [--prep-args "..."]
#                 [--dry-run]
#
# Layouts: docs/real_corpora.md.  Nothing here has been run on the real data (none was available
# while it was written): the model size and optimisation values are UNTESTED starting points, chosen
# by analogy with fairseq's S2T recipes (MuST-C / CoVoST s2t_transformer), not tuned:
#   - the s2t_transformer_m size: 12 encoder / 6 decoder layers, width 512, FFN 2048, 8 heads,
#     1024-channel convolutional subsampler, dropout 0.15 (about 70M parameters); baseline
#     --arch s2t_transformer_m, GDPS --arch s2t_transformer_gdps_m (the same network until split);
#   - Adam, inverse-sqrt schedule, lr 1e-3, 10000 warm-up updates, max-tokens 20000 x update-freq 2,
#     60000 updates in all (GDPS: 20000 probed stage-1 updates, probing every 4th), SpecAugment lb;
#   - segments longer than 30 s are left out (fairseq's 6000-frame source limit is 60 s).
# The flags after "--" that this script hands to run_baseline.sh / run_gdps.sh come after the
# demo-sized settings of common.sh on the fairseq-train command line, so they replace them.
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
AEB=; AEB_SPLITS=; BEM=; GA=; ET=; ET_TEST=; WORK=; SYSTEM=both; MAX_UPDATE=60000; STAGE1=20000
PROBE_INTERVAL=4; SEED=1; VOCAB=8000; JOBS=$(nproc); PREP_ARGS="--max-duration 30"; DRY=0
while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --aeb) AEB=$2; shift 2 ;;
    --aeb-splits) AEB_SPLITS=$2; shift 2 ;;
    --bem) BEM=$2; shift 2 ;;
    --ga) GA=$2; shift 2 ;;
    --et) ET=$2; shift 2 ;;
    --et-test) ET_TEST=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --system) SYSTEM=$2; shift 2 ;;
    --max-update) MAX_UPDATE=$2; shift 2 ;;
    --stage1-updates) STAGE1=$2; shift 2 ;;
    --probe-interval) PROBE_INTERVAL=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --vocab-size) VOCAB=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    --prep-args) PREP_ARGS=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
missing=()
for v in AEB AEB_SPLITS BEM GA ET; do [ -n "${!v}" ] || missing+=("--$(echo "$v" | tr 'A-Z_' 'a-z-')"); done
[ ${#missing[@]} -eq 0 ] || { echo "missing ${missing[*]} (see --help)" >&2; exit 2; }
case $SYSTEM in both|baseline|gdps) ;; *) echo "--system must be both, baseline or gdps" >&2; exit 2 ;; esac
WORK=${WORK:-$REPO_ROOT/work/iwslt4}

# Echo every step; with --dry-run only echo it.
step() { echo "+ $*"; [ "$DRY" = 1 ] || "$@"; }

SIZE_M=(--encoder-layers 12 --decoder-layers 6 --conv-channels 1024
  --encoder-embed-dim 512 --decoder-embed-dim 512 --encoder-ffn-embed-dim 2048 --decoder-ffn-embed-dim 2048
  --encoder-attention-heads 8 --decoder-attention-heads 8 --dropout 0.15)
OPTIM_M=(--lr 1e-3 --warmup-updates 10000 --max-tokens 20000 --update-freq 2
  --save-interval-updates 2000 --keep-interval-updates 1)

# shellcheck disable=SC2086
{
  [ -f "$WORK/corpus/aeb/train.tsv" ] || step gdps-prep-corpus tunisian --root "$AEB" --splits "$AEB_SPLITS" \
    --out "$WORK/corpus/aeb" --jobs "$JOBS" $PREP_ARGS
  [ -f "$WORK/corpus/bem/train.tsv" ] || step gdps-prep-corpus bemba --root "$BEM" --out "$WORK/corpus/bem" \
    --jobs "$JOBS" $PREP_ARGS
  [ -f "$WORK/corpus/ga/train.tsv" ] || step gdps-prep-corpus irish --root "$GA" --out "$WORK/corpus/ga" \
    --jobs "$JOBS" $PREP_ARGS
  [ -f "$WORK/corpus/et/train.tsv" ] || step gdps-prep-corpus estonian --root "$ET" ${ET_TEST:+--test-tsv "$ET_TEST"} \
    --out "$WORK/corpus/et" --jobs "$JOBS" $PREP_ARGS
}
step gdps-prep-corpus merge "$WORK/corpus/aeb" "$WORK/corpus/bem" "$WORK/corpus/ga" "$WORK/corpus/et" \
  --out "$WORK/corpus/all"
[ -f "$WORK/data/config.yaml" ] || step gdps-prep --corpus "$WORK/corpus/all" --out "$WORK/data" \
  --vocab-size "$VOCAB" --specaugment lb --jobs "$JOBS"

if [ "$SYSTEM" != gdps ]; then
  step bash "$RECIPE_DIR/run_baseline.sh" "$WORK/data" "$WORK/baseline" --max-update "$MAX_UPDATE" --seed "$SEED" \
    -- --arch s2t_transformer_m "${SIZE_M[@]}" "${OPTIM_M[@]}"
fi
if [ "$SYSTEM" != baseline ]; then
  # With both systems, GDPS's scores include paired bootstrap tests against the baseline's decodes.
  DECODE=(); [ "$SYSTEM" = both ] && DECODE=(--decode-args "--baseline-decode-dir $WORK/baseline/decode")
  step bash "$RECIPE_DIR/run_gdps.sh" "$WORK/data" "$WORK/gdps" --max-update "$MAX_UPDATE" \
    --stage1-updates "$STAGE1" --probe-interval "$PROBE_INTERVAL" --seed "$SEED" "${DECODE[@]}" \
    -- --arch s2t_transformer_gdps_m "${SIZE_M[@]}" "${OPTIM_M[@]}"
fi
echo "[iwslt4] done: scores in $WORK/{baseline,gdps}/scores*, GDPS analysis in $WORK/gdps/analysis/report.md"
