"""The four actions against a fake transport: requests sent, outputs and outcomes."""

from __future__ import annotations

import pytest
from fake_transport import FakeTokens, FakeTransport, Reply, graph_error

from worker import retry
from worker.actions import (
    GROUP_FIELDS,
    USER_FIELDS,
    add_user_to_group,
    lookup_group,
    lookup_user,
    remove_member_from_group,
    run_action,
)
from worker.errors import (
    AmbiguousMatchError,
    ForbiddenError,
    InvalidInputError,
    NotFoundError,
)
from worker.graph import GraphClient
from worker.retry import RetryPolicy

GRAPH_URL = "https://graph.microsoft.com/v1.0"
GID = "0b5e3f43-7c2f-4f4a-9d6e-2a1b3c4d5e6f"
UID = "6f5e4d3c-2b1a-4e9d-a4f7-2c7f3e5b0b11"
USER_SELECT = "$select=id,displayName,givenName,surname,mail,userPrincipalName,jobTitle"
ADELE = {
    "id": UID,
    "displayName": "Adele Vance",
    "givenName": "Adele",
    "surname": "Vance",
    "mail": "adele@contoso.com",
    "userPrincipalName": "adele@contoso.com",
    "jobTitle": None,
    "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#users/$entity",
}
ALREADY_MEMBER = (
    "One or more added object references already exist for the following modified "
    "properties: 'members'."
)
NOT_REPLICATED = "One or more of the objects being referenced don't exist."
NOT_FOUND = graph_error(
    404, "Request_ResourceNotFound", "Resource does not exist.", request_id="nf"
)


# Retry waits are recorded instead of slept (the conftest fixture).
pytestmark = pytest.mark.usefixtures("no_sleeping")


@pytest.fixture
def transport() -> FakeTransport:
    return FakeTransport()


@pytest.fixture
def client(transport: FakeTransport) -> GraphClient:
    policy = RetryPolicy(max_inprocess_wait_s=10)
    return GraphClient(GRAPH_URL, FakeTokens(), session=transport.session(), retry_policy=policy)


def wire(transport: FakeTransport) -> list[str]:
    return [f"{r.method} {r.url.removeprefix(GRAPH_URL)}" for r in transport.requests]


def test_lookup_user_by_id(client: GraphClient, transport: FakeTransport) -> None:
    transport.queue(Reply(200, ADELE, {"request-id": "r-1"}))

    result = lookup_user(client, user_id=UID)

    assert wire(transport) == [f"GET /users/{UID}?{USER_SELECT}"]
    assert result.output == {field: ADELE[field] for field in USER_FIELDS}
    assert list(result.output) == list(USER_FIELDS)
    assert result.request_id == "r-1"


def test_lookup_user_fills_missing_fields_with_none(
    client: GraphClient, transport: FakeTransport
) -> None:
    transport.queue(Reply(200, {"id": UID, "displayName": "Adele Vance"}))

    output = lookup_user(client, user_id=UID).output

    assert output == {field: None for field in USER_FIELDS} | {
        "id": UID,
        "displayName": "Adele Vance",
    }


@pytest.mark.parametrize(
    ("inputs", "path"),
    [
        ({"user_id": "g_x.com#EXT#@contoso.com"}, "/users/g_x.com%23EXT%23@contoso.com"),
        ({"upn": "adele@contoso.com"}, "/users/adele@contoso.com"),
        ({"upn": "$admin@contoso.com"}, "/users('$admin@contoso.com')"),
    ],
)
def test_lookup_user_by_upn(
    client: GraphClient, transport: FakeTransport, inputs: dict[str, str], path: str
) -> None:
    transport.queue(Reply(200, ADELE))

    lookup_user(client, **inputs)

    assert wire(transport) == [f"GET {path}?{USER_SELECT}"]


def test_lookup_user_by_email(client: GraphClient, transport: FakeTransport) -> None:
    transport.queue(Reply(200, {"value": [ADELE]}, {"request-id": "r-2"}))

    result = lookup_user(client, email="o'brien+x@contoso.com")

    assert wire(transport) == [
        "GET /users?$filter=mail%20eq%20'o%27%27brien%2Bx%40contoso.com'&" + USER_SELECT
    ]
    assert result.output["id"] == UID
    assert result.request_id == "r-2"


def test_lookup_user_by_an_email_nobody_has_is_not_found(
    client: GraphClient, transport: FakeTransport
) -> None:
    transport.queue(Reply(200, {"value": []}))

    with pytest.raises(NotFoundError, match=r"no user has the email 'nobody@contoso\.com'"):
        lookup_user(client, email="nobody@contoso.com")


def test_lookup_user_by_a_shared_email_is_ambiguous(
    client: GraphClient, transport: FakeTransport
) -> None:
    transport.queue(Reply(200, {"value": [ADELE, ADELE | {"id": GID}]}))

    with pytest.raises(AmbiguousMatchError, match="2 users have the email") as raised:
        lookup_user(client, email="adele@contoso.com")

    assert raised.value.outcome == "ambiguous"


