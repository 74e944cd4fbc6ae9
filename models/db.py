"""The database engine and sessions: SQLite by default, PostgreSQL in production.

A SQLite file is migrated to the newest schema when a process first opens it; a PostgreSQL
database only by `entraflow db upgrade` (see `models.migrations`). PostgreSQL connections are
pooled as the `ENTRAFLOW_DB_*` settings say.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, TypeDecorator, event
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.pool import NullPool
from sqlmodel import Session, create_engine

from entraflow.home import private_database
from entraflow.settings import get_settings
from models import migrations

# How long a SQLite writer waits for another process's write lock before failing.
SQLITE_BUSY_TIMEOUT_S = 30.0
# The path SQLite reads as "no file, a database in memory".
SQLITE_MEMORY = ":memory:"


def utcnow() -> datetime:
    """Now, in UTC: every moment entraflow stores."""
    return datetime.now(UTC)


class Timestamp(TypeDecorator[datetime]):
    """A moment in UTC, stored with its zone where the database can, and read back aware."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"a naive datetime cannot be stored as a moment: {value!r}")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        # SQLite keeps no zone: what it gives back was written in UTC.
        if value is None or value.tzinfo is not None:
            return value
        return value.replace(tzinfo=UTC)


# One engine per URL in this process; a forked worker child drops the parent's.
_engines: dict[str, Engine] = {}


def get_engine(database_url: str) -> Engine:
    """One engine per URL and process; a SQLite file is migrated to the newest schema."""
    engine = _engines.get(database_url)
    if engine is None:
        engine = create_database_engine(database_url)
        if engine.dialect.name == "sqlite":
            migrations.upgrade(engine)
        _engines[database_url] = engine
    return engine


def create_database_engine(database_url: str, *, for_migrations: bool = False) -> Engine:
    """A new engine for the URL; `for_migrations`: unpooled, and no statement time limit."""
    if database_url.startswith("sqlite:///"):
        path = database_url.removeprefix("sqlite:///")
        if path and path != SQLITE_MEMORY:
            # Before SQLite opens it: its WAL and shared-memory files take the file's mode.
            private_database(Path(path), get_settings().home)
        pool: dict[str, Any] = {"poolclass": NullPool} if for_migrations else {}
        engine = create_engine(
            database_url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
            **pool,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if for_migrations:
        # A migration may rewrite a large table: it runs for as long as it takes.
        return create_engine(database_url, poolclass=NullPool)
    settings = get_settings()
    connect_args: dict[str, Any] = {}
    if database_url.startswith("postgresql") and settings.db_statement_timeout_s > 0:
        timeout_ms = int(settings.db_statement_timeout_s * 1000)
        connect_args["options"] = f"-c statement_timeout={timeout_ms}"
    return create_engine(
        database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_s,
        pool_recycle=settings.db_pool_recycle_s,
        pool_pre_ping=settings.db_pool_pre_ping,
        connect_args=connect_args,
    )


def forget_engines() -> None:
    """Drop this process's engines: a forked child must open its own connections."""
    for engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()


@contextmanager
def session_scope(database_url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(get_engine(database_url), expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the scheduler, several workers and the CLI read while one of them writes.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
