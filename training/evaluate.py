"""Metrics for the evaluation report: accuracy, macro-F1, recall@k, ECE, confusions, latency."""

import time
from collections import Counter

import numpy as np
from tqdm.auto import tqdm


def accuracy(y_true, y_pred) -> float:
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def macro_f1(y_true, y_pred, labels=None) -> float:
    """Mean F1 over the labels that occur in y_true or y_pred (as scikit-learn does by default)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    f1s = []
    for l in labels:
        tp = np.sum((y_pred == l) & (y_true == l))
        fp = np.sum((y_pred == l) & (y_true != l))
        fn = np.sum((y_pred != l) & (y_true == l))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


def recall_at(gold_ids, ranked_ids: np.ndarray, ks=(1, 3, 5, 10)) -> dict:
    """gold (n,), ranked (n, >=max k) -> {"recall@k": fraction of rows with gold in the first k}."""
    hit = ranked_ids == np.asarray(gold_ids)[:, None]  # (n, kmax)
    return {f"recall@{k}": float(hit[:, :k].any(1).mean()) for k in ks if k <= ranked_ids.shape[1]}


def expected_calibration_error(confidence, correct, bins: int = 15) -> float:
    """Equal-width bins over [0, 1]; weighted mean |accuracy - confidence|. Rows whose gold label was
    not retrieved count as wrong at their stated confidence (they are part of the test set too)."""
    conf, ok = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if sel.any():
            ece += sel.mean() * abs(ok[sel].mean() - conf[sel].mean())
    return float(ece)


def top_confusions(y_true, y_pred, n: int = 10) -> list:
    pairs = Counter((t, p) for t, p in zip(y_true, y_pred) if t != p)
    return [{"gold": t, "predicted": p, "count": c} for (t, p), c in pairs.most_common(n)]


def system_metrics(y_true, y_pred, confidence, labels) -> dict:
    correct = np.asarray(y_true) == np.asarray(y_pred)
    return {"accuracy": accuracy(y_true, y_pred), "macro_f1": macro_f1(y_true, y_pred, labels),
            "ece": expected_calibration_error(confidence, correct), "n": len(y_true)}


def fit_temp(scored: list, gold_ids, clf) -> float:
    """Temperature minimising the NLL of the gold label over the K candidates (rows whose gold was
    not retrieved cannot inform it and are left out)."""
    rows = [(c, cos, lg, g) for (c, cos, lg), g in zip(scored, gold_ids) if g in c]
    best, best_nll = 1.0, float("inf")
    for t in np.exp(np.linspace(np.log(0.005), np.log(20), 161)):
        nll = 0.0
        for c, cos, lg, g in rows:
            z = (lg + clf.prior_scale * cos) / t
            z = z - z.max()
            nll -= z[list(c).index(g)] - np.log(np.exp(z).sum())
        if nll < best_nll:
            best, best_nll = float(t), nll
    return best


def evaluate_two_stage(clf, examples: list, k: int, batch_size: int = 32, prior_grid=None, fit_rerank=False) -> dict:
    """Bi-encoder only and two-stage results of one classifier on examples, with per-stage CPU latency."""
    texts, gold = [e.text for e in examples], [e.label for e in examples]
    names = clf.label_names
    labels = list(names)
    gold_ids = np.array([labels.index(g) for g in gold])
    # stage 1 alone: ranks over all labels, probability = softmax of the MNR-scaled cosines
    ranked, bi_conf, t_embed = [], [], 0.0
    for s in tqdm(range(0, len(texts), batch_size), desc="evaluate: retrieval"):
        t0 = time.perf_counter()
        xq = clf._embed(texts[s:s + batch_size])
        t_embed += time.perf_counter() - t0
        D, I = clf.index.search(xq, len(labels))  # (b, labels)
        z = np.exp(20.0 * (D - D[:, :1]))
        bi_conf += list(z[:, 0] / z.sum(1))
        ranked.append(I)
    ranked = np.concatenate(ranked)
    bi_pred = [labels[i] for i in ranked[:, 0]]
    # both stages through the classifier's own code path (what serving runs); the cross-encoder runs
    # once and every fusion weight of the grid is applied to the same logits
    scored, stage_ms, t0 = [], {"embed": 0.0, "search": 0.0, "rerank": 0.0}, time.perf_counter()
    for s in tqdm(range(0, len(texts), batch_size), desc=f"evaluate: two-stage K={k}"):
        rows, ms = clf.score_candidates(texts[s:s + batch_size], [k] * len(texts[s:s + batch_size]))
        scored += rows
        stage_ms = {name: stage_ms[name] + ms[name] for name in stage_ms}
    t_total = time.perf_counter() - t0
    grid = sorted(set(prior_grid or []) | {clf.prior_scale})
    fusion = {w: accuracy(gold, [clf.combine(*r, clf.threshold, w).label for r in scored]) for w in grid}
    if fit_rerank:  # the fusion weight first (accuracy does not depend on the temperature)
        clf.prior_scale = max(grid, key=lambda w: (fusion[w], -w))
    if fit_rerank:  # one parameter, fitted by NLL on these (validation) emails
        clf.temperature = fit_temp(scored, gold_ids, clf)
    preds = [clf.combine(*r, clf.threshold) for r in scored]
    two_pred, two_conf = [p.label for p in preds], [p.probability for p in preds]
    recall = recall_at(gold_ids, ranked)
    bi = system_metrics(gold, bi_pred, bi_conf, labels) | {"recall@10": recall.get("recall@10")}
    two = system_metrics(gold, two_pred, two_conf, labels) | {"recall@10": recall.get("recall@10"), "k": k,
                                                               "prior_scale": clf.prior_scale, "temperature": clf.temperature,
                                                               "retrieval_misses": int(np.mean([g not in p.top_labels for g, p in zip(gold, preds)]) * len(gold))}
    latency = {"embed_ms_per_email": 1e3 * t_embed / len(texts), "two_stage_ms_per_email": 1e3 * t_total / len(texts),
               "batch_size": batch_size} | {f"{name}_ms_per_email": v / len(texts) for name, v in stage_ms.items() if name != "embed"}
    return {"bi_encoder": bi, "two_stage": two, "retrieval": recall, "fusion_accuracy": {str(w): a for w, a in fusion.items()}, "confusions": top_confusions(gold, two_pred), "latency": latency,
            "predictions": [{"gold": g, "label": p.label, "probability": p.probability} for g, p in zip(gold, preds)]}
