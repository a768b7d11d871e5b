"""How much labelled email does each stage need? A learning curve over runs that differ only in training emails per label
(a script, not a test).

The runs are ordinary `mailroute train` runs with `--sample-per-label N` (the validation emails and the test emails are
the same in every run of one split; only the training emails shrink), e.g. one `mailroute sweep`:

    mailroute sweep --out runs/curve --parallel 1 --threads 2 \\
        n10:--sample-per-label=10 n25:--sample-per-label=25 n50:--sample-per-label=50 -- --dataset banking77
    python -m benchmarks.learning_curve --runs runs/curve/n10 runs/curve/n25 runs/curve/n50 benchmarks/results/banking77 \\
        --out benchmarks/results/banking77/learning_curve_s34

For each run it reads `metrics.json` and `predictions.jsonl` (the folder names in `mailroute.run_layout`) and reports,
on the test emails: the flat softmax, stage 1 with label descriptions only and with the exemplar index, the
cross-encoder alone over the K candidates, retrieval + flat without the cross-encoder, and the served system; the
served system against flat paired on the same emails (McNemar exact p, bootstrap interval); and what the policy fitted
on validation kept (the cross-encoder's weight per logit unit, whether the flat classifier is fused). Writes
`summary.json`, `summary.md` and `learning_curve.png` into --out.
"""

import argparse
import json
import sys
from pathlib import Path

from benchmarks.paired import paired_comparison
from mailroute.rerank_policy import RerankPolicy
from mailroute.run_layout import POLICY_FILE, RunFolder, read_predictions
from training.data import SPLIT_SETTINGS

# the systems compared, in the order the table and the plot show them: "flat" is metrics.json's flat_baseline, the
# others its test variants (name in metrics -> what it is)
SYSTEMS = {"flat": "flat softmax", "bi_encoder_descriptions": "stage 1, descriptions only",
           "bi_encoder": "stage 1, exemplar index", "cross_encoder_only": "cross-encoder alone over K",
           "retrieval_flat": "retrieval + flat, no cross-encoder", "two_stage": "served (gated)"}


class CurveError(ValueError):
    """A run folder that cannot be a point of the curve; the message names the folder and what it lacks."""


