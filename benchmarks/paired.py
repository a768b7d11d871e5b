"""Is the two-stage system's lead over the flat softmax more than chance? (a script, not a test)

Reads a run's test predictions (`predictions.jsonl`: the served label (the two stages, with the flat classifier
fused where the run fuses it) and the flat baseline's label for every test email) and compares the two systems on
the same emails:

- the emails only one of them gets right (the only ones that tell them apart);
- McNemar's exact test on those (two-sided binomial test, p = 0.5);
- a paired bootstrap 95% interval of the accuracy difference (resampling emails).

    python -m benchmarks.paired --run runs/banking77-ce2
    python -m benchmarks.paired --predictions benchmarks/results/banking77/headline_s12/predictions.jsonl
    python -m benchmarks.paired --run runs/no-baseline --flat-from benchmarks/results/banking77/headline_s12/predictions.jsonl
    python -m benchmarks.paired --run runs/changed --against runs/reference/predictions.jsonl   # two runs' two-stage systems

--flat-from takes the flat baseline's labels from another run's predictions, for a run trained with
--skip-baseline on the same split (the test emails' gold labels must agree row by row). --against compares
this run's served two-stage labels with another run's instead (one setting changed, same split), and also
counts the emails whose labels differ at all (both wrong in two ways included).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from mailroute.run_layout import RunFolder, read_predictions


def mcnemar_p(ok_a: np.ndarray, ok_b: np.ndarray) -> float:
    """Exact two-sided McNemar p of two paired right/wrong vectors (binomial test on the discordant emails)."""
    from scipy.stats import binomtest

    ok_a, ok_b = np.asarray(ok_a, bool), np.asarray(ok_b, bool)
    only_a, only_b = int((ok_a & ~ok_b).sum()), int((~ok_a & ok_b).sum())
    return 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


RESAMPLES = 10_000  # paired bootstrap resamples of every comparison script (oof_choice and bi_positives used 2,000 until
                   # session 25: their committed intervals differ from a re-run by resampling noise only)


def bootstrap_interval(ok_a: np.ndarray, ok_b: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> tuple:
    """95% paired bootstrap interval of accuracy(a) - accuracy(b), in points (the emails resampled together)."""
    d = np.asarray(ok_a, np.float64) - np.asarray(ok_b, np.float64)  # (n,)
    means = d[np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))].mean(1)  # (resamples,)
    return 100 * float(np.quantile(means, 0.025)), 100 * float(np.quantile(means, 0.975))


def paired_comparison(gold, a, b, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """a, b: two systems' labels for the same emails. -> accuracies, discordant counts, McNemar exact p,
    bootstrap 95% interval of accuracy(a) - accuracy(b)."""
    gold, a, b = np.asarray(gold), np.asarray(a), np.asarray(b)
    if not len(gold) == len(a) == len(b) or not len(gold):
        raise ValueError(f"paired_comparison expects equally long, non-empty label lists, got {len(gold)}, {len(a)}, {len(b)}")
    ok_a, ok_b = a == gold, b == gold
    lo, hi = bootstrap_interval(ok_a, ok_b, resamples, seed)
    return {"n": len(gold), "accuracy_a": float(ok_a.mean()), "accuracy_b": float(ok_b.mean()),
            "difference": float(ok_a.mean() - ok_b.mean()), "only_a_right": int((ok_a & ~ok_b).sum()),
            "only_b_right": int((ok_b & ~ok_a).sum()), "mcnemar_exact_p": mcnemar_p(ok_a, ok_b), "bootstrap_95": [lo / 100, hi / 100]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder (reads its predictions.jsonl)")
    src.add_argument("--predictions", help="a predictions.jsonl file")
    other = ap.add_mutually_exclusive_group()
    other.add_argument("--flat-from", help="predictions.jsonl of another run on the same split whose flat baseline is compared")
    other.add_argument("--against", help="another run on the same split (its folder or predictions.jsonl): compare the two "
                                         "runs' served two-stage systems instead (e.g. one setting changed)")
    ap.add_argument("--resamples", type=int, default=RESAMPLES, help=f"bootstrap resamples (default {RESAMPLES})")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    path = Path(a.predictions) if a.predictions else RunFolder(a.run).predictions
    if not path.exists():
        sys.exit(f"paired: {path} does not exist (train or refit the run first)")
    rows = read_predictions(path)
    if a.against:
        against = RunFolder(a.against).predictions if Path(a.against).is_dir() else Path(a.against)
        other = read_predictions(against) if against.is_file() else None
        if not rows or other is None or [x.get("gold") for x in other] != [x.get("gold") for x in rows] \
                or not all("label" in x for x in rows + other):
            sys.exit(f"paired: --against {a.against} is not a run (or predictions.jsonl) with served labels over the same, "
                     f"non-empty test emails as {path}")
        r = paired_comparison([x["gold"] for x in rows], [x["label"] for x in rows], [x["label"] for x in other], a.resamples)
        r["labels_differ"] = sum(x["label"] != y["label"] for x, y in zip(rows, other))
        print(f"{path} against {against}: {r['n']} test emails, two-stage (served) both; labels differ on {r['labels_differ']}")
        print(f"this {r['accuracy_a']:.2%}  other {r['accuracy_b']:.2%}  difference {100 * r['difference']:+.2f} points "
              f"(bootstrap 95%: {100 * r['bootstrap_95'][0]:+.2f} to {100 * r['bootstrap_95'][1]:+.2f})")
        print(f"right only by this: {r['only_a_right']}, only by the other: {r['only_b_right']}; McNemar exact p = {r['mcnemar_exact_p']:.3f}")
        print(json.dumps(r))
        return
    if a.flat_from:
        if not Path(a.flat_from).is_file():
            sys.exit(f"paired: --flat-from {a.flat_from} does not exist (a run's predictions.jsonl)")
        flat = read_predictions(a.flat_from)
        if [x["gold"] for x in flat] != [x["gold"] for x in rows] or "flat_label" not in flat[0]:
            sys.exit(f"paired: {a.flat_from} is not a run with a flat baseline over the same test emails as {path} "
                     f"({len(flat)} vs {len(rows)} rows, or gold labels differ, or no flat_label)")
        rows = [x | {"flat_label": f["flat_label"]} for x, f in zip(rows, flat)]
    if not rows or "flat_label" not in rows[0]:
        sys.exit(f"paired: {path} has no flat-baseline predictions (the run skipped the baseline: `mailroute baseline` trains it, "
                 f"or --flat-from takes another run's)")
    r = paired_comparison([x["gold"] for x in rows], [x["label"] for x in rows], [x["flat_label"] for x in rows], a.resamples)
    print(f"{path}: {r['n']} test emails")
    print(f"two-stage {r['accuracy_a']:.2%}  flat {r['accuracy_b']:.2%}  difference {100 * r['difference']:+.2f} points "
          f"(bootstrap 95%: {100 * r['bootstrap_95'][0]:+.2f} to {100 * r['bootstrap_95'][1]:+.2f})")
    print(f"right only by two-stage: {r['only_a_right']}, only by flat: {r['only_b_right']}; McNemar exact p = {r['mcnemar_exact_p']:.3f}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
