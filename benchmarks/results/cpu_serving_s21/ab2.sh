#!/usr/bin/env bash
# Quiet A/B of the in-process paths and Locust: current code vs session 14's (f192c26), same host, one round each.
set -u
# BASE: a worktree of the old code (git worktree add $BASE f192c26; ln -s $PWD/.venv $BASE/.venv); OUT: raw outputs
CUR=$(git rev-parse --show-toplevel); BASE=${BASE:?set BASE to a worktree of f192c26}; OUT=${OUT:-$CUR/runs/ab}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
for arm in current base; do
  if [ $arm = current ]; then dir=$CUR; run=runs/demo-s21; repo=runs/bench-repo-s21; pp=""; else dir=$BASE; run=runs/demo-base; repo=runs/bench-repo-base; pp=$BASE; fi
  cd $dir
  echo "== $arm inprocess $(date -u +%H:%M:%S)"
  rm -rf runs/int8-repo-ab && PYTHONPATH=$pp .venv/bin/python -m mailroute.cli export --run $run --repo runs/int8-repo-ab --quantize >/dev/null 2>&1
  PYTHONPATH=$pp .venv/bin/python -m benchmarks.inprocess --run $run --repo $repo --int8-repo runs/int8-repo-ab --n 256 --batch 32 --k 10 2>/dev/null | grep -v '^\s*$' > $OUT/inprocess_$arm.txt
  grep speedup $OUT/inprocess_$arm.txt
  echo "== $arm locust $(date -u +%H:%M:%S)"
  PYTHONPATH=$pp .venv/bin/python - $repo $arm "$OUT" <<'PYEOF'
import subprocess, sys
from client.server import TritonServer
with TritonServer(sys.argv[1]) as s:
    r = subprocess.run([".venv/bin/locust", "-f", "benchmarks/locustfile.py", "--headless", "-u", "8", "-r", "8", "-t", "45s",
                        "--host", s.grpc_url, "--sla-p99-ms", "1000", "--only-summary"], capture_output=True, text=True)
    open(f"{sys.argv[3]}/locust_{sys.argv[2]}.txt", "w").write(r.stdout[-3000:] + r.stderr[-3000:])
PYEOF
  grep Aggregated $OUT/locust_$arm.txt
  rm -rf runs/int8-repo-ab
done
