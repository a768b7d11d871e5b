"""The feedback loop, simulated on BANKING77 (a script, not a test).

BANKING77 train (shuffled; `--fraction` of it to fit a 2-core CPU) is split into an initial share
(`--initial`, 30%) that `mailroute train` learns from, and a stream of slices (`--slice` each).
`--new-labels` labels do not exist yet when the initial version is trained (their emails are left out
of it); they are added at run time (`mailroute labels add`: name + description, zero-shot) before the
stream starts, and their zero-shot accuracy is measured. That version is where every variant starts. Round r
classifies slice r through the served system (the real tritonserver, `classify(record=True)` into the
feedback store), corrects its mistakes with the gold labels (simulated reviewers, `client.correct`),
then applies feedback four ways and measures each on the next slice and on the test split:

  (a) none        the starting version, unchanged
  (b) exemplars   corrections as exemplars of the starting version (no training)
  (c) continued   exemplars + continued listwise training of the cross-encoder with replay, through the
                  promotion gate, promoted into the running server when it passes (the product's loop)
  (d) retrain     `mailroute train` from scratch on everything seen so far (upper bound; costly, so only
                  at the rounds `--retrain-rounds` names)

Writes benchmarks/results/feedback/summary.json (after every round) and rounds.png.

    python -m benchmarks.feedback.simulate --fraction 0.4 --rounds 3 --test-limit 800 --retrain-rounds 3
"""

