"""What the sandbox answers: raw responses, Graph answers and Graph's error envelope."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

JSON_CONTENT_TYPE = "application/json"


def json_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON, as Graph sends it."""
    return json.dumps(value, separators=(",", ":")).encode()


@dataclass(frozen=True)
class SandboxResponse:
    """One HTTP answer: status, headers and body bytes."""

    status: int
    headers: dict[str, str]
    body: bytes = b""

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    @classmethod
    def of_json(
        cls, status: int, value: Any, headers: dict[str, str] | None = None
    ) -> SandboxResponse:
        """A JSON response."""
        return cls(
            status, {"Content-Type": JSON_CONTENT_TYPE, **(headers or {})}, json_bytes(value)
        )


@dataclass
class GraphAnswer:
    """A Graph result before rendering: a top-level response or one part of a `$batch`."""

    status: int
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def stamped(self, request_id: str, client_request_id: str) -> GraphAnswer:
        """This answer with request ids in its headers and, for an error, in `innerError`."""
        headers = {**self.headers, "request-id": request_id, "client-request-id": client_request_id}
        body = self.body
        if body is not None and "error" in body:
            inner = {
                "request-id": request_id,
                "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                "client-request-id": client_request_id,
            }
            body = {"error": {**body["error"], "innerError": inner}}
        return GraphAnswer(self.status, body, headers)

    def response(self) -> SandboxResponse:
        """The answer as HTTP."""
        if self.body is None:
            return SandboxResponse(self.status, dict(self.headers))
        return SandboxResponse.of_json(self.status, self.body, self.headers)


class GraphError(Exception):
    """Raised when a Graph request fails; carries Graph's status, error code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    def answer(self) -> GraphAnswer:
        """The error as Graph's envelope (ids are stamped later)."""
        return GraphAnswer(self.status, {"error": {"code": self.code, "message": self.message}})


# Graph's messages for the errors clients branch on (GRAPH.md, "Errors").
ALREADY_MEMBER_MESSAGE = (
    "One or more added object references already exist for the following modified "
    "properties: 'members'."
)


def not_found(key: str) -> GraphError:
    """Graph's 404 for an object that does not exist."""
    return GraphError(
        404,
        "Request_ResourceNotFound",
        f"Resource '{key}' does not exist or one of its queried reference-property objects "
        "are not present.",
    )


def invalid_id(key: str) -> GraphError:
    """Graph's 400 for an object id that is not a GUID."""
    return GraphError(400, "Request_BadRequest", f"Invalid object identifier '{key}'.")


def already_member() -> GraphError:
    """Graph's 400 for adding a member twice."""
    return GraphError(400, "Request_BadRequest", ALREADY_MEMBER_MESSAGE)
