#!/usr/bin/env bash
# The test command: set up, then every test, the slow ones included (real Triton server, real training).
# Quick loop while developing: .venv/bin/pytest -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/python -m pytest -ra "$@"