@pytest.mark.parametrize(
    "inputs",
    [
        {},
        {"user_id": UID, "email": "adele@contoso.com"},
        {"user_id": "adele"},
        {"user_id": "adele@contoso.com/../../groups"},
        {"upn": UID},
        {"email": "not an email"},
    ],
)
def test_lookup_user_refuses_bad_input_before_any_request(
    client: GraphClient, transport: FakeTransport, inputs: dict[str, str]
) -> None:
    with pytest.raises(InvalidInputError):
        lookup_user(client, **inputs)

    assert transport.requests == []


def test_lookup_group(client: GraphClient, transport: FakeTransport) -> None:
    group = {"id": GID, "displayName": "Sales", "mailEnabled": False, "securityEnabled": True}
    transport.queue(Reply(200, group, {"request-id": "r-3"}))

    result = lookup_group(client, group_id=GID)

    assert wire(transport) == [
        f"GET /groups/{GID}?$select=id,displayName,description,mail,mailEnabled,securityEnabled"
    ]
    assert list(result.output) == list(GROUP_FIELDS)
    assert result.output == {
        "id": GID,
        "displayName": "Sales",
        "description": None,
        "mail": None,
        "mailEnabled": False,
        "securityEnabled": True,
    }
    assert result.request_id == "r-3"


def test_lookup_group_wants_a_guid(client: GraphClient, transport: FakeTransport) -> None:
    with pytest.raises(InvalidInputError, match="group_id"):
        lookup_group(client, group_id="Sales")

    assert transport.requests == []


def test_add_user_to_group(client: GraphClient, transport: FakeTransport) -> None:
    transport.queue(Reply(204, headers={"request-id": "r-4"}))

    result = add_user_to_group(client, user_id=UID, group_id=GID)

    assert wire(transport) == [f"POST /groups/{GID}/members/$ref"]
    assert transport.requests[0].json() == {"@odata.id": f"{GRAPH_URL}/directoryObjects/{UID}"}
    assert (result.output, result.request_id) == ({"success": True, "outcome": "added"}, "r-4")


def test_add_user_to_group_by_upn_resolves_the_id_first(
    client: GraphClient, transport: FakeTransport
) -> None:
    transport.queue(Reply(200, {"id": UID}), Reply(204))

    result = add_user_to_group(client, user_id="adele@contoso.com", group_id=GID)

    assert wire(transport) == [
        "GET /users/adele@contoso.com?$select=id",
        f"POST /groups/{GID}/members/$ref",
    ]
    assert transport.requests[1].json()["@odata.id"].endswith(f"/directoryObjects/{UID}")
    assert result.output["outcome"] == "added"


def test_add_an_existing_member_is_a_success(client: GraphClient, transport: FakeTransport) -> None:
    transport.queue(graph_error(400, "Request_BadRequest", ALREADY_MEMBER, request_id="r-5"))

    result = add_user_to_group(client, user_id=UID, group_id=GID)

    assert (result.output, result.request_id) == (
        {"success": True, "outcome": "already_member"},
        "r-5",
    )


def test_add_retried_after_an_ambiguous_write_is_a_success(
    client: GraphClient, transport: FakeTransport
) -> None:
    # The first POST was applied but its answer was a 503; the retry meets the membership.
    transport.queue(
        graph_error(503, "serviceNotAvailable", "down"),
        graph_error(400, "Request_BadRequest", ALREADY_MEMBER),
    )

    result = add_user_to_group(client, user_id=UID, group_id=GID)

    assert wire(transport) == [f"POST /groups/{GID}/members/$ref"] * 2
    assert result.output == {"success": True, "outcome": "already_member"}


def test_add_to_a_new_group_waits_for_replication(
    client: GraphClient, transport: FakeTransport
) -> None:
    transport.queue(
        graph_error(400, "Request_BadRequest", NOT_REPLICATED),
        Reply(204),
    )

    assert add_user_to_group(client, user_id=UID, group_id=GID).output["outcome"] == "added"
    assert len(retry.recorded_waits_s()) == 1


@pytest.mark.parametrize(
    ("checks", "missing"),
    [
        ([NOT_FOUND], f"group '{GID}' does not exist"),
        ([Reply(200, {"id": GID}), NOT_FOUND], f"user '{UID}' does not exist"),
    ],
)
def test_add_says_whether_the_user_or_the_group_is_missing(
    client: GraphClient, transport: FakeTransport, checks: list[Reply], missing: str
) -> None:
    transport.queue(NOT_FOUND, *checks)

    with pytest.raises(NotFoundError) as raised:
        add_user_to_group(client, user_id=UID, group_id=GID)

    assert raised.value.message == missing
    assert (raised.value.status, raised.value.request_id) == (404, "nf")
    assert (
        wire(transport)[1:]
        == [f"GET /groups/{GID}?$select=id", f"GET /users/{UID}?$select=id"][: len(checks)]
    )


