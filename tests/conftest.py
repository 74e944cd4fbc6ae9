"""Shared fixtures: one real Redis and one database for the session, clean for every test.

Unit tests of Redis logic (the budget's Lua scripts, the producer's stream writes) take
`fake_redis`, an in-process fakeredis; whatever only a server proves (processes, restarts,
AUTH/TLS, blocking reads, a Celery broker) takes `redis_client` on the real one.

With `ENTRAFLOW_TEST_REDIS_URL` / `ENTRAFLOW_TEST_DATABASE_URL` set (CI sets them to this
machine's Redis and PostgreSQL) the suite uses those; without them it starts the embedded Redis
and uses SQLite files, as on a fresh machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest
import redis
from sqlmodel import SQLModel

from entraflow.redis_server import EmbeddedRedis
from entraflow.secrets import generate_key
from entraflow.settings import Settings, get_settings
from harness.stack import LocalStack, sandbox_environment
from models import migrations
from models.db import create_database_engine, forget_engines, get_engine
from sandbox.server import SandboxServer
from worker import retry


@pytest.fixture
def no_sleeping() -> Iterator[None]:
    """Retry waits recorded in `worker.retry.recorded_waits_s()` instead of slept."""
    retry.set_testing(True)
    yield
    retry.set_testing(False)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session's real Redis server."""
    configured = os.environ.get("ENTRAFLOW_TEST_REDIS_URL")
    if configured:
        yield configured
        return
    # Never stopped for idleness: a stretch of tests without Redis must not lose it for the rest.
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), idle_stop_s=0)
    url, _ = server.ensure_running()
    yield url
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def _session_environment(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    # The Celery app reads its broker from the settings once per process: fix it for the session.
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith("ENTRAFLOW_") and not name.startswith("ENTRAFLOW_TEST_"):
            del os.environ[name]
    os.environ["ENTRAFLOW_REDIS_URL"] = redis_url
    os.environ["ENTRAFLOW_HOME"] = str(tmp_path_factory.mktemp("home"))
    get_settings.cache_clear()
    yield
    os.environ.clear()
    os.environ.update(saved)
    get_settings.cache_clear()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the session's Redis, flushed before and after the test."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def fake_redis() -> Iterator[redis.Redis]:
    """An empty in-process Redis of the test's own, with Lua (fakeredis): no server involved."""
    # A server of its own: fakeredis clients made alike would otherwise share one.
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    yield client
    client.close()


@pytest.fixture(scope="session")
def _configured_database_schema() -> None:
    # A machine's database outlives test sessions: rebuild it with today's migrations once.
    url = os.environ.get("ENTRAFLOW_TEST_DATABASE_URL")
    if url:
        engine = create_database_engine(url, for_migrations=True)
        migrations.downgrade(engine, migrations.BASE)
        # Tables a session made with create_all, before migrations existed, have no revision.
        SQLModel.metadata.drop_all(engine)
        migrations.upgrade(engine)
        engine.dispose()


@pytest.fixture
def database_url(tmp_path: Path, _configured_database_schema: None) -> Iterator[str]:
    """An empty run history for the test."""
    url = os.environ.get("ENTRAFLOW_TEST_DATABASE_URL") or f"sqlite:///{tmp_path / 'runs.db'}"
    engine = get_engine(url)
    _empty(url)
    yield url
    _empty(url)
    engine.dispose()
    forget_engines()


def _empty(database_url: str) -> None:
    engine = get_engine(database_url)
    with engine.begin() as connection:
        for table in reversed(SQLModel.metadata.sorted_tables):
            connection.execute(table.delete())


@pytest.fixture
def settings(
    tmp_path: Path,
    redis_url: str,
    database_url: str,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Settings]:
    """Settings for one test: its own home, the session's Redis, an empty database."""
    monkeypatch.setenv("ENTRAFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ENTRAFLOW_DATABASE_URL", database_url)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture
def sandbox_server() -> Iterator[SandboxServer]:
    """The Graph sandbox over real HTTP on a free loopback port."""
    server = SandboxServer().start()
    yield server
    server.stop()


@pytest.fixture
def entra(
    settings: Settings, sandbox_server: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """Settings pointing at the sandbox's app registration, with a secret key."""
    for name, value in {
        **sandbox_environment(sandbox_server),
        "ENTRAFLOW_SECRET_KEY": generate_key(),
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """An embedded server of the test's own: restarting the session's would disturb the rest."""
    server = EmbeddedRedis(tmp_path / "redis")
    server.ensure_running()
    yield server
    server.stop()


@pytest.fixture
def stack(settings: Settings, tmp_path: Path) -> Iterator[LocalStack]:
    """The sandbox and one real worker process, on the session's Redis and the test's database."""
    local = LocalStack(
        home=settings.home,
        redis_url=settings.redis_url,
        database_url=settings.database_url,
        concurrency=2,
    )
    with local:
        yield local
