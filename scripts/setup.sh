#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment with pinned dependencies (torch 2.13.0 CPU from the
# local wheel cache first, so nothing pulls a CUDA build), this package in editable mode, and
# docker-compose (Debian package) for validating the production compose file.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -m pip check
if ! command -v docker-compose >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get install -y -q docker-compose >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q docker-compose >/dev/null 2>&1)) \
      || echo "note: docker-compose not installed; the compose validation test will be skipped"
  fi
fi
echo "setup done: $(.venv/bin/python -c 'import torch, sentence_transformers, onnxruntime, faiss; print(f"torch {torch.__version__}, sentence-transformers {sentence_transformers.__version__}, onnxruntime {onnxruntime.__version__}, faiss {faiss.__version__}")')"
