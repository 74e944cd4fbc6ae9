"""Schema migrations: up and down on SQLite and PostgreSQL, and in step with the models."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

from cli.main import cli
from entraflow.settings import get_settings
from models import migrations
from models.db import create_database_engine, forget_engines, get_engine

POSTGRES_URL = os.environ.get("ENTRAFLOW_TEST_DATABASE_URL")
ENTRAFLOW_TABLES = frozenset(SQLModel.metadata.tables)
# The enum types the initial migration makes on PostgreSQL.
ENUM_TYPES = ("batchstatus", "causekind", "connectionkind", "connectionstatus", "runstatus")


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param(
            "postgresql",
            marks=pytest.mark.skipif(
                not POSTGRES_URL, reason="ENTRAFLOW_TEST_DATABASE_URL is not set (no PostgreSQL)"
            ),
        ),
    ]
)
def migrated_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine for migrations on a temporary SQLite file or the test PostgreSQL database."""
    url = f"sqlite:///{tmp_path / 'migrated.db'}" if request.param == "sqlite" else POSTGRES_URL
    assert url is not None
    engine = create_database_engine(url, for_migrations=True)
    yield engine
    # The suite's other tests expect the newest schema on the shared PostgreSQL database.
    migrations.upgrade(engine)
    engine.dispose()
    forget_engines()


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) & ENTRAFLOW_TABLES


def differences(engine: Engine) -> list[object]:
    with engine.connect() as connection:
        return list(compare_metadata(MigrationContext.configure(connection), SQLModel.metadata))


def test_downgrade_to_base_removes_every_table_and_upgrade_restores_the_newest_schema(
    migrated_engine: Engine,
) -> None:
    migrations.upgrade(migrated_engine)
    migrations.downgrade(migrated_engine, migrations.BASE)

    assert migrations.current_revisions(migrated_engine) == ()
    assert tables(migrated_engine) == set()
    if migrated_engine.dialect.name == "postgresql":
        with migrated_engine.connect() as connection:
            left = connection.execute(
                text("SELECT typname FROM pg_type WHERE typname = ANY(:names)"),
                {"names": list(ENUM_TYPES)},
            ).all()
        assert left == []

    migrations.upgrade(migrated_engine)

    assert migrations.current_revisions(migrated_engine) == (migrations.head_revision(),)
    assert tables(migrated_engine) == ENTRAFLOW_TABLES


def test_the_migrations_create_exactly_what_the_models_define(migrated_engine: Engine) -> None:
    migrations.downgrade(migrated_engine, migrations.BASE)
    migrations.upgrade(migrated_engine)

    # Not empty: a model changed without a migration. Write one with models.migrations.revision.
    assert differences(migrated_engine) == []


def test_a_fresh_sqlite_file_is_migrated_to_the_newest_schema_on_first_use(
    tmp_path: Path,
) -> None:
    engine = get_engine(f"sqlite:///{tmp_path / 'fresh' / 'entraflow.db'}")

    assert migrations.current_revisions(engine) == (migrations.head_revision(),)
    assert tables(engine) == ENTRAFLOW_TABLES
    forget_engines()


def test_a_database_made_by_create_all_before_migrations_is_adopted(tmp_path: Path) -> None:
    engine = create_database_engine(f"sqlite:///{tmp_path / 'old.db'}", for_migrations=True)
    # What `create_all` made then: the initial revision's schema, with no revision recorded.
    migrations.upgrade(engine, migrations.INITIAL_REVISION)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE alembic_version"))

    migrations.upgrade(engine)

    assert migrations.current_revisions(engine) == (migrations.head_revision(),)
    assert differences(engine) == []


def test_db_commands_upgrade_downgrade_and_report_the_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENTRAFLOW_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    get_settings.cache_clear()
    head = migrations.head_revision()

    def db(*args: str) -> dict[str, object]:
        result = CliRunner().invoke(cli, ["db", *args, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)  # type: ignore[no-any-return]

    assert db("current") == {"revisions": [], "head": head, "at_head": False}
    assert db("upgrade") == {"revisions": [head], "head": head, "at_head": True}
    assert db("downgrade", "base")["revisions"] == []
    assert db("upgrade", head)["at_head"] is True
    get_settings.cache_clear()


def test_db_downgrade_to_an_unknown_revision_fails_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENTRAFLOW_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    get_settings.cache_clear()

    result = CliRunner().invoke(cli, ["db", "downgrade", "nonesuch"])

    assert result.exit_code == 1
    assert json.loads(result.stdout)["outcome"] == "invalid_revision"
    get_settings.cache_clear()
