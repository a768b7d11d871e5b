"""Hard-candidate mining: each training email's top-K labels from the trained bi-encoder, turned
into the listwise rows the cross-encoder trains on (the same K candidates it will rerank at
inference; the gold label is put in when retrieval missed it, positions shuffled)."""

import random

import numpy as np

from mailroute.label_index import LabelIndex
from training.bi_encoder import embed


def mine_candidates(model, texts: list, index: LabelIndex, k: int) -> np.ndarray:
    """(n,) texts -> (n, k) label ids, best first."""
    _, I = index.search(embed(model, texts), k)
    return I


def listwise_rows(examples: list, candidates: np.ndarray, index: LabelIndex, seed: int) -> dict:
    """-> {"query": [...], "docs": [[K label texts]], "labels": [[0/1 x K]]}, exactly one 1 per row."""
    tax = index.taxonomy
    texts = tax.texts
    rng = random.Random(seed)
    rows = {"query": [], "docs": [], "labels": []}
    for e, cand in zip(examples, candidates):
        gold = tax.index(e.label)
        cand = [int(c) for c in cand]
        if gold not in cand:
            cand[-1] = gold  # retrieval missed: the gold replaces the weakest candidate
        rng.shuffle(cand)  # else the gold sits at position 0 most of the time and position leaks
        rows["query"].append(e.text)
        rows["docs"].append([texts[c] for c in cand])
        rows["labels"].append([int(c == gold) for c in cand])
    return rows
