"""The database engine and sessions: SQLite by default, PostgreSQL in production.

A SQLite file is migrated to the newest schema when a process first opens it; a PostgreSQL
database only by `entraflow db upgrade` (see `models.migrations`). PostgreSQL connections are
pooled as the `ENTRAFLOW_DB_*` settings say. Which of the database's failures pass (it is away,
busy or timing out) is judged here too, for every process that waits such failures out.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, TypeDecorator, event, text
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import NullPool
from sqlmodel import Session, create_engine

from entraflow.home import private_database
from entraflow.settings import get_settings
from models import migrations

log = logging.getLogger(__name__)

# How long a SQLite writer waits for another process's write lock before failing.
SQLITE_BUSY_TIMEOUT_S = 30.0
# The path SQLite reads as "no file, a database in memory".
SQLITE_MEMORY = ":memory:"

# SQLSTATE classes that a later try can get past: 08 connection exception, 40 transaction
# rollback (serialization failure, deadlock), 53 insufficient resources, 57 operator
# intervention (statement timeout, shutdown), 58 system error; and 42, a table, column or grant
# missing: the deployment's fault, mended by `entraflow db upgrade` or a grant, which no value
# can cause (values are bound, never written into SQL), so the work waits for the mend instead
# of failing. Every other class, 22 data exception, 23 integrity, 54 program limit (an index row
# too large) among them, is the fault of the values written (issue 13: a 20 KB id failing
# PostgreSQL's index was retried forever as an `OperationalError`, which is also what a lost
# connection raises).
TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "42", "53", "57", "58"})
# Single SQLSTATEs of other classes that pass: 55P03 lock_not_available (a lock timeout).
TRANSIENT_SQLSTATES = frozenset({"55P03"})
# SQLite's primary result codes that pass: BUSY and LOCKED ("database is locked"), NOMEM, IOERR,
# FULL, CANTOPEN and PROTOCOL. TOOBIG, CONSTRAINT, MISMATCH and the rest are the values' fault.
TRANSIENT_SQLITE_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)
# Extended SQLite result codes carry the primary one in their low byte.
_SQLITE_PRIMARY_MASK = 0xFF


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
# The threads of a worker open an engine once between them: two would migrate the file at once.
_engines_lock = threading.Lock()


def get_engine(database_url: str) -> Engine:
    """One engine per URL and process; a SQLite file is migrated to the newest schema."""
    engine = _engines.get(database_url)
    if engine is not None:
        return engine
    with _engines_lock:
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


def database_reachable(database_url: str) -> bool:
    """Whether this process reaches the database: the health probe of `/healthz`."""
    try:
        with get_engine(database_url).connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        log.warning("health: database unreachable: %s", type(exc).__name__)
        return False
    return True


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


def is_transient_database_error(exc: BaseException) -> bool:
    """Whether `exc` is a database failure that a later try can get past.

    The database unreachable, busy, timing out, or its schema behind: not a value it refuses.
    """
    if isinstance(exc, PoolTimeout | DisconnectionError):  # no pooled connection free in time
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:  # SQLAlchemy saw the connection lost
        return True
    sqlstate = _sqlstate(exc.orig)
    if sqlstate is not None:
        return sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES or sqlstate in TRANSIENT_SQLSTATES
    sqlite_code = getattr(exc.orig, "sqlite_errorcode", None)
    if isinstance(sqlite_code, int):
        return sqlite_code & _SQLITE_PRIMARY_MASK in TRANSIENT_SQLITE_CODES
    # No code at all: the driver failed before any server answered (refused, reset, closed).
    return isinstance(exc, OperationalError | InterfaceError)


def database_error_summary(exc: DBAPIError) -> str:
    """The driver's first line of `exc`, with its SQLSTATE or SQLite result code."""
    orig = exc.orig
    lines = str(orig).strip().splitlines()
    message = lines[0] if lines else type(orig).__name__
    sqlstate = _sqlstate(orig)
    sqlite_name = getattr(orig, "sqlite_errorname", None)
    if sqlstate is not None:
        message += f" ({type(orig).__name__}, SQLSTATE {sqlstate})"
    elif isinstance(sqlite_name, str):
        message += f" ({sqlite_name})"
    return message


def _sqlstate(orig: BaseException | None) -> str | None:
    # psycopg 3 names it `sqlstate`, psycopg2 `pgcode`; None for errors raised by the driver.
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code if isinstance(code, str) and code else None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the scheduler, several workers and the CLI read while one of them writes.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
