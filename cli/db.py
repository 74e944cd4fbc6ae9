"""`entraflow db ...`: the database schema, migrated with `models.migrations`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click
from alembic.util import CommandError
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from cli.output import fail_json, print_json
from entraflow.settings import get_settings
from models import migrations
from models.db import create_database_engine


@click.group()
def db() -> None:
    """Migrate the database schema (PostgreSQL: before the scheduler and workers start)."""


@db.command("upgrade")
@click.argument("revision", default=migrations.HEAD)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def upgrade_command(revision: str, as_json: bool) -> None:
    """Migrate up to REVISION (default: the newest)."""
    _migrate(lambda engine: migrations.upgrade(engine, revision), as_json)


@db.command("downgrade")
@click.argument("revision")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def downgrade_command(revision: str, as_json: bool) -> None:
    """Migrate down to REVISION (`base` drops every table; SQLite upgrades again on next use)."""
    _migrate(lambda engine: migrations.downgrade(engine, revision), as_json)


@db.command("current")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def current_command(as_json: bool) -> None:
    """Show the revision the database is at, and the newest one."""
    with _engine() as engine:
        _report(engine, as_json)


def _migrate(migrate: Callable[[Engine], None], as_json: bool) -> None:
    with _engine() as engine:
        migrate(engine)
        _report(engine, as_json)


def _report(engine: Engine, as_json: bool) -> None:
    revisions = list(migrations.current_revisions(engine))
    head = migrations.head_revision()
    if as_json:
        print_json({"revisions": revisions, "head": head, "at_head": revisions == [head]})
        return
    at = ", ".join(revisions) or "no revision (empty)"
    note = " (up to date)" if revisions == [head] else ""
    click.echo(f"database at {at}; newest {head}{note}")


@contextmanager
def _engine() -> Iterator[Engine]:
    engine = create_database_engine(get_settings().resolved_database_url, for_migrations=True)
    try:
        yield engine
    except CommandError as exc:
        fail_json({"outcome": "invalid_revision", "message": str(exc)})
    except DBAPIError as exc:
        # The driver's message names the host and the failure, never the URL's password.
        fail_json({"outcome": "database_error", "message": str(exc.orig)})
    finally:
        engine.dispose()
