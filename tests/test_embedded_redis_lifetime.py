"""The embedded Redis stops by itself once unused; `entraflow redis status|stop` (issue 13, 13)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result

from cli.main import cli
from entraflow import process_info
from entraflow.redis_server import EmbeddedRedis
from entraflow.redis_watchdog import IdleClock
from entraflow.settings import get_settings
from harness.waiting import wait_until

pytestmark = pytest.mark.integration

# Short enough for a test, long enough to see the watchdog look several times.
IDLE_S = 2.0
COMMAND_TIMEOUT_S = 60.0
# INFO calls of the watchdog (one a second) that span well over IDLE_S.
LOOKS_OVER_IDLE = 6


def watchdogs(folder: Path) -> list[int]:
    """The pids of the watchdog processes of `folder`."""
    wanted = f"entraflow.redis_watchdog\0{folder}\0".encode()
    return [pid for pid in process_info.pids() if wanted in (process_info.command_line(pid) or b"")]


def info_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_info", {}).get("calls", 0))


@pytest.fixture
def idle_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """An embedded server that stops after `IDLE_S` without a client."""
    server = EmbeddedRedis(tmp_path / "redis", idle_stop_s=IDLE_S)
    yield server
    server.stop()


def entraflow(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The command in a process of its own, which ends: what a one-shot command is."""
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("ENTRAFLOW_")},
            "ENTRAFLOW_HOME": str(home),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


def redis_command(*args: str, home: Path, **env: str) -> Result:
    """`entraflow redis ...` run in this process, with `env` for settings."""
    # Not in a process of its own: the command's imports take two seconds a process, and
    # status and stop hold nothing that outlives them.
    environment: dict[str, str | None] = {
        **dict.fromkeys(name for name in os.environ if name.startswith("ENTRAFLOW_")),
        "ENTRAFLOW_HOME": str(home),
        **env,
    }
    get_settings.cache_clear()
    try:
        return CliRunner(env=environment).invoke(cli, ["redis", *args])
    finally:
        get_settings.cache_clear()


def test_the_server_a_one_shot_command_started_stops_once_unused_and_keeps_its_data(
    tmp_path: Path,
) -> None:
    pushed = entraflow(
        "events", "push", "--type", "t", "--source", "s", "--json",
        home=tmp_path, ENTRAFLOW_EMBEDDED_REDIS_IDLE_S=f"{IDLE_S:g}",
    )  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    server = EmbeddedRedis(tmp_path.resolve() / "redis")
    assert server.pid is not None

    # Looked at through /proc only: a connection would count as a use.
    wait_until(lambda: server.pid is None, "the idle server to stop")
    wait_until(lambda: not watchdogs(server.folder), "its watchdog to leave")

    server.start_again()
    try:
        client = redis.Redis.from_url(server.url or "")
        assert client.xlen("entraflow:events") == 1  # stopped cleanly, its AOF complete
        client.close()
    finally:
        server.stop()


def test_a_connected_process_keeps_the_server_running(idle_redis: EmbeddedRedis) -> None:
    url, _ = idle_redis.ensure_running()
    client = redis.Redis.from_url(url)  # holds its connection open, as a worker does
    looks = info_calls(client)

    wait_until(lambda: info_calls(client) >= looks + LOOKS_OVER_IDLE, "the watchdog to look again")

    assert idle_redis.pid is not None
    assert client.ping()
    client.close()


def test_a_restarted_server_has_exactly_one_watchdog(idle_redis: EmbeddedRedis) -> None:
    url, _ = idle_redis.ensure_running()
    client = redis.Redis.from_url(url)
    client.ping()  # a client, so the server stays up while we look
    wait_until(lambda: len(watchdogs(idle_redis.folder)) == 1, "the watchdog")
    first = watchdogs(idle_redis.folder)

    idle_redis.kill()
    idle_redis.start_again()
    client.ping()

    wait_until(
        lambda: len(watchdogs(idle_redis.folder)) == 1 and watchdogs(idle_redis.folder) != first,
        "the old watchdog to leave and the new one to stay",
    )
    looks = info_calls(client)
    wait_until(lambda: info_calls(client) >= looks + 2, "the new watchdog to look")
    client.close()


