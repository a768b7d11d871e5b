#!/usr/bin/env bash
# The main job on a fresh machine: set up, train both stages on the built-in 50-label demo taxonomy,
# export ONNX into model_repository/, start the real Triton server, classify sample emails over gRPC.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/mailroute demo "$@"
