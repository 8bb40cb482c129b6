#!/usr/bin/env bash
# One-shot, re-runnable set-up of fairseq-gdps on a fresh Debian machine with Python 3.11.
#   - Debian packages (espeak-ng) through apt-get
#   - a virtual environment in .venv
#   - torch 2.13.0 (CPU) first, so nothing later pulls a multi-GB CUDA build
#   - fairseq-fixed 0.12.3.1 built once as a wheel (cached in .cache/wheels) without build isolation
#   - pinned runtime dependencies (scripts/constraints.txt), then this project in editable mode
# No torchaudio: the PyPI build does not load beside CPU torch 2.13.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
VENV=${VENV:-$ROOT/.venv}
WHEELS=$ROOT/.cache/wheels
CONSTRAINTS=$ROOT/scripts/constraints.txt
FAIRSEQ_VERSION=0.12.3.1
TORCH_VERSION=2.13.0

log() { printf '[setup] %s\n' "$*"; }

# --- Debian packages -------------------------------------------------------
need_apt=()
command -v espeak-ng >/dev/null 2>&1 || need_apt+=(espeak-ng)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO=sudo; else
      echo "[setup] ERROR: Debian packages missing: ${need_apt[*]}." >&2
      echo "[setup] Run as root, or first: sudo apt-get update && sudo apt-get install -y ${need_apt[*]}" >&2
      exit 1
    fi
  else SUDO=; fi
  log "installing Debian packages: ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# --- virtual environment ----------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install -c "$CONSTRAINTS" pip setuptools wheel

# torch first and pinned: an unpinned torch requirement resolves to a CUDA build. (It is pinned
# here and not in the constraints file: pip treats "torch==2.13.0" from both a constraint and the
# local "+cpu" wheel as a conflict.)
"${PIP[@]}" install "torch==$TORCH_VERSION"
"${PIP[@]}" install -c "$CONSTRAINTS" numpy Cython

# fairseq-fixed: its build needs torch/numpy/Cython from the venv, so no build isolation.
mkdir -p "$WHEELS"
if ! ls "$WHEELS"/fairseq_fixed-"$FAIRSEQ_VERSION"-*.whl >/dev/null 2>&1; then
  log "building fairseq-fixed $FAIRSEQ_VERSION wheel (about 2-3 minutes, cached afterwards)"
  "${PIP[@]}" wheel --no-build-isolation --no-deps -w "$WHEELS" "fairseq-fixed==$FAIRSEQ_VERSION"
fi
"${PIP[@]}" install --no-deps "$WHEELS"/fairseq_fixed-"$FAIRSEQ_VERSION"-*.whl

# runtime dependencies, pinned; then the project itself (editable, no dependency resolution
# beyond the constraints so fairseq's own metadata cannot drag torchaudio in).
"${PIP[@]}" install -c "$CONSTRAINTS" -r "$ROOT/scripts/requirements.txt"
"${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT"

"$VENV/bin/python" -c "import torch, fairseq, fairseq_gdps; print('[setup] ok: torch', torch.__version__, 'fairseq', fairseq.__version__)"
