"""`mailroute train`: both stages and the flat baseline on one dataset, evaluated, saved with config and metrics.

Output folder: bi_encoder/ cross_encoder/ label_index/ config.json metrics.json report.md
"""

import json
import platform
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from mailroute.label_index import weights_id
from training import bi_encoder as bi
from training.config import TrainConfig  # noqa: F401 (re-exported for callers)
from training.cross_encoder import train_cross_encoder
from training.data import load_dataset, load_named, sample_per_label, split_validation
from training.evaluate import evaluate_two_stage, system_metrics
from training.flat_baseline import predict_flat, train_flat
from training.mining import listwise_rows, mine_candidates
from training.models import load_bi_encoder, load_cross_encoder
from training.reference import RERANK_FILE, classifier_from_models
from training.report import write_report


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: TrainConfig) -> dict:
    seed_everything(cfg.seed)
    times, t = {}, time.perf_counter()

    # 1. data: validation held out of train; test only for the final numbers
    if cfg.taxonomy:
        data = load_dataset(cfg.taxonomy, cfg.train, cfg.test, cfg.drop_invalid)
    else:
        data = load_named(cfg.dataset, cfg.banking77 or None)
    tax = data.taxonomy
    train, val = split_validation(data.train, cfg.validation_fraction, cfg.seed)
    if cfg.sample_per_label:
        train = sample_per_label(train, cfg.sample_per_label, cfg.seed)
    test = data.test[: cfg.test_limit] if cfg.test_limit else data.test
    out = Path(cfg.out)  # created only once the data is known to be valid
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
    print(f"[1/8] data: {len(tax)} labels, {len(train)} train, {len(val)} validation, {len(test)} test")

    # 2. bi-encoder from the base weights; anisotropy before training
    model = load_bi_encoder(cfg.base or None)
    aniso_before = bi.anisotropy(model, [e.text for e in test])

    # 3. MNR fine-tuning, in-batch negatives without false negatives
    print(f"[3/8] bi-encoder: MNR, {cfg.bi_epochs} epoch(s)")
    bi.train_bi_encoder(model, train, tax, cfg.bi_epochs, cfg.bi_batch_size, cfg.bi_lr, cfg.seed)
    aniso_after = bi.anisotropy(model, [e.text for e in test])
    times["bi_encoder_s"] = time.perf_counter() - t

    # 4. save the encoder and the label index built from it
    model.save(str(out / "bi_encoder"))
    index = bi.build_label_index(model, tax, weights_id(out / "bi_encoder" / "model.safetensors"))
    index.save(out / "label_index")

    # 5. mine the K hard candidates of every training email
    t = time.perf_counter()
    cand, scores = mine_candidates(model, [e.text for e in train], index, cfg.k_train)
    rows = listwise_rows(train, cand, index, cfg.seed, scores if cfg.train_prior_scale else None)
    print(f"[5/8] mined top-{cfg.k_train}: gold retrieved for {np.mean([1 in r for r in rows['labels']]):.1%}"
          f" of train (gold inserted where missed)")

    # 6. cross-encoder from the same base weights (or the fine-tuned bi-encoder), new head, listwise softmax CE over those K
    print(f"[6/8] cross-encoder: listwise, K={cfg.k_train}, {cfg.ce_epochs} epoch(s)")
    if cfg.ce_init not in ("base", "bi_encoder"):
        raise ValueError(f"ce_init must be 'base' or 'bi_encoder', got {cfg.ce_init!r}")
    cross = load_cross_encoder(out / "bi_encoder" if cfg.ce_init == "bi_encoder" else (cfg.base or None))
    train_cross_encoder(cross, rows, cfg.ce_epochs, cfg.ce_batch_size, cfg.ce_lr, cfg.seed, cfg.train_prior_scale)
    cross.save(str(out / "cross_encoder"))
    times["cross_encoder_s"] = time.perf_counter() - t

    # 7. evaluate through the reference classifier (the code path serving runs): the fusion weight is
    #    chosen on validation (highest accuracy, ties to the smaller weight), then test is measured once
    grid = [float(w) for w in cfg.prior_grid.split(",") if w.strip()] or [cfg.train_prior_scale]
    clf = classifier_from_models(model, cross, index, out / "bi_encoder", out / "cross_encoder", prior_scale=grid[0])
    metrics = {"dataset": tax.name, "labels": len(tax), "n_train": len(train), "n_validation": len(val), "n_test": len(test)}
    if val:
        v = evaluate_two_stage(clf, val, cfg.k_eval, prior_grid=grid, fit_rerank=True)  # sets w, then T
        metrics["validation"] = {"bi_encoder": v["bi_encoder"], "two_stage": v["two_stage"], "retrieval": v["retrieval"],
                                 "fusion_accuracy": v["fusion_accuracy"]}
    metrics["prior_scale"], metrics["temperature"] = clf.prior_scale, clf.temperature
    (out / RERANK_FILE).write_text(json.dumps({"prior_scale": clf.prior_scale, "temperature": clf.temperature,
                                               "k_train": cfg.k_train, "k_eval": cfg.k_eval}) + "\n")
    metrics.update(evaluate_two_stage(clf, test, cfg.k_eval, prior_grid=grid))
    metrics["anisotropy"] = {"before": aniso_before, "after": aniso_after}

    # 8. the flat softmax baseline: same MiniLM, same data, linear head over all labels
    if not cfg.skip_baseline:
        t = time.perf_counter()
        flat = train_flat(load_bi_encoder(cfg.base or None), train, tax, cfg.flat_epochs, cfg.flat_batch_size, cfg.flat_lr, cfg.seed)
        probs = predict_flat(flat, [e.text for e in test])
        pred = [tax.names[i] for i in probs.argmax(1)]
        metrics["flat_baseline"] = system_metrics([e.label for e in test], pred, probs.max(1), tax.names)
        times["flat_baseline_s"] = time.perf_counter() - t
    metrics["train_time"] = times
    metrics["machine"] = {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__}
    (out / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in metrics.pop("predictions")))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    write_report(metrics, out / "report.md")
    print(f"[8/8] saved to {out}: two-stage accuracy {metrics['two_stage']['accuracy']:.2%}, "
          f"bi-encoder recall@{min(10, len(tax))} {metrics['retrieval'].get('recall@10', float('nan')):.2%}")
    return metrics
