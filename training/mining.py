"""Hard-candidate mining: each training email's top-K labels from the trained bi-encoder, turned
into the listwise rows the cross-encoder trains on (the same K candidates it will rerank at
inference; the gold label is put in when retrieval missed it, positions shuffled)."""

import random

import numpy as np

from mailroute.label_index import LabelIndex
from training.bi_encoder import embed


def mine_candidates(model, texts: list, index: LabelIndex, k: int) -> tuple:
    """(n,) texts -> label ids I (n, k) best first, and the cosine of every email to every label S (n, labels)."""
    xq = embed(model, texts)  # (n, dim)
    _, I = index.search(xq, k)
    xb = index.index.reconstruct_n(0, index.index.ntotal)  # (labels, dim)
    return I, xq @ xb.T


def listwise_rows(examples: list, candidates: np.ndarray, index: LabelIndex, seed: int, scores: np.ndarray = None) -> dict:
    """-> {"query": [...], "docs": [[K label texts]], "prior": [[K retrieval scores]], "labels": [[0/1 x K]]},
    exactly one 1 per row ("prior" only when scores are given)."""
    tax = index.taxonomy
    texts = tax.texts
    rng = random.Random(seed)
    rows = {"query": [], "docs": [], "labels": []} | ({"prior": []} if scores is not None else {})
    for n, (e, cand) in enumerate(zip(examples, candidates)):
        gold = tax.index(e.label)
        cand = [int(c) for c in cand]
        if gold not in cand:
            cand[-1] = gold  # retrieval missed: the gold replaces the weakest candidate
        rng.shuffle(cand)  # else the gold sits at position 0 most of the time and position leaks
        rows["query"].append(e.text)
        rows["docs"].append([texts[c] for c in cand])
        rows["labels"].append([int(c == gold) for c in cand])
        if scores is not None:
            rows["prior"].append([float(scores[n, c]) for c in cand])
    # column order is input order for the trainer: query, docs, prior; labels are taken out by name
    return {k: rows[k] for k in ("query", "docs", "prior", "labels") if k in rows}
