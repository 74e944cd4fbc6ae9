"""The exception tree and the mapping of Graph error answers onto it."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import pytest
from fake_transport import Reply, graph_error, make_response

from worker import errors
from worker.errors import (
    AlreadyMemberError,
    AuthenticationError,
    BadRequestError,
    EntraflowError,
    ForbiddenError,
    GraphError,
    InvalidInputError,
    NotFoundError,
    NotReplicatedError,
    PermanentGraphError,
    ServiceUnavailableError,
    ThrottledError,
    TransientGraphError,
    error_from_answer,
)

ALREADY_MEMBER = (
    "One or more added object references already exist for the following modified "
    "properties: 'members'."
)
NOT_REPLICATED = "One or more of the objects being referenced don't exist."

# The statuses with a class of their own; any other 5xx is Graph's trouble, any other status
# from 300 up (redirects are refused too) a permanent refusal.
CLASS_BY_STATUS: dict[int, type[GraphError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: ForbiddenError,
    404: NotFoundError,
    429: ThrottledError,
}
NON_SUCCESS_STATUSES = [status for status in HTTPStatus if status >= 300]


def from_response(reply: Reply) -> GraphError:
    """The error for `reply` answered as a whole HTTP response, as the Graph client reads it."""
    response = make_response(reply)
    return error_from_answer(
        response.status_code, response.headers, response.content, response.reason
    )


def from_batch_part(reply: Reply, spell: Callable[[str], str] = str.lower) -> GraphError:
    """The error for `reply` answered as a `$batch` part: parsed body, headers in `spell` case."""
    part: dict[str, Any] = {
        "status": reply.status,
        "headers": {spell(name): value for name, value in reply.headers.items()},
        "body": reply.json,
    }
    return error_from_answer(part["status"], part["headers"], part["body"])


@pytest.mark.parametrize("status", NON_SUCCESS_STATUSES, ids=lambda status: str(status.value))
@pytest.mark.parametrize("shape", [from_response, from_batch_part])
def test_every_status_maps_to_its_class_as_a_response_and_as_a_batch_part(
    status: HTTPStatus, shape: Callable[[Reply], GraphError]
) -> None:
    reply = graph_error(
        status, "SomeCode", "Some message.", request_id="r-1", headers={"Retry-After": "3"}
    )
    default = ServiceUnavailableError if status >= 500 else PermanentGraphError

    error = shape(reply)

    assert type(error) is CLASS_BY_STATUS.get(status, default)
    assert (error.status, error.code, error.message, error.request_id, error.retry_after_s) == (
        status,
        "SomeCode",
        "Some message.",
        "r-1",
        3.0,
    )


@pytest.mark.parametrize(
    ("status", "code", "message", "error_class", "outcome"),
    [
        (400, "Request_BadRequest", "Invalid object identifier.", BadRequestError, "bad_request"),
        (400, "Request_BadRequest", ALREADY_MEMBER, AlreadyMemberError, "already_member"),
        (400, "Request_BadRequest", NOT_REPLICATED, NotReplicatedError, "unavailable"),
        (401, "InvalidAuthenticationToken", "Expired.", AuthenticationError, "unauthorized"),
        (403, "Authorization_RequestDenied", "Denied.", ForbiddenError, "forbidden"),
        (404, "Request_ResourceNotFound", "Does not exist.", NotFoundError, "not_found"),
        (409, "Conflict", "Conflict.", PermanentGraphError, "failed"),
        (429, "TooManyRequests", "Too many requests.", ThrottledError, "throttled"),
        (500, "InternalServerError", "Oops.", ServiceUnavailableError, "unavailable"),
        (502, "BadGateway", "Bad gateway.", ServiceUnavailableError, "unavailable"),
        (503, "serviceNotAvailable", "Try later.", ServiceUnavailableError, "unavailable"),
        (504, "GatewayTimeout", "Timed out.", ServiceUnavailableError, "unavailable"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("shape", [from_response, from_batch_part])
def test_graphs_answers_map_to_their_class_and_outcome(
    status: int,
    code: str,
    message: str,
    error_class: type[GraphError],
    outcome: str,
    shape: Callable[[Reply], GraphError],
) -> None:
    error = shape(graph_error(status, code, message))

    assert type(error) is error_class
    assert (error.status, error.code, error.message, error.outcome) == (
        status,
        code,
        message,
        outcome,
    )


@pytest.mark.parametrize("spell", [str.lower, str.upper, str.title])
def test_a_batch_parts_headers_are_read_in_any_case(spell: Callable[[str], str]) -> None:
    envelope = {"error": {"code": "TooManyRequests", "message": "Slow down."}}
    reply = Reply(429, envelope, {"Retry-After": "7", "request-id": "header-id"})

    from_part = from_batch_part(reply, spell)

    assert from_part.to_dict() == from_response(reply).to_dict()
    assert (type(from_part), from_part.retry_after_s, from_part.request_id) == (
        ThrottledError,
        7.0,
        "header-id",
    )


@pytest.mark.parametrize("body", [None, "", "not JSON", ["a", "list"], {"no": "envelope"}])
def test_a_batch_part_without_graphs_envelope_is_mapped_by_its_status(body: Any) -> None:
    error = error_from_answer(503, {}, body)

    assert (type(error), error.message, error.code) == (ServiceUnavailableError, "HTTP 503", None)


@pytest.mark.parametrize(
    ("error_class", "transient"),
    [
        (ThrottledError, True),
        (ServiceUnavailableError, True),
        (NotReplicatedError, True),
        (errors.GraphConnectionError, True),
        (BadRequestError, False),
        (AlreadyMemberError, False),
        (AuthenticationError, False),
        (ForbiddenError, False),
        (NotFoundError, False),
        (errors.AmbiguousMatchError, False),
    ],
)
def test_errors_are_transient_or_permanent(error_class: type[GraphError], transient: bool) -> None:
    assert issubclass(error_class, TransientGraphError) is transient
    assert issubclass(error_class, PermanentGraphError) is not transient


def test_codes_decide_nothing_the_message_only_tells_the_two_documented_400s_apart() -> None:
    error = from_response(graph_error(404, "Request_BadRequest", ALREADY_MEMBER))

    assert type(error) is NotFoundError


def test_request_id_comes_from_the_body_before_the_header() -> None:
    reply = graph_error(404, "Request_ResourceNotFound", "gone", request_id="body-id")
    with_header = Reply(reply.status, reply.json, {"request-id": "header-id"})

    assert from_response(with_header).request_id == "body-id"


def test_request_id_falls_back_to_the_header() -> None:
    reply = Reply(503, None, {"request-id": "header-id"}, body=b"<html>down</html>")

    error = from_response(reply)

    assert (type(error), error.request_id, error.code) == (
        ServiceUnavailableError,
        "header-id",
        None,
    )
    assert error.message == "Service Unavailable"


def test_retry_after_is_read_from_the_answer() -> None:
    reply = graph_error(429, "TooManyRequests", "slow down", headers={"Retry-After": "2.5"})

    assert from_response(reply).retry_after_s == 2.5


def test_str_is_one_line_with_meaning_status_code_message_and_request_id() -> None:
    reply = graph_error(
        404, "Request_ResourceNotFound", "Resource 'u' does not exist.", request_id="r-1"
    )

    text = str(from_response(reply))

    assert text == (
        "not found (HTTP 404, Request_ResourceNotFound): Resource 'u' does not exist. "
        "[request-id r-1]"
    )
    assert "\n" not in text


def test_str_of_an_error_without_status_says_what_happened() -> None:
    error = errors.GraphConnectionError("GET /users/x got no answer (ConnectTimeout)")

    assert str(error) == "could not reach Graph: GET /users/x got no answer (ConnectTimeout)"


def test_str_says_when_retrying_was_given_up() -> None:
    error = ThrottledError("slow down", status=429)
    error.retries_exhausted = True

    assert str(error).endswith("(gave up retrying)")


def test_to_dict_has_the_five_output_keys() -> None:
    reply = graph_error(
        403, "Authorization_RequestDenied", "Insufficient privileges.", request_id="r"
    )

    assert from_response(reply).to_dict() == {
        "outcome": "forbidden",
        "status": 403,
        "code": "Authorization_RequestDenied",
        "message": "Insufficient privileges.",
        "request_id": "r",
    }


def test_invalid_input_has_the_same_dict_shape() -> None:
    assert InvalidInputError("group_id must be a GUID").to_dict() == {
        "outcome": "invalid_input",
        "status": None,
        "code": None,
        "message": "group_id must be a GUID",
        "request_id": None,
    }


def test_every_error_class_says_when_it_is_raised() -> None:
    classes = [
        value
        for value in vars(errors).values()
        if inspect.isclass(value) and issubclass(value, EntraflowError)
    ]

    assert len(classes) == 16
    for error_class in classes:
        assert (error_class.__doc__ or "").startswith("Raised when "), error_class
        assert "\n" not in (error_class.__doc__ or ""), error_class
