"""Alembic environment for the feedback store.

FeedbackStore runs the migrations itself, passing its open connection (inside its transaction) through
config.attributes["connection"]. From the command line, `alembic -c <ini>` with sqlalchemy.url set (or
MAILROUTE_FEEDBACK_URL) also works: the engine is built like the store builds it (SQLite pragmas included).
"""

from alembic import context

from mailroute.feedback_store import Base, default_url, make_engine

config = context.config


def run(connection):
    # render_as_batch: SQLite cannot ALTER most things, later migrations get copy-and-move for free
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("the feedback store's migrations run online only (no --sql)")
if config.attributes.get("connection") is not None:
    run(config.attributes["connection"])
else:
    engine = make_engine(config.get_main_option("sqlalchemy.url") or default_url())
    with engine.begin() as conn:
        run(conn)
    engine.dispose()