import argparse
import json
import platform
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _relative_to_root(obj):
    """A JSON-able value with every string naming a path inside the clone made relative to the clone."""
    if isinstance(obj, dict):
        return {k: _relative_to_root(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relative_to_root(v) for v in obj]
    if isinstance(obj, str) and obj.startswith(f"{ROOT}/"):
        return obj[len(f"{ROOT}/"):]
    return obj


def write_examples(path: Path, examples: list) -> str:
    with open(path, "w") as f:
        for e in examples:
            f.write(json.dumps({"text": e.text, "label": e.label}) + "\n")
    return str(path)


def train_and_export(name: str, work: Path, taxonomy_file: str, train: list, test_file: str, a) -> tuple:
    """`mailroute train` on `train` + `mailroute export` into its own repository -> (repo, seconds of training)."""
    from export.run import ExportConfig, export
    from training.run import TrainConfig, run

    data = work / "data"
    t = time.perf_counter()
    run(TrainConfig(taxonomy=taxonomy_file, train=write_examples(data / f"{name}-train.jsonl", train), test=test_file,
                    out=str(work / "runs" / name), skip_baseline=True, bi_epochs=a.bi_epochs,
                    ce_epochs=a.ce_epochs, seed=a.seed, device=a.device))
    seconds = time.perf_counter() - t
    repo = work / f"repo-{name}"
    shutil.rmtree(repo, ignore_errors=True)
    export(ExportConfig(run=str(work / "runs" / name), repo=str(repo)))
    return repo, seconds


def accuracy(repo, version, examples) -> float:
    from mailroute.repository import open_onnx_classifier
    from training.feedback import accuracy as acc

    return acc(open_onnx_classifier(repo, version), examples)


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "next_slice", "accuracy on the next slice"), (axes[1], "test", "accuracy on test")):
        for variant, style in (("a_none", "o-"), ("b_exemplars", "s-"), ("c_continued", "^-"), ("d_retrain", "D--")):
            pts = [(r["round"], r[variant][key]) for r in summary["rounds"] if r.get(variant, {}).get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=variant)
        ax.set_xlabel("round (corrections applied from this many slices)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"feedback loop on {summary['dataset']} ({summary['machine']['cpu']}, {summary['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def targets(summary: dict) -> dict:
    """The issue's targets after the last round, from the rounds' numbers."""
    last, first = summary["rounds"][-1], summary["rounds"][0]
    err0, err_c, err_a = (1 - first["c_continued"]["next_slice"], 1 - last["c_continued"]["next_slice"], 1 - last["a_none"]["next_slice"])
    out = {"c_fewer_errors_next_slice": 1 - err_c / err0 if err0 else None,  # the measure: later slice vs the first
           "c_fewer_errors_than_a_same_slice": 1 - err_c / err_a if err_a else None,  # slices differ: this one compares like with like
           "c_test_minus_a": last["c_continued"]["test"] - last["a_none"]["test"]}
    if "d_retrain" in last:
        c_time = sum(r["c_continued"]["train_s"] for r in summary["rounds"][1:])
        out |= {"c_test_minus_d": last["c_continued"]["test"] - last["d_retrain"]["test"], "c_train_s_all_rounds": c_time,
                "d_train_s_last_round": last["d_retrain"]["train_s"], "c_time_share_of_d": c_time / last["d_retrain"]["train_s"]}
    return out


def table(summary: dict) -> str:
    """The per-round table of summary.json as markdown (written as rounds.md)."""
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
    lines = ["| round | corrections | (a) none next / test | (b) exemplars next / test | (c) continued next / test (gate) | "
             "(d) retrain next / test | time (b) / (c) / (d) s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary["rounds"]:
        a, b, c, d = (r.get(k, {}) for k in ("a_none", "b_exemplars", "c_continued", "d_retrain"))
        gate = "" if "gate" not in c else (" promoted" if c["promoted"] else f" kept v{c['serving']}: {c['gate']['why']}")
        lines.append(f"| {r['round']} | {r.get('corrections', '-')} | {pct(a.get('next_slice'))} / {pct(a.get('test'))} | "
                     f"{pct(b.get('next_slice'))} / {pct(b.get('test'))} | {pct(c.get('next_slice'))} / {pct(c.get('test'))}{gate} | "
                     f"{pct(d.get('next_slice'))} / {pct(d.get('test'))} | {b.get('train_s', '-') if r['round'] else '-'} / "
                     f"{c.get('train_s', '-') if r['round'] else '-'} / {round(d['train_s'], 1) if 'train_s' in d else '-'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    from mailroute.settings import DEFAULTS
    from training.config import TrainConfig
    from training.feedback_config import FeedbackConfig

    train_d, feedback_d = TrainConfig(), FeedbackConfig()  # `mailroute train`'s and `mailroute feedback train`'s defaults
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="banking77", help="banking77 | demo (demo: a smoke run in minutes)")
    ap.add_argument("--fraction", type=float, default=1.0, help="share of the train split used (stratified by shuffling)")
    ap.add_argument("--initial", type=float, default=0.3, help="share of the used train the initial version learns from")
    ap.add_argument("--slice", type=float, default=0.1, help="share of the used train in each slice of the stream")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of feedback (needs rounds + 1 slices)")
    ap.add_argument("--new-labels", type=int, default=2, help="labels added at run time, zero-shot, before the stream starts")
    ap.add_argument("--test-limit", type=int, default=0, help=">0: at most this many test emails")
    ap.add_argument("--retrain-rounds", default="3", help="rounds at which (d) retrains from scratch, comma separated")
    ap.add_argument("--bi-epochs", type=float, default=train_d.bi_epochs, help=f"(default {train_d.bi_epochs:g})")
    ap.add_argument("--ce-epochs", type=float, default=train_d.ce_epochs, help=f"(default {train_d.ce_epochs:g})")
    ap.add_argument("--replay-ratio", type=float, default=feedback_d.replay_ratio, help=f"(default {feedback_d.replay_ratio:g})")
    ap.add_argument("--feedback-epochs", type=float, default=feedback_d.epochs, help=f"(default {feedback_d.epochs:g})")
    ap.add_argument("--feedback-lr", type=float, default=feedback_d.lr, help=f"(default {feedback_d.lr:g})")
    ap.add_argument("--holdout-fraction", type=float, default=feedback_d.holdout_fraction, help=f"(default {feedback_d.holdout_fraction:g})")
    ap.add_argument("--max-eval-drop", type=float, default=feedback_d.max_eval_drop, help=f"(default {feedback_d.max_eval_drop:g})")
    from training.config import add_device_arg  # light: no torch before the flags are read

    add_device_arg(ap)
    ap.add_argument("--seed", type=int, default=DEFAULTS.seed, help=f"(default {DEFAULTS.seed})")
    ap.add_argument("--work", default=str(ROOT / "runs" / "feedback-sim"), help="runs, repositories and the store (removed first)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "feedback"))
    ap.add_argument("--report-only", action="store_true", help="recompute targets, rounds.md and rounds.png from --out/summary.json")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if a.report_only:
        out = Path(a.out)
        summary = json.loads((out / "summary.json").read_text())
        summary["targets"] = targets(summary)
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        (out / "rounds.md").write_text(table(summary))
        plot(summary, out / "rounds.png")
        print(json.dumps(summary["targets"], indent=1))
        return

    import torch

    from client import ClassifierClient
    from client.server import TritonServer
    from export import versions
    from mailroute import contract
    from mailroute.feedback_store import FeedbackStore
    from training.data import limit, load_named
    from mailroute.taxonomy import Taxonomy
    from training.feedback import add_label, build_candidate

    work, out = Path(a.work), Path(a.out)
    shutil.rmtree(work, ignore_errors=True)
    (work / "data").mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    data = load_named(a.dataset)
    pool = data.train[:]
    random.Random(a.seed).shuffle(pool)
    pool = pool[: int(len(pool) * a.fraction)]
    n0, ns = int(len(pool) * a.initial), int(len(pool) * a.slice)
    initial = pool[:n0]
    slices = [pool[n0 + i * ns: n0 + (i + 1) * ns] for i in range(a.rounds + 1)]
    if len(slices[-1]) < ns:
        sys.exit(f"not enough emails for {a.rounds + 1} slices of {ns}: lower --slice or --rounds")
    test = limit(data.test, a.test_limit, a.seed)  # a random subset: the split is grouped by label
    new = sorted(random.Random(a.seed + 1).sample(data.taxonomy.names, a.new_labels))
    old_tax = Taxonomy(tuple(l for l in data.taxonomy.labels if l.name not in new), data.taxonomy.name)
    initial = [e for e in initial if e.label not in new]  # those labels do not exist yet
    tax_file, full_tax_file = str(work / "data" / "taxonomy-initial.json"), str(work / "data" / "taxonomy.json")
    old_tax.save(tax_file)
    data.taxonomy.save(full_tax_file)
    test_file = write_examples(work / "data" / "test-initial.jsonl", [e for e in test if e.label not in new])
    full_test_file = write_examples(work / "data" / "test.jsonl", test)
    retrain_rounds = {int(r) for r in a.retrain_rounds.split(",") if r.strip()}
    summary = {"dataset": a.dataset, "date": time.strftime("%Y-%m-%d"), "args": vars(a), "new_labels": new, "sizes": {
        "used_train": len(pool), "initial": len(initial), "slice": ns, "test": len(test)},
        "machine": {"cpu": f"{torch.get_num_threads()}-thread CPU" if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
                    "platform": platform.platform()}, "rounds": []}

    def save():  # committed: paths inside the clone are written relative to it, not as this machine's paths
        (out / "summary.json").write_text(json.dumps(_relative_to_root(summary), indent=1) + "\n")
        (out / "rounds.md").write_text(table(summary))
        plot(summary, out / "rounds.png")

    print(f"== initial version: {len(initial)} emails, {len(old_tax)} labels", flush=True)
    repo, initial_s = train_and_export("initial", work, tax_file, initial, test_file, a)
    summary["initial_train_s"] = round(initial_s, 1)
    start = 1
    for name in new:  # labels added at run time: name + description, no examples, no training
        label = data.taxonomy.labels[data.taxonomy.index(name)]
        rep = add_label(repo, name, label.description, base=start, evaluation=test)
        summary.setdefault("labels_added", []).append(rep)
        start = rep["version"]
        print(f"== label {name!r} added at run time (zero-shot): recall {rep['new_label_recall']}, precision {rep['new_label_precision']}, "
              f"test accuracy {rep['accuracy_before']:.2%} -> {rep['accuracy_after']:.2%}", flush=True)
    versions.promote(repo, start, note="labels added at run time")
    store_url = f"sqlite:///{work / 'feedback.sqlite3'}"
    store = FeedbackStore(store_url, labels=data.taxonomy.names)
    base = {"repo": str(repo), "db": store_url, "holdout_fraction": a.holdout_fraction, "max_eval_drop": a.max_eval_drop,
            "replay_ratio": a.replay_ratio, "epochs": a.feedback_epochs, "lr": a.feedback_lr, "device": a.device, "seed": a.seed}
    test_a = accuracy(repo, start, test)
    d_repo = None
    row0 = {"round": 0, "a_none": {"version": start, "test": test_a, "next_slice": accuracy(repo, start, slices[0])}}
    row0 |= {"b_exemplars": dict(row0["a_none"]), "c_continued": dict(row0["a_none"]), "d_retrain": dict(row0["a_none"]) | {"train_s": initial_s}}
    summary["rounds"].append(row0)
    save()
    with TritonServer(repo, admin_key="simulation") as server, ClassifierClient(server.grpc_url, store=store, timeout=120) as client:
        for r in range(1, a.rounds + 1):
            seen = slices[r - 1]
            print(f"== round {r}: classify slice {r} ({len(seen)} emails) through Triton, correct the mistakes", flush=True)
            t = time.perf_counter()
            served = client.classify([e.text for e in seen], record=True)
            serve_s = time.perf_counter() - t
            mistakes = [(e, p) for e, p in zip(seen, served) if p.label != e.label]
            for e, p in mistakes:
                client.correct(p.prediction_id, e.label, who="simulated-reviewer")
            row = {"round": r, "served_version": served[0].model_versions.get(contract.CLASSIFIER), "slice_accuracy_served": 1 - len(mistakes) / len(seen),
                   "corrections": len(mistakes), "classify_s": round(serve_s, 1)}
            nxt = slices[r]
            row["a_none"] = {"test": test_a, "next_slice": accuracy(repo, start, nxt)}

            t = time.perf_counter()
            rb = build_candidate(FeedbackConfig(**base, base_version=start, exemplars_only=True), store)
            b_version = rb["version"]
            row["b_exemplars"] = {"version": b_version, "gate_passed": rb["gate"]["passed"], "train_s": round(time.perf_counter() - t, 1),
                                  "test": accuracy(repo, b_version, test), "next_slice": accuracy(repo, b_version, nxt)}

            t = time.perf_counter()
            rc = build_candidate(FeedbackConfig(**base, promote=True, url=server.grpc_url, admin_key="simulation"), store)
            c_serving = versions.serving_version(repo)
            row["b_exemplars"]["policy"] = rb.get("policy")
            row["c_continued"] = {"candidate": rc["version"], "gate": rc["gate"], "promoted": "promotion" in rc, "serving": c_serving,
                                  "policy": rc.get("policy"),
                                  "train_s": round(time.perf_counter() - t, 1), "training": rc.get("training"),
                                  "test": accuracy(repo, c_serving, test), "next_slice": accuracy(repo, c_serving, nxt)}
            if r in retrain_rounds:
                everything = initial + [e for s in slices[:r] for e in s]
                print(f"== round {r}: (d) retrain from scratch on {len(everything)} emails", flush=True)
                d_repo, d_s = train_and_export(f"retrain-{r}", work, full_tax_file, everything, full_test_file, a)
                row["d_retrain"] = {"train_s": round(d_s, 1), "emails": len(everything), "test": accuracy(d_repo, 1, test),
                                    "next_slice": accuracy(d_repo, 1, nxt)}
            summary["rounds"].append(row)
            print(json.dumps({k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items() if kk in ("test", "next_slice", "train_s")})
                              for k, v in row.items()}), flush=True)
            save()
    store.close()
    summary["targets"] = targets(summary)
    save()
    print(json.dumps(summary["targets"], indent=1))
    shutil.rmtree(work / "data", ignore_errors=True)  # derived copies of the dataset do not outlive the run


if __name__ == "__main__":
    main()
