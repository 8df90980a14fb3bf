"""Engines and sessions, one engine per database URL and process."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

_lock = threading.Lock()
_engines: dict[tuple[str, int], Engine] = {}

# Seconds a SQLite connection waits for a lock held by another process (API or worker).
_SQLITE_BUSY_TIMEOUT_S = 30


def _configure_sqlite(dbapi_connection, _record) -> None:  # noqa: ANN001 - DBAPI types vary
    cursor = dbapi_connection.cursor()
    # WAL lets the API read while a worker writes; foreign keys are off by default in SQLite.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def get_engine(url: str) -> Engine:
    """Return the engine for `url`, creating it on first use in this process.

    Engines are keyed by process id as well, because a Celery prefork child must not reuse the
    connections of the parent it was forked from.
    """
    key = (url, os.getpid())
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            if url.startswith("sqlite"):
                engine = create_engine(
                    url,
                    connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
                )
                event.listen(engine, "connect", _configure_sqlite)
            else:
                engine = create_engine(url, pool_pre_ping=True)
            _engines[key] = engine
        return engine


def dispose_engines() -> None:
    """Close the connections of every engine this process created."""
    with _lock:
        for (_, pid), engine in list(_engines.items()):
            if pid == os.getpid():
                engine.dispose()
        _engines.clear()


def session_factory(url: str) -> sessionmaker[Session]:
    """Return a session factory bound to the engine of `url`."""
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """Yield a session that is rolled back on error and always closed (commits are explicit)."""
    session = session_factory(url)()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
