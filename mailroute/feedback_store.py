"""Feedback store: the predictions the product made and the corrections users sent, in a real database.

Schema (created by the Alembic migrations in mailroute/migrations, never by metadata.create_all):

  predictions  id (uuid4 hex) | text (normalised email; NULL in hash-only privacy mode) | text_hash (sha256 of
               the normalised text, indexed) | label, probability (what the system chose) | candidates,
               probabilities (JSON lists, best first) | classifier/bi_encoder/cross_encoder/flat_encoder version
               (flat: NULL where the version fuses none, and in rows written before migration 0002) | created_at
  corrections  id (autoincrement, so `since_id` gives training an append-only cursor) | prediction_id (FK,
               nullable: a correction may name an email by its text) | text, text_hash (UNIQUE) | label (the
               correct one) | wrong_label (what the system chose: a guaranteed hard negative) | who | source
               | created_at

Emails are identified by the hash of their *normalised* text (mailroute.normalise, as serving sees them), so
a correction by id and one by text of the same email collide. The UNIQUE constraint on corrections.text_hash
is the one rule that keeps the training labels consistent: one correct label per email, enforced by the
database itself, so two writers racing cannot both win; the loser's IntegrityError is turned into
DuplicateCorrection or ConflictingCorrection after reading the winner's row.

Concurrency: on SQLite every transaction starts with BEGIN IMMEDIATE (the SQLAlchemy pysqlite recipe), so a
writer takes the write lock up front and waits for it (busy_timeout) instead of failing with "database is
locked" when a deferred read transaction tries to upgrade. Reads take that lock too, briefly (one
transaction kind keeps it simple; the store's reads are short lookups). On PostgreSQL the unique constraint does the work; migrations hold an advisory lock so that
processes opening a fresh database at once run them one at a time.
"""

import csv
import difflib
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint, event, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from mailroute import contract
from mailroute.normalise import InvalidEmail, normalise
from mailroute.settings import DEFAULT_FEEDBACK_URL, FEEDBACK_URL_ENV

DEFAULT_URL = DEFAULT_FEEDBACK_URL  # relative to the working directory
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SOURCES = ("api", "cli", "import")
VERSION_KEYS = contract.VERSION_MODELS  # a prediction keeps the version of every model that made it, in these columns:
VERSION_COLUMNS = dict(zip(VERSION_KEYS, ("classifier_version", "bi_encoder_version", "cross_encoder_version", "flat_encoder_version"),
                           strict=True))
_PG_MIGRATION_LOCK = 0x6D61696C  # any constant shared by every process of this product ("mail")


def default_url() -> str:
    return os.environ.get(FEEDBACK_URL_ENV) or DEFAULT_URL


def text_hash(normalised_text: str) -> str:
    return hashlib.sha256(normalised_text.encode("utf-8")).hexdigest()


# --- errors: one class per failure, each message names the offending value ---------------------------------

class FeedbackError(ValueError):
    """Base of every refusal by the store; the message names what was wrong."""


class UnknownLabel(FeedbackError):
    pass


class UnknownPrediction(FeedbackError):
    pass


class DuplicateCorrection(FeedbackError):
    """The email is already corrected to this same label."""


class ConflictingCorrection(FeedbackError):
    """The email is already corrected to another label."""


class ImportProblems(FeedbackError):
    """An import refused as a whole; `problems` holds every "FILE:LINE: what is wrong"."""

    def __init__(self, problems):
        self.problems = list(problems)
        more = len(self.problems) - 20
        super().__init__(f"{len(self.problems)} problem(s), nothing imported:\n" + "\n".join(self.problems[:20])
                         + (f"\n... and {more} more" if more > 0 else ""))


# --- rows (ORM) and what callers get back (plain dataclasses, usable after the session is gone) ----------

class Base(DeclarativeBase):
    pass