def test_an_idle_setting_of_0_starts_no_watchdog(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", idle_stop_s=0)
    server.ensure_running()
    try:
        assert not watchdogs(server.folder)
    finally:
        server.stop()


def test_a_connection_between_two_looks_counts_as_a_use() -> None:
    clock = IdleClock(idle_stop_s=10)
    assert not clock.observe({"connected_clients": 1, "total_connections_received": 5}, 0.0)
    assert not clock.observe({"connected_clients": 1, "total_connections_received": 5}, 9.0)
    # One command came and went: it shows only in the count of connections.
    assert not clock.observe({"connected_clients": 1, "total_connections_received": 6}, 11.0)
    assert not clock.observe({"connected_clients": 2, "total_connections_received": 6}, 30.0)
    assert not clock.observe({"connected_clients": 1, "total_connections_received": 6}, 35.0)
    assert clock.observe({"connected_clients": 1, "total_connections_received": 6}, 40.0)


def status(home: Path, **env: str) -> dict[str, Any]:
    done = redis_command("status", "--json", home=home, **env)
    assert done.exit_code == 0, done.stderr
    view: dict[str, Any] = json.loads(done.stdout)
    return view


def test_redis_status_tells_whether_the_server_runs_where_and_when_it_stops(
    tmp_path: Path,
) -> None:
    server = EmbeddedRedis(tmp_path.resolve() / "redis", idle_stop_s=0)
    before = status(tmp_path, ENTRAFLOW_EMBEDDED_REDIS_IDLE_S="300")
    server.ensure_running()
    try:
        running = status(tmp_path, ENTRAFLOW_EMBEDDED_REDIS_IDLE_S="300")
        plain = redis_command("status", home=tmp_path).stdout
        port = int(server.port_file.read_text())
        pid = server.pid
    finally:
        server.stop()

    assert before == {
        "embedded": True,
        "running": False,
        "pid": None,
        "port": None,
        "folder": str(server.folder),
        "idle_stop_s": 300,
    }
    assert pid is not None
    assert running == {**before, "running": True, "pid": pid, "port": port}
    assert f"127.0.0.1:{port}" in plain and "600 s" in plain
    password = server.password()
    assert password and password not in json.dumps(running) + plain


def watchdog_connected(url: str) -> bool:
    """Whether a client besides the asking one is connected: the watchdog, in these tests."""
    client = redis.Redis.from_url(url)
    try:
        return len(client.client_list()) > 1
    finally:
        client.close()


# 0 starts no watchdog; with one, its own connection must not count as a process using Redis.
@pytest.mark.parametrize("idle_stop_s", [0, 600])
def test_redis_stop_shuts_the_server_down_cleanly(tmp_path: Path, idle_stop_s: float) -> None:
    server = EmbeddedRedis(tmp_path.resolve() / "redis", idle_stop_s=idle_stop_s)
    url, _ = server.ensure_running()
    client = redis.Redis.from_url(url)
    client.set("kept", "yes")
    client.close()
    if idle_stop_s:
        wait_until(lambda: watchdog_connected(url), "the watchdog to connect")

    stopped = redis_command("stop", home=tmp_path)
    again = redis_command("stop", home=tmp_path)

    assert stopped.exit_code == 0, stopped.stderr
    assert server.pid is None
    assert again.exit_code == 0 and "no embedded Redis is running" in again.stdout
    server.start_again()
    try:
        assert redis.Redis.from_url(url).get("kept") == b"yes"
    finally:
        server.stop()


@pytest.mark.parametrize("idle_stop_s", [0, 600])
def test_redis_stop_leaves_a_server_other_processes_use_unless_forced(
    tmp_path: Path, idle_stop_s: float
) -> None:
    server = EmbeddedRedis(tmp_path.resolve() / "redis", idle_stop_s=idle_stop_s)
    url, _ = server.ensure_running()
    if idle_stop_s:
        wait_until(lambda: watchdog_connected(url), "the watchdog to connect")
    worker = redis.Redis.from_url(url)
    worker.ping()
    try:
        refused = redis_command("stop", home=tmp_path)
        assert refused.exit_code != 0 and "1 other client" in refused.stderr
        assert server.pid is not None

        forced = redis_command("stop", "--force", home=tmp_path)
        assert forced.exit_code == 0, forced.stderr
        assert server.pid is None
    finally:
        worker.close()
        server.stop()


def test_with_a_configured_redis_there_is_no_embedded_server_to_manage(tmp_path: Path) -> None:
    configured = {"ENTRAFLOW_REDIS_URL": "redis://:not-to-be-shown@127.0.0.1:1/0"}

    shown = redis_command("status", home=tmp_path, **configured)
    stopped = redis_command("stop", home=tmp_path, **configured)

    assert shown.exit_code == 0 and "no embedded Redis server to manage" in shown.stdout
    assert stopped.exit_code != 0 and "no embedded Redis server to manage" in stopped.stderr
    assert "not-to-be-shown" not in shown.stdout + stopped.stderr
