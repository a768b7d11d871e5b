"""Evaluation: metrics (accuracy, macro-F1, recall@k, ECE, confusions, latency), the scores of one split
collected once, and the choices made on validation (label scoring, rerank policy, gate)."""

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from mailroute import contract
from mailroute.label_index import LabelScoring
from mailroute.rerank_policy import GateTarget, RerankPolicy, fit_ce_only, fit_fusion, fit_gate, fit_retrieval_temperature, flat_fusion_helps


def accuracy(y_true, y_pred) -> float:
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def macro_f1(y_true, y_pred) -> float:
    """Mean F1 over the labels that occur in y_true or y_pred (as scikit-learn does by default): a taxonomy label
    that is neither gold nor predicted on the split does not count (what every recorded macro-F1 means)."""
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


ECE_BINS = 15  # equal-width confidence bins of the expected calibration error (named in the report's table)


def expected_calibration_error(confidence, correct, bins: int = ECE_BINS) -> float:
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


def system_metrics(y_true, y_pred, confidence) -> dict:
    """Accuracy, macro-F1 (over the labels present in y_true or y_pred), ECE and n of one system's answers."""
    correct = np.asarray(y_true) == np.asarray(y_pred)
    return {"accuracy": accuracy(y_true, y_pred), "macro_f1": macro_f1(y_true, y_pred),
            "ece": expected_calibration_error(confidence, correct), "n": len(y_true)}


@dataclass
class Scored:
    """Everything both stages say about one split, computed once; every variant and policy is read from it."""
    gold: np.ndarray  # (n,) gold label ids
    xq: np.ndarray  # (n, dim) email embeddings
    ranked: np.ndarray  # (n, labels) label ids by retrieval score, best first
    D: np.ndarray  # (n, k) retrieval scores of the K candidates
    I: np.ndarray  # (n, k) candidate label ids
    logits: np.ndarray  # (n, k) cross-encoder logits of the candidates
    ms: dict = field(default_factory=dict)  # per-stage milliseconds per email
    flat: np.ndarray = None  # (n, k) the flat classifier's log-probabilities of the candidates (None: no flat classifier)
    flat_all: np.ndarray = None  # (n, labels) ... of every label: the flat baseline's own answers, without a second pass

    @property
    def gold_pos(self) -> np.ndarray:
        """(n,) position of the gold label among the K candidates, -1 where retrieval missed it."""
        hit = self.I == self.gold[:, None]
        return np.where(hit.any(1), hit.argmax(1), -1)


EVAL_BATCH = 32  # emails per in-process classifier call when a run or an export is evaluated


def embed_texts(clf, texts: list, batch_size: int = EVAL_BATCH, with_flat: bool = False, stage_ms: dict = None) -> tuple:
    """-> ((n, dim) embeddings, (n, labels) the flat classifier's log-probabilities or None). stage_ms: gets "flat",
    the ms the flat classifier took in all (as TwoStageClassifier.encode)."""
    parts, flat_ms = [], 0.0
    for s in tqdm(range(0, len(texts), batch_size), desc="evaluate: embed"):
        ms = {}
        parts.append(clf.encode(texts[s:s + batch_size], with_flat=with_flat, stage_ms=ms))
        flat_ms += ms[contract.STAGE_FLAT]
    if stage_ms is not None:
        stage_ms[contract.STAGE_FLAT] = flat_ms
    return np.concatenate([x for x, _ in parts]), np.concatenate([f for _, f in parts]) if with_flat else None


def choose_scoring(index, xq: np.ndarray, gold: np.ndarray, top_n_grid, description_weight_grid) -> tuple:
    """The label scoring rule with the best accuracy on these (validation) emails; ties go to the higher
    mean reciprocal rank. -> (LabelScoring, {"n=..,w=..": accuracy})."""
    table, best, best_key = {}, None, None
    for n in top_n_grid:
        for w in description_weight_grid:
            s = LabelScoring(exemplar_top_n=int(n), description_weight=float(w), search_depth=index.scoring.search_depth)
            _, I = index.search(xq, len(index), scoring=s)
            rank = (I == gold[:, None]).argmax(1)
            key = (float(np.mean(rank == 0)), float(np.mean(1.0 / (1 + rank))))
            table[f"top_n={n},description_weight={w:g}"] = key[0]
            if best_key is None or key > best_key:
                best, best_key = s, key
    return best, table


def collect(clf, examples: list, k: int, batch_size: int = EVAL_BATCH) -> Scored:
    """Run stage 1 over all labels and stage 2 over the top K of every email, through the classifier's
    own embed / search / score code (what serving runs), with per-stage timings; and the flat classifier
    where the classifier has one (its log-probabilities of the K, whatever the policy fuses)."""
    labels = list(clf.label_names)
    gold = np.array([labels.index(e.label) for e in examples])
    texts = [e.text for e in examples]
    t0 = time.perf_counter()
    flat_ms = {}
    xq, flat_all = embed_texts(clf, texts, batch_size, with_flat=clf.flat_head is not None, stage_ms=flat_ms)
    t1 = time.perf_counter()
    D_all, ranked = clf.index.search(xq, len(labels))  # (n, labels)
    t2 = time.perf_counter()
    D, I = D_all[:, :k].astype(np.float64), ranked[:, :k]
    logits = []
    for s in tqdm(range(0, len(texts), batch_size), desc=f"evaluate: rerank K={k}"):
        logits.append(clf._score(texts[s:s + batch_size], I[s:s + batch_size], xq=xq[s:s + batch_size]).reshape(-1, k))
    t3 = time.perf_counter()
    n = max(1, len(texts))
    # embed: the bi-encoder alone; flat: the flat classifier's pass (0 without one); rerank: stage 2 for every email
    ms = {"embed_ms_per_email": (1e3 * (t1 - t0) - flat_ms[contract.STAGE_FLAT]) / n, "flat_ms_per_email": flat_ms[contract.STAGE_FLAT] / n,
          "search_ms_per_email": 1e3 * (t2 - t1) / n, "rerank_ms_per_email": 1e3 * (t3 - t2) / n,
          "two_stage_ms_per_email": 1e3 * (t3 - t0) / n, "batch_size": batch_size}
    flat = None if flat_all is None else np.take_along_axis(flat_all, I, 1)
    return Scored(gold, xq, ranked, D, I, np.concatenate(logits).astype(np.float64), ms, flat, flat_all)