class PredictionRow(Base):
    __tablename__ = "predictions"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    text: Mapped[str | None] = mapped_column(Text)
    text_hash: Mapped[str] = mapped_column(String(64), index=True)
    label: Mapped[str | None] = mapped_column(String(100))
    probability: Mapped[float | None] = mapped_column(Float)
    candidates: Mapped[list | None] = mapped_column(JSON)
    probabilities: Mapped[list | None] = mapped_column(JSON)
    classifier_version: Mapped[str | None] = mapped_column(String(20))
    bi_encoder_version: Mapped[str | None] = mapped_column(String(20))
    cross_encoder_version: Mapped[str | None] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    flat_encoder_version: Mapped[str | None] = mapped_column(String(20))  # migration 0002


class CorrectionRow(Base):
    __tablename__ = "corrections"
    __table_args__ = (UniqueConstraint("text_hash", name="uq_corrections_text_hash"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prediction_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("predictions.id"))
    text: Mapped[str | None] = mapped_column(Text)
    text_hash: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(100))
    wrong_label: Mapped[str | None] = mapped_column(String(100))
    who: Mapped[str | None] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


@dataclass
class StoredCorrection:
    id: int
    prediction_id: str | None
    text: str | None
    text_hash: str
    label: str
    wrong_label: str | None
    who: str | None
    source: str
    created_at: datetime


@dataclass
class StoredPrediction:
    id: str
    text: str | None
    text_hash: str
    label: str
    probability: float
    candidates: list
    probabilities: list
    versions: dict
    created_at: datetime


def _utc(dt):  # SQLite returns naive datetimes; everything is written in UTC
    return dt.replace(tzinfo=timezone.utc) if dt is not None and dt.tzinfo is None else dt


def _correction(r: CorrectionRow) -> StoredCorrection:
    return StoredCorrection(r.id, r.prediction_id, r.text, r.text_hash, r.label, r.wrong_label, r.who, r.source,
                            _utc(r.created_at))


def _prediction(r: PredictionRow) -> StoredPrediction:
    versions = {k: getattr(r, column) for k, column in VERSION_COLUMNS.items()}
    return StoredPrediction(r.id, r.text, r.text_hash, r.label, r.probability, r.candidates, r.probabilities,
                            versions, _utc(r.created_at))


def _already(existing: CorrectionRow, label: str) -> FeedbackError:
    """The error for correcting an email that `existing` already corrects."""
    by = f"correction {existing.id} by {existing.who or 'unknown'} at {_utc(existing.created_at):%Y-%m-%d %H:%M:%S} UTC"
    if existing.label == label:
        return DuplicateCorrection(f"this email is already corrected to {label!r} ({by})")
    return ConflictingCorrection(f"this email is already corrected to {existing.label!r} ({by}); "
                                 f"refusing to change it to {label!r}")


def _where_in(column, values, chunk=500):
    """WHERE column IN (...) clauses in chunks (SQLite caps the number of bound parameters)."""
    values = sorted(set(values))
    return [column.in_(values[i:i + chunk]) for i in range(0, len(values), chunk)]


def make_engine(url: str = None, echo=False) -> sa.Engine:
    raw = url or default_url()
    try:
        url = sa.make_url(raw)
        if url.drivername in ("postgresql", "postgres"):  # psycopg 3 is what the project installs
            url = url.set(drivername="postgresql+psycopg")
        engine = sa.create_engine(url, echo=echo)  # no connection yet: this checks the dialect and loads its driver
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as e:  # unparsable, unknown dialect, no driver
        raise FeedbackError(f"--db / ${FEEDBACK_URL_ENV}: {raw!r} is not a usable database URL ({type(e).__name__}: {e}; "
                            f"e.g. sqlite:///feedback.db, postgresql://user@host/mailroute)") from None
    if url.get_backend_name() != "sqlite":
        return engine
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # pysqlite must not BEGIN on its own: _begin below does
        cur = dbapi_connection.cursor()
        for pragma in ("busy_timeout=30000", "journal_mode=WAL", "foreign_keys=ON"):  # busy_timeout first: WAL needs a lock
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # take the write lock now (waiting up to busy_timeout), not mid-transaction

    return engine