def _json(folder, path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CurveError(f"{folder}: {path.name} cannot be read ({e})") from None


def run_point(folder) -> dict:
    """One run folder -> its point of the curve (test accuracies, the paired comparison, the fitted policy), with the
    run's split settings and test gold labels (`curve` checks that the points share them)."""
    run = RunFolder(folder)
    missing = [f.name for f in (run.metrics, run.predictions, run.config) if not f.is_file()]
    if missing:
        raise CurveError(f"{folder}: no {' nor '.join(missing)} (not a trained run folder?)")
    m, config = _json(folder, run.metrics), _json(folder, run.config)
    if "flat_baseline" not in m:
        raise CurveError(f"{folder}: the run skipped the flat baseline (--skip-baseline), so it has no flat softmax to compare")
    rows = read_predictions(run.predictions)
    if not rows or "flat_label" not in rows[0]:
        raise CurveError(f"{folder}: {run.predictions.name} has no flat_label column")
    try:
        test = m["variants"]["test"]
        accuracy = {"flat": m["flat_baseline"]["accuracy"]} | {name: test[name]["accuracy"] for name in SYSTEMS if name in test}
        point = {"run": str(folder), "labels": m["labels"], "n_train": m["n_train"], "n_validation": m["n_validation"],
                 "n_test": m["n_test"], "emails_per_label": m["n_train"] / m["labels"], "accuracy": accuracy,
                 "share_reranked": m["two_stage"]["share_reranked"], "run_minutes": sum(m["train_time"].values()) / 60}
    except KeyError as e:
        raise CurveError(f"{folder}: {run.metrics.name} has no {e} (written by an older mailroute train?)") from None
    policy = RerankPolicy.load(run.policy) if run.policy.is_file() else None
    paired = paired_comparison([r["gold"] for r in rows], [r["label"] for r in rows], [r["flat_label"] for r in rows])
    # the cross-encoder logit's coefficient in the served softmax (ce_weight / temperature): 0 = not used
    return point | {"ce_logit_coefficient": None if policy is None else policy.ce_weight / policy.temperature,
                    "flat_fused": None if policy is None else policy.uses_flat, "served_vs_flat": paired,
                    "split": {k: config.get(k) for k in SPLIT_SETTINGS if k != "sample_per_label"},
                    "gold": [r["gold"] for r in rows]}


def curve(folders: list) -> dict:
    points = sorted((run_point(f) for f in folders), key=lambda p: p["n_train"])
    # points of one curve differ only in their training emails: the settings that deal the split (training.data.
    # SPLIT_SETTINGS) but --sample-per-label are the same, and so are the test emails
    for p in points[1:]:
        differ = sorted(k for k in p["split"] if p["split"][k] != points[0]["split"][k])
        if differ or p["gold"] != points[0]["gold"]:
            raise CurveError(f"{p['run']} and {points[0]['run']} do not share one split: "
                             + (f"they differ in {', '.join(differ)}" if differ else "their test emails differ"))
    for p in points:
        del p["gold"]
    return {"points": points, "systems": SYSTEMS}


def table(summary: dict) -> str:
    pts = summary["points"]
    head = ["system (test accuracy)"] + [f"{p['emails_per_label']:.0f} a label ({p['n_train']:,})" for p in pts]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, what in SYSTEMS.items():
        cells = [f"{100 * p['accuracy'][name]:.2f}%" if name in p["accuracy"] else "–" for p in pts]
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    rows = {"served - flat (bootstrap 95%)": lambda p: (f"{100 * p['served_vs_flat']['difference']:+.2f} "
                                                         f"({100 * p['served_vs_flat']['bootstrap_95'][0]:+.2f}..{100 * p['served_vs_flat']['bootstrap_95'][1]:+.2f})"),
            "right only served / only flat, McNemar p": lambda p: (f"{p['served_vs_flat']['only_a_right']} / {p['served_vs_flat']['only_b_right']}, "
                                                                  f"p = {p['served_vs_flat']['mcnemar_exact_p']:.3g}"),
            "served - (retrieval + flat): the cross-encoder's share": lambda p: (
                f"{100 * (p['accuracy']['two_stage'] - p['accuracy']['retrieval_flat']):+.2f}" if "retrieval_flat" in p["accuracy"] else "–"),
            "cross-encoder logit coefficient in the policy (ce_weight / T)": lambda p: "–" if p["ce_logit_coefficient"] is None else f"{p['ce_logit_coefficient']:.3g}",
            "flat classifier fused (validation's choice)": lambda p: {True: "yes", False: "no", None: "–"}[p["flat_fused"]],
            "test emails reranked": lambda p: f"{p['share_reranked']:.1%}",
            "run minutes (training stages and evaluation)": lambda p: f"{p['run_minutes']:.1f}"}
    lines += [f"| {what} | " + " | ".join(cell(p) for p in pts) + " |" for what, cell in rows.items()]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = summary["points"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for (name, what), style in zip(SYSTEMS.items(), ("s--", "v:", "o-", "x:", "d-.", "*-")):
        xy = [(p["emails_per_label"], 100 * p["accuracy"][name]) for p in pts if name in p["accuracy"]]
        if xy:
            ax.plot(*zip(*xy), style, label=what, markersize=7 if name == "two_stage" else 5)
    ax.set_xscale("log")
    ax.set_xticks([p["emails_per_label"] for p in pts], [f"{p['emails_per_label']:.0f}" for p in pts])
    ax.minorticks_off()
    ax.set_xlabel("training emails a label (log scale)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title(f"Learning curve: {pts[0]['labels']} labels, {pts[0]['n_test']:,} test emails")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True,
                    help="run folders of one split (each with metrics.json, predictions.jsonl and " + POLICY_FILE + ")")
    ap.add_argument("--out", required=True, help="folder for summary.json, summary.md and learning_curve.png")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        summary = curve(a.runs)
    except CurveError as e:
        sys.exit(f"learning_curve: {e}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    md = table(summary)
    (out / "summary.md").write_text(md)
    plot(summary, out / "learning_curve.png")
    print(md + f"\nwrote {out}/summary.json, summary.md, learning_curve.png")


if __name__ == "__main__":
    main()
