"""The embedded Redis's watchdog: it shuts the server down once nothing has used it for a while.

A one-shot command (`entraflow action`, `events push`) starts the embedded server and exits; the
server would run on for good. `EmbeddedRedis` starts this watchdog beside every server it starts,
as `python -m entraflow.redis_watchdog FOLDER IDLE_S PID`: it looks at `INFO` every
`WATCH_INTERVAL_S` and sends SHUTDOWN (the AOF written out) once, for `IDLE_S`, no client but
itself was connected and none connected. Workers, schedulers and Flower hold connections open,
so a running deployment keeps its server.

It reads the password from the server's folder, as every entraflow process does: nothing secret
is on its command line. It watches the one server process it was started for (PID): the watchdog
of a server that was killed or stopped leaves as soon as it sees that server gone, and the one
started with the next server, waiting on a file lock meanwhile, takes over.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported at run time only once detached (see `watch`)
    from entraflow.redis_server import EmbeddedRedis

# How often the watchdog looks at the server: one INFO a second costs the server nothing.
WATCH_INTERVAL_S = 1.0
# How long one INFO may take: a server busy with a burst is busy, not gone.
INFO_TIMEOUT_S = 5.0
# The lowest CPU priority: the watchdog gives way to the server and to every entraflow process.
WATCHDOG_NICENESS = 19
# In the server's folder: held by the one watchdog watching it.
LOCK_FILE = "watchdog.lock"
USAGE = "usage: python -m entraflow.redis_watchdog FOLDER IDLE_S PID"


@dataclass
class IdleClock:
    """Tells from successive `INFO` answers how long the server has had no client but us."""

    idle_stop_s: float
    connections_seen: int | None = None
    idle_since: float | None = None

    def quiet(self, info: dict[str, Any]) -> bool:
        """Whether, since the last look, only the watchdog was connected and nobody connected."""
        # A one-shot command may connect and leave between two looks: the count shows it.
        return (
            int(info["connected_clients"]) <= 1
            and int(info["total_connections_received"]) == self.connections_seen
        )

    def observe(self, info: dict[str, Any], now: float) -> bool:
        """Record one look at the server; whether it has now been idle for `idle_stop_s`."""
        if not self.quiet(info) or self.idle_since is None:
            self.idle_since = now
        self.connections_seen = int(info["total_connections_received"])
        return now - self.idle_since >= self.idle_stop_s


def watch(folder: Path, idle_stop_s: float, server_pid: int) -> None:
    """Watch server `server_pid` of `folder` until it goes; shut it down once idle that long."""
    # Imported here, after `main` detached: the launcher waits for that fork, not for imports.
    from entraflow.home import open_private
    from entraflow.redis_server import EmbeddedRedis

    # Held while this watchdog lives: a later watchdog of the folder waits for it.
    with open_private(folder / LOCK_FILE) as lock:
        if _took_lock(lock, server_pid):
            _watch_server(EmbeddedRedis(folder, idle_stop_s), idle_stop_s, server_pid)


def _took_lock(lock: int, server_pid: int) -> bool:
    """Wait for the folder's watchdog lock; False if server `server_pid` went meanwhile."""
    from entraflow.process_info import is_running

    # The lock is held by the watchdog of a server this one replaced, until it sees it gone; or,
    # when this one was slow to start, by the watchdog of the server that replaced this one's.
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if not is_running(server_pid):
                return False
            time.sleep(WATCH_INTERVAL_S)


def _watch_server(server: EmbeddedRedis, idle_stop_s: float, server_pid: int) -> None:
    import redis

    from entraflow.redis_server import WATCHDOG_CLIENT_NAME, probe_client, shutdown

    port, password = server.recorded_port(), server.password()
    if port is None or password is None:
        return
    client = probe_client(
        port, password, timeout_s=INFO_TIMEOUT_S, client_name=WATCHDOG_CLIENT_NAME
    )
    clock = IdleClock(idle_stop_s)
    try:
        while True:
            try:
                info = client.info()
            except redis.TimeoutError:
                clock.idle_since = None  # busy
                continue
            # Another server on the port (this one was killed, another started) has its own.
            if int(info["process_id"]) != server_pid:
                return
            if clock.observe(info, time.monotonic()):
                with server.start_lock():
                    # A process may have connected since the last look; starting one waits.
                    if clock.quiet(client.info()):
                        shutdown(port, password)
                        return
            time.sleep(WATCH_INTERVAL_S)
    except redis.RedisError:
        return  # the server is gone: whoever starts it again starts its watchdog too
    finally:
        client.close()


def main(argv: list[str]) -> int:
    try:
        folder, idle_stop_s, server_pid = Path(argv[0]), float(argv[1]), int(argv[2])
    except (IndexError, ValueError):
        print(USAGE, file=sys.stderr)
        return 2
    _detach()
    watch(folder, idle_stop_s, server_pid)
    return 0


def _detach() -> None:
    """Leave the launcher at once: fork, the parent exits, the child leads a session of its own."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    os.chdir("/")  # hold no directory busy
    # Housekeeping: its start (imports) must not slow the server it was started beside.
    os.nice(WATCHDOG_NICENESS)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
