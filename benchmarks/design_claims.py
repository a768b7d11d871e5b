"""The design's own claims, measured on the same data and budget (a script, not a test):

1. bi-encoder: MultipleNegativesRankingLoss (in-batch negatives, no same-label rows in a batch) vs
   TripletLoss (one hard negative per email: the base model's best wrong label), same epochs, batch, lr;
   recall@1/3/10 over the exemplar-aware label index, and anisotropy.
2. cross-encoder: listwise softmax cross-entropy over the K mined candidates vs pairwise binary
   cross-entropy on the same (email, candidate) pairs, same epochs, pairs per step and lr; top-1 over
   the K candidates and ECE (softmax over K, temperature fitted on validation for both).

Runs on a stratified sample of BANKING77 train (--per-label) to fit the 2-core CPU; validation is the
same held-out 10% as `mailroute train`. Writes benchmarks/results/design_claims.json.

    python -m benchmarks.design_claims --per-label 30 --out benchmarks/results/design_claims.json
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main(argv=None):
    from training.config import TrainConfig

    d = TrainConfig()  # mailroute train's defaults: the same budget for both sides of each claim
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-label", type=int, default=30, help="training emails per label (default 30)")
    ap.add_argument("--val-limit", type=int, default=0, help=">0: at most this many validation emails")
    ap.add_argument("--test-limit", type=int, default=0, help=">0: at most this many test emails")
    ap.add_argument("--bi-epochs", type=float, default=d.bi_epochs, help=f"(default {d.bi_epochs:g})")
    ap.add_argument("--ce-epochs", type=float, default=d.ce_epochs, help=f"(default {d.ce_epochs:g})")
    ap.add_argument("--k", type=int, default=d.k_train, help=f"candidates per email (default {d.k_train})")
    ap.add_argument("--card-examples", type=int, default=d.card_examples, help=f"(default {d.card_examples})")
    ap.add_argument("--seed", type=int, default=d.seed, help=f"(default {d.seed})")
    ap.add_argument("--out", default="benchmarks/results/design_claims.json")
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)

    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
    from sentence_transformers.sentence_transformer.losses import TripletLoss

    from mailroute.rerank_policy import fit_ce_only
    from mailroute.taxonomy import CardSpec
    from training import bi_encoder as bi
    from training.cross_encoder import train_cross_encoder
    from training.data import limit, load_named, sample_per_label, split_validation
    from training.evaluate import expected_calibration_error, recall_at
    from training.mining import exemplar_rows, listwise_rows, mine_candidates
    from training.models import load_bi_encoder, load_cross_encoder

    torch.manual_seed(a.seed)
    data = load_named("banking77")
    tax = data.taxonomy
    train, val = split_validation(data.train, d.validation_fraction, a.seed)
    train = sample_per_label(train, a.per_label, a.seed)
    val = limit(val, a.val_limit, a.seed)  # random subsets: both splits are grouped by label
    test = limit(data.test, a.test_limit, a.seed)
    out = {"command": "python -m benchmarks.design_claims " + " ".join(argv), "n_train": len(train), "n_validation": len(val),
           "n_test": len(test), "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
           "date": time.strftime("%Y-%m-%d"), "bi_encoder": {}, "cross_encoder": {}}
    print(f"design claims: {len(train)} train, {len(val)} validation, {len(test)} test")

    # 1. bi-encoder losses
    base = load_bi_encoder()
    xb0, xt0 = bi.embed(base, tax.texts), bi.embed(base, [e.text for e in train])
    s0 = xt0 @ xb0.T  # (n, labels) base cosines
    gold_train = np.array([tax.index(e.label) for e in train])
    s0[np.arange(len(train)), gold_train] = -np.inf
    hard = s0.argmax(1)  # each email's most confusable wrong label under the base model
    encoders = {}
    for name in ("mnr", "triplet"):
        t = time.perf_counter()
        model = load_bi_encoder()
        if name == "mnr":
            bi.train_bi_encoder(model, train, tax, a.bi_epochs, d.bi_batch_size, d.bi_lr, a.seed)
        else:
            ds = Dataset.from_dict({"anchor": [e.text for e in train], "positive": [tax.texts[g] for g in gold_train],
                                    "negative": [tax.texts[h] for h in hard]})
            with tempfile.TemporaryDirectory() as tmp:
                args = SentenceTransformerTrainingArguments(output_dir=tmp, num_train_epochs=a.bi_epochs, per_device_train_batch_size=d.bi_batch_size,
                                                            learning_rate=d.bi_lr, warmup_steps=0.1, seed=a.seed, data_seed=a.seed,
                                                            save_strategy="no", report_to="none", use_cpu=True)
                SentenceTransformerTrainer(model=model, args=args, train_dataset=ds, loss=TripletLoss(model)).train()
        seconds = time.perf_counter() - t
        index = bi.build_label_index(model, tax, name, train)
        res = {"train_s": seconds, "anisotropy": bi.anisotropy(model, [e.text for e in test])}
        for split, rows in (("validation", val), ("test", test)):
            _, I = index.search(bi.embed(model, [e.text for e in rows]), len(tax))
            res[split] = recall_at(np.array([tax.index(e.label) for e in rows]), I, ks=(1, 3, 10))
        out["bi_encoder"][name] = res
        encoders[name] = (model, index)
        print(f"bi-encoder {name}: {res}")

    # 2. cross-encoder losses, on the candidates the MNR encoder mines (leave-one-out)
    model, index = encoders["mnr"]
    x = bi.embed(model, [e.text for e in train])
    cards, used = bi.label_cards(tax, train, x, CardSpec(examples=a.card_examples))
    index.cards = cards
    cand, _ = mine_candidates(model, [e.text for e in train], index, a.k, exclude=exemplar_rows(index, train), x=x)
    keep = [i for i, e in enumerate(train) if e.text not in used]
    rows = listwise_rows([train[i] for i in keep], cand[keep], index, a.seed)
    split_cands = {}
    for split, exs in (("validation", val), ("test", test)):
        D, I = index.search(bi.embed(model, [e.text for e in exs]), a.k)
        split_cands[split] = (exs, D, I)
    for name in ("listwise", "pairwise"):
        t = time.perf_counter()
        cross = load_cross_encoder()
        if name == "listwise":
            train_cross_encoder(cross, rows, a.ce_epochs, d.ce_batch_size, d.ce_lr, a.seed)
        else:
            pairs = {"query": [], "doc": [], "label": []}
            for q, docs, labels in zip(rows["query"], rows["docs"], rows["labels"]):
                for d, l in zip(docs, labels):
                    pairs["query"].append(q)
                    pairs["doc"].append(d)
                    pairs["label"].append(float(l))
            with tempfile.TemporaryDirectory() as tmp:
                args = CrossEncoderTrainingArguments(output_dir=tmp, num_train_epochs=a.ce_epochs, per_device_train_batch_size=d.ce_batch_size * a.k,
                                                     learning_rate=d.ce_lr, warmup_steps=0.1, seed=a.seed, data_seed=a.seed,
                                                     save_strategy="no", report_to="none", use_cpu=True)
                CrossEncoderTrainer(model=cross, args=args, train_dataset=Dataset.from_dict(pairs), loss=BinaryCrossEntropyLoss(cross)).train()
        seconds = time.perf_counter() - t
        logits = {}
        for split, (exs, D, I) in split_cands.items():
            pairs = [(e.text, cards[c]) for e, cand_row in zip(exs, I) for c in cand_row]
            logits[split] = np.asarray(cross.predict(pairs, batch_size=128, show_progress_bar=False, convert_to_numpy=True)).reshape(len(exs), a.k)
        exs, D, I = split_cands["validation"]
        gold_pos = (I == np.array([tax.index(e.label) for e in exs])[:, None])
        ok = gold_pos.any(1)
        policy = fit_ce_only(logits["validation"][ok], gold_pos[ok].argmax(1))
        res = {"train_s": seconds, "temperature": policy.temperature}
        for split, (exs, D, I) in split_cands.items():
            gold = np.array([tax.index(e.label) for e in exs])
            p = policy.probabilities(logits[split], np.zeros_like(D))
            correct = I[np.arange(len(exs)), p.argmax(1)] == gold
            res[split] = {"top1": float(correct.mean()), "ece": expected_calibration_error(p.max(1), correct)}
        out["cross_encoder"][name] = res
        print(f"cross-encoder {name}: {res}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()
