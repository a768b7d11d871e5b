"""Typed client for the `email_classifier` Triton model over gRPC (sync and asyncio).

    with ClassifierClient("127.0.0.1:8001") as c:
        for r in c.classify(["I was charged twice", "Where is my parcel?"], top_k=5):
            print(r.label, r.probability, r.needs_review)

Many emails go in one call (split into requests of at most `max_batch` rows; the async client keeps
at most `max_in_flight` of them in flight). Retryable failures are retried with exponential backoff:
UNAVAILABLE (server starting, overloaded, a backend being recovered, connection reset) and a backend
process that is not healthy; INVALID_ARGUMENT (the caller's mistake), every other error, and
UNAVAILABLE caused by a restricted protocol (a missing admin key) are raised at once. What is raised is
a ClassifierError that says whether it was retryable.

Feedback: give the client a store (`mailroute.feedback_store.FeedbackStore`); `classify(..., record=True)`
records every answered email with what was shown and sets `prediction_id`; `correct(prediction_id, label)`
records the right label (typed errors for an unknown label or prediction, duplicates and conflicts).

TLS: pass `ssl=True` and the PEM files (`root_certificates`, `private_key`, `certificate_chain`);
they go to tritonclient's InferenceServerClient unchanged. Keepalive: `keepalive` takes a
tritonclient.grpc.KeepAliveOptions (defaults: a ping every 30 s, 20 s to answer).
"""

import asyncio
import random
import time
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from mailroute import contract
from mailroute.settings import DEFAULT_GRPC_URL, REQUEST_TIMEOUT_S

OUTPUTS = contract.CLASSIFIER_OUTPUTS


class ClassifierError(InferenceServerException):
    """A classification request failed. `retryable` says whether sending it again may succeed
    (server side, transient) or not (the request itself is wrong, or access is refused)."""

    def __init__(self, e: InferenceServerException, attempts: int):
        self.retryable, self.attempts = retryable(e), attempts
        why = f"retryable, gave up after {attempts} attempt(s)" if self.retryable else "not retryable"
        super().__init__(f"{e.message()} [{why}]", status=e.status(), debug_details=e.debug_details())


def default_keepalive():
    return grpcclient.KeepAliveOptions(keepalive_time_ms=30_000, keepalive_timeout_ms=20_000, keepalive_permit_without_calls=True,
                                       http2_max_pings_without_data=0)


@dataclass
class Classification:
    label: str
    probability: float
    top_labels: list
    top_probabilities: list
    needs_review: bool
    error: str = ""  # set when this email could not be classified (then label is "")
    model_versions: dict = field(default_factory=dict)
    stage_ms: dict = field(default_factory=dict)
    reranked: bool = False  # stage 2 ran (False where the version's gate found retrieval sure, or its policy gives the CE no weight)
    prediction_id: str = None  # set by classify(..., record=True): what correct() takes

    @property
    def ok(self) -> bool:
        return not self.error


def _text(x) -> str:
    return x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x)


def _as_bytes(x) -> bytes:
    return x if isinstance(x, bytes) else str(x).encode("utf-8")


def build_inputs(texts: list, subjects=None, module=grpcclient) -> list:
    text_t, subject_t = contract.TENSORS[contract.TEXT], contract.TENSORS[contract.SUBJECT]
    arr = np.array([[_as_bytes(t)] for t in texts], dtype=text_t.dtype)  # (n, 1)
    inputs = [module.InferInput(contract.TEXT, list(arr.shape), text_t.wire_type)]
    inputs[0].set_data_from_numpy(arr)
    if subjects is not None:
        if len(subjects) != len(texts):
            raise ValueError(f"got {len(subjects)} subjects for {len(texts)} texts")
        sub = np.array([[_as_bytes(s or "")] for s in subjects], dtype=subject_t.dtype)
        inputs.append(module.InferInput(contract.SUBJECT, list(sub.shape), subject_t.wire_type))
        inputs[1].set_data_from_numpy(sub)
    return inputs


