"""Choose a fusion rule on out-of-fold scores of every training email instead of 1,003 validation emails.

Validation (10% of BANKING77's training split) cannot separate fusion rules 0.3 points apart: one email is
0.1 point and the paired standard error of two rules is about 0.5 (RESULTS.md, session 16). Here the training
emails themselves become the held-out set: n runs, each trained with `mailroute train --holdout-fold i/n`,
so that every training email is scored by a bi-encoder, a label index and a cross-encoder that never saw it.

    mailroute train --dataset banking77 --holdout-fold 0/2 --skip-baseline --ce-epochs 2 --out runs/oof2-0
    mailroute train --dataset banking77 --holdout-fold 1/2 --skip-baseline --ce-epochs 2 --out runs/oof2-1
    python -m benchmarks.oof_choice --runs runs/oof2-0 runs/oof2-1 [--compare runs/oof2n-0 runs/oof2n-1] \\
        [--reference benchmarks/results/banking77/fusion_study_s16.json] [--json out.json]

Each run scores its held-out fold once at K=--k (cached as RUN/heldout_k<K>.npz); each rule of
benchmarks/fusion_study.py is then cross-fitted: its weights are fitted on the other folds' held-out emails
and it is scored on this fold's, so no email is scored by weights fitted on it. Every rule is compared
with the served rule (CE + retrieval) on the same emails: difference, a paired bootstrap interval and
McNemar's exact test. --only-fold i uses fold i's held-out emails alone, cross-fitted between two stratified halves
of them (for when the other folds were never scored, e.g. a GPU call that ran out of time: only that fold's runs need
their models or caches). The rules include a linear softmax probe on the bi-encoder's embeddings (fitted on each
run's own training emails). --compare takes a second configuration's fold runs (the same folds, another
setting, e.g. --card-nearest) and compares it with the first, rule by rule. --reference prints beside each
rule what validation and test said of it on the headline run (a fusion_study --json file): test is shown,
never used for a choice.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.fusion_study import K, PROBE_RULES, RULES, SERVED, _features, _fit, _gold_pos, _probe_scores, _scored
from benchmarks.paired import bootstrap_interval, mcnemar_p

RETRIEVAL_ONLY = {f"retrieval only, K={K}": (["D"], K)}


def _fold_runs(runs: list) -> list:
    """The runs' configs, checked to be the folds 0..n-1 of one n-fold split of one training configuration."""
    from mailroute.run_layout import RunFolder
    from training.config import TrainConfig

    missing = [r for r in runs if not RunFolder(r).config.is_file()]
    if missing:
        raise SystemExit(f"--runs: {', '.join(missing)}: not a run folder (no {RunFolder(missing[0]).config.name}; "
                         f"mailroute train --holdout-fold i/n writes one)")
    cfgs = [TrainConfig.load(RunFolder(r).config) for r in runs]
    folds = [c.holdout() for c in cfgs]
    n = folds[0][1]
    if not n or sorted(i for i, _ in folds) != list(range(n)) or any(m != n for _, m in folds):
        raise SystemExit(f"--runs must be the folds 0/n .. n-1/n of one split (mailroute train --holdout-fold i/n); got "
                         f"{[c.holdout_fold or 'none' for c in cfgs]}")
    same = {k: v for k, v in vars(cfgs[0]).items() if k not in ("out", "holdout_fold")}
    for r, c in zip(runs, cfgs):
        other = {k: v for k, v in vars(c).items() if k not in ("out", "holdout_fold")}
        if other != same:
            diff = sorted(k for k in same if same[k] != other[k])
            raise SystemExit(f"{r}: trained with other settings than {runs[0]} ({', '.join(diff)}): not folds of one configuration")
    return cfgs


def heldout_scores(run: str, cfg, k: int, device: str) -> dict:
    """Both stages over the run's held-out fold at K=k (features as in fusion_study) and the run's linear probe
    at the candidates ("probe"), cached in the run folder (small: it travels back from a GPU machine alone)."""
    from mailroute.run_layout import RunFolder
    from training.data import splits_of

    cache = RunFolder(run).heldout_cache(k)
    if cache.exists():
        return dict(np.load(cache))
    _, held, _, _ = splits_of(cfg, held_out=True)
    print(f"{run}: scoring its {len(held)} held-out emails at K={k}", file=sys.stderr)
    data = _scored(Path(run), k, [], device, {"heldout": held})["heldout"]
    probe = _probe_scores(Path(run), device, {"heldout": data.pop("xq")})["heldout"]
    data["probe"] = np.take_along_axis(probe, data["I"], 1)
    data["probe_alone_right"] = probe.argmax(1) == data["gold"]
    np.savez(cache, **data)
    return data


