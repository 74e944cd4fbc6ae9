"""The sandbox over HTTP/1.1: a threading stdlib server in front of `SandboxApp`."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from sandbox.app import GRAPH_PREFIX, SandboxApp
from sandbox.config import SandboxConfig

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 0  # 0: any free port, read it back from `.url`
# How often the serving loop checks for `stop()`, in seconds: also the longest `stop()` waits.
SHUTDOWN_POLL_S = 0.05
# Pending connections the listening socket queues; benchmarks open many at once.
LISTEN_BACKLOG = 512


class _Handler(BaseHTTPRequestHandler):
    """Hands each request to the app and writes its answer with a Content-Length."""

    protocol_version = "HTTP/1.1"  # keep-alive
    # Headers and body go out as separate writes; without this, Nagle's algorithm and the
    # client's delayed ACK add ~40 ms to every keep-alive request.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        response = self.server.app.handle(self.command, self.path, dict(self.headers.items()), body)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        self.wfile.write(response.body)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _dispatch

    def log_message(self, format: str, *args: object) -> None:
        """Say nothing: hundreds of requests a second would drown the test output."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-answer (a worker killed by a test, a client timeout) is
        # normal here; anything else still gets the standard report.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def __init__(self, address: tuple[str, int], app: SandboxApp) -> None:
        self.app = app
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(connection)

    def untrack(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(connection)

    def close_connections(self) -> None:
        """End idle keep-alive connections so their threads exit and close their sockets."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            # OSError: the client closed it first.
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class SandboxServer:
    """The Graph sandbox on a local port; `start()` serves in a background thread."""

    def __init__(
        self,
        config: SandboxConfig | None = None,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        app: SandboxApp | None = None,
    ) -> None:
        self.app = app or SandboxApp(config)
        self._address = (host, port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:54321`; with port 0, known once started."""
        if self._server is not None:
            host, port = self._server.server_address[:2]
            return f"http://{host!s}:{port}"
        if self._address[1] == 0:
            raise RuntimeError("the sandbox server picks its port when started")
        return f"http://{self._address[0]}:{self._address[1]}"

    @property
    def graph_url(self) -> str:
        """What `ENTRAFLOW_GRAPH_URL` should be to use this sandbox."""
        return self.url + GRAPH_PREFIX

    @property
    def authority_url(self) -> str:
        """What `ENTRAFLOW_AUTHORITY_URL` should be to use this sandbox."""
        return self.url

    def start(self) -> SandboxServer:
        """Bind and serve in a daemon thread; returns self."""
        server = self._bind()
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": SHUTDOWN_POLL_S},
            name="graph-sandbox",
            daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Bind and serve in this thread until interrupted (for a command line)."""
        server = self._bind()
        try:
            server.serve_forever(poll_interval=SHUTDOWN_POLL_S)
        finally:
            self._close()

    def stop(self) -> None:
        """Stop serving, end open connections and release the port."""
        if self._server is None:
            return
        self._server.shutdown()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._close()

    def _bind(self) -> _Server:
        if self._server is not None:
            raise RuntimeError("the sandbox server is already started")
        self._server = _Server(self._address, self.app)
        return self._server

    def _close(self) -> None:
        if self._server is not None:
            self._server.close_connections()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
