"""Should a run's answer fuse its flat classifier? `--flat-fusion auto`'s rule, read beside what each choice scores
(a script, not a test; choices are made on validation, test is printed beside it, never used to choose).

For each trained run folder (one that kept its flat classifier): both stages and the flat classifier scored on the
run's validation and test emails, through the classifier serving runs (as `mailroute refit`); then

- the rule: the held-out (5-fold) NLL of validation's gold candidates with and without the flat classifier
  (rerank_policy.flat_fusion_helps, what `mailroute train --flat-fusion auto` decides on);
- the served (gated) accuracy on validation and test of the policy fused with it (`--flat-fusion always`), of the
  two stages alone, and of the bi-encoder alone.

    python -m benchmarks.flat_fusion_cv runs/demo runs/banking77 [--json out.json]
"""

import argparse
import json

import numpy as np


def compare(run_dir, device: str = "cpu") -> dict:
    from mailroute.label_index import LabelIndex
    from mailroute.run_layout import RunFolder
    from training.data import splits_of
    from training.evaluate import collect, fit_policy, predict
    from training.run import TrainConfig, classifier_from_models, load_bi_encoder, load_cross_encoder, load_flat

    out = RunFolder(run_dir)
    if not out.is_trained():
        raise SystemExit(f"{out.root} is not a trained run folder (run `mailroute train` first)")
    if not out.has_flat():
        raise SystemExit(f"{out.root} kept no flat classifier (trained with --skip-baseline or --flat-fusion never): nothing to decide")
    cfg = TrainConfig.load(out.config)
    _, _, val, test = splits_of(cfg)
    index = LabelIndex.load(out.label_index)
    clf = classifier_from_models(load_bi_encoder(out.bi_encoder, device=device), load_cross_encoder(out.cross_encoder, device=device),
                                 index, out.bi_encoder, out.cross_encoder, flat=load_flat(out.root, index.taxonomy.names, device),
                                 top_k=min(cfg.k_eval, len(index)))
    names = list(clf.label_names)
    sv, st = collect(clf, val, clf.top_k), collect(clf, test, clf.top_k)
    policies = fit_policy(sv, cfg.gate_target(), "always")  # fused, and the rule's verdict on it (what auto would do)
    rule = policies.flat_fusion | {"fused": policies.flat_fusion["held_out_gain"]}

    def accuracy(sc, policy, mode) -> float:
        pred, _, _ = predict(sc, policy, names, mode)
        return float(np.mean(np.array(pred) == np.array([names[g] for g in sc.gold])))

    systems = {"fused": (policies.gated, "gated"), "two_stages": (policies.two_stage_gated, "gated"),
               "bi_encoder": (policies.retrieval, "retrieval")}
    return {"run": str(out.root), "seed": cfg.seed, "n_validation": len(val), "n_test": len(test), "rule": rule,
            "validation": {k: accuracy(sv, p, m) for k, (p, m) in systems.items()},
            "test": {k: accuracy(st, p, m) for k, (p, m) in systems.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="trained run folders that kept their flat classifier")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    ap.add_argument("--json", default="", help="also write the rows here")
    a = ap.parse_args(argv)
    rows = [compare(r, a.device) for r in a.runs]
    print("| run | seed | held-out NLL with flat / without | auto fuses | validation: fused / two stages / bi-encoder | "
          "test: fused / two stages / bi-encoder |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        v, t, rule = r["validation"], r["test"], r["rule"]
        print(f"| {r['run']} | {r['seed']} | {rule['cv_nll_with_flat']:.1f} / {rule['cv_nll_without_flat']:.1f} | "
              f"{'yes' if rule['fused'] else 'no'} | {v['fused']:.2%} / {v['two_stages']:.2%} / {v['bi_encoder']:.2%} | "
              f"{t['fused']:.2%} / {t['two_stages']:.2%} / {t['bi_encoder']:.2%} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
