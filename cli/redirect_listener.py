"""The loopback HTTP listener that catches the sign-in redirect and its authorization code."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import urlsplit

import click

LOOPBACK_HOST = "127.0.0.1"
# Entra accepts a loopback redirect on any port when the app registers `http://localhost`.
REDIRECT_HOST = "localhost"
# The listener checks this often whether the wait is over, in seconds.
LISTENER_POLL_S = 0.5


class RedirectListener:
    """Waits on 127.0.0.1 for the one browser request that carries the authorization code."""

    def __init__(self, port: int = 0) -> None:
        received: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = urlsplit(self.path).query
                if "state=" in query:
                    received.append(self.path)
                    text = "entraflow received the sign-in. You can close this tab."
                else:  # a favicon or a probe: not the redirect
                    text = "entraflow is waiting for the sign-in redirect."
                body = f"<!DOCTYPE html><html><body><p>{text}</p></body></html>".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                """Say nothing: the request line carries the authorization code."""

        self._received = received
        self._server = HTTPServer((LOOPBACK_HOST, port), Handler)
        self._server.timeout = LISTENER_POLL_S

    @property
    def redirect_uri(self) -> str:
        """The redirect URI to send Entra."""
        return f"http://{REDIRECT_HOST}:{self._server.server_address[1]}/"

    def wait(self, timeout_s: float) -> str:
        """The redirect URL the browser brought back; ClickException after `timeout_s`."""
        deadline = threading.Event()
        timer = threading.Timer(timeout_s, deadline.set)
        timer.start()
        try:
            while not self._received and not deadline.is_set():
                self._server.handle_request()
        finally:
            timer.cancel()
        if not self._received:
            raise click.ClickException(
                f"no sign-in came back within {timeout_s:g} s: run `entraflow connect` again "
                "(or with --paste)"
            )
        return self.redirect_uri.rstrip("/") + self._received[0]

    def close(self) -> None:
        """Release the port."""
        self._server.server_close()
