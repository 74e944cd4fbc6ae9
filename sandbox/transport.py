"""A requests transport adapter that serves a session from a `SandboxApp` in process, no sockets.

Mount it on a made-up base URL and point the Graph client there:

    session.mount(IN_PROCESS_URL, SandboxAdapter(app))
    graph_url = IN_PROCESS_URL + "/v1.0"

Sleeps (latency, delay faults) happen in the calling thread; a client timeout cannot cut them.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from urllib.parse import urlsplit

from requests import PreparedRequest, Response
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

from sandbox.app import SandboxApp

# A base URL that never resolves, so a session without the adapter mounted fails loudly.
IN_PROCESS_URL = "http://graph-sandbox.invalid"


class SandboxAdapter(BaseAdapter):
    """Answers every request sent through it with `app.handle`."""

    def __init__(self, app: SandboxApp) -> None:
        super().__init__()
        self.app = app

    def send(
        self,
        request: PreparedRequest,
        stream: bool = False,
        timeout: float | tuple[float, float] | tuple[float, None] | None = None,
        verify: bool | str = True,
        cert: bytes | str | tuple[bytes | str, bytes | str] | None = None,
        proxies: Mapping[str, str] | None = None,
    ) -> Response:
        """Hand the prepared request to the app and wrap its answer as a `requests.Response`."""
        url = urlsplit(request.url or "")
        target = url.path + (f"?{url.query}" if url.query else "")
        body = request.body or b""
        headers = {"Host": url.netloc, **request.headers}
        answer = self.app.handle(
            request.method or "GET",
            target,
            headers,
            body.encode() if isinstance(body, str) else body,
        )
        response = Response()
        response.status_code = answer.status
        response.reason = HTTPStatus(answer.status).phrase
        response.headers = CaseInsensitiveDict(answer.headers)
        response._content = answer.body
        response.encoding = "utf-8"
        response.url = request.url or ""
        response.request = request
        return response

    def close(self) -> None:
        """Nothing to release: there is no connection."""