class FeedbackStore:
    """Predictions and corrections; see the module docstring. Use as a context manager or call close()."""

    def __init__(self, url: str = None, labels=None, store_text: bool = True, echo=False):
        from alembic import command
        from alembic.config import Config

        self.engine = make_engine(url, echo)
        self.store_text = store_text
        self.set_labels(labels)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
        try:
            with self.engine.begin() as conn:  # one transaction: alembic sees it as external and runs inside it
                if conn.dialect.name == "postgresql":
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except sa.exc.DBAPIError as e:  # no server there, wrong credentials, a folder for a SQLite file, ...
            self.engine.dispose()
            reason = str(e.orig).strip().splitlines()[0] if e.orig is not None else str(e)
            raise FeedbackError(f"cannot open the feedback store {self.engine.url.render_as_string(hide_password=True)}: "
                                f"{reason} (--db / ${FEEDBACK_URL_ENV})") from None

    def set_labels(self, labels):
        """Replace the valid label set (None accepts any label)."""
        self.labels = None if labels is None else frozenset(labels)

    def close(self):
        self.engine.dispose()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- predictions ----------------------------------------------------------------------------------

    def record(self, texts: list, results: list, subjects: list = None) -> list:
        """Store one prediction per classified email, in one transaction. Returns their ids, None for rows
        not recorded (the classifier reported an error, or the email does not normalise)."""
        subjects = [None] * len(texts) if subjects is None else subjects
        if not len(texts) == len(results) == len(subjects):
            raise FeedbackError(f"record() needs as many results and subjects as texts, got {len(texts)} texts, "
                                f"{len(results)} results and {len(subjects)} subjects")
        now, rows, ids = datetime.now(timezone.utc), [], []
        for body, subject, r in zip(texts, subjects, results):
            try:
                norm = None if getattr(r, "error", "") else normalise(body, subject)
            except InvalidEmail:
                norm = None
            if norm is None:
                ids.append(None)
                continue
            versions = getattr(r, "model_versions", None) or {}
            pinned = {column: None if versions.get(k) is None else str(versions[k]) for k, column in VERSION_COLUMNS.items()}
            rows.append(PredictionRow(
                id=uuid.uuid4().hex, text=norm if self.store_text else None, text_hash=text_hash(norm),
                label=r.label, probability=float(r.probability), candidates=[str(x) for x in r.top_labels],
                probabilities=[float(p) for p in r.top_probabilities], created_at=now,
                **pinned))
            ids.append(rows[-1].id)
        if rows:
            with self._session.begin() as s:
                s.add_all(rows)
        return ids

    def prediction(self, prediction_id) -> StoredPrediction:
        with self._session.begin() as s:
            row = s.get(PredictionRow, str(prediction_id))
            if row is None:
                raise UnknownPrediction(f"no prediction with id {prediction_id!r}")
            return _prediction(row)

    # --- corrections ----------------------------------------------------------------------------------

    def _check(self, label, who, source="api"):
        if not isinstance(label, str) or not label:
            raise FeedbackError(f"label must be a non-empty string, got {label!r}")
        if self.labels is not None and label not in self.labels:
            close = difflib.get_close_matches(label, sorted(self.labels), n=3)
            raise UnknownLabel(f"unknown label {label!r}" + (f"; did you mean {', '.join(map(repr, close))}?" if close else
                                                             f" ({len(self.labels)} labels in the taxonomy)"))
        if len(label) > 100:
            raise FeedbackError(f"label is {len(label)} characters, over the 100 the store keeps: {label[:40]!r}...")
        if who is not None and (not isinstance(who, str) or len(who) > 200):
            raise FeedbackError(f"who must be a string of at most 200 characters, got {str(who)[:40]!r}")
        if source not in SOURCES:
            raise FeedbackError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")

    @staticmethod
    def _normalise(text, subject):
        try:
            return normalise(text, subject)
        except InvalidEmail as e:
            raise FeedbackError(f"email text: {e}") from e

    def _newest_label(self, s, h):
        """The label the system chose for this email most recently, if it ever classified it."""
        return s.scalar(select(PredictionRow.label).where(PredictionRow.text_hash == h)
                        .order_by(PredictionRow.created_at.desc()).limit(1))

    def correct(self, prediction_id: str = None, label: str = None, *, text: str = None, subject: str = None,
                who: str = None, source="api") -> StoredCorrection:
        """Record the correct label of one email, named by the prediction's id or by its text."""
        if (prediction_id is None) == (text is None):
            raise FeedbackError("give exactly one of prediction_id or text to name the email, got "
                                + ("both" if text is not None else "neither"))
        self._check(label, who, source)
        norm = None if text is None else self._normalise(text, subject)  # before taking the write lock
        h = None
        try:
            with self._session.begin() as s:
                if prediction_id is not None:
                    p = s.get(PredictionRow, str(prediction_id))
                    if p is None:
                        raise UnknownPrediction(f"no prediction with id {prediction_id!r}")
                    h, keep, wrong = p.text_hash, p.text, p.label
                else:
                    h, keep = text_hash(norm), norm
                    wrong = self._newest_label(s, h)
                row = CorrectionRow(prediction_id=prediction_id and str(prediction_id),
                                    text=keep if self.store_text else None, text_hash=h, label=label,
                                    wrong_label=wrong if wrong != label else None,  # a confirmation is no negative
                                    who=who, source=source, created_at=datetime.now(timezone.utc))
                s.add(row)
                s.flush()  # the unique constraint fires here, if another writer got there first
                return _correction(row)
        except IntegrityError:
            with self._session.begin() as s:  # the failed transaction is gone: read the winner in a new one
                existing = s.scalar(select(CorrectionRow).where(CorrectionRow.text_hash == h)) if h else None
                if existing is None:
                    raise
                raise _already(existing, label) from None

    def corrections(self, since_id: int = 0) -> list:
        with self._session.begin() as s:
            rows = s.scalars(select(CorrectionRow).where(CorrectionRow.id > since_id).order_by(CorrectionRow.id))
            return [_correction(r) for r in rows]

    def counts(self) -> dict:
        with self._session.begin() as s:
            return {"predictions": s.scalar(select(sa.func.count()).select_from(PredictionRow)),
                    "corrections": s.scalar(select(sa.func.count()).select_from(CorrectionRow))}

    # --- bulk import ----------------------------------------------------------------------------------

    @staticmethod
    def _read_rows(path: Path):
        """(line, dict or problem string) for each row of a .jsonl or .csv file."""
        suffix = path.suffix.lower()
        if suffix not in (".jsonl", ".csv"):
            raise FeedbackError(f"cannot import {path}: expected a .jsonl or .csv file, got {suffix or 'no extension'!r}")
        try:  # a file in another encoding is refused whole, before any row is stored
            path.read_bytes().decode("utf-8")
        except OSError as e:  # missing, a folder, no permission
            raise FeedbackError(f"cannot import {path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise FeedbackError(f"cannot import {path}: not UTF-8 ({e.reason} at byte {e.start}); save it as UTF-8") from None
        with path.open(encoding="utf-8", newline="") as f:
            if suffix == ".jsonl":
                for line, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    try:
                        obj = json.loads(raw)
                    except json.JSONDecodeError as e:
                        yield line, f"bad JSON: {e.msg} (column {e.colno})"
                        continue
                    yield line, obj if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"
                return
            reader = csv.reader(f)
            header = next(reader, [])
            columns = set(header)
            if "label" not in columns or not columns & {"prediction_id", "text"}:
                yield 1, f"the header must name a label column and a prediction_id or text column, got {sorted(columns)}"
                return
            end = reader.line_num
            for cells in reader:  # a row starts on the line after the previous one ended (quoted cells can span lines)
                start, end = end + 1, reader.line_num
                if not cells:  # a blank line
                    continue
                yield start, {k: v for k, v in zip(header, cells) if v != ""}  # empty cells mean absent

    def import_file(self, path, who: str = None) -> int:
        """Import corrections from a .jsonl or .csv file, all or nothing: every row is checked first and any
        problem refuses the whole file (ImportProblems lists them). Returns the number imported."""
        path = Path(path)
        problems, rows = [], []  # problems: (line, message); rows: (line, fields checked so far)
        for line, fields in self._read_rows(path):
            if isinstance(fields, str):
                problems.append((line, fields))
                continue
            try:
                pid, text, label = fields.get("prediction_id"), fields.get("text"), fields.get("label")
                if label is None:
                    raise FeedbackError("missing 'label'")
                if (pid is None) == (text is None):
                    raise FeedbackError("give exactly one of 'prediction_id' or 'text', got "
                                        + ("both" if pid is not None else "neither"))
                for key in ("prediction_id", "text", "subject"):
                    if fields.get(key) is not None and not isinstance(fields[key], str):
                        raise FeedbackError(f"'{key}' must be a string, got {fields[key]!r}")
                row_who = fields.get("who", who)
                self._check(label, row_who, "import")
                norm = None if text is None else self._normalise(text, fields.get("subject"))
                rows.append((line, dict(pid=pid, norm=norm, label=label, who=row_who)))
            except FeedbackError as e:
                problems.append((line, str(e)))
        todo = []  # (line, text_hash, prediction row or None, fields)
        try:
            with self._session.begin() as s:  # SQLite: the write lock is held from the checks to the inserts
                preds = {}
                for clause in _where_in(PredictionRow.id, [r["pid"] for _, r in rows if r["pid"] is not None]):
                    preds.update({p.id: p for p in s.scalars(select(PredictionRow).where(clause))})
                seen = {}  # text_hash -> (line, label) of its first row in this file
                for line, r in rows:
                    if r["pid"] is not None and r["pid"] not in preds:
                        problems.append((line, f"no prediction with id {r['pid']!r}"))
                        continue
                    p = preds.get(r["pid"])
                    h = p.text_hash if p else text_hash(r["norm"])
                    if h in seen:
                        first, first_label = seen[h]
                        problems.append((line, f"same email as line {first} " + (
                            f"(duplicate, both {first_label!r})" if first_label == r["label"]
                            else f"with another label ({first_label!r} there, {r['label']!r} here)")))
                        continue
                    seen[h] = (line, r["label"])
                    todo.append((line, h, p, r))
                existing = self._corrections_by_hash(s, seen)
                problems += [(line, str(_already(existing[h], r["label"]))) for line, h, _, r in todo if h in existing]
                if problems:
                    raise ImportProblems(f"{path}:{line}: {msg}" for line, msg in sorted(problems, key=lambda x: x[0]))
                now = datetime.now(timezone.utc)
                for _, h, p, r in todo:
                    wrong = p.label if p else self._newest_label(s, h)
                    s.add(CorrectionRow(prediction_id=r["pid"], text=(p.text if p else r["norm"]) if self.store_text else None,
                                        text_hash=h, label=r["label"], wrong_label=wrong if wrong != r["label"] else None,
                                        who=r["who"], source="import", created_at=now))
                s.flush()
                return len(todo)
        except IntegrityError:  # a concurrent writer corrected one of these emails after our checks (PostgreSQL)
            with self._session.begin() as s:
                won = self._corrections_by_hash(s, [h for _, h, _, _ in todo])
            raise ImportProblems([f"{path}:{line}: {_already(won[h], r['label'])} (written during this import)"
                                  for line, h, _, r in todo if h in won]
                                 or [f"{path}: the database refused the import; nothing imported"]) from None

    @staticmethod
    def _corrections_by_hash(s, hashes) -> dict:
        found = {}
        for clause in _where_in(CorrectionRow.text_hash, hashes):
            found.update({c.text_hash: c for c in s.scalars(select(CorrectionRow).where(clause))})
        return found
