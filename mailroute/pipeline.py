"""The two-stage pipeline as a plain Python class: normalise -> tokenise -> embed (and, where the policy fuses
it, the flat classifier's log-probabilities) -> label index top-K (descriptions + exemplars) -> the gate
(retrieval sure? stage 2 skipped) -> rerank the K (email, label card) pairs -> the RerankPolicy's softmax
over the K fused scores.

It does not know what runs the encoders: `Encoders` is PyTorch for the in-process reference
classifier (training/reference.py), onnxruntime in-process (mailroute/onnx_encoders.py), BLS
calls to the bi_encoder / cross_encoder (/ flat_encoder) Triton models (export/triton/email_classifier.py), or the
torch runtime's encoders inside the classifier's own process (mailroute/torch_encoders.TorchEncoders,
when its config's "encoders" parameter says so). So all four produce the same answers from the same
code (within float rounding; fp16 on a GPU), and tests run it without Triton.
"""

import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
from tokenizers import Tokenizer

from mailroute import contract
from mailroute.flat_head import FlatHead
from mailroute.label_index import LabelIndex
from mailroute.normalise import InvalidEmail, normalise
from mailroute.rerank_policy import RerankPolicy
from mailroute.settings import DEFAULTS


class Encoders(Protocol):
    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(n, seq) int64 -> (n, dim) float32, mean pooled and L2 normalised."""

    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        """(n, seq) int64 pairs -> (n,) float32 raw logits."""

    def flat_embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(n, seq) int64 -> (n, dim) float32: the flat classifier's encoder, as embed (only where the classifier has
        a flat head; the bi-encoder's inputs, since both encoders share one tokenizer). Encoders without the flat
        classifier raise NoFlatClassifier."""


class NoFlatClassifier(ValueError):
    """The flat classifier was asked of encoders (or a classifier) that hold none: a policy or caller that fuses it met
    a version exported without it. One message for every runtime, naming what lacked it."""

    def __init__(self, what: str = "these encoders", hint: str = "fuse it only where the version pins one"):
        super().__init__(f"no flat classifier ({contract.FLAT_ENCODER}) in {what}: {hint}")


class BadParameter(ValueError):
    """A request parameter (top_k, threshold) out of range or of the wrong type."""


def check_params(top_k, threshold, n_labels: int) -> tuple:
    if isinstance(top_k, (bool, np.bool_)):  # int(True) is 1: a JSON true would silently mean K=1
        raise BadParameter(f"top_k must be an integer, got {top_k!r}")
    if isinstance(threshold, (bool, np.bool_)):  # float(True) is 1.0: every row would need review
        raise BadParameter(f"threshold must be a number, got {threshold!r}")
    try:
        k = int(top_k)
        if k != float(top_k):
            raise ValueError
    except (TypeError, ValueError, OverflowError):  # int(inf) overflows: refused like any other non-integer
        raise BadParameter(f"top_k must be an integer, got {top_k!r}") from None
    if not 1 <= k <= n_labels:
        raise BadParameter(f"top_k must be between 1 and {n_labels} (labels in the taxonomy), got {k}")
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise BadParameter(f"threshold must be a number, got {threshold!r}") from None
    if not 0.0 <= t <= 1.0:
        raise BadParameter(f"threshold must be between 0 and 1, got {t}")
    return k, t


@dataclass
class Prediction:
    label: str
    probability: float
    top_labels: list
    top_probabilities: list
    needs_review: bool
    error: str = ""
    reranked: bool = False  # stage 2 ran for this email (False where the gate found retrieval sure or the CE has no weight)
    error_kind: str = ""  # empty | not_utf8 | too_large (mailroute.normalise.InvalidEmail.kind)
    stage_ms: dict = field(default_factory=dict)


def load_tokenizer(path, max_length: int) -> Tokenizer:
    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(max_length)  # longest_first, as HF / sentence-transformers truncate pairs
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def pad_stack(arrays: list) -> np.ndarray:
    """Token arrays of different sequence lengths (requests of one server batch) -> one array, right-padded
    with 0 (masked out)."""
    width = max(a.shape[1] for a in arrays)
    return np.concatenate([np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in arrays])


