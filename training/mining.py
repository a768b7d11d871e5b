"""Hard-candidate mining: each training email's top-K labels, turned into the listwise rows the
cross-encoder trains on (the same K candidates it will rerank at inference; the gold label is put in
when retrieval missed it, positions shuffled).

Training emails are also exemplars of the label index, so mining them against the full index would
find each email itself and retrieve its gold label almost always: the cross-encoder would never see
the hard lists an unseen email gets. Two remedies, chosen by the caller:
  leave-one-out (default, free): an email is not its own exemplar while its candidates are mined;
  out-of-fold (oof_folds >= 2, costs one bi-encoder per fold): a fold's candidates come from an
    encoder and an index that never saw that fold's emails.
"""

import random

import numpy as np

from mailroute.label_index import LabelIndex
from mailroute.rerank_policy import retrieval_margin
from training.bi_encoder import embed


def mine_candidates(model, texts: list, index: LabelIndex, k: int, exclude: np.ndarray = None, x: np.ndarray = None) -> tuple:
    """(n,) texts -> label ids I (n, k) best first, and every label's retrieval score S (n, labels).
    exclude: (n,) exemplar row of each email in the index (-1 none), left out of its own scores."""
    xq = embed(model, texts) if x is None else x  # (n, dim)
    S = index.label_scores(xq, exclude=exclude)  # (n, labels)
    I = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return I, S


def exemplar_rows(index: LabelIndex, examples: list) -> np.ndarray:
    """(n,) row of each example's text among the index's exemplars of its label, -1 where absent."""
    where = {(int(l), t): r for r, (l, t) in enumerate(zip(index.exemplar_labels, index.exemplar_texts))}
    return np.array([where.get((index.taxonomy.index(e.label), e.text), -1) for e in examples], dtype=np.int64)


def least_sure(candidates: np.ndarray, scores: np.ndarray, share: float) -> np.ndarray:
    """Indices (ascending) of the ceil(share x n) emails retrieval is least sure of: the smallest margin between
    their two best candidates' retrieval scores, the margin the serving gate reads to decide whether stage 2
    runs. So the cross-encoder can train on the lists it will rerank at inference. share 1 (or K < 2): every email.
    candidates (n, K) best first; scores (n, labels)."""
    n = len(candidates)
    if share >= 1 or candidates.shape[1] < 2:
        return np.arange(n)
    margin = retrieval_margin(np.take_along_axis(scores, candidates[:, :2], axis=1))
    keep = int(np.ceil(share * n))
    return np.sort(np.argsort(margin, kind="stable")[:keep])


def fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    """(n,) fold of each example, balanced, shuffled with the seed."""
    if folds < 2:
        raise ValueError(f"out-of-fold mining expects at least 2 folds, but got {folds}")
    ids = np.arange(n) % folds
    np.random.default_rng(seed).shuffle(ids)
    return ids


def mine_out_of_fold(examples: list, folds: int, k: int, seed: int, train_fold_encoder, build_index) -> tuple:
    """Out-of-fold candidates: for each fold f, `train_fold_encoder(other_examples) -> model` and
    `build_index(model, other_examples) -> LabelIndex`, then mine fold f's emails with them.

    Returns (I (n, k), S (n, labels), folds (n,)); no fold's emails ever reach its own encoder or index."""
    f = fold_ids(len(examples), folds, seed)
    I, S = [None] * len(examples), [None] * len(examples)
    for fold in range(folds):
        held = np.flatnonzero(f == fold)
        rest = [examples[i] for i in np.flatnonzero(f != fold)]
        model = train_fold_encoder(rest)
        index = build_index(model, rest)
        Ii, Si = mine_candidates(model, [examples[i].text for i in held], index, k)
        for j, i in enumerate(held):
            I[i], S[i] = Ii[j], Si[j]
    return np.stack(I), np.stack(S), f


def listwise_rows(examples: list, candidates: np.ndarray, index: LabelIndex, seed: int, scores: np.ndarray = None,
                  x: np.ndarray = None, exclude: np.ndarray = None) -> dict:
    """-> {"query": [...], "docs": [[K label texts]], "retrieval": [[K retrieval scores]], "labels": [[0/1 x K]]},
    exactly one 1 per row ("retrieval" only when scores (n, labels) are given).

    The label side is what serving reads (`LabelIndex.pair_cards`): the fixed cards, or where the index's
    cards show the nearest exemplars, cards made for each email from its embedding x[n] (required then), never
    showing the email itself (exclude[n]: its exemplar row, -1 none)."""
    tax = index.taxonomy
    nearest = index.card_spec.nearest and index.exemplar_index is not None
    if nearest and x is None:
        raise ValueError("listwise_rows: this index's cards show each email's nearest exemplars; pass the emails' embeddings x")
    texts = None if nearest else index.label_texts
    rng = random.Random(seed)
    rows = {"query": [], "docs": [], "labels": []} | ({"retrieval": []} if scores is not None else {})
    for n, (e, cand) in enumerate(zip(examples, candidates)):
        gold = tax.index(e.label)
        cand = [int(c) for c in cand]
        if gold not in cand:
            cand[-1] = gold  # retrieval missed: the gold replaces the weakest candidate
        rng.shuffle(cand)  # else the gold sits at position 0 most of the time and position leaks
        rows["query"].append(e.text)
        rows["docs"].append(index.pair_cards(x[n:n + 1], [cand], None if exclude is None else exclude[n:n + 1]) if nearest
                            else [texts[c] for c in cand])
        rows["labels"].append([int(c == gold) for c in cand])
        if scores is not None:
            rows["retrieval"].append([float(scores[n, c]) for c in cand])
    # column order is input order for the trainer: query, docs, retrieval (the loss's optional third input);
    # labels are taken out by name
    return {k: rows[k] for k in ("query", "docs", "retrieval", "labels") if k in rows}
