"""Request handling of the email_classifier model, as a plain class (the Triton model.py is a thin
adapter over it; tests run it in-process).

A batch of requests is classified in one pass: all their rows are stacked, embedded once, searched
once, reranked once, then split back, one response per request. Problems of the request itself
(wrong shape, bad parameters) fail that request only; problems of one email (empty, not UTF-8, too
large) give that row an ERROR and leave the other rows of the batch answered.
"""

import json
from dataclasses import dataclass

import numpy as np

from mailroute import contract
from mailroute.pipeline import BadParameter, TwoStageClassifier, check_params

KNOWN_PARAMS = (contract.PARAM_TOP_K, contract.PARAM_THRESHOLD, contract.PARAM_GATE)


ERROR_KINDS = "_error_kinds"  # key of the per-row error kinds in a result (the adapter counts them; not an output)


class RequestError(ValueError):
    """The whole request is malformed; the message goes back to the caller."""


class EncoderUnavailable(RuntimeError):
    """A BLS call to an encoder came back with an error. Mostly a retry gets past it (the backend being recovered or
    reloaded), but a BLS response loses the status code (it arrives as INTERNAL), so a permanent fault of the encoder
    (a pinned version absent) is retried as well: it costs the client's retries, never a wrong answer."""


def server_fault(e: Exception) -> tuple:
    """A batch that failed on the server -> (message for every caller of it, whether a retry may get past it).
    Only an unavailable encoder is retryable (the client retries UNAVAILABLE); any other fault is this version's
    own (its index, policy, in-process encoders) and a retry would get the same: INTERNAL, said once."""
    if isinstance(e, EncoderUnavailable):
        return f"classification failed, retry: {e}", True
    return f"classification failed: {type(e).__name__}: {' '.join(str(e).split())}", False  # one line


@dataclass
class Request:
    text: np.ndarray  # (n, 1) object (bytes)
    subject: np.ndarray = None  # (n, 1) object, optional
    parameters: str = "{}"  # JSON, as Triton hands it over


class ClassifierService:
    def __init__(self, clf: TwoStageClassifier, model_versions: tuple):
        """model_versions: the versions of contract.VERSION_MODELS, in that order (the MODEL_VERSIONS output); "" or
        missing at the end (the model.py of an earlier version passes contract.MODELS' three) = not pinned."""
        self.clf = clf
        versions = [str(v) for v in model_versions] + [""] * (len(contract.VERSION_MODELS) - len(model_versions))
        self.versions = np.array(versions, dtype=contract.dtype(contract.MODEL_VERSIONS))

    def _parse(self, req: Request) -> tuple:
        try:
            params = json.loads(req.parameters or "{}")
        except json.JSONDecodeError as e:
            raise RequestError(f"request parameters are not JSON: {e.msg}") from None
        unknown = sorted(set(params) - set(KNOWN_PARAMS))
        if unknown:
            raise RequestError(f"unknown request parameter(s) {unknown}; known: {list(KNOWN_PARAMS)}")
        try:
            k, t = check_params(params.get(contract.PARAM_TOP_K, self.clf.top_k),
                                params.get(contract.PARAM_THRESHOLD, self.clf.threshold), len(self.clf.label_names))
        except BadParameter as e:
            raise RequestError(str(e)) from None
        gate = params.get(contract.PARAM_GATE, True)
        if not isinstance(gate, bool):
            raise RequestError(f"{contract.PARAM_GATE} must be a boolean (false = rerank every email the policy gives the reranker a weight for), got {gate!r}")
        text = req.text
        if text is None or text.dtype != contract.dtype(contract.TEXT) or text.ndim != 2 or text.shape[1] != 1:
            raise RequestError(f"{contract.TEXT} must be a string tensor of shape [batch, 1], got "
                               f"{None if text is None else (text.dtype, list(text.shape))}")
        subject = req.subject
        if subject is not None and subject.shape != text.shape:
            raise RequestError(f"{contract.SUBJECT} shape {list(subject.shape)} differs from {contract.TEXT} shape {list(text.shape)}")
        return text[:, 0], (subject[:, 0] if subject is not None else None), k, t, gate

    def handle(self, requests: list) -> list:
        """-> one item per request: a dict of output arrays, or a RequestError."""
        parsed, out = [], [None] * len(requests)
        for i, req in enumerate(requests):
            try:
                parsed.append((i, *self._parse(req)))
            except RequestError as e:
                out[i] = e
        if not parsed:
            return out
        bodies = [b for _, text, *_ in parsed for b in text]
        subjects = [s for _, text, subj, *_ in parsed for s in (subj if subj is not None else [None] * len(text))]
        ks = [k for _, text, _, k, _, _ in parsed for _ in text]
        ts = [t for _, text, _, _, t, _ in parsed for _ in text]
        gs = [g for _, text, _, _, _, g in parsed for _ in text]
        preds = self.clf.classify(bodies, subjects, top_k=np.array(ks), threshold=np.array(ts), gate=np.array(gs))
        start = 0
        for i, text, _, k, _, _ in parsed:
            out[i] = self._outputs(preds[start:start + len(text)], k)
            start += len(text)
        return out

    def _outputs(self, preds: list, k: int) -> dict:
        n, dt = len(preds), contract.dtype
        top_l = np.full((n, k), b"", dtype=dt(contract.TOP_LABELS))
        top_p = np.zeros((n, k), dtype=dt(contract.TOP_PROBABILITIES))
        for r, p in enumerate(preds):
            top_l[r, : len(p.top_labels)] = [l.encode() for l in p.top_labels]
            top_p[r, : len(p.top_probabilities)] = p.top_probabilities
        return {
            contract.LABEL: np.array([[p.label.encode()] for p in preds], dtype=dt(contract.LABEL)),
            contract.PROBABILITY: np.array([[p.probability] for p in preds], dtype=dt(contract.PROBABILITY)),
            contract.TOP_LABELS: top_l,
            contract.TOP_PROBABILITIES: top_p,
            contract.NEEDS_REVIEW: np.array([[p.needs_review] for p in preds], dtype=dt(contract.NEEDS_REVIEW)),
            contract.ERROR: np.array([[p.error.encode()] for p in preds], dtype=dt(contract.ERROR)),
            contract.MODEL_VERSIONS: np.tile(self.versions, (n, 1)),
            contract.STAGE_MS: np.array([[p.stage_ms[s] for s in contract.STAGES] for p in preds], dtype=dt(contract.STAGE_MS)),
            contract.RERANKED: np.array([[p.reranked] for p in preds], dtype=dt(contract.RERANKED)),
            ERROR_KINDS: [p.error_kind for p in preds if p.error],  # for metrics, not sent
        }
