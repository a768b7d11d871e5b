"""A reusable Locust User over mailroute's gRPC client: fires `events.request` with perf_counter timings.

grpcio does its I/O in C, which gevent cannot patch; `init_gevent()` makes grpcio cooperate with
gevent so that many Locust users in one process do not serialise on blocking calls.
"""

import time

import grpc.experimental.gevent as grpc_gevent
from locust import User

from client import ClassifierClient
from mailroute.settings import DEFAULT_GRPC_URL, REQUEST_TIMEOUT_S

grpc_gevent.init_gevent()


class ClassifierUser(User):
    abstract = True
    top_k = None
    host = DEFAULT_GRPC_URL  # where `mailroute serve` listens; --host overrides

    def __init__(self, environment):
        super().__init__(environment)
        self.client = ClassifierClient(self.host, timeout=REQUEST_TIMEOUT_S, retries=0)  # retries would hide errors from the stats

    def classify(self, texts: list, name: str):
        start, exc, size = time.perf_counter(), None, 0
        try:
            results = self.client.classify(texts, top_k=self.top_k)
            size = len(results)
            bad = [r.error for r in results if not r.ok]
            if bad:
                raise RuntimeError(f"{len(bad)} email(s) not classified: {bad[0]}")
        except Exception as e:  # noqa: BLE001 - reported to Locust as a failure
            exc = e
        self.environment.events.request.fire(request_type="grpc", name=name, response_time=(time.perf_counter() - start) * 1e3,
                                              response_length=size, exception=exc, context={})

    def on_stop(self):
        self.client.close()
