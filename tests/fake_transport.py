"""A fake `requests` transport: canned answers, and a record of exactly what went on the wire.

The requests twin of httpx's `MockTransport`: mount it on a session, answer from a handler or a
queue, then assert on `transport.requests`.
"""

from __future__ import annotations

import json as jsonlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict


@dataclass(frozen=True)
class Recorded:
    """One request as it was sent."""

    method: str
    url: str
    headers: CaseInsensitiveDict[str]
    body: bytes | None
    timeout: object

    def json(self) -> Any:
        """The body parsed as JSON."""
        assert self.body is not None
        return jsonlib.loads(self.body)

    def form(self) -> dict[str, str]:
        """The body parsed as an HTML form (token requests)."""
        assert self.body is not None
        return dict(parse_qsl(self.body.decode()))


@dataclass(frozen=True)
class Reply:
    """A canned answer."""

    status: int = 200
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None


Answer = Reply | Exception
Handler = Callable[[Recorded], Answer]


def graph_error(
    status: int,
    code: str,
    message: str = "",
    *,
    request_id: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    """Graph's error envelope."""
    inner = {"request-id": request_id, "date": "2025-01-01T00:00:00"} if request_id else {}
    return Reply(
        status, {"error": {"code": code, "message": message, "innerError": inner}}, headers or {}
    )


def make_response(
    reply: Reply, request: requests.PreparedRequest | None = None
) -> requests.Response:
    """A `requests.Response` for `reply`, as a real adapter would build it."""
    response = requests.Response()
    response.status_code = reply.status
    headers = CaseInsensitiveDict(reply.headers)
    if reply.body is not None:
        response._content = reply.body
    elif reply.json is not None:
        response._content = jsonlib.dumps(reply.json).encode()
        headers.setdefault("Content-Type", "application/json")
    else:
        response._content = b""
    response.headers = headers
    response.reason = HTTPStatus(reply.status).phrase
    response.encoding = "utf-8"
    if request is not None:
        response.request = request
        response.url = request.url or ""
    return response


class FakeTransport(BaseAdapter):
    """Answers every request from `handler`, or else from the queue of `answers`."""

    def __init__(self, answers: Iterable[Answer] = (), *, handler: Handler | None = None) -> None:
        super().__init__()
        self.handler = handler
        self.answers: deque[Answer] = deque(answers)
        self.requests: list[Recorded] = []

    def queue(self, *answers: Answer) -> None:
        """Answer the next requests with `answers`, in order."""
        self.answers.extend(answers)

    def mount_on(self, session: requests.Session) -> requests.Session:
        """`session` with every http and https request going here."""
        session.mount("http://", self)
        session.mount("https://", self)
        return session

    def session(self) -> requests.Session:
        """A new session wired to this transport."""
        return self.mount_on(requests.Session())

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: object = None,
        verify: object = True,
        cert: object = None,
        proxies: object = None,
    ) -> requests.Response:
        body = request.body
        recorded = Recorded(
            method=request.method or "",
            url=request.url or "",
            headers=CaseInsensitiveDict(request.headers),
            body=body.encode() if isinstance(body, str) else body,
            timeout=timeout,
        )
        self.requests.append(recorded)
        if self.handler is not None:
            answer = self.handler(recorded)
        else:
            assert self.answers, f"no answer queued for {recorded.method} {recorded.url}"
            answer = self.answers.popleft()
        if isinstance(answer, Exception):
            raise answer
        return make_response(answer, request)

    def close(self) -> None:
        """Nothing to release."""


class FakeTokens:
    """A token provider handing out `token-1`, `token-2`, ... and recording each call."""

    def __init__(self) -> None:
        # The token each call said Graph refused, None for a plain call.
        self.calls: list[str | None] = []
        self._issued = 0

    def token(self, rejected: str | None = None) -> str:
        """The current token; a new one when the current one is `rejected`."""
        self.calls.append(rejected)
        if not self._issued or rejected == f"token-{self._issued}":
            self._issued += 1
        return f"token-{self._issued}"