def test_add_a_user_whose_upn_does_not_exist(client: GraphClient, transport: FakeTransport) -> None:
    transport.queue(NOT_FOUND)

    with pytest.raises(NotFoundError, match=r"user 'ghost@contoso\.com' does not exist"):
        add_user_to_group(client, user_id="ghost@contoso.com", group_id=GID)

    assert len(transport.requests) == 1


def test_add_without_permission_is_forbidden(client: GraphClient, transport: FakeTransport) -> None:
    transport.queue(graph_error(403, "Authorization_RequestDenied", "Insufficient privileges."))

    with pytest.raises(ForbiddenError):
        add_user_to_group(client, user_id=UID, group_id=GID)


def test_remove_member_from_group(client: GraphClient, transport: FakeTransport) -> None:
    transport.queue(Reply(204, headers={"request-id": "r-6"}))

    result = remove_member_from_group(client, user_id=UID, group_id=GID)

    assert wire(transport) == [f"DELETE /groups/{GID}/members/{UID}/$ref"]
    assert (result.output, result.request_id) == ({"success": True, "outcome": "removed"}, "r-6")


def test_remove_by_upn_deletes_the_reference_by_id(
    client: GraphClient, transport: FakeTransport
) -> None:
    transport.queue(Reply(200, {"id": UID}), Reply(204))

    remove_member_from_group(client, user_id="$admin@contoso.com", group_id=GID)

    assert wire(transport) == [
        "GET /users('$admin@contoso.com')?$select=id",
        f"DELETE /groups/{GID}/members/{UID}/$ref",
    ]


def test_remove_a_non_member_is_a_success(client: GraphClient, transport: FakeTransport) -> None:
    transport.queue(
        NOT_FOUND,
        Reply(200, {"id": GID}),
        Reply(200, {"id": UID}, {"request-id": "r-7"}),
    )

    result = remove_member_from_group(client, user_id=UID, group_id=GID)

    assert result.output == {"success": True, "outcome": "not_member"}
    assert result.request_id == "r-7"
    assert wire(transport)[1:] == [f"GET /groups/{GID}?$select=id", f"GET /users/{UID}?$select=id"]


@pytest.mark.parametrize(
    ("checks", "missing"),
    [
        ([NOT_FOUND], f"group '{GID}' does not exist"),
        ([Reply(200, {"id": GID}), NOT_FOUND], f"user '{UID}' does not exist"),
    ],
)
def test_remove_says_whether_the_user_or_the_group_is_missing(
    client: GraphClient, transport: FakeTransport, checks: list[Reply], missing: str
) -> None:
    transport.queue(NOT_FOUND, *checks)

    with pytest.raises(NotFoundError) as raised:
        remove_member_from_group(client, user_id=UID, group_id=GID)

    assert raised.value.message == missing


@pytest.mark.parametrize("action", [add_user_to_group, remove_member_from_group])
@pytest.mark.parametrize(
    ("user_id", "group_id"),
    [
        (UID, "Sales"),
        ("adele", GID),
        ("adele@contoso.com", "Sales"),
        (UID, f"{GID}/members/{UID}"),
    ],
)
def test_membership_actions_refuse_bad_ids_before_any_request(
    client: GraphClient, transport: FakeTransport, action: object, user_id: str, group_id: str
) -> None:
    assert callable(action)

    with pytest.raises(InvalidInputError):
        action(client, user_id=user_id, group_id=group_id)

    assert transport.requests == []


def test_run_action_runs_by_name(client: GraphClient, transport: FakeTransport) -> None:
    transport.queue(Reply(204))

    result = run_action(client, "add_user_to_group", {"user_id": UID, "group_id": GID})

    assert result.output == {"success": True, "outcome": "added"}


def test_run_action_treats_an_absent_optional_input_as_not_given(
    client: GraphClient, transport: FakeTransport
) -> None:
    transport.queue(Reply(200, ADELE))

    run_action(client, "lookup_user", {"user_id": UID, "email": None})

    assert len(transport.requests) == 1


@pytest.mark.parametrize(
    ("name", "inputs", "message"),
    [
        ("delete_user", {"user_id": UID}, "unknown action 'delete_user'"),
        ("lookup_group", {"group_id": GID, "force": "yes"}, "lookup_group has no input force"),
        ("add_user_to_group", {"user_id": UID}, "add_user_to_group needs the input group_id"),
        ("lookup_group", {"group_id": 123}, "group_id must be a string, got 123"),
        ("lookup_user", {"user_id": ["a"]}, "user_id must be a string"),
        ("remove_member_from_group", {"user_id": UID, "group_id": None}, "group_id must be"),
    ],
)  # fmt: skip
def test_run_action_refuses_bad_calls_before_any_request(
    client: GraphClient,
    transport: FakeTransport,
    name: str,
    inputs: dict[str, object],
    message: str,
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        run_action(client, name, inputs)

    assert transport.requests == []