def execute_encoder(pb_utils, requests, inputs: list, output: str, run) -> list:
    """One server batch of encoder requests (the Python-backend adapters of every runtime): stack the
    requests' token arrays (padded), `run({input name: array}) -> (rows, ...)`, split the answer back per
    request. A failure answers every request with the reason and the model keeps serving. pb_utils is
    passed in: it exists only inside Triton's backend process."""
    feeds = [[pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in inputs] for r in requests]
    try:
        out = run({n: pad_stack([f[j] for f in feeds]) for j, n in enumerate(inputs)})
    except Exception as e:  # e.g. wrong shapes
        return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{output}: {e}")) for _ in requests]
    responses, start = [], 0
    for f in feeds:
        n = f[0].shape[0]
        responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(output, out[start:start + n])]))
        start += n
    return responses


def tensors(encodings) -> tuple:
    ids = np.array([e.ids for e in encodings], dtype=contract.TOKEN_DTYPE)  # (n, seq)
    mask = np.array([e.attention_mask for e in encodings], dtype=contract.TOKEN_DTYPE)
    types = np.array([e.type_ids for e in encodings], dtype=contract.TOKEN_DTYPE)
    return ids, mask, types


def _without_lengths(tok: Tokenizer) -> dict:
    """A tokenizer's definition without its truncation and padding settings."""
    d = json.loads(tok.to_str())
    d.pop("truncation", None)
    d.pop("padding", None)
    return d


