#!/usr/bin/env bash
# A/B of the Triton serving path on this host: current code (this checkout) vs session 21's (2dabf9c, $BASE: the
# code of the last A/B, cpu_serving_s21), current then base in each round, 2 rounds. Each arm serves its own export of a demo run with
# every email reranked (prepare.sh makes both): the same work per email whatever the weights.
set -u -o pipefail
# BASE: a worktree of the old code (git worktree add $BASE 2dabf9c; ln -s $PWD/.venv $BASE/.venv); OUT: raw outputs
CUR=$(git rev-parse --show-toplevel); BASE=${BASE:?set BASE to a worktree of 2dabf9c}; OUT=${OUT:-$CUR/benchmarks/results/cpu_serving_s30}
export HF_HUB_OFFLINE=1
for round in ${ROUNDS:-1 2}; do
  for arm in current base; do
    if [ $arm = current ]; then dir=$CUR; repo=runs/bench-repo-s30; pp=""; else dir=$BASE; repo=runs/bench-repo-base; pp=$BASE; fi
    echo "== round $round arm $arm $(date -u +%H:%M:%S)"
    (cd $dir && PYTHONPATH=$pp .venv/bin/python -m benchmarks.triton_load --repo $repo --concurrency 8 --seconds 30 --k 10 2>/dev/null | grep -v '^\s*$' > $OUT/triton_${arm}_$round.txt && tail -3 $OUT/triton_${arm}_$round.txt) || { echo "ab.sh: round $round arm $arm failed" >&2; exit 1; }
  done
done
