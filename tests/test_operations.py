"""Operations on the real tritonserver: a crashed backend is noticed and recovered, status codes say
whose fault a failure is, Prometheus metrics move, and the async client bounds its requests in flight."""

import asyncio
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from tritonclient.utils import InferenceServerException

from client import AsyncClassifierClient, ClassifierClient, ClassifierError
from client.server import TritonServer
from client.watchdog import ReadinessServer, Watchdog
from mailroute import contract
from mailroute.repository import CONFIG_FILE
from server_metrics import metric_total, metrics_text

pytestmark = pytest.mark.slow

EMAIL = "Hi, I was charged twice this month, please refund the extra charge."


@pytest.fixture()
def fresh_server(tiny_repo):
    """A server of its own: these tests kill its processes."""
    with TritonServer(tiny_repo, admin_key="ops-key") as server:
        yield server


def test_killed_stub_turns_readiness_false_and_is_recovered(fresh_server):
    # Given a served pipeline with its watchdog and readiness endpoint
    wd = Watchdog(fresh_server, interval=0.5, max_age=1.5).start()
    ready = ReadinessServer(wd, 0, host="127.0.0.1").start()
    url = f"http://127.0.0.1:{ready.port}/ready"
    try:
        assert urllib.request.urlopen(url, timeout=5).status == 200
        # When the cross-encoder's backend process is killed
        os.kill(fresh_server.stub_pid(contract.CROSS_ENCODER), signal.SIGKILL)
        t0 = time.time()
        # Then readiness turns false (Triton's own readiness would still say 200) ...
        saw_unready = False
        while time.time() - t0 < 15 and not saw_unready:
            try:
                urllib.request.urlopen(url, timeout=5)
            except urllib.error.HTTPError as e:
                saw_unready = e.code == 503
            time.sleep(0.1)
        assert saw_unready
        # ... and the model is reloaded: classifications succeed again within 15 s, readiness back to 200
        with ClassifierClient(fresh_server.grpc_url, timeout=30) as c:
            deadline = time.time() + 15
            while True:
                try:
                    assert c.classify_one(EMAIL).ok
                    break
                except ClassifierError:
                    assert time.time() < deadline, f"not recovered in 15 s: {wd.status()}"
        while not wd.ready:
            assert time.time() - t0 < 20
            time.sleep(0.2)
        assert urllib.request.urlopen(url, timeout=5).status == 200
        assert any(e["action"].startswith("reload") and contract.CROSS_ENCODER in e["action"] for e in wd.events)
    finally:
        wd.stop()
        ready.stop()


def _wait_dead(pid: int, seconds: float = 10) -> None:
    """Until a killed process is gone or a zombie (its parent, tritonserver, reaps it later)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still runs {seconds} s after SIGKILL")


def test_client_retries_carry_a_request_over_the_recovery_gap(fresh_server):
    # Given a watchdog that repairs, and a dead classifier stub
    wd = Watchdog(fresh_server, interval=0.5, max_age=1.5).start()
    try:
        stub = fresh_server.stub_pid(contract.CLASSIFIER)
        os.kill(stub, signal.SIGKILL)
        _wait_dead(stub)
        # When a client with the default retries classifies during the gap, it gets its answer
        with ClassifierClient(fresh_server.grpc_url, timeout=30) as c:
            waits, delay = [], c._delay  # the backoffs taken, recorded (and waited: the gap must pass)
            c._delay = lambda attempt: waits.append(attempt) or delay(attempt)
            results = [c.classify_one(EMAIL) for _ in range(5)]
        assert all(r.ok for r in results)
        assert waits, "no request was retried: the kill did not reach the client, so nothing here was tested"
    finally:
        wd.stop()


def test_caller_errors_are_invalid_argument_and_not_retried(triton):
    with ClassifierClient(triton.grpc_url, retries=5, backoff=2.0) as c:
        backoffs = []  # the waits before each retry, recorded (and not waited)
        c._delay = lambda attempt: backoffs.append(attempt) or 0.0
        with pytest.raises(ClassifierError, match="top_k must be between") as err:
            c.classify([EMAIL], top_k=500)
        assert "INVALID_ARGUMENT" in str(err.value.status()) and not err.value.retryable
        assert backoffs == []  # no retry: a caller error is raised at once
        assert isinstance(err.value, InferenceServerException) and "not retryable" in str(err.value)


def test_metrics_appear_and_move_after_requests(triton):
    before = metrics_text(triton)
    with ClassifierClient(triton.grpc_url) as c:
        res = c.classify([EMAIL, "", "Where is my parcel?"])
    assert [r.ok for r in res] == [True, False, True]
    after = metrics_text(triton)
    for name in (contract.METRIC_STAGE_MS, contract.METRIC_EMAILS, contract.METRIC_RERANKED, contract.METRIC_ROW_ERRORS):
        assert name in after, name
    assert metric_total(after, contract.METRIC_EMAILS + "{") - metric_total(before, contract.METRIC_EMAILS + "{") == 2
    assert metric_total(after, contract.METRIC_ROW_ERRORS, kind="empty") - metric_total(before, contract.METRIC_ROW_ERRORS, kind="empty") == 1
    for stage in contract.STAGES:
        count = contract.METRIC_STAGE_MS + "_count"
        assert metric_total(after, count, stage=stage) > metric_total(before, count, stage=stage)
    assert re.search(contract.METRIC_EMAILS + r'\{[^}]*version="1"', after)


def test_async_client_bounds_requests_in_flight(triton):
    async def go():
        async with AsyncClassifierClient(triton.grpc_url, max_batch=1, max_in_flight=2) as c:
            res = await c.classify([EMAIL, "Where is my parcel?", "The app crashes", "Send the invoice", "refund"] * 2)
            return res, c.peak_in_flight

    res, peak = asyncio.run(go())
    assert len(res) == 10 and all(r.ok for r in res)
    assert 1 <= peak <= 2


def test_queue_limit_refuses_overload_at_once_and_keeps_serving(tiny_run, tmp_path):
    # Given a classifier that queues at most 1 request (one instance, a long batching delay)
    from concurrent.futures import ThreadPoolExecutor

    from export.configs import Throughput, classifier_config
    from export.run import ExportConfig, export

    repo = tmp_path / "repo"
    export(ExportConfig(run=str(tiny_run), repo=str(repo), top_k=5, max_queue_size=1))
    cfg = repo / contract.CLASSIFIER / CONFIG_FILE
    cfg.write_text(classifier_config(64, 1, 64, 256, serving_version=1, throughput=Throughput(1, (), 200_000, 1)))
    with TritonServer(repo) as server:
        # When 16 callers arrive at once, without retries
        def one(i):
            with ClassifierClient(server.grpc_url, retries=0, max_batch=1) as c:
                try:
                    return c.classify_one(f"{EMAIL} #{i}").label
                except ClassifierError as e:
                    return e

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(one, range(16)))
        refused = [a for a in answers if isinstance(a, ClassifierError)]
        # Then some are refused at once with a clear, retryable error, the rest answered, and it keeps serving
        assert refused and len(refused) < 16
        assert all(e.retryable and "queue size" in e.message() for e in refused), [e.message() for e in refused]
        with ClassifierClient(server.grpc_url) as c:
            assert c.classify_one(EMAIL).ok
