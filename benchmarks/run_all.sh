#!/usr/bin/env bash
# All CPU serving benchmarks in one run (about 10 minutes on 2 cores), outputs in OUT_DIR (default benchmarks/results/:
# pass a new folder to keep the committed raw files of earlier sessions).
# Needs a trained run and its export: `mailroute demo` (or train + export) first.
#   bash benchmarks/run_all.sh [RUN_DIR] [REPO] [OUT_DIR]    (relative paths: from the checkout's root)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/demo}; REPO=${2:-model_repository}; OUT=${3:-benchmarks/results}; mkdir -p "$OUT"
PY=.venv/bin/python
export HF_HUB_OFFLINE=1
echo "== int8 export of the same run (accuracy change measured on its test emails)"
rm -rf runs/int8-repo && .venv/bin/mailroute export --run "$RUN" --repo runs/int8-repo --quantize | tee "$OUT/int8_export.txt"
echo "== in-process: PyTorch vs ONNX Runtime (fp32, int8), K=10"
$PY -m benchmarks.inprocess --run "$RUN" --repo "$REPO" --int8-repo runs/int8-repo --n 256 --batch 32 --k 10 | tee "$OUT/inprocess.txt"
echo "== Triton gRPC vs in-process ONNX, concurrency 8, K=10"
$PY -m benchmarks.triton_load --repo "$REPO" --concurrency 8 --seconds 30 --k 10 | tee "$OUT/triton_load.txt"
echo "== Locust: 8 users, 45 s, email-length texts, SLA p99 <= 1000 ms"
$PY - "$REPO" "$OUT" <<'PYEOF' | tee "$OUT/locust.txt"
import subprocess, sys
from client.server import TritonServer
with TritonServer(sys.argv[1]) as s:
    r = subprocess.run([".venv/bin/locust", "-f", "benchmarks/locustfile.py", "--headless", "-u", "8", "-r", "8", "-t", "45s",
                        "--host", s.grpc_url, "--csv", f"{sys.argv[2]}/locust", "--sla-p99-ms", "1000", "--only-summary"],
                       capture_output=True, text=True)
    print(r.stdout[-3000:], r.stderr[-3000:])
PYEOF
