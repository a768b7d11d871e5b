"""Versions on the real tritonserver: promote and rollback under concurrent load (0 failed requests), a
corrupt version keeps the old one serving, and recorded predictions + corrections through the client."""

import shutil
import threading

import pytest

from client import ClassifierClient
from client.server import TritonServer
from export import versions
from export.derive import derive_version
from mailroute import contract
from mailroute.feedback_store import FeedbackStore, UnknownLabel
from mailroute.repository import PIPELINE_FILE, open_onnx_classifier

pytestmark = pytest.mark.slow

EMAILS = ["Hi, I was charged twice this month, please refund the extra charge.", "I can't log in, the reset link never arrives."]
KEY = "versions-key"


@pytest.fixture()
def served(repo):
    with TritonServer(repo, admin_key=KEY) as server:
        yield repo, server


class Load:
    """Threads classifying without retries while versions change: every failure is counted."""

    def __init__(self, url, threads=3):
        self.url, self.stop, self.failures, self.answered, self.seen = url, threading.Event(), [], 0, set()
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self):
        with ClassifierClient(self.url, retries=0, timeout=60) as c:
            while not self.stop.is_set():
                try:
                    for r in c.classify(EMAILS):
                        self.seen.add(r.model_versions[contract.CLASSIFIER])
                    self.answered += 1
                except Exception as e:  # noqa: BLE001 (counted, and the test fails on any)
                    self.failures.append(str(e)[:300])

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def served_version(server) -> str:
    with ClassifierClient(server.grpc_url) as c:
        return c.classify_one(EMAILS[0]).model_versions[contract.CLASSIFIER]


def test_promote_and_rollback_under_load_drop_nothing(served):
    repo, server = served
    label = open_onnx_classifier(repo).index.taxonomy.names[0]
    v2 = derive_version(repo, 1, "exemplars", [(EMAILS[0], label)])
    with Load(server.grpc_url) as load:
        versions.promote(repo, v2, server.grpc_url, KEY)
        assert served_version(server) == str(v2)
        versions.rollback(repo, server.grpc_url, KEY)
        assert served_version(server) == "1"
        versions.promote(repo, v2, server.grpc_url, KEY)
    assert load.failures == [] and load.answered > 5 and load.seen == {"1", str(v2)}
    assert [h["action"] for h in versions.history(repo)][-3:] == ["promote", "rollback", "promote"]


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(served):
    repo, server = served
    with versions.new_version(repo, contract.CLASSIFIER) as (folder, v):
        shutil.copytree(repo / contract.CLASSIFIER / "1", folder, dirs_exist_ok=True)
        (folder / PIPELINE_FILE).write_text("{not json")  # corrupt: the classifier cannot start
    with Load(server.grpc_url) as load:
        with pytest.raises(versions.PromotionFailed, match=f"version 1 is still serving"):
            versions.promote(repo, v, server.grpc_url, KEY)
        assert served_version(server) == "1"
    assert load.failures == []
    assert versions.serving_version(repo) == 1  # the config on disk was put back: a restart serves 1 too


def test_record_and_correct_through_the_client(served, tmp_path):
    repo, server = served
    names = open_onnx_classifier(repo).index.taxonomy.names
    with FeedbackStore(f"sqlite:///{tmp_path}/fb.sqlite3", labels=names) as store, \
            ClassifierClient(server.grpc_url, store=store) as c:
        results = c.classify(EMAILS + [""], record=True)
        assert all(r.prediction_id for r in results[:2]) and results[2].prediction_id is None  # an empty email is not recorded
        stored = store.prediction(results[0].prediction_id)
        assert stored.label == results[0].label and stored.candidates == results[0].top_labels
        assert stored.versions[contract.CLASSIFIER] == "1"
        gold = next(n for n in names if n != results[0].label)
        fix = c.correct(results[0].prediction_id, gold, who="ops")
        assert fix.label == gold and fix.wrong_label == results[0].label
        with pytest.raises(UnknownLabel, match="no_such_label"):
            c.correct(results[1].prediction_id, "no_such_label")
        assert store.counts() == {"predictions": 2, "corrections": 1}
