"""Does the cross-encoder add more when each label card shows that label's training emails nearest to the email
being classified? A study on a trained run (a script, not a test).

Today a label card is fixed per label: the description plus a few typical emails (`CardSpec`). The cross-encoder
then compares an email with the same two examples whatever the email says, while retrieval already scores each
label by its exemplars nearest to the email, and the fusion leans on retrieval (benchmarks/RESULTS.md). A
query-dependent card, the description plus the label's exemplars nearest to this email (the email itself never
among them), lets the reranker read the evidence retrieval used, word by word: retrieval-augmented
classification, as in kNN-augmented or in-context-example rerankers. Same format and character budget as the fixed
card, so the pairs cost the same.

Two arms, everything else equal: the run's bi-encoder and label index (full size), K candidates mined leave-one-out
for a stratified sample of the training emails, one cross-encoder from the base weights per arm, trained listwise
as `mailroute train` trains it. Measured on the run's validation emails: the cross-encoder alone, and fused with
retrieval (the two-stage rule, `fit_fusion` without the flat classifier, fitted on validation; also 10-fold cross-validated inside validation).
Test is not read unless --test is given, and then only with the fusion fitted on validation. Each arm's scores are
saved beside the summary (`neighbour_cards_<arm>_<split>.npz`: logits, retrieval scores, gold position, candidates).

    python -m benchmarks.neighbour_cards --run runs/banking77-ce2 [--per-label 40] [--epochs 1] [--out benchmarks/results/banking77]
"""

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np


def scores_file(folder, arm: str, split: str) -> Path:
    """Where an arm's scores on a split are saved in --out (written here, read by benchmarks/fusion_study.py --nearest-scores)."""
    return Path(folder) / f"neighbour_cards_{arm}_{split}.npz"


def _fit(logits, retrieval, gold):
    """The served fusion (`fit_fusion`) fitted on the rows whose gold was retrieved."""
    from mailroute.rerank_policy import fit_fusion

    ok = gold >= 0
    return fit_fusion(logits[ok], retrieval[ok], gold[ok])


def _right(policy, logits, retrieval, gold) -> np.ndarray:
    return policy.probabilities(logits, retrieval).argmax(1) == gold  # a row whose gold was not retrieved counts as wrong


