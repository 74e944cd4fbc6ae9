"""The exception tree and the mapping of Graph error answers onto it."""

from __future__ import annotations

import inspect

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
    error_from_response,
)

ALREADY_MEMBER = (
    "One or more added object references already exist for the following modified "
    "properties: 'members'."
)
NOT_REPLICATED = "One or more of the objects being referenced don't exist."


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
def test_every_status_maps_to_its_class_and_outcome(
    status: int, code: str, message: str, error_class: type[GraphError], outcome: str
) -> None:
    error = error_from_response(make_response(graph_error(status, code, message)))

    assert type(error) is error_class
    assert (error.status, error.code, error.message, error.outcome) == (
        status,
        code,
        message,
        outcome,
    )


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
    error = error_from_response(
        make_response(graph_error(404, "Request_BadRequest", ALREADY_MEMBER))
    )

    assert type(error) is NotFoundError


def test_request_id_comes_from_the_body_before_the_header() -> None:
    reply = graph_error(404, "Request_ResourceNotFound", "gone", request_id="body-id")
    with_header = Reply(reply.status, reply.json, {"request-id": "header-id"})

    assert error_from_response(make_response(with_header)).request_id == "body-id"


def test_request_id_falls_back_to_the_header() -> None:
    reply = Reply(503, None, {"request-id": "header-id"}, body=b"<html>down</html>")

    error = error_from_response(make_response(reply))

    assert (type(error), error.request_id, error.code) == (
        ServiceUnavailableError,
        "header-id",
        None,
    )
    assert error.message == "Service Unavailable"


def test_retry_after_is_read_from_the_answer() -> None:
    reply = graph_error(429, "TooManyRequests", "slow down", headers={"Retry-After": "2.5"})

    assert error_from_response(make_response(reply)).retry_after_s == 2.5


def test_str_is_one_line_with_meaning_status_code_message_and_request_id() -> None:
    reply = graph_error(
        404, "Request_ResourceNotFound", "Resource 'u' does not exist.", request_id="r-1"
    )

    text = str(error_from_response(make_response(reply)))

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

    assert error_from_response(make_response(reply)).to_dict() == {
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

    assert len(classes) == 15
    for error_class in classes:
        assert (error_class.__doc__ or "").startswith("Raised when "), error_class
        assert "\n" not in (error_class.__doc__ or ""), error_class
