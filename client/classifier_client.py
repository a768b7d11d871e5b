"""Typed client for the `email_classifier` Triton model over gRPC (sync and asyncio).

    with ClassifierClient("127.0.0.1:8001") as c:
        for r in c.classify(["I was charged twice", "Where is my parcel?"], top_k=5):
            print(r.label, r.probability, r.needs_review)

Many emails go in one call (split into requests of at most `max_batch` rows). UNAVAILABLE answers
(server starting, overloaded, connection reset) are retried with exponential backoff; every other
error, and UNAVAILABLE caused by a restricted protocol (a missing admin key), is raised at once.
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

OUTPUTS = contract.CLASSIFIER_OUTPUTS


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
    reranked: bool = False  # stage 2 ran (False where the version's gate found retrieval sure)

    @property
    def ok(self) -> bool:
        return not self.error


def _text(x) -> str:
    return x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x)


def _as_bytes(x) -> bytes:
    return x if isinstance(x, bytes) else str(x).encode("utf-8")


def build_inputs(texts: list, subjects=None, module=grpcclient) -> list:
    arr = np.array([[_as_bytes(t)] for t in texts], dtype=object)  # (n, 1)
    inputs = [module.InferInput(contract.TEXT, list(arr.shape), "BYTES")]
    inputs[0].set_data_from_numpy(arr)
    if subjects is not None:
        if len(subjects) != len(texts):
            raise ValueError(f"got {len(subjects)} subjects for {len(texts)} texts")
        sub = np.array([[_as_bytes(s or "")] for s in subjects], dtype=object)
        inputs.append(module.InferInput(contract.SUBJECT, list(sub.shape), "BYTES"))
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
            model_versions=dict(zip(("email_classifier", "bi_encoder", "cross_encoder"), map(_text, out[contract.MODEL_VERSIONS][i]))),
            stage_ms=dict(zip(contract.STAGES, map(float, out[contract.STAGE_MS][i]))),
            reranked=bool(out[contract.RERANKED][i, 0]),
        ))
    return rows


def retryable(e: Exception) -> bool:
    if not isinstance(e, InferenceServerException):
        return False
    msg = e.message() or ""
    return "UNAVAILABLE" in str(e.status()) and "restricted" not in msg


def _params(top_k, threshold, gate=None) -> dict:
    p = {} if gate is None else {contract.PARAM_GATE: bool(gate)}
    if top_k is not None:
        p[contract.PARAM_TOP_K] = int(top_k)
    if threshold is not None:
        p[contract.PARAM_THRESHOLD] = float(threshold)
    return p


class _Base:
    def __init__(self, url: str = "127.0.0.1:8001", model: str = contract.CLASSIFIER, version: str = "",
                 timeout: float = 30.0, retries: int = 3, backoff: float = 0.2, max_batch: int = 64, headers: dict = None):
        self.url, self.model, self.version = url, model, version
        self.timeout, self.retries, self.backoff, self.max_batch = timeout, retries, backoff, max_batch
        self.headers = headers

    def _delay(self, attempt: int) -> float:
        return self.backoff * (2 ** attempt) * (1 + random.random() * 0.25)  # jitter: clients don't retry in lockstep

    def _chunks(self, texts, subjects):
        texts = list(texts)
        for s in range(0, len(texts), self.max_batch):
            yield texts[s:s + self.max_batch], (list(subjects)[s:s + self.max_batch] if subjects is not None else None)


class ClassifierClient(_Base):
    def __init__(self, url: str = "127.0.0.1:8001", **kw):
        super().__init__(url, **kw)
        self.client = grpcclient.InferenceServerClient(url)

    def _infer(self, inputs, params):
        for attempt in range(self.retries + 1):
            try:
                return self.client.infer(self.model, inputs, model_version=self.version, outputs=[grpcclient.InferRequestedOutput(o) for o in OUTPUTS],
                                         parameters=params or None, client_timeout=self.timeout, headers=self.headers)
            except InferenceServerException as e:
                if attempt == self.retries or not retryable(e):
                    raise
                time.sleep(self._delay(attempt))

    def classify(self, texts, subjects=None, top_k=None, threshold=None, gate=None) -> list:
        """gate: None = the version's default; False = rerank every email; True = let the gate skip stage 2."""
        out = []
        for t, s in self._chunks(texts, subjects):
            out += parse_result(self._infer(build_inputs(t, s), _params(top_k, threshold, gate)))
        return out

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
    def __init__(self, url: str = "127.0.0.1:8001", **kw):
        super().__init__(url, **kw)
        self.client = grpcaio.InferenceServerClient(url)

    async def _infer(self, inputs, params):
        for attempt in range(self.retries + 1):
            try:
                return await self.client.infer(self.model, inputs, model_version=self.version, outputs=[grpcaio.InferRequestedOutput(o) for o in OUTPUTS],
                                               parameters=params or None, client_timeout=self.timeout, headers=self.headers)
            except InferenceServerException as e:
                if attempt == self.retries or not retryable(e):
                    raise
                await asyncio.sleep(self._delay(attempt))

    async def classify(self, texts, subjects=None, top_k=None, threshold=None, gate=None) -> list:
        chunks = [self._infer(build_inputs(t, s, grpcaio), _params(top_k, threshold, gate)) for t, s in self._chunks(texts, subjects)]
        return [r for res in await asyncio.gather(*chunks) for r in parse_result(res)]

    async def close(self):
        await self.client.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
