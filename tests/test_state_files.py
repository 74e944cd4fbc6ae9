"""`ENTRAFLOW_HOME` and the SQLite database are private to the user entraflow runs as."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from entraflow.home import private_folder, private_home
from entraflow.redis_server import EmbeddedRedis
from entraflow.settings import get_settings
from models.db import forget_engines

# What a usual login shell gives: files 0644 and folders 0755 unless entraflow says otherwise.
LOOSE_UMASK = 0o022
DATABASE = "entraflow.db"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    previous = os.umask(LOOSE_UMASK)
    yield
    os.umask(previous)


@pytest.fixture
def default_home(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, loose_umask: None
) -> Iterator[Path]:
    """A home not yet made, holding the default SQLite database; the session's Redis."""
    home = tmp_path / "not-yet" / "home"
    monkeypatch.setenv("ENTRAFLOW_HOME", str(home))
    monkeypatch.setenv("ENTRAFLOW_REDIS_URL", redis_url)
    monkeypatch.delenv("ENTRAFLOW_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    forget_engines()
    yield home
    forget_engines()
    get_settings.cache_clear()


def submit_a_batch(tmp_path: Path) -> None:
    """A real write: a batch stored in the database and queued."""
    group, user = (str(uuid.UUID(int=n)) for n in (1, 2))
    path = tmp_path / "rows.csv"
    path.write_text(f"action,user_id,group_id\nadd,{user},{group}\n")
    result = CliRunner().invoke(cli, ["batch", "submit", str(path), "--json"])
    assert result.exit_code == 0, result.output


def test_a_new_home_and_its_database_wal_and_shm_are_private_after_a_write(
    default_home: Path, tmp_path: Path
) -> None:
    submit_a_batch(tmp_path)

    database = default_home / DATABASE
    assert oct(mode(default_home)) == oct(0o700)
    assert oct(mode(default_home.parent)) == oct(0o700)  # made by entraflow too
    for path in (
        database,
        database.with_name(DATABASE + "-wal"),
        database.with_name(DATABASE + "-shm"),
    ):
        assert path.exists(), path
        assert (path.name, oct(mode(path))) == (path.name, oct(0o600))


def test_a_loose_home_database_wal_and_shm_left_by_an_older_version_are_tightened_on_use(
    default_home: Path,
) -> None:
    default_home.mkdir(parents=True, mode=0o755)
    database = default_home / DATABASE
    side_files = [database.with_name(DATABASE + suffix) for suffix in ("-wal", "-shm")]
    # An older process still has the database open in WAL mode: its side files exist, 0644.
    older = sqlite3.connect(database)
    try:
        older.execute("PRAGMA journal_mode=WAL")
        older.execute("CREATE TABLE older (x)")
        older.commit()
        loose = [oct(mode(p)) for p in (default_home, database, *side_files)]
        assert loose == [oct(0o755), oct(0o644), oct(0o644), oct(0o644)]

        result = CliRunner().invoke(cli, ["batch", "list", "--json"])

        assert result.exit_code == 0, result.output
        assert json.loads(result.output) == []
        tight = [oct(mode(p)) for p in (default_home, database, *side_files)]
        assert tight == [oct(0o700), oct(0o600), oct(0o600), oct(0o600)]
    finally:
        older.close()


def test_missing_folders_are_made_private_and_existing_ones_outside_the_home_left_alone(
    tmp_path: Path, loose_umask: None
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)

    private_folder(shared / "a" / "b")

    assert oct(mode(shared)) == oct(0o755)
    assert [oct(mode(p)) for p in (shared / "a", shared / "a" / "b")] == [oct(0o700)] * 2

    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o775)
    assert private_home(home) == home.resolve()
    assert oct(mode(home)) == oct(0o700)


def test_a_home_first_made_by_the_embedded_redis_is_private(
    tmp_path: Path, loose_umask: None
) -> None:
    home = tmp_path / "not-yet" / "home"
    server = EmbeddedRedis(home / "redis")
    server.ensure_running()
    try:
        assert [oct(mode(p)) for p in (home.parent, home, home / "redis")] == [oct(0o700)] * 3
    finally:
        server.stop()