def configuration(runs: list, k: int, device: str, only_fold: int = None) -> list:
    """The held-out scores of one configuration's fold runs, in fold order; with only_fold, that fold's scores as two
    stratified halves (nothing else is scored)."""
    cfgs = _fold_runs(runs)
    ordered = sorted(zip(runs, cfgs), key=lambda rc: rc[1].holdout()[0])
    if only_fold is None:
        return [heldout_scores(run, cfg, k, device) for run, cfg in ordered]
    return halves(heldout_scores(*ordered[only_fold], k, device))


def halves(scores: dict, seed: int = 0) -> list:
    """One fold's held-out scores split in two, each label's emails dealt alternately after a seeded shuffle: the
    halves depend only on the gold labels, so two configurations of the same fold get the same halves."""
    gold = scores["gold"]
    first = np.zeros(len(gold), bool)
    rng = np.random.default_rng(seed)
    for label in np.unique(gold):
        first[rng.permutation(np.flatnonzero(gold == label))[::2]] = True
    return [{name: v[mask] for name, v in scores.items()} for mask in (first, ~first)]


def cross_fitted(folds: list, feats: list, k: int) -> tuple:
    """(right (n,) bool over all folds' emails in fold order, weights fitted on all folds together):
    each fold scored by weights fitted on the other folds."""
    F = [_features(d, feats, k) for d in folds]
    pos = [_gold_pos(d, k) for d in folds]
    right = []
    for f in range(len(folds)):
        w = _fit(np.concatenate([F[g] for g in range(len(folds)) if g != f]),
                 np.concatenate([pos[g] for g in range(len(folds)) if g != f]))
        right.append((F[f] @ w).argmax(1) == pos[f])  # rows whose gold was not retrieved count as wrong
    return np.concatenate(right), _fit(np.concatenate(F), np.concatenate(pos))


def same_split(runs: list, other_runs: list) -> None:
    """Refuses a second configuration whose runs hold out other emails (checked before any scoring)."""
    from mailroute.run_layout import RunFolder

    from training.config import TrainConfig
    from training.data import SPLIT_SETTINGS

    def split_of(rs):  # what decides which emails each run holds out (a setting older runs lack: its default)
        return sorted(tuple(json.loads(RunFolder(r).config.read_text()).get(k, getattr(TrainConfig(), k)) for k in SPLIT_SETTINGS)
                      for r in rs)

    if split_of(runs) != split_of(other_runs):
        raise SystemExit("--compare: its runs hold out other emails than --runs (another dataset, seed or fold split)")


