"""Schema migrations with Alembic, configured here rather than by an alembic.ini.

How the schema comes to be:

- SQLite (the zero-setup default): `models.db.get_engine` upgrades the file to the newest
  revision the first time a process opens it, so a fresh machine needs no setup step. Processes
  racing to do so take turns on SQLite's write lock, and the later ones find nothing to do.
- PostgreSQL (production): nothing is created on connect. `entraflow db upgrade` migrates the
  database, once per release, before the scheduler and the workers start.

A database made by `create_all` before migrations existed has tables but no revision: an upgrade
adopts it at the initial revision (which creates exactly those tables) and goes on from there.

This package takes an engine and makes none: `models.db` makes them, and brings a SQLite file to
head through `upgrade`, so imports run one way, from `models.db` to here.

Every schema change is a new file in `versions/`. Write it with autogenerate and read it over:

    python - <<'EOF'
    from models.db import create_database_engine
    from models.migrations import revision
    revision(create_database_engine("sqlite:///new.db", for_migrations=True), "add x")
    EOF

`tests/test_migrations.py` fails while the models and the migrations disagree.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

HEAD = "head"
BASE = "base"
# The revision that creates the tables `create_all` made before migrations existed.
INITIAL_REVISION = "0001"
# A table every entraflow database has had since the first release.
_SENTINEL_TABLE = "flow_run"
# PostgreSQL's advisory lock that one migrating process holds at a time ("entraflw" in ASCII).
_LOCK_KEY = 0x656E747261666C77
_HERE = Path(__file__).parent


def alembic_config(connection: Connection) -> Config:
    """Alembic's configuration for this package, migrating `connection`."""
    config = Config()
    config.set_main_option("script_location", str(_HERE))
    # Paths are split as the OS does: an install path may contain spaces.
    config.set_main_option("path_separator", "os")
    # New revision files start with their date, so `versions/` lists them in order.
    config.set_main_option("file_template", "%%(year)d%%(month).2d%%(day).2d_%%(rev)s_%%(slug)s")
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision in `versions/`."""
    head = ScriptDirectory(str(_HERE)).get_current_head()
    if head is None:
        raise RuntimeError("no migrations found")
    return head


def current_revisions(engine: Engine) -> tuple[str, ...]:
    """The revisions the database is at: empty for an unmigrated database."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_heads()


def upgrade(engine: Engine, revision: str = HEAD) -> None:
    """Migrate the database up to `revision`, adopting a database made by `create_all`."""
    with _migrating(engine) as connection:
        context = MigrationContext.configure(connection)
        if not context.get_current_heads() and inspect(connection).has_table(_SENTINEL_TABLE):
            context.stamp(ScriptDirectory.from_config(alembic_config(connection)), INITIAL_REVISION)
        command.upgrade(alembic_config(connection), revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate the database down to `revision` (`base`: no entraflow tables at all)."""
    with _migrating(engine) as connection:
        command.downgrade(alembic_config(connection), revision)


def revision(engine: Engine, message: str) -> None:
    """Write a new revision file from what the models have and the database, at head, lacks."""
    upgrade(engine)
    with engine.begin() as connection:
        command.revision(alembic_config(connection), message, autogenerate=True)


@contextmanager
def _migrating(engine: Engine) -> Iterator[Connection]:
    # One transaction that holds the database's migration lock from its start: two processes
    # migrating at once would otherwise both find no tables and both create them.
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        elif engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        try:
            yield connection
        except BaseException:
            connection.rollback()
            raise
        connection.commit()
