# Shared settings of the recipes in this folder (sourced, not run).
# The model size and optimisation settings are chosen to learn the demo corpus on 2 CPU cores;
# see docs/benchmarks.md ("The demo": how the quick profile was tuned).
RECIPE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$RECIPE_DIR/../.." && pwd)
USER_DIR="$REPO_ROOT/fairseq_gdps"
if [ -x "$REPO_ROOT/.venv/bin/python" ]; then export PATH="$REPO_ROOT/.venv/bin:$PATH"; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}

# s2t_transformer sized for 2 CPU cores: 4 encoder / 2 decoder layers, width 160, FFN 512, and a
# 256-channel convolutional subsampler (fairseq's default of 1024 channels costs more than the
# whole transformer at this width).  About 2.0M parameters.
# SIZE_ARGS are shared by the baseline (--arch s2t_transformer_s) and GDPS (--arch
# s2t_transformer_gdps_s), so both train exactly the same network apart from the split.
SIZE_ARGS=(--encoder-layers 4 --decoder-layers 2 --conv-channels 256
  --encoder-embed-dim 160 --decoder-embed-dim 160
  --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512
  --encoder-attention-heads 4 --decoder-attention-heads 4
  --dropout 0.1 --share-decoder-input-output-embed)
BASELINE_ARCH=s2t_transformer_s
GDPS_ARCH=s2t_transformer_gdps_s
LR=2e-3
WARMUP=150
OPTIM_ARGS=(--optimizer adam --adam-betas '(0.9,0.98)' --lr "$LR" --lr-scheduler inverse_sqrt
  --warmup-updates "$WARMUP" --clip-norm 10.0 --weight-decay 0.0001
  --criterion label_smoothed_cross_entropy --label-smoothing 0.1 --report-accuracy)
# --required-batch-size-multiple 1: fairseq-fixed silently drops a final partial batch otherwise.
DATA_ARGS=(--num-workers 0 --max-tokens 8000 --required-batch-size-multiple 1
  --skip-invalid-size-inputs-valid-test)
