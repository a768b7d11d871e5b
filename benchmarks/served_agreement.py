"""Does the Triton server answer what the run's evaluation measured? (a script, not a test)

Reads a repository exported from a trained run (`mailroute export --run RUN --repo REPO`), starts the real
tritonserver over it (or talks to one already running: --url), sends the run's test emails over gRPC in batches of
the classifier's max batch, and compares every answer with the run's `predictions.jsonl` (what `mailroute train` /
`refit` measured in process): the same label, the probability within --atol, the same RERANKED flag. Prints the
agreement, the served accuracy, emails per second and the versions that answered; exits 1 when any answer differs,
so a platform team can run it after each export before promoting a version.

    mailroute export --run runs/banking77 --repo runs/check-repo
    python -m benchmarks.served_agreement --run runs/banking77 --repo runs/check-repo --limit 600 \\
        --json benchmarks/results/banking77/served_agreement.json

The first --limit test emails are sent (0 = all), in their file order; the server answers them with the version's
default gate, as a caller would.
"""

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from mailroute import contract
from mailroute.run_layout import RunFolder, read_predictions

ATOL = 1e-4  # probability tolerance: ONNX vs PyTorch differ in the 6th digit (export's parity check), fused scores / T amplify it


def run_predictions(run: RunFolder) -> list:
    """The run's evaluation answers (predictions.jsonl), or exit naming the missing file."""
    if not run.predictions.exists():
        raise SystemExit(f"error: {run.predictions} not found: is {run.root} a trained run (`mailroute train`)?")
    return read_predictions(run.predictions)


def read_test_emails(run: RunFolder) -> list:
    """The run's test split, re-read from its config (the emails predictions.jsonl holds, in order)."""
    from training.config import TrainConfig
    from training.data import splits_of

    return splits_of(TrainConfig.load(run.config))[3]


def compare(rows: list, answers: list, atol: float = ATOL) -> dict:
    """rows: predictions.jsonl rows; answers: the server's Classification for the same emails, in order."""
    label = np.array([a.label == r["label"] for r, a in zip(rows, answers)])
    prob = np.array([abs(a.probability - r["probability"]) for r, a in zip(rows, answers)])
    reranked = np.array([a.reranked == r["reranked"] for r, a in zip(rows, answers)])
    errors = [a.error for a in answers if not a.ok]
    differ = [i for i in range(len(rows)) if not (label[i] and prob[i] <= atol and reranked[i])]
    return {"n": len(rows), "equal": len(rows) - len(differ), "same_label": int(label.sum()), "same_reranked": int(reranked.sum()),
            "max_probability_diff": float(prob.max()) if len(prob) else 0.0, "atol": atol, "row_errors": errors[:5],
            "accuracy_served": float(np.mean([a.label == r["gold"] for r, a in zip(rows, answers)])),
            "accuracy_measured": float(np.mean([r["label"] == r["gold"] for r in rows])),
            "first_differences": [{"row": i, "measured": rows[i]["label"], "served": answers[i].label,
                                   "probability_diff": float(prob[i])} for i in differ[:10]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--run", required=True, help="the trained run folder the repository was exported from")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--repo", help="model repository: a tritonserver is started over it (free ports) and stopped after")
    where.add_argument("--url", help="gRPC address of a server already serving the run's export (host:port)")
    ap.add_argument("--limit", type=int, default=0, help="send the first N test emails (default 0 = all)")
    ap.add_argument("--batch", type=int, default=contract.CLASSIFIER_MAX_BATCH, help=f"emails per request (default {contract.CLASSIFIER_MAX_BATCH})")
    ap.add_argument("--atol", type=float, default=ATOL, help=f"largest probability difference counted as equal (default {ATOL:g})")
    ap.add_argument("--json", help="write the summary here")
    args = ap.parse_args(argv)
    if args.limit < 0 or args.batch < 1 or args.atol < 0:
        ap.error(f"--limit must be >= 0, --batch >= 1, --atol >= 0 (got {args.limit}, {args.batch}, {args.atol})")

    from client.classifier_client import ClassifierClient, ClassifierError
    from client.server import TritonServer

    run = RunFolder(args.run)
    rows, test = run_predictions(run), read_test_emails(run)
    if [r["gold"] for r in rows] != [e.label for e in test]:
        raise SystemExit(f"error: {run.predictions} is not for this run's test emails (was the dataset changed?)")
    n = len(rows) if args.limit == 0 else min(args.limit, len(rows))
    rows, texts = rows[:n], [e.text for e in test[:n]]
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(TritonServer(args.repo)).grpc_url
        client = stack.enter_context(ClassifierClient(url))
        try:
            client.classify(texts[:1])  # warm-up, not timed
            t = time.perf_counter()
            answers = []
            for s in range(0, n, args.batch):  # a line every ~10 batches: thousands of emails take minutes on a CPU
                answers += client.classify(texts[s:s + args.batch])
                if (s // args.batch) % 10 == 9:
                    print(f"  {len(answers)} of {n} answered", file=sys.stderr, flush=True)
            seconds = time.perf_counter() - t
        except ClassifierError as e:
            raise SystemExit(f"error: the classifier at {url} did not answer: {e}") from None
    out = compare(rows, answers, args.atol) | {
        "run": str(run.root), "seconds": round(seconds, 2), "emails_per_s": round(n / seconds, 1), "batch": args.batch,
        "share_reranked": float(np.mean([a.reranked for a in answers])) if answers else 0.0,
        "model_versions": answers[0].model_versions if answers else {}, "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python -m benchmarks.served_agreement " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    print(f"served {n} test emails over gRPC in {seconds:.1f} s ({out['emails_per_s']} emails/s, batches of {args.batch}): "
          f"{out['equal']} of {n} answers equal to the run's evaluation (label, probability within {args.atol:g}, reranked); "
          f"accuracy served {out['accuracy_served']:.2%} vs measured {out['accuracy_measured']:.2%}; "
          f"{out['share_reranked']:.0%} reranked; versions {out['model_versions']}")
    for d in out["first_differences"]:
        print(f"  differs: row {d['row']}: measured {d['measured']}, served {d['served']}, probability diff {d['probability_diff']:.2g}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if out["equal"] == n else 1


if __name__ == "__main__":
    from client.server import ServerStartError

    try:
        sys.exit(main())
    except ServerStartError as e:  # a wrong --repo, a port in use: one line (after the server log's tail, where it has one)
        sys.exit((f"{e.log_tail}\n" if e.log_tail else "") + f"served_agreement: {e.summary}")
