"""The embedded Redis restarted on its own port, cleanly or killed, keeps what it acknowledged."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from entraflow.redis_server import PID_FILE, EmbeddedRedis, EmbeddedRedisError

pytestmark = pytest.mark.integration

# Entries a writer pushes at most while the server is killed under it.
MAX_PUSHES = 200_000


def _client(url: str) -> redis.Redis:
    # No client-side retries: a write the server did not acknowledge must show as an error.
    return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))


def test_a_clean_restart_keeps_the_port_and_every_key(private_redis: EmbeddedRedis) -> None:
    url = private_redis.url
    assert url is not None
    _client(url).set("kept", "yes")

    private_redis.stop(keep_port=True)
    assert private_redis.url is None
    again = private_redis.start_again()

    assert again == url == private_redis.url
    assert _client(url).get("kept") == b"yes"


def test_a_client_holding_the_url_works_again_once_the_server_is_back(
    private_redis: EmbeddedRedis,
) -> None:
    url = private_redis.url
    assert url is not None
    client = redis.Redis.from_url(url)
    client.set("before", 1)

    private_redis.kill()
    with pytest.raises(redis.ConnectionError):
        _client(url).ping()
    private_redis.start_again()

    # The same client object, as every entraflow process holds one: it reconnects by itself.
    assert client.get("before") == b"1"


def test_a_killed_server_loses_no_write_it_acknowledged(private_redis: EmbeddedRedis) -> None:
    url = private_redis.url
    assert url is not None
    client = _client(url)
    acknowledged: list[int] = []
    started = threading.Event()

    def write() -> None:
        for number in range(MAX_PUSHES):
            try:
                client.rpush("numbers", number)
            except redis.ConnectionError:
                return
            acknowledged.append(number)
            if number == 1000:
                started.set()

    writer = threading.Thread(target=write)
    writer.start()
    assert started.wait(timeout=30)
    # appendfsync everysec writes the AOF before answering: only a lost machine loses a second.
    private_redis.kill()
    writer.join(timeout=30)
    private_redis.start_again()

    stored = [int(value) for value in client.lrange("numbers", 0, -1)]
    assert len(acknowledged) < MAX_PUSHES, "the writer never saw the server die"
    assert stored[: len(acknowledged)] == acknowledged
    # At most the one push in flight when the server died was applied without an answer.
    assert len(stored) - len(acknowledged) in (0, 1)


def test_start_again_refuses_a_server_that_never_had_a_port(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedRedisError, match="no port"):
        EmbeddedRedis(tmp_path / "redis").start_again()


def test_kill_refuses_a_pid_file_that_names_another_process(private_redis: EmbeddedRedis) -> None:
    private_redis.stop(keep_port=True)
    # A stale pid file whose pid now belongs to someone else, here this very test process.
    (private_redis.folder / PID_FILE).write_text(str(os.getpid()))

    with pytest.raises(EmbeddedRedisError, match="no embedded redis-server"):
        private_redis.kill()


def test_a_server_that_died_is_started_again_on_its_port_by_the_next_process_needing_it(
    private_redis: EmbeddedRedis,
) -> None:
    url = private_redis.url
    assert url is not None
    client = redis.Redis.from_url(url)
    client.set("connected", 1)  # a connection the killed server leaves in TIME_WAIT
    private_redis.kill()

    again, started = private_redis.ensure_running()

    assert started and again == url
    assert client.get("connected") == b"1"


def test_a_server_whose_port_was_taken_meanwhile_starts_on_another(
    private_redis: EmbeddedRedis,
) -> None:
    url = private_redis.url
    assert url is not None
    private_redis.kill()
    port = int(private_redis.port_file.read_text())

    with socket.socket() as squatter:
        # The killed server's connections may hold the port in TIME_WAIT.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        again, started = private_redis.ensure_running()

    assert started and again != url and again == private_redis.url