@dataclass(frozen=True)
class Policies:
    """The policies fitted on validation: the served one and those of the report's other variants."""
    fused: RerankPolicy  # every score the classifier has (the flat classifier's too, where it has one), no gate
    gated: RerankPolicy  # fused with the gate: what is served
    gate_report: dict
    ce_only: RerankPolicy  # the reranker alone
    two_stage: RerankPolicy  # cross-encoder and retrieval without the flat classifier (= fused where there is none)
    retrieval: RerankPolicy  # stage 1 alone
    two_stage_gated: RerankPolicy = None  # two_stage with its own gate: what a version answers once it drops the flat classifier
    flat_fusion: dict = None  # where `sc` has the flat classifier: whether validation's held-out likelihood fuses it, and its numbers


def fit_policy(sc: Scored, target: GateTarget = GateTarget(), flat_fusion: str = "auto") -> Policies:
    """On validation: fusion weights and temperature (NLL), the stage-1-only softmax (where the gate skips
    stage 2), then the gate. Where `sc` has the flat classifier's log-probabilities they are fused with flat_fusion
    "always", and with "auto" where fusing them lowers the held-out likelihood of validation's gold candidates
    (rerank_policy.flat_fusion_helps); else `fused` is the two stages alone (and the report's flat-fused variants are
    not made). Policies.flat_fusion: the decision and its numbers (None without a flat classifier)."""
    ok = sc.gold_pos >= 0
    pos = sc.gold_pos[ok]
    decision = None
    if sc.flat is not None:
        decision = flat_fusion_helps(sc.logits[ok], sc.D[ok], pos, sc.flat[ok])
        # the rule's own verdict is kept beside what the mode made of it (always / never override it)
        decision |= {"mode": flat_fusion, "held_out_gain": decision["fused"],
                     "fused": {"auto": decision["fused"], "always": True, "never": False}[flat_fusion]}
    flat = sc.flat if decision and decision["fused"] else None
    flat_ok = None if flat is None else flat[ok]
    fused = fit_retrieval_temperature(sc.D[ok], pos, fit_fusion(sc.logits[ok], sc.D[ok], pos, flat=flat_ok), flat=flat_ok)
    two_stage = fused if flat is None else fit_retrieval_temperature(sc.D[ok], pos, fit_fusion(sc.logits[ok], sc.D[ok], pos))
    retrieval = two_stage  # its retrieval softmax is stage 1's alone (no flat term): the same fit
    ce_only = fit_ce_only(sc.logits[ok], pos)  # the reranker alone, for the variants table
    gated, report = fit_gate(fused, sc.logits, sc.D, sc.gold_pos, target, flat=flat)
    two_stage_gated = None if flat is None else fit_gate(two_stage, sc.logits, sc.D, sc.gold_pos, target)[0]
    return Policies(fused, gated, report, ce_only, two_stage, retrieval, two_stage_gated, decision)


def predict(sc: Scored, policy: RerankPolicy, names, mode: str = "rerank") -> tuple:
    """mode: rerank (gate ignored: stage 2 for every email, none where the policy gives it no weight), gated (the policy's gate), retrieval (stage 1 only).
    -> (predicted names, confidence, reranked (n,) bool)."""
    if mode == "retrieval":
        skip = np.ones(len(sc.gold), dtype=bool)
    else:
        skip = policy.skip_rerank(sc.D, gate=(mode == "gated"))
    flat = sc.flat if policy.uses_flat else None
    p = np.where(skip[:, None], policy.retrieval_probabilities(sc.D, flat), policy.probabilities(sc.logits, sc.D, flat))  # (n, k)
    best = p.argmax(1)
    return [names[i] for i in sc.I[np.arange(len(best)), best]], p.max(1), ~skip


def variants(sc: Scored, names, policies: Policies, description_ranked=None) -> dict:
    """Each system variant of the report on one split: {name: metrics}. With a flat classifier fused, also the
    cross-encoder and retrieval without it (two_stage_without_flat) and retrieval with it, no cross-encoder
    (retrieval_flat: the gated path for every email)."""
    gold = [names[g] for g in sc.gold]
    out = {}
    if description_ranked is not None:  # stage 1 as it was: cosine to the label description only
        pred = [names[i] for i in description_ranked[:, 0]]
        out["bi_encoder_descriptions"] = system_metrics(gold, pred, np.ones(len(pred))) | {"ece": None}
    rows = [("bi_encoder", policies.retrieval, "retrieval"), ("cross_encoder_only", policies.ce_only, "rerank")]
    if policies.fused.uses_flat:
        rows += [("retrieval_flat", policies.fused, "retrieval"), ("two_stage_without_flat", policies.two_stage, "rerank")]
    for name, policy, mode in rows + [("two_stage_ungated", policies.fused, "rerank"), ("two_stage", policies.gated, "gated")]:
        pred, conf, reranked = predict(sc, policy, names, mode)
        out[name] = system_metrics(gold, pred, conf) | {"share_reranked": float(reranked.mean())}
    return out