def parse_result(result) -> list:
    out = {name: result.as_numpy(name) for name in OUTPUTS}
    rows = []
    for i in range(out[contract.LABEL].shape[0]):
        err = _text(out[contract.ERROR][i, 0])
        k = 0 if err else out[contract.TOP_LABELS].shape[1]
        rows.append(Classification(
            label=_text(out[contract.LABEL][i, 0]), probability=float(out[contract.PROBABILITY][i, 0]),
            top_labels=[_text(x) for x in out[contract.TOP_LABELS][i, :k]],
            top_probabilities=[float(x) for x in out[contract.TOP_PROBABILITIES][i, :k]],
            needs_review=bool(out[contract.NEEDS_REVIEW][i, 0]), error=err,
            model_versions={m: v for m, v in zip(contract.VERSION_MODELS, map(_text, out[contract.MODEL_VERSIONS][i])) if v},
            stage_ms=dict(zip(contract.STAGES, map(float, out[contract.STAGE_MS][i]))),
            reranked=bool(out[contract.RERANKED][i, 0]),
        ))
    return rows


def retryable(e: Exception) -> bool:
    if not isinstance(e, InferenceServerException):
        return False
    msg, status = e.message() or "", str(e.status())
    if "UNAVAILABLE" in status:
        return "restricted" not in msg  # a missing admin key stays missing
    if "INTERNAL" in status and "is not healthy" in msg:
        return True  # a backend process died; the watchdog brings it back
    # a request cut off by a dying server comes back with no message (INTERNAL or UNKNOWN); classifying is
    # idempotent, so sending it again is safe
    # (a server's own message may span lines: whitespace is not what marks a torn frame)
    cut_off = not msg.strip() or not "".join(msg.split()).isprintable()  # no message, or a torn frame's bytes
    return ("INTERNAL" in status or "UNKNOWN" in status) and cut_off


def _params(top_k, threshold, gate=None) -> dict:
    p = {} if gate is None else {contract.PARAM_GATE: bool(gate)}
    if top_k is not None:
        p[contract.PARAM_TOP_K] = int(top_k)
    if threshold is not None:
        p[contract.PARAM_THRESHOLD] = float(threshold)
    return p


class _Base:
    def __init__(self, url: str = DEFAULT_GRPC_URL, model: str = contract.CLASSIFIER, version: str = "",
                 timeout: float = REQUEST_TIMEOUT_S, retries: int = 5, backoff: float = 0.2, max_batch: int = contract.CLASSIFIER_MAX_BATCH, headers: dict = None,
                 max_in_flight: int = 4, keepalive=None, ssl: bool = False, root_certificates=None, private_key=None,
                 certificate_chain=None, store=None):
        """retries with backoff 0.2 s doubling: 5 retries wait about 6 s in all, enough to ride out a
        backend reload (measured 1.5 s to recovery) but not a full server restart."""
        self.url, self.model, self.version = url, model, version
        self.timeout, self.retries, self.backoff, self.max_batch = timeout, retries, backoff, max_batch
        self.headers, self.max_in_flight, self.store = headers, max_in_flight, store
        for name, value, ok in (("max_in_flight", max_in_flight, max_in_flight >= 1), ("max_batch", max_batch, max_batch >= 1),
                                ("retries", retries, retries >= 0), ("timeout", timeout, timeout is None or timeout > 0), ("backoff", backoff, backoff >= 0)):
            if not ok:
                raise ValueError(f"{name} must be {'>= 0' if name in ('retries', 'backoff') else '> 0'}, got {value}")
        self._conn = {"keepalive_options": keepalive or default_keepalive(), "ssl": ssl, "root_certificates": root_certificates,
                      "private_key": private_key, "certificate_chain": certificate_chain}

    def _delay(self, attempt: int) -> float:
        return self.backoff * (2 ** attempt) * (1 + random.random() * 0.25)  # jitter: clients don't retry in lockstep

    def _record(self, texts, subjects, results) -> None:
        if self.store is None:
            raise ValueError("classify(..., record=True) needs a feedback store: ClassifierClient(url, store=FeedbackStore(...))")
        for r, pid in zip(results, self.store.record(list(texts), results, None if subjects is None else list(subjects))):
            r.prediction_id = pid

    def _correct(self, prediction_id, label, who=None):
        if self.store is None:
            raise ValueError("correct() needs a feedback store: ClassifierClient(url, store=FeedbackStore(...))")
        return self.store.correct(prediction_id, label, who=who)

    def _chunks(self, texts, subjects):
        texts, subjects = list(texts), None if subjects is None else list(subjects)
        if subjects is not None and len(subjects) != len(texts):  # checked whole: per chunk, an extra subject would go unseen
            raise ValueError(f"got {len(subjects)} subjects for {len(texts)} texts")
        for s in range(0, len(texts), self.max_batch):
            yield texts[s:s + self.max_batch], (subjects[s:s + self.max_batch] if subjects is not None else None)