def same_tokenisation(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers split every text alike (their truncation and padding aside)."""
    return _without_lengths(a) == _without_lengths(b)


def padded_tensors(encodings) -> tuple:
    """Unpadded encodings -> (ids, mask, type ids), right-padded with 0 (masked out), as the tokenizer's
    batch padding would give (the Assembler's rows that post_process builds). Filled through one flat copy
    per tensor: a Python loop over rows costs as much as tokenising them."""
    n = len(encodings)
    ids_rows = [e.ids for e in encodings]
    lens = np.fromiter(map(len, ids_rows), dtype=np.int64, count=n)
    mask = np.arange(int(lens.max()) if n else 0)[None, :] < lens[:, None]  # (n, width)
    ids, types = (np.zeros(mask.shape, dtype=contract.TOKEN_DTYPE) for _ in range(2))
    ids[mask] = np.fromiter(itertools.chain.from_iterable(ids_rows), dtype=contract.TOKEN_DTYPE, count=int(lens.sum()))
    types[mask] = np.fromiter(itertools.chain.from_iterable(e.type_ids for e in encodings), dtype=contract.TOKEN_DTYPE,
                              count=int(lens.sum()))
    return ids, mask.astype(contract.TOKEN_DTYPE), types


@dataclass(frozen=True)
class Parts:
    """Texts tokenised without special tokens, flattened for array arithmetic."""
    encodings: list  # tokenizers.Encoding per text (a list, or made on demand): post_process's input where a row is checked
    pool: np.ndarray  # every token id, text after text
    offsets: np.ndarray  # (texts,) where each text starts in pool
    lengths: np.ndarray  # (texts,)

    @classmethod
    def of(cls, encodings: list) -> "Parts":
        rows = [e.ids for e in encodings]
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        pool = np.fromiter(itertools.chain.from_iterable(rows), dtype=contract.TOKEN_DTYPE, count=int(lengths.sum()))
        return cls(list(encodings), pool, np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64), lengths)


class _CardRows:
    """`Parts.encodings` of cards made from pieces: card i tokenised whole, only when asked (the Assembler asks
    for the first row of each new length pair, and for rows it lays out by post_process)."""

    def __init__(self, tok: Tokenizer, cards: list):
        self.tok, self.cards = tok, cards  # per row, its card's pieces

    def __len__(self) -> int:
        return len(self.cards)

    def __getitem__(self, i):
        return self.tok.encode("".join(self.cards[i]), add_special_tokens=False)


# tokenizer parts under which pieces meeting at a space tokenise as the whole text does: words are split at
# whitespace before the model sees them, normalising never joins characters across a space, and no added
# token (matched in the raw text first) contains whitespace
_WORD_SPLITTERS = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}
_WORD_NORMALISERS = {"BertNormalizer", "Lowercase", "NFD", "NFKD", "NFC", "NFKC", "StripAccents"}


def _splits_words_at_whitespace(tok: Tokenizer) -> bool:
    d = json.loads(tok.to_str())
    norm, pre = d.get("normalizer"), d.get("pre_tokenizer")
    norms = [] if norm is None else (norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm])
    return (pre is not None and pre.get("type") in _WORD_SPLITTERS and all(n.get("type") in _WORD_NORMALISERS for n in norms)
            and d.get("model", {}).get("type") in ("WordPiece", "WordLevel")
            and not any(any(ch.isspace() for ch in t.get("content", "")) for t in d.get("added_tokens") or []))


class CardTokens:
    """Per-email label cards (CardSpec.nearest) tokenised piece by piece: each piece of a card (its label's
    description, an example cut to its length, a separator; `CardSpec.segments`) is tokenised once and
    remembered, and a card's tokens are its pieces' end to end. Tokenising every distinct card of a batch
    whole cost 194 of 225 ms of CPU per 256 emails at K=10 (benchmarks/cpu_side.py --nearest), though the
    same exemplars come back batch after batch.

    Exact where the tokenizer splits words at whitespace first and normalises within words (BERT's tokenizer;
    `_splits_words_at_whitespace`), since pieces meet at spaces; any other tokenizer (byte-level
    BPE reads a space as part of the next word) gets each card tokenised whole. The first cards an instance
    makes are also checked against whole-card tokenisation, and one difference switches it to whole cards
    for good (tests hold both equal)."""

    MAX_CARDS = 1 << 16  # cards remembered (their tokens); then forgotten all at once
    MAX_PIECES = 1 << 17  # pieces remembered (an exemplar is one or two: cut to its length, or shorter at a card's end)
    CHECK_FIRST = 256  # cards checked against tokenising them whole

    def __init__(self, tok: Tokenizer):  # a tokenizer that neither truncates nor pads (the pair is cut as a whole)
        self.tok = tok
        self.by_pieces = _splits_words_at_whitespace(tok)
        self.pieces = {}  # piece -> its token ids
        self.cards = {}  # card key -> (its token ids, its pieces)
        self.unchecked = self.CHECK_FIRST

    def __call__(self, keys: np.ndarray, pieces_of) -> tuple:
        """keys: (pairs,) or (pairs, m) ints naming each pair's card (`LabelIndex.pair_card_keys`); pieces_of(key)
        -> that card's pieces -> (the distinct cards tokenised (Parts), each pair's row in them)."""
        keys = np.asarray(keys, dtype=np.int64)
        if not len(keys):
            return Parts.of([]), np.zeros(0, np.int64)
        distinct, card_of = np.unique(keys.reshape(len(keys), -1), axis=0, return_inverse=True)
        distinct = [tuple(k) for k in distinct.tolist()]
        card_of = card_of.reshape(-1)
        if not self.by_pieces:
            return Parts.of(self.tok.encode_batch(["".join(pieces_of(k)) for k in distinct], add_special_tokens=False)), card_of
        new = [k for k in distinct if k not in self.cards]
        if len(self.cards) + len(new) > self.MAX_CARDS:
            self.cards.clear()
            new = distinct
        if new:
            self._tokenise(new, pieces_of)
        rows = [self.cards[k] for k in distinct]
        lengths = np.fromiter((len(ids) for ids, _ in rows), dtype=np.int64, count=len(rows))
        pool = np.concatenate([ids for ids, _ in rows] or [np.zeros(0, contract.TOKEN_DTYPE)])
        parts = Parts(_CardRows(self.tok, [pieces for _, pieces in rows]), pool,
                      np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64), lengths)
        if self.unchecked > 0:
            n = min(self.unchecked, len(distinct))
            self.unchecked -= n
            whole = self.tok.encode_batch(["".join(pieces_of(k)) for k in distinct[:n]], add_special_tokens=False)
            if any(w.ids != parts.pool[o:o + ln].tolist() for w, o, ln in zip(whole, parts.offsets, parts.lengths)):
                self.by_pieces = False
                self.cards.clear()
                return self(keys, pieces_of)
        return parts, card_of

    def _tokenise(self, keys: list, pieces_of) -> None:
        """Remember these cards' tokens, tokenising only the pieces not seen before."""
        cards = [pieces_of(k) for k in keys]
        new = [p for p in dict.fromkeys(itertools.chain.from_iterable(cards)) if p not in self.pieces]
        if len(self.pieces) + len(new) > self.MAX_PIECES:
            self.pieces.clear()
            new = list(dict.fromkeys(itertools.chain.from_iterable(cards)))
        self.pieces.update((p, np.asarray(e.ids, dtype=contract.TOKEN_DTYPE))
                           for p, e in zip(new, self.tok.encode_batch(new, add_special_tokens=False)))
        empty = np.zeros(0, contract.TOKEN_DTYPE)
        for k, card in zip(keys, cards):
            self.cards[k] = (np.concatenate([self.pieces[p] for p in card] or [empty]), card)


class Assembler:
    """Encoder inputs (ids, mask, type ids; right-padded with 0) from texts tokenised once without special
    tokens, laid out as the tokenizer's own post-processing lays them out (truncation, special tokens, type
    ids), for a whole batch in array arithmetic: calling post_process row by row cost ~50 us a pair, 130 of
    the ~250 ms of CPU per 256 emails at K=10 (benchmarks/cpu_side.py).

    A row is [specials] A [specials] (B [specials]): where the parts sit among the specials and their type ids
    are read once off post_process on placeholder texts (any template of that form: BERT's, RoBERTa's, ...),
    and the parts are cut by longest-first truncation (`load_tokenizer`'s). Each distinct (length of A, length
    of B) is then checked once against post_process on a real row; lengths that differ, a template of another
    form or another truncation rule are assembled by post_process row by row ever after, so the tensors are
    post_process's in every case (tested)."""

    MAX_CHECKED = 1 << 16  # distinct length pairs remembered

    def __init__(self, tok: Tokenizer):  # a tokenizer that truncates (or not) but does not pad
        self.tok = tok
        t = tok.truncation  # None: no truncation
        self.max_length = None if t is None else t["max_length"]
        self.known_rule = t is None or t.get("strategy") == "longest_first"  # others: post_process row by row
        self.left = t is not None and t.get("direction") == "left"
        empty = tok.encode("", add_special_tokens=False)
        self.specials = {1: tok.post_process(empty), 2: tok.post_process(empty, empty)}  # ids, type ids of the specials
        # where A (and B) sit among the specials, per number of parts: found once on placeholder texts, never on
        # an email (one that spells "[CLS]" would fit a wrong layout); None: not found, post_process row by row
        self.split = {n: self._find_split(n) for n in (1, 2)} if self.known_rule else {1: None, 2: None}
        self.checked = {}  # (len A, len B or -1) -> (kept of A, kept of B), or None: post_process row by row

    def _kept(self, la: int, lb: int) -> tuple:
        """Tokens longest-first truncation keeps of each part (a tie gives the odd token to the second)."""
        budget = None if self.max_length is None else self.max_length - len(self.specials[1 if lb < 0 else 2].ids)
        lb0 = max(lb, 0)
        if budget is None or la + lb0 <= budget:
            return la, lb0
        if lb < 0:
            return budget, 0
        short = min(la, lb0)
        if short <= budget // 2:
            return (budget - short, short) if la > lb0 else (short, budget - short)
        return ((budget + 1) // 2, budget // 2) if la > lb0 else (budget // 2, (budget + 1) // 2)

    def _row(self, split: tuple, a, b, kept) -> tuple:
        """One row laid out by `split` (ids, type ids as lists)."""
        s0, s1, ta_type, tb_type = split
        sp = self.specials[1 if b is None else 2]
        ka, kb = kept
        a_ids = a.ids[len(a.ids) - ka:] if self.left else a.ids[:ka]
        b_ids = [] if b is None else (b.ids[len(b.ids) - kb:] if self.left else b.ids[:kb])
        ids = sp.ids[:s0] + a_ids + sp.ids[s0:s0 + s1] + b_ids + sp.ids[s0 + s1:]
        types = sp.type_ids[:s0] + [ta_type] * ka + sp.type_ids[s0:s0 + s1] + [tb_type] * kb + sp.type_ids[s0 + s1:]
        return ids, types

    def _find_split(self, n: int):
        """(specials before A, specials between A and B, type id of A, of B) that reproduce post_process on the
        placeholder texts "a" (and "b"), when exactly one does; else None."""
        a = self.tok.encode("a", add_special_tokens=False)
        b = self.tok.encode("b", add_special_tokens=False) if n == 2 else None
        if not a.ids or (b is not None and not b.ids):
            return None
        want = self.tok.post_process(a, b)
        kept = self._kept(len(a.ids), -1 if b is None else len(b.ids))
        if not kept[0] or (b is not None and not kept[1]):
            return None
        n_sp, fits = len(self.specials[n].ids), []
        for s0 in range(n_sp + 1):
            for s1 in range(n_sp - s0 + 1 if n == 2 else 1):
                b_at = s0 + kept[0] + s1
                if b_at >= len(want.type_ids) and n == 2:
                    continue
                split = (s0, s1, want.type_ids[s0], want.type_ids[b_at] if n == 2 else 0)
                if self._row(split, a, b, kept) == (want.ids, want.type_ids):
                    fits.append(split)
        return fits[0] if len(fits) == 1 else None

    def _check(self, a, b) -> tuple:
        """(kept of A, kept of B) for this row's lengths where the layout gives post_process's answer, else None."""
        key = (len(a.ids), -1 if b is None else len(b.ids))
        if key in self.checked:
            return self.checked[key]
        split, kept = self.split[1 if b is None else 2], None
        if split is not None:
            kept, want = self._kept(*key), self.tok.post_process(a, b)
            if self._row(split, a, b, kept) != (want.ids, want.type_ids):
                kept = None
        if len(self.checked) >= self.MAX_CHECKED:
            self.checked.clear()
        self.checked[key] = kept
        return kept

    def __call__(self, first: Parts, rows_first, second: Parts = None, rows_second=None) -> tuple:
        """Rows pairing first[rows_first[i]] with second[rows_second[i]] (or first alone) -> (ids, mask, type ids)."""
        fi = np.asarray(rows_first, dtype=np.int64)
        si = None if second is None else np.asarray(rows_second, dtype=np.int64)
        n, n_parts = len(fi), 1 if second is None else 2
        la = first.lengths[fi]
        lb = np.full(n, -1) if si is None else second.lengths[si]
        keys, inverse = np.unique(np.stack([la, lb], 1), axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        kept = np.zeros((len(keys), 2), dtype=np.int64)
        fallback = np.zeros(len(keys), dtype=bool)
        for u, (len_a, len_b) in enumerate(keys.tolist()):
            got = self.checked.get((len_a, len_b), False)
            if got is False:  # not seen yet: checked on the first row with these lengths
                r = int(np.argmax(inverse == u))
                got = self._check(first.encodings[fi[r]], None if si is None else second.encodings[si[r]])
            if got is None:
                fallback[u] = True
            else:
                kept[u] = got
        ta, tb = kept[inverse, 0], kept[inverse, 1]  # (n,)
        s0, s1, type_a, type_b = self.split[n_parts] or (0, 0, 0, 0)  # no split: every row fell back above
        sp_ids = np.asarray(self.specials[n_parts].ids, dtype=contract.TOKEN_DTYPE)
        sp_types = np.asarray(self.specials[n_parts].type_ids, dtype=contract.TOKEN_DTYPE)
        end_a = s0 + ta
        start_b = end_a + s1
        end_b = start_b + tb
        end = end_b + len(sp_ids) - s0 - s1
        width = int(end.max()) if n else 0
        j = np.arange(width)[None, :]
        c = lambda v: v[:, None]  # noqa: E731 - per row, against the column positions
        # where each position's token comes from: a special, A (a prefix or, truncating left, a suffix), B
        special_at = np.where(j < s0, j, np.where(j < c(end_a), 0, np.where(j < c(start_b), j - c(end_a) + s0,
                                                                             np.where(j < c(end_b), 0, j - c(end_b) + s0 + s1))))
        in_a = (j >= s0) & (j < c(end_a))
        in_b = (j >= c(start_b)) & (j < c(end_b))
        mask = j < c(end)
        a_from = c(first.offsets[fi] + (la - ta if self.left else 0)) + j - s0
        ids = np.where(mask, sp_ids[np.clip(special_at, 0, max(len(sp_ids) - 1, 0))] if len(sp_ids) else 0, 0)
        ids = np.where(in_a, first.pool[np.clip(a_from, 0, max(len(first.pool) - 1, 0))] if len(first.pool) else 0, ids)
        types = np.where(mask, sp_types[np.clip(special_at, 0, max(len(sp_types) - 1, 0))] if len(sp_types) else 0, 0)
        types = np.where(in_a, type_a, types)
        if si is not None:
            b_from = c(second.offsets[si] + (lb - tb if self.left else 0)) + j - c(start_b)
            ids = np.where(in_b, second.pool[np.clip(b_from, 0, max(len(second.pool) - 1, 0))] if len(second.pool) else 0, ids)
            types = np.where(in_b, type_b, types)
        ids, types, mask = ids.astype(contract.TOKEN_DTYPE), types.astype(contract.TOKEN_DTYPE), mask.astype(contract.TOKEN_DTYPE)
        slow = np.flatnonzero(fallback[inverse])
        if len(slow):  # rows whose lengths the layout does not reproduce: post_process, merged in
            encs = [self.tok.post_process(first.encodings[fi[r]], None if si is None else second.encodings[si[r]]) for r in slow]
            ids_s, mask_s, types_s = padded_tensors(encs)
            grow = max(0, ids_s.shape[1] - width)
            ids, mask, types = (np.pad(x, ((0, 0), (0, grow))) for x in (ids, mask, types))
            for x, y in ((ids, ids_s), (mask, mask_s), (types, types_s)):
                x[slow] = 0
                x[slow, :y.shape[1]] = y
            width = int(mask.sum(1).max()) if n else 0  # rows shorter than before keep no extra padding
            ids, mask, types = ids[:, :width], mask[:, :width], types[:, :width]
        return ids, mask, types


class TwoStageClassifier:
    """classify(emails) -> label, probability, top-K labels with probabilities, needs_review."""

    def __init__(self, encoders: Encoders, label_index: LabelIndex, bi_tokenizer: Tokenizer, cross_tokenizer: Tokenizer,
                 top_k: int = DEFAULTS.top_k, threshold: float = DEFAULTS.threshold, policy: RerankPolicy = None,
                 embed_batch: int = DEFAULTS.embed_batch, score_batch: int = DEFAULTS.score_batch, flat_head: FlatHead = None):
        self.encoders, self.index = encoders, label_index
        self.bi_tok, self.cross_tok = bi_tokenizer, cross_tokenizer
        self.label_names = np.array(label_index.taxonomy.names, dtype=object)
        self.label_texts = label_index.label_texts  # label cards (description + examples) or descriptions
        self.top_k, self.threshold = check_params(top_k, threshold, len(self.label_names))
        self.embed_batch, self.score_batch = embed_batch, score_batch
        self.policy = policy or RerankPolicy()  # fusion, temperature and gate: fitted on validation
        # the flat classifier's head over the encoders' flat_embed (None: no flat classifier; the policy must not fuse it)
        self.flat_head = None if flat_head is None else flat_head.check(label_index.taxonomy.names)
        if self.policy.uses_flat and self.flat_head is None:
            raise NoFlatClassifier("this classifier (no flat head), but its rerank policy fuses the flat log-probabilities",
                                   hint="give the flat head, or the policy's without_flat()")

    def prepare(self, bodies: Sequence, subjects: Sequence = None) -> tuple:
        """Normalise every row; a row that cannot be classified gets an error instead of raising."""
        texts, errors = [], []
        for i, body in enumerate(bodies):
            try:
                texts.append(normalise(body, subjects[i] if subjects is not None else None))
                errors.append("")
            except InvalidEmail as e:
                texts.append(None)
                errors.append(e)
        return texts, errors

    def embed(self, texts: list, parts: Parts = None) -> np.ndarray:
        """(n, dim) bi-encoder embeddings (the flat classifier not run). `parts`: the texts already tokenised without
        special tokens (as score_candidates tokenises once for both stages), turned into the bi-encoder's input as its
        own post-processing lays it out instead of tokenising again."""
        return self.encode(texts, parts, with_flat=False)[0]

    def encode(self, texts: list, parts: Parts = None, with_flat: bool = None, stage_ms: dict = None) -> tuple:
        """-> ((n, dim) embeddings, (n, labels) the flat classifier's log-probabilities or None). with_flat: run the
        flat encoder on the same token tensors (default: where the policy fuses it). stage_ms: gets "flat", the ms
        the flat classifier took (its encoder and head; the caller counts the rest as "embed")."""
        single = self._tokenizers()[2]
        with_flat = self.policy.uses_flat if with_flat is None else with_flat
        if with_flat and self.flat_head is None:
            raise NoFlatClassifier("this classifier (no flat head)", hint="encode with_flat=False")
        out, flat, flat_s = [], [], 0.0
        for s in range(0, len(texts), self.embed_batch):
            if parts is not None and single is not None:
                ids, mask, _ = self._assemblers()[1](parts, np.arange(s, min(s + self.embed_batch, len(texts))))
            else:
                ids, mask, _ = tensors(self.bi_tok.encode_batch(texts[s:s + self.embed_batch]))
            out.append(self.encoders.embed(ids, mask))
            if with_flat:
                t = time.perf_counter()
                flat.append(self.flat_head.log_probabilities(self.encoders.flat_embed(ids, mask)))
                flat_s += time.perf_counter() - t
        if stage_ms is not None:
            stage_ms[contract.STAGE_FLAT] = flat_s * 1e3
        return np.concatenate(out).astype(np.float32), np.concatenate(flat) if with_flat else None  # (n, dim), (n, labels)

    def _label_parts(self) -> Parts:
        """Each label text tokenised once per classifier (no special tokens, whole)."""
        if getattr(self, "_label_parts_of", None) is not self.label_texts:  # label texts replaced: tokenise again
            self._label_parts_cache = Parts.of(self._tokenizers()[0].encode_batch(list(self.label_texts), add_special_tokens=False))
            self._label_parts_of = self.label_texts
        return self._label_parts_cache

    def _card_tokens(self) -> CardTokens:
        """Nearest cards tokenised with the parts tokenizer; it remembers cards by their keys, so it is made
        anew when the label index is replaced (its exemplar rows may mean other emails)."""
        part_tok = self._tokenizers()[0]
        of = getattr(self, "_cards_of", (None, None))
        if of[0] is not part_tok or of[1] is not self.index:
            self._cards, self._cards_of = CardTokens(part_tok), (part_tok, self.index)
        return self._cards

    def _assemblers(self) -> tuple:
        """(pairs, single): the Assemblers of the cross-encoder's pairs and the bi-encoder's single texts (single
        None where _tokenizers() has no single copy); made with the copies, so they remember checked lengths."""
        toks = self._tokenizers()
        if getattr(self, "_asm_of", None) is not toks:
            self._asm, self._asm_of = (Assembler(toks[1]), None if toks[2] is None else Assembler(toks[2])), toks
        return self._asm

    def _tokenizers(self) -> tuple:
        """(parts, pairs, single): copies of the encoders' tokenizers that never pad (the Assembler pads a
        batch; a padded part would carry its [PAD]s into a pair). `parts` (the cross-encoder's) does not
        truncate either: the longest-first cut of a pair depends on both parts' whole lengths. `pairs`
        truncates pairs like the cross-encoder's; `single` truncates one text like the bi-encoder's, and is
        None where the two tokenizers differ in more than their lengths (then each stage tokenises itself)."""
        if getattr(self, "_toks_of", None) != (self.bi_tok, self.cross_tok):
            parts, pairs, single = (Tokenizer.from_str(t.to_str()) for t in (self.cross_tok, self.cross_tok, self.bi_tok))
            for t in (parts, pairs, single):
                t.no_padding()
            parts.no_truncation()
            same = same_tokenisation(self.bi_tok, self.cross_tok)
            self._toks, self._toks_of = (parts, pairs, single if same else None), (self.bi_tok, self.cross_tok)
        return self._toks

    def _score(self, texts: list, candidates, parts: Parts = None, rows=None, xq: np.ndarray = None) -> np.ndarray:
        """Cross-encoder logits of each email against each of its candidate label ids, flattened in order:
        (sum of len(candidates[i]),). Each email is tokenised once (not once per candidate; `parts`: already
        tokenised by score_candidates, texts[i] being parts' row rows[i]) and each label once per classifier; the pairs are laid out as the
        tokenizer's own post-processing lays them out (longest-first truncation, [CLS] a [SEP] b [SEP], type ids;
        Assembler), so the tensors equal encode_batch on the text pairs (tests hold them equal). Tokenising the
        K pairs of every email was most of the CPU time per email (measured: 480 of 584 ms per 256 emails at K=10
        on 2 cores), then post-processing them pair by pair (130 of ~250 ms).

        Where the index's cards show each label's exemplars nearest the email (CardSpec.nearest), the label side
        depends on the email: xq (len(texts), dim) are the emails' embeddings (computed here when not given),
        and each card is assembled from its pieces' tokens (CardTokens)."""
        if parts is None:
            parts, rows = Parts.of(self._tokenizers()[0].encode_batch(list(texts), add_special_tokens=False)), None
        rows = np.arange(len(texts)) if rows is None else np.asarray(rows, dtype=np.int64)
        emails, assemble = parts, self._assemblers()[0]
        candidates = [np.asarray(c, dtype=np.int64).reshape(-1) for c in candidates]
        email_of = np.repeat(rows, [len(c) for c in candidates])  # (pairs,) row of each pair's email in parts
        if self.index.card_spec.nearest and candidates:
            xq = self.embed(list(texts)) if xq is None else xq
            # (pairs,) row of each pair's card in labels, the distinct cards tokenised piece by piece
            labels, label_of = self._card_tokens()(self.index.pair_card_keys(xq, candidates), self.index.card_pieces)
        else:
            labels = self._label_parts()
            label_of = np.concatenate(candidates) if candidates else np.zeros(0, np.int64)
        out = []
        for s in range(0, len(email_of), self.score_batch):
            ids, mask, types = assemble(emails, email_of[s:s + self.score_batch], labels, label_of[s:s + self.score_batch])
            out.append(np.asarray(self.encoders.score(ids, mask, types), dtype=np.float32).reshape(-1))
        return np.concatenate(out) if out else np.zeros(0, np.float32)  # (pairs,)

    def score_candidates(self, texts: list, ks, gate=False) -> tuple:
        """Stages 1 and 2 for valid texts: per row its candidate ids (k,), retrieval scores (k,), cross-encoder
        logits (k,) (None where the gate skipped stage 2) and the flat classifier's log-probabilities (k,) (None
        where the policy does not fuse them), plus the stage timings in ms (contract.STAGES but "preprocess")."""
        t0 = time.perf_counter()
        # each text tokenised once for both stages where their tokenizers agree (counted in the embed stage's time)
        part_tok, _, single = self._tokenizers()
        parts = Parts.of(part_tok.encode_batch(list(texts), add_special_tokens=False)) if single is not None else None
        ms = {}
        xq, flat_lp = self.encode(texts, parts, stage_ms=ms)  # (n, dim), (n, labels) or None
        t1 = time.perf_counter()
        D, I = self.index.search(xq, int(max(ks)))  # (n, kmax) label scores and ids, best first
        t2 = time.perf_counter()
        gates = np.broadcast_to(np.asarray(gate), (len(texts),))
        skip = np.array([self.policy.skip_rerank(D[j:j + 1, :k], bool(g))[0] for j, (k, g) in enumerate(zip(ks, gates))], dtype=bool)
        rerank = [j for j in range(len(texts)) if not skip[j]]
        ce_logits = self._score([texts[j] for j in rerank], [I[j, :ks[j]] for j in rerank], parts,
                           rerank if parts is not None else None, xq[rerank])  # (sum of k over reranked rows,)
        t3 = time.perf_counter()
        rows, start = [], 0
        for j, k in enumerate(ks):
            logits = None if skip[j] else ce_logits[start:start + k].astype(np.float64)
            rows.append((I[j, :k], D[j, :k].astype(np.float64), logits, None if flat_lp is None else flat_lp[j, I[j, :k]]))
            start += 0 if skip[j] else k
        flat_ms = ms[contract.STAGE_FLAT]
        return rows, {contract.STAGE_EMBED: (t1 - t0) * 1e3 - flat_ms, contract.STAGE_FLAT: flat_ms,
                      contract.STAGE_SEARCH: (t2 - t1) * 1e3, contract.STAGE_RERANK: (t3 - t2) * 1e3}

    def combine(self, cand, retrieval, logits, threshold: float, flat=None) -> Prediction:
        """The K candidates of one email -> its Prediction, by the rerank policy (logits None: stage 2 skipped; flat:
        the flat classifier's log-probabilities of the candidates, where the policy fuses them)."""
        p = self.policy.probabilities(logits, retrieval, flat)  # (k,)
        order = np.argsort(-p, kind="stable")
        top = [str(self.label_names[cand[o]]) for o in order]
        probs = [float(p[o]) for o in order]
        return Prediction(top[0], probs[0], top, probs, bool(probs[0] < threshold), reranked=logits is not None)

    def classify_texts(self, texts: list, errors: list, top_k=None, threshold=None, gate=True) -> list:
        """Normalised texts (None where errors[i] says why) -> one Prediction per row. gate: per row or one
        bool, whether the policy's gate may skip stage 2 (without a gate it never skips, unless the policy gives the cross-encoder no weight: then it always does)."""
        n = len(texts)
        ks = np.broadcast_to(np.asarray(self.top_k if top_k is None else top_k), (n,))
        ts = np.broadcast_to(np.asarray(self.threshold if threshold is None else threshold), (n,))
        gs = np.broadcast_to(np.asarray(gate), (n,))
        ok = [i for i in range(n) if texts[i] is not None]
        results = [Prediction("", 0.0, [], [], True, str(errors[i]), False, getattr(errors[i], "kind", "invalid" if errors[i] else ""),
                              dict.fromkeys(contract.STAGES, 0.0)) for i in range(n)]
        if not ok:
            return results
        rows, ms = self.score_candidates([texts[i] for i in ok], [int(ks[i]) for i in ok], [bool(gs[i]) for i in ok])
        for i, (cand, retrieval, logits, flat) in zip(ok, rows):
            results[i] = self.combine(cand, retrieval, logits, ts[i], flat)
            results[i].stage_ms = dict(ms)
        return results

    def classify(self, bodies: Sequence, subjects: Sequence = None, top_k=None, threshold=None, gate=True) -> list:
        t0 = time.perf_counter()
        texts, errors = self.prepare(bodies, subjects)
        pre = (time.perf_counter() - t0) * 1e3
        results = self.classify_texts(texts, errors, top_k, threshold, gate)
        for r in results:
            r.stage_ms[contract.STAGE_PREPROCESS] = pre
        return results