def compare(first_right: dict, other: list, rules: dict, label: str) -> list:
    """Each rule of the second configuration (`other`: its folds' held-out scores, the same emails) against the same
    rule of the first (first_right: rule -> (right, weights) from cross_fitted)."""
    rows = []
    print(f"\n{label}, rule by rule, on the same held-out emails:")
    for name, (feats, k) in rules.items():
        a = first_right[name][0]
        b, _ = cross_fitted(other, feats, k)
        lo, hi = bootstrap_interval(b, a)
        rows.append({"rule": name, "first": float(a.mean()), "second": float(b.mean()), "second_minus_first_points": 100 * float(b.mean() - a.mean()),
                     "bootstrap95": [lo, hi], "mcnemar_p": mcnemar_p(b, a)})
        print(f"{name:42s} {a.mean():8.2%} -> {b.mean():8.2%} {100 * (b.mean() - a.mean()):+6.2f} ({lo:+.2f}..{hi:+.2f}) p={rows[-1]['mcnemar_p']:.3f}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--runs", nargs="+", required=True, help="the n runs of `mailroute train --holdout-fold i/n`, one per fold")
    ap.add_argument("--k", type=int, default=K, help=f"candidates scored per held-out email (the served K is {K}; at least that)")
    ap.add_argument("--compare", nargs="+", default=[], help="the fold runs of a second configuration (same folds, e.g. "
                                                              "--card-nearest): its served rule against this one's, email by email")
    ap.add_argument("--reference", help="a fusion_study --json file of the headline run: its validation and test per rule, shown")
    ap.add_argument("--only-fold", type=int, help="use fold I's held-out emails alone, cross-fitted between two halves of "
                                                    "them (when the other folds were not scored)")
    from training.config import add_device_arg  # light: no torch before the flags are read

    add_device_arg(ap)
    ap.add_argument("--json", help="write the table here as JSON too")
    a = ap.parse_args(argv)
    if a.only_fold is not None and not 0 <= a.only_fold < len(a.runs):
        ap.error(f"--only-fold must name one of the {len(a.runs)} folds of --runs (0..{len(a.runs) - 1}), got {a.only_fold}")
    if a.k < K:
        ap.error(f"--k must be at least the served K ({K}, mailroute.settings DEFAULTS.top_k): every rule is compared with the "
                 f"served rule at K={K}; got {a.k}")
    if a.compare:
        same_split(a.runs, a.compare)
    folds = configuration(a.runs, a.k, a.device, a.only_fold)
    rules = RETRIEVAL_ONLY | {name: (feats, k) for name, (feats, k) in RULES.items() if k <= a.k and feats != ["D"]}
    rules |= PROBE_RULES
    reference = {r["rule"]: r for r in json.loads(Path(a.reference).read_text())} if a.reference else {}
    n = sum(len(d["gold"]) for d in folds)
    right = {name: cross_fitted(folds, feats, k) for name, (feats, k) in rules.items()}
    base = right[SERVED][0]
    table = []
    for name, (feats, k) in rules.items():
        r, w = right[name]
        lo, hi = bootstrap_interval(r, base)
        ref = reference.get(name, {})
        table.append({"rule": name, "features": feats, "k": k, "weights_all_folds": w.round(4).tolist(), "heldout": float(r.mean()),
                      "minus_served_points": 100 * float(r.mean() - base.mean()), "bootstrap95": [lo, hi],
                      "mcnemar_p": mcnemar_p(r, base), "only_this": int((r & ~base).sum()), "only_served": int((~r & base).sum()),
                      "reference_val_cv10": ref.get("val_cv10"), "reference_test": ref.get("test")})
    where = f"{len(folds)} folds" if a.only_fold is None else f"fold {a.only_fold} of {len(a.runs)}, as 2 halves"
    print(f"{n} held-out training emails in {where} (cross-fitted), K={a.k}; recall@{a.k} "
          f"{np.mean(np.concatenate([_gold_pos(d, a.k) for d in folds]) >= 0):.2%}")
    print(f"{'rule':42s} {'held-out':>8s} {'vs served (95%)':>22s} {'McNemar p':>9s}" + ("  headline val 10-fold / test" if reference else ""))
    for t in table:
        ref = (f"  {t['reference_val_cv10']:.2%} / {t['reference_test']:.2%}" if t["reference_test"] is not None else "  -") if reference else ""
        print(f"{t['rule']:42s} {t['heldout']:8.2%} {t['minus_served_points']:+6.2f} ({t['bootstrap95'][0]:+.2f}..{t['bootstrap95'][1]:+.2f})"
              f" {t['mcnemar_p']:9.3f}{ref}")
    print(f"probe alone (a linear softmax on the bi-encoder's embeddings, fitted on each run's training emails): "
          f"{np.concatenate([d['probe_alone_right'] for d in folds]).mean():.2%}")
    out = {"emails": n, "folds": len(folds), "only_fold": a.only_fold, "k": a.k, "runs": a.runs, "rules": table}
    if a.compare:
        other = configuration(a.compare, a.k, a.device, a.only_fold)
        if any(not np.array_equal(f["gold"], g["gold"]) for f, g in zip(folds, other)):
            raise SystemExit("--compare: its runs' held-out emails differ from --runs' (another dataset or data file)")
        out["compare"] = compare(right, other, rules, f"{a.compare[0]}.. against {a.runs[0]}..")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