class ClassifierClient(_Base):
    def __init__(self, url: str = DEFAULT_GRPC_URL, **kw):
        super().__init__(url, **kw)
        self.client = grpcclient.InferenceServerClient(url, **self._conn)

    def _infer(self, inputs, params):
        for attempt in range(self.retries + 1):
            try:
                return self.client.infer(self.model, inputs, model_version=self.version, outputs=[grpcclient.InferRequestedOutput(o) for o in OUTPUTS],
                                         parameters=params or None, client_timeout=self.timeout, headers=self.headers)
            except InferenceServerException as e:
                if attempt == self.retries or not retryable(e):
                    raise ClassifierError(e, attempt + 1) from None
                time.sleep(self._delay(attempt))

    def classify(self, texts, subjects=None, top_k=None, threshold=None, gate=None, record=False) -> list:
        """gate: None = the version's default; False = rerank every email (none where the version's policy gives the CE no weight); True = let the gate skip stage 2.
        record: store each answered email and what was shown (sets prediction_id)."""
        texts = list(texts)  # read twice when recording
        if record and self.store is None:
            raise ValueError("classify(..., record=True) needs a feedback store: ClassifierClient(url, store=FeedbackStore(...))")
        out = []
        for t, s in self._chunks(texts, subjects):
            out += parse_result(self._infer(build_inputs(t, s), _params(top_k, threshold, gate)))
        if record:
            self._record(texts, subjects, out)
        return out

    def correct(self, prediction_id: str, label: str, who: str = None):
        """The right label for a recorded prediction -> the stored correction."""
        return self._correct(prediction_id, label, who)

    def classify_one(self, text, subject=None, **kw) -> Classification:
        return self.classify([text], None if subject is None else [subject], **kw)[0]

    def ready(self) -> bool:
        try:
            return self.client.is_server_ready() and self.client.is_model_ready(self.model, self.version)
        except InferenceServerException:
            return False

    def close(self):
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClassifierClient(_Base):
    def __init__(self, url: str = DEFAULT_GRPC_URL, **kw):
        super().__init__(url, **kw)
        self.client = grpcaio.InferenceServerClient(url, **self._conn)
        self.in_flight = self.peak_in_flight = 0  # requests on the wire now, and the most at once

    async def _infer(self, inputs, params):
        for attempt in range(self.retries + 1):
            try:
                self.in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                try:
                    return await self.client.infer(self.model, inputs, model_version=self.version, outputs=[grpcaio.InferRequestedOutput(o) for o in OUTPUTS],
                                                   parameters=params or None, client_timeout=self.timeout, headers=self.headers)
                finally:
                    self.in_flight -= 1
            except InferenceServerException as e:
                if attempt == self.retries or not retryable(e):
                    raise ClassifierError(e, attempt + 1) from None
                await asyncio.sleep(self._delay(attempt))

    async def classify(self, texts, subjects=None, top_k=None, threshold=None, gate=None, record=False) -> list:
        """Chunks of max_batch rows, at most max_in_flight requests on the wire at once, answers in input order."""
        texts = list(texts)  # read twice when recording
        if record and self.store is None:
            raise ValueError("classify(..., record=True) needs a feedback store: AsyncClassifierClient(url, store=FeedbackStore(...))")
        limit = asyncio.Semaphore(self.max_in_flight)

        async def one(t, s):
            async with limit:
                return await self._infer(build_inputs(t, s, grpcaio), _params(top_k, threshold, gate))

        results = await asyncio.gather(*(one(t, s) for t, s in self._chunks(texts, subjects)))
        out = [r for res in results for r in parse_result(res)]
        if record:  # the database write runs in a thread: the event loop keeps serving other requests
            await asyncio.to_thread(self._record, texts, subjects, out)
        return out

    async def correct(self, prediction_id: str, label: str, who: str = None):
        return await asyncio.to_thread(self._correct, prediction_id, label, who)

    async def close(self):
        await self.client.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
