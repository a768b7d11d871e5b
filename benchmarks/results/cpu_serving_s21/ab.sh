#!/usr/bin/env bash
# A/B of the Triton serving path on this host: current code (this checkout) vs session 14's (f192c26, $BASE),
# alternating, 2 rounds. Each arm serves its own export of its own demo run (identical weights and answers).
set -u
# BASE: a worktree of the old code (git worktree add $BASE f192c26; ln -s $PWD/.venv $BASE/.venv); OUT: raw outputs
CUR=$(git rev-parse --show-toplevel); BASE=${BASE:?set BASE to a worktree of f192c26}; OUT=${OUT:-$CUR/runs/ab}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
for round in 1 2; do
  for arm in current base; do
    if [ $arm = current ]; then dir=$CUR; repo=runs/bench-repo-s21; pp=""; else dir=$BASE; repo=runs/bench-repo-base; pp=$BASE; fi
    echo "== round $round arm $arm $(date -u +%H:%M:%S)"
    (cd $dir && PYTHONPATH=$pp .venv/bin/python -m benchmarks.triton_load --repo $repo --concurrency 8 --seconds 30 --k 10 2>/dev/null | grep -v '^\s*$' > $OUT/triton_${arm}_$round.txt; tail -3 $OUT/triton_${arm}_$round.txt)
  done
done
