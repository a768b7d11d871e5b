"""The two-stage pipeline as a plain Python class: normalise -> tokenise -> embed -> label index top-K
(descriptions + exemplars) -> the gate (retrieval sure? stage 2 skipped) -> rerank the K (email, label
card) pairs -> the RerankPolicy's softmax over the K fused scores.

It does not know what runs the encoders: `Encoders` is PyTorch for the in-process reference
classifier (training/reference.py), onnxruntime in-process (mailroute/onnx_encoders.py), or BLS
calls to the bi_encoder / cross_encoder Triton models (export/triton/email_classifier.py). So
all three produce the same answers from the same code, and tests run it without Triton.
"""

import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
from tokenizers import Tokenizer

from mailroute import contract
from mailroute.label_index import LabelIndex
from mailroute.normalise import InvalidEmail, normalise
from mailroute.rerank_policy import RerankPolicy
from mailroute.settings import DEFAULTS


class Encoders(Protocol):
    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(n, seq) int64 -> (n, dim) float32, mean pooled and L2 normalised."""

    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        """(n, seq) int64 pairs -> (n,) float32 raw logits."""


class BadParameter(ValueError):
    """A request parameter (top_k, threshold) out of range or of the wrong type."""


def check_params(top_k, threshold, n_labels: int) -> tuple:
    try:
        k = int(top_k)
        if k != float(top_k):
            raise ValueError
    except (TypeError, ValueError):
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
    reranked: bool = False  # stage 2 ran for this email (False where the gate found retrieval sure)
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


def padded_tensors(encodings) -> tuple:
    """Unpadded encodings -> (ids, mask, type ids), right-padded with 0 (masked out), as the tokenizer's
    batch padding would give. Filled through one flat copy per tensor (a Python loop over rows cost as much
    as the tokenising it replaces)."""
    n = len(encodings)
    ids_rows = [e.ids for e in encodings]
    lens = np.fromiter(map(len, ids_rows), dtype=np.int64, count=n)
    mask = np.arange(int(lens.max()) if n else 0)[None, :] < lens[:, None]  # (n, width)
    ids, types = (np.zeros(mask.shape, dtype=contract.TOKEN_DTYPE) for _ in range(2))
    ids[mask] = np.fromiter(itertools.chain.from_iterable(ids_rows), dtype=contract.TOKEN_DTYPE, count=int(lens.sum()))
    types[mask] = np.fromiter(itertools.chain.from_iterable(e.type_ids for e in encodings), dtype=contract.TOKEN_DTYPE,
                              count=int(lens.sum()))
    return ids, mask.astype(contract.TOKEN_DTYPE), types


class TwoStageClassifier:
    """classify(emails) -> label, probability, top-K labels with probabilities, needs_review."""

    def __init__(self, encoders: Encoders, label_index: LabelIndex, bi_tokenizer: Tokenizer, cross_tokenizer: Tokenizer,
                 top_k: int = DEFAULTS.top_k, threshold: float = DEFAULTS.threshold, policy: RerankPolicy = None,
                 embed_batch: int = 64, score_batch: int = 256):
        self.encoders, self.index = encoders, label_index
        self.bi_tok, self.cross_tok = bi_tokenizer, cross_tokenizer
        self.label_names = np.array(label_index.taxonomy.names, dtype=object)
        self.label_texts = label_index.label_texts  # label cards (description + examples) or descriptions
        self.top_k, self.threshold = check_params(top_k, threshold, len(self.label_names))
        self.embed_batch, self.score_batch = embed_batch, score_batch
        self.policy = policy or RerankPolicy()  # fusion, temperature and gate: fitted on validation

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

    def _embed(self, texts: list, parts: list = None) -> np.ndarray:
        """(n, dim) embeddings. `parts`: the texts already tokenised without special tokens (score_candidates),
        turned into the bi-encoder's input by its own post-processing instead of tokenising again."""
        single = self._tokenizers()[2]
        out = []
        for s in range(0, len(texts), self.embed_batch):
            if parts is not None and single is not None:
                ids, mask, _ = padded_tensors([single.post_process(e) for e in parts[s:s + self.embed_batch]])
            else:
                ids, mask, _ = tensors(self.bi_tok.encode_batch(texts[s:s + self.embed_batch]))
            out.append(self.encoders.embed(ids, mask))
        return np.concatenate(out).astype(np.float32)  # (n, dim)

    def _label_encodings(self) -> list:
        """Each label text tokenised once per classifier (no special tokens, whole)."""
        if getattr(self, "_label_encs_of", None) is not self.label_texts:  # label texts replaced: tokenise again
            self._label_encs = self._tokenizers()[0].encode_batch(list(self.label_texts), add_special_tokens=False)
            self._label_encs_of = self.label_texts
        return self._label_encs

    def _tokenizers(self) -> tuple:
        """(parts, pairs, single): copies of the encoders' tokenizers that never pad (padded_tensors pads a
        batch; a padded part would carry its [PAD]s into a pair). `parts` (the cross-encoder's) does not
        truncate either: the longest-first cut of a pair depends on both parts' whole lengths. `pairs`
        truncates pairs like the cross-encoder's; `single` truncates one text like the bi-encoder's, and is
        None where the two tokenizers differ in more than their lengths (then each stage tokenises itself)."""
        if getattr(self, "_toks_of", None) != (self.bi_tok, self.cross_tok):
            parts, pairs, single = (Tokenizer.from_str(t.to_str()) for t in (self.cross_tok, self.cross_tok, self.bi_tok))
            for t in (parts, pairs, single):
                t.no_padding()
            parts.no_truncation()
            same = _without_lengths(self.bi_tok) == _without_lengths(self.cross_tok)
            self._toks, self._toks_of = (parts, pairs, single if same else None), (self.bi_tok, self.cross_tok)
        return self._toks

    def _score(self, texts: list, candidates, parts: list = None) -> np.ndarray:
        """Cross-encoder logits of each email against each of its candidate label ids, flattened in order:
        (sum of len(candidates[i]),). Each email is tokenised once (not once per candidate; `parts`: already
        tokenised by score_candidates) and each label once per classifier; the pairs are assembled by the
        tokenizer's own post-processing (longest-first truncation, [CLS] a [SEP] b [SEP], type ids), so the
        tensors equal encode_batch on the text pairs (tests hold them equal). Tokenising the K pairs of every
        email was most of the CPU time per email (measured: 480 of 584 ms per 256 emails at K=10 on 2 cores)."""
        split, tok, _ = self._tokenizers()
        emails = parts if parts is not None else split.encode_batch(list(texts), add_special_tokens=False)
        labels = self._label_encodings()
        pairs = [(e, labels[c]) for e, cand in zip(emails, candidates) for c in cand]
        out = []
        for s in range(0, len(pairs), self.score_batch):
            encs = [tok.post_process(e, lab) for e, lab in pairs[s:s + self.score_batch]]
            ids, mask, types = padded_tensors(encs)
            out.append(np.asarray(self.encoders.score(ids, mask, types), dtype=np.float32).reshape(-1))
        return np.concatenate(out) if out else np.zeros(0, np.float32)  # (pairs,)

    def score_candidates(self, texts: list, ks, gate=False) -> tuple:
        """Stages 1 and 2 for valid texts: per row its candidate ids (k,), retrieval scores (k,) and
        cross-encoder logits (k,) (None where the gate skipped stage 2), plus the stage timings in ms."""
        t0 = time.perf_counter()
        # each text tokenised once for both stages where their tokenizers agree (counted in the embed stage's time)
        split, _, single = self._tokenizers()
        parts = split.encode_batch(list(texts), add_special_tokens=False) if single is not None else None
        xq = self._embed(texts, parts)  # (n, dim)
        t1 = time.perf_counter()
        D, I = self.index.search(xq, int(max(ks)))  # (n, kmax) label scores and ids, best first
        t2 = time.perf_counter()
        gates = np.broadcast_to(np.asarray(gate), (len(texts),))
        skip = np.array([self.policy.skip_rerank(D[j:j + 1, :k], bool(g))[0] for j, (k, g) in enumerate(zip(ks, gates))], dtype=bool)
        rerank = [j for j in range(len(texts)) if not skip[j]]
        flat = self._score([texts[j] for j in rerank], [I[j, :ks[j]] for j in rerank],
                           None if parts is None else [parts[j] for j in rerank])  # (sum of k over reranked rows,)
        t3 = time.perf_counter()
        rows, start = [], 0
        for j, k in enumerate(ks):
            logits = None if skip[j] else flat[start:start + k].astype(np.float64)
            rows.append((I[j, :k], D[j, :k].astype(np.float64), logits))
            start += 0 if skip[j] else k
        return rows, {"embed": (t1 - t0) * 1e3, "search": (t2 - t1) * 1e3, "rerank": (t3 - t2) * 1e3}

    def combine(self, cand, retrieval, logits, threshold: float, policy: RerankPolicy = None) -> Prediction:
        """The K candidates of one email -> its Prediction, by the rerank policy (logits None: stage 2 skipped)."""
        policy = policy or self.policy
        p = policy.retrieval_probabilities(retrieval) if logits is None else policy.probabilities(logits, retrieval)  # (k,)
        order = np.argsort(-p, kind="stable")
        top = [str(self.label_names[cand[o]]) for o in order]
        probs = [float(p[o]) for o in order]
        return Prediction(top[0], probs[0], top, probs, bool(probs[0] < threshold), reranked=logits is not None)

    def classify_texts(self, texts: list, errors: list, top_k=None, threshold=None, gate=True) -> list:
        """Normalised texts (None where errors[i] says why) -> one Prediction per row. gate: per row or one
        bool, whether the policy's gate may skip stage 2 (it never does when the policy has no gate)."""
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
        for i, (cand, retrieval, logits) in zip(ok, rows):
            results[i] = self.combine(cand, retrieval, logits, ts[i])
            results[i].stage_ms = dict(ms)
        return results

    def classify(self, bodies: Sequence, subjects: Sequence = None, top_k=None, threshold=None, gate=True) -> list:
        t0 = time.perf_counter()
        texts, errors = self.prepare(bodies, subjects)
        pre = (time.perf_counter() - t0) * 1e3
        results = self.classify_texts(texts, errors, top_k, threshold, gate)
        for r in results:
            r.stage_ms["preprocess"] = pre
        return results