def _fused_validation(logits, retrieval, gold) -> tuple:
    """(accuracy with the fusion fitted on validation itself, as `mailroute train` reports it; its 10-fold
    cross-validated accuracy inside validation)."""
    fitted = float(np.mean(_right(_fit(logits, retrieval, gold), logits, retrieval, gold)))
    order, right = np.random.default_rng(0).permutation(len(gold)), 0
    for part in np.array_split(order, 10):
        rest = np.setdiff1d(order, part)
        right += int(_right(_fit(logits[rest], retrieval[rest], gold[rest]), logits[part], retrieval[part], gold[part]).sum())
    return fitted, right / len(gold)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a trained run folder (its bi-encoder, label index, config and split)")
    ap.add_argument("--per-label", type=int, default=40, help="training emails per label for the cross-encoders (0 = all)")
    ap.add_argument("--epochs", type=float, default=1.0, help="cross-encoder epochs per arm")
    ap.add_argument("--arms", default="fixed,neighbours", help="fixed (the index's cards) and/or neighbours (query-dependent)")
    ap.add_argument("--test", action="store_true", help="also measure on test (for the record; choices use validation)")
    from training.config import add_device_arg  # light: no torch before the flags are read

    add_device_arg(ap)
    ap.add_argument("--out", default="benchmarks/results/banking77", help="folder for neighbour_cards.{json,txt}")
    a = ap.parse_args(argv)

    from mailroute.label_index import LabelIndex
    from mailroute.run_layout import RunFolder
    from training.bi_encoder import embed
    from training.config import TrainConfig
    from training.cross_encoder import train_cross_encoder
    from training.data import sample_per_label, splits_of
    from training.mining import exemplar_rows, listwise_rows, mine_candidates
    from training.models import load_bi_encoder, load_cross_encoder, resolve_device

    folder = RunFolder(Path(a.run))
    cfg = TrainConfig.load(folder.config)
    device = resolve_device(a.device)
    tax, train, val, test = splits_of(cfg)
    index = LabelIndex.load(folder.label_index)
    spec = index.card_spec
    if not spec.examples or not any(index.exemplar_texts):
        raise SystemExit(f"{a.run}: its label index has no cards with examples or no exemplar texts; nothing to compare")
    fixed = set(index.label_texts)
    pool = sample_per_label(train, a.per_label, cfg.seed) if a.per_label else train
    pool = [e for e in pool if not any(e.text[:spec.example_chars] in card for card in fixed)]  # no email meets itself
    bi = load_bi_encoder(folder.bi_encoder, device=device)
    t0 = time.perf_counter()
    x_pool, own = embed(bi, [e.text for e in pool]), exemplar_rows(index, pool)
    cand, _ = mine_candidates(bi, None, index, cfg.k_train, exclude=own, x=x_pool)
    evals = {"validation": val} | ({"test": test} if a.test else {})
    scored = {}
    for split, rows in evals.items():
        x = embed(bi, [e.text for e in rows])
        I, S = mine_candidates(bi, None, index, cfg.k_eval, x=x)
        gold_ids = np.array([tax.index(e.label) for e in rows])
        hit = I == gold_ids[:, None]
        scored[split] = {"rows": rows, "x": x, "I": I, "retrieval": np.take_along_axis(S, I, 1),
                         "gold": np.where(hit.any(1), hit.argmax(1), -1)}
    print(f"{len(pool)} training emails (K={cfg.k_train}), validation {len(val)} (K={cfg.k_eval}); embedded and mined in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)

    Path(a.out).mkdir(parents=True, exist_ok=True)
    results = {"run": a.run, "per_label": a.per_label, "epochs": a.epochs, "card_spec": asdict(spec),
               "n_train_emails": len(pool), "k_train": cfg.k_train, "k_eval": cfg.k_eval, "arms": {}}
    for s, d in scored.items():
        results[f"{s}_retrieval_alone"] = float(np.mean(d["retrieval"].argmax(1) == d["gold"]))
    arms = {"fixed": replace(spec, nearest=False), "neighbours": replace(spec, nearest=True)}
    for arm in a.arms.split(","):
        if arm not in arms:
            raise SystemExit(f"--arms: unknown arm {arm!r} (fixed, neighbours)")
        # the product's own cards and rows (LabelIndex.pair_cards, listwise_rows), in this arm's card format
        arm_index = replace(index, manifest=index.manifest | {"cards": asdict(arms[arm])})
        t = time.perf_counter()
        rows = listwise_rows(pool, cand, arm_index, cfg.seed, x=x_pool, exclude=own)
        cross = load_cross_encoder(cfg.base or None, device=device)
        train_cross_encoder(cross, rows, a.epochs, cfg.ce_batch_size, cfg.ce_lr, cfg.seed, device=device)
        out = {"train_s": round(time.perf_counter() - t, 1), "example_cards": rows["docs"][0][:2]}
        for split, d in scored.items():
            cards = arm_index.pair_cards(d["x"], list(d["I"]))
            pairs = [(e.text, c) for e, c in zip((e for e in d["rows"] for _ in range(d["I"].shape[1])), cards)]
            logits = np.asarray(cross.predict(pairs, batch_size=64, show_progress_bar=False, convert_to_numpy=True),
                                np.float64).reshape(len(d["I"]), -1)
            d["logits"] = logits
            out[split] = {"cross_encoder_alone": float(np.mean(logits.argmax(1) == d["gold"]))}
            if split == "validation":
                out[split]["fused"], out[split]["fused_cv10"] = _fused_validation(logits, d["retrieval"], d["gold"])
            else:  # test with the fusion fitted on validation (validation is scored first): test never fits anything
                v = scored["validation"]
                policy = _fit(v["logits"], v["retrieval"], v["gold"])
                out[split]["fused"] = float(np.mean(_right(policy, logits, d["retrieval"], d["gold"])))
            np.savez_compressed(scores_file(a.out, arm, split), logits=logits, retrieval=d["retrieval"],
                                gold=d["gold"], candidates=d["I"])
        results["arms"][arm] = out
        print(f"{arm}: {json.dumps({k: v for k, v in out.items() if k != 'example_cards'})}", flush=True)

    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "neighbour_cards.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"run {a.run}: cross-encoders on {len(pool)} training emails ({a.per_label or 'all'} per label), {a.epochs} epoch(s); "
             f"retrieval alone on validation {results['validation_retrieval_alone']:.2%}",
             f"{'arm':<11} {'split':<10} {'CE alone':>9} {'fused':>7} {'fused (10-fold CV)':>19} {'train s':>8}"]
    for arm, r in results["arms"].items():
        for split in scored:
            cv = r[split].get("fused_cv10")
            lines.append(f"{arm:<11} {split:<10} {r[split]['cross_encoder_alone']:>9.2%} {r[split]['fused']:>7.2%} "
                         f"{'(fit on validation)' if cv is None else f'{cv:.2%}':>19} {r['train_s']:>8.0f}")
    (out_dir / "neighbour_cards.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
