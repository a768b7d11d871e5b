#!/usr/bin/env bash
# The two arms of ab.sh, each every email reranked at K=10 whatever its fitted gate (the current demo default gives the
# cross-encoder no weight, session 21's code gated 20%): the served work per email is then the same in both.
set -eu
CUR=$(git rev-parse --show-toplevel); BASE=${BASE:?set BASE to a worktree of 2dabf9c}
export HF_HUB_OFFLINE=1
rm -rf "$CUR/runs/demo-trw10" "$CUR/runs/bench-repo-s30" "$BASE/runs/demo-base" "$BASE/runs/bench-repo-base"  # version 1 below is each export
(cd "$CUR" && .venv/bin/mailroute train --dataset demo --train-retrieval-weight 10 --out runs/demo-trw10 \
   && .venv/bin/mailroute export --run runs/demo-trw10 --repo runs/bench-repo-s30)
(cd "$BASE" && PYTHONPATH=$BASE .venv/bin/python -m mailroute.cli train --dataset demo --out runs/demo-base \
   && PYTHONPATH=$BASE .venv/bin/python -m mailroute.cli export --run runs/demo-base --repo runs/bench-repo-base)
python3 - "$CUR/runs/bench-repo-s30" "$BASE/runs/bench-repo-base" <<'PY'
import json, sys
for repo in sys.argv[1:]:  # stage 2 for every email, no flat classifier (session 21's code has none)
    p = f"{repo}/email_classifier/1/pipeline.json"
    d = json.load(open(p))
    d["policy"].update(ce_weight=1.0, gate_margin=None, **({"flat_weight": 0.0, "gated_flat_weight": 0.0} if "flat_weight" in d["policy"] else {}))
    json.dump(d, open(p, "w"), indent=1)
PY
