"""Our exceptions, and the one place Graph error bodies become them.

The hierarchy:

* EntraflowError
  + InvalidInputError - bad action input, refused before any request.
  + GraphError - Graph (or its token endpoint) did not do what we asked.
    + TransientGraphError - worth another try after a wait.
      · ThrottledError - 429.
      · ServiceUnavailableError - 503, 504 and any other 5xx.
      · NotReplicatedError - 400 about an object created moments ago.
      · GraphConnectionError - no answer at all: connection refused, reset, timed out.
    + PermanentGraphError - the same request will fail the same way.
      · BadRequestError - 400.
        · AlreadyMemberError - 400 when adding a member that is already there.
      · AuthenticationError - 401 after one token refresh, or the token endpoint refused us.
      · ForbiddenError - 403.
      · NotFoundError - 404.
      · AmbiguousMatchError - an email address that matches several users.

Every error has an `outcome`, the snake_case word step outputs use, and `to_dict()` for JSON.
Secrets and tokens never enter an error, so no message can leak them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar

# Graph answers both cases below with 400 Request_BadRequest; only the message tells them
# apart (GRAPH.md, "Errors"). These are the only message texts we ever match on.
ALREADY_MEMBER_MESSAGE = "added object references already exist"
NOT_REPLICATED_MESSAGE = "objects being referenced don't exist"
# Response header Graph sets on every answer; the body's innerError carries the same id.
REQUEST_ID_HEADER = "request-id"
RETRY_AFTER_HEADER = "Retry-After"
# The first status that is Graph's fault rather than ours.
FIRST_SERVER_ERROR_STATUS = 500


class EntraflowError(Exception):
    """Raised when entraflow cannot do what was asked; the base of all our errors."""

    outcome: ClassVar[str] = "failed"
    summary: ClassVar[str] = "entraflow failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.summary}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """The error as the JSON object step outputs and the CLI print."""
        return {
            "outcome": self.outcome,
            "status": None,
            "code": None,
            "message": self.message,
            "request_id": None,
        }


class InvalidInputError(EntraflowError):
    """Raised when an action input is malformed, before any request is sent."""

    outcome = "invalid_input"
    summary = "invalid input"


class GraphError(EntraflowError):
    """Raised when Graph or its token endpoint does not do what was asked."""

    summary = "Graph request failed"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.request_id = request_id
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        details = ", ".join(
            part for part in (f"HTTP {self.status}" if self.status else None, self.code) if part
        )
        text = f"{self.summary} ({details})" if details else self.summary
        text = f"{text}: {self.message}"
        if self.request_id:
            text = f"{text} [request-id {self.request_id}]"
        return text

    def to_dict(self) -> dict[str, Any]:
        """The error as the JSON object step outputs and the CLI print."""
        return {
            "outcome": self.outcome,
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "request_id": self.request_id,
        }


class TransientGraphError(GraphError):
    """Raised when Graph failed in a way that another try after a wait may fix."""

    summary = "Graph is temporarily unable to answer"
    # Set by the retry policy when it stopped for good (attempts or total time spent), as
    # opposed to handing a long wait back to the queue with `retry_after_s` set.
    retries_exhausted: bool = False

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} (gave up retrying)" if self.retries_exhausted else text


class SharedLimitError(TransientGraphError):
    """Raised when a limit all workers share (the budget, a group's slots) asks for a long wait."""

    # No failure of Graph's: the work goes back to the queue and waits, spending neither a
    # step's retry time nor its delivery cap.
    outcome = "throttled"


class ThrottledError(TransientGraphError):
    """Raised when Graph throttles us (429); wait `retry_after_s` before the next request."""

    outcome = "throttled"
    summary = "Graph throttled the request"


class ServiceUnavailableError(TransientGraphError):
    """Raised when Graph answers 503, 504 or another 5xx."""

    outcome = "unavailable"
    summary = "Graph is unavailable"


class NotReplicatedError(TransientGraphError):
    """Raised when Graph does not see an object created moments ago (400, not replicated yet)."""

    outcome = "unavailable"
    summary = "Graph has not replicated a new object yet"


class GraphConnectionError(TransientGraphError):
    """Raised when Graph or the token endpoint cannot be reached or does not answer in time."""

    outcome = "unavailable"
    summary = "could not reach Graph"


class PermanentGraphError(GraphError):
    """Raised when Graph refused a request that would be refused the same way again."""


class BadRequestError(PermanentGraphError):
    """Raised when Graph finds the request malformed (400)."""

    outcome = "bad_request"
    summary = "Graph refused a malformed request"


class AlreadyMemberError(BadRequestError):
    """Raised when adding a member that is already in the group (400 Request_BadRequest)."""

    outcome = "already_member"
    summary = "already a member"


class AuthenticationError(PermanentGraphError):
    """Raised when a refreshed token is still refused (401) or the token endpoint refuses us."""

    outcome = "unauthorized"
    summary = "authentication failed"


class ForbiddenError(PermanentGraphError):
    """Raised when the app lacks the permission for the request (403)."""

    outcome = "forbidden"
    summary = "Graph denied the request"


class NotFoundError(PermanentGraphError):
    """Raised when the user or group does not exist (404), or no user has the email asked."""

    outcome = "not_found"
    summary = "not found"


class AmbiguousMatchError(PermanentGraphError):
    """Raised when an email address matches more than one user."""

    outcome = "ambiguous"
    summary = "ambiguous match"


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` value: seconds (maybe fractional) or an HTTP date."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        return _seconds_until(text, now)
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)


def _seconds_until(http_date: str, now: datetime | None) -> float | None:
    try:
        when = parsedate_to_datetime(http_date)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        # RFC 9110 dates are always GMT; email.utils leaves "-0000" naive.
        when = when.replace(tzinfo=UTC)
    delta_s = (when - (now or datetime.now(UTC))).total_seconds()
    return max(delta_s, 0.0)


_ERRORS_BY_STATUS: dict[int, type[GraphError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: ForbiddenError,
    404: NotFoundError,
    429: ThrottledError,
}


def error_from_answer(
    status: int,
    headers: Mapping[str, Any],
    body: bytes | str | Mapping[str, Any] | None,
    reason: str | None = None,
) -> GraphError:
    """The error a Graph error answer stands for, mapped by status (and two 400 messages).

    The answer is a whole response or one part of a `$batch` answer: `headers` may spell names in
    any case, `body` is raw JSON text or already parsed, and `reason`, the status line's phrase,
    stands in for a missing message.
    """
    code, message, body_request_id = _error_envelope(_parsed(body), status, reason)
    error_class = _error_class(status, message)
    return error_class(
        message,
        status=status,
        code=code,
        request_id=body_request_id or _header(headers, REQUEST_ID_HEADER),
        retry_after_s=retry_after_s_of(headers),
    )


def retry_after_s_of(headers: Mapping[str, Any]) -> float | None:
    """Seconds to wait from the `Retry-After` of an answer's or a `$batch` part's `headers`."""
    return parse_retry_after(_header(headers, RETRY_AFTER_HEADER))


def _header(headers: Mapping[str, Any], name: str) -> str | None:
    """The value of header `name` as text, whatever the case: `$batch` parts keep Graph's."""
    wanted = name.lower()
    for found, value in headers.items():
        if found.lower() == wanted:
            return str(value)
    return None


def _error_class(status: int, message: str) -> type[GraphError]:
    if status == 400:
        lowered = message.lower()
        if ALREADY_MEMBER_MESSAGE in lowered:
            return AlreadyMemberError
        if NOT_REPLICATED_MESSAGE in lowered:
            return NotReplicatedError
    if status >= FIRST_SERVER_ERROR_STATUS:
        return ServiceUnavailableError
    return _ERRORS_BY_STATUS.get(status, PermanentGraphError)


def _parsed(body: bytes | str | Mapping[str, Any] | None) -> Any:
    if not isinstance(body, bytes | str):
        # A `$batch` part's body comes parsed with the rest of the `$batch` answer.
        return body
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


def _error_envelope(
    body: Any, status: int, reason: str | None
) -> tuple[str | None, str, str | None]:
    """The code, message and request id of Graph's `{"error": {...}}` body, when it has one."""
    error = body.get("error") if isinstance(body, Mapping) else None
    if not isinstance(error, Mapping):
        # Not Graph's envelope (a proxy's HTML page, an empty 503): the status says it all.
        return None, reason or f"HTTP {status}", None
    code = error.get("code")
    message = error.get("message")
    inner = error.get("innerError")
    request_id = inner.get("request-id") if isinstance(inner, Mapping) else None
    return (
        code if isinstance(code, str) else None,
        message if isinstance(message, str) and message else reason or "",
        request_id if isinstance(request_id, str) else None,
    )
