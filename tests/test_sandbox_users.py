"""User lookups: by id, by UPN (including `$` and `#EXT#` UPNs), by mail, and `$select`."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pytest
import requests
from sandbox_fixtures import AppClient, fetch_token

from sandbox.app import SandboxApp
from sandbox.directory import DEMO_USERS, USER_DEFAULT_PROPERTIES
from sandbox.server import SandboxServer

ADELE = DEMO_USERS["adele"]
GUEST = DEMO_USERS["guest"]
SVC = DEMO_USERS["svc"]
OBRIEN = DEMO_USERS["obrien"]
KIM = DEMO_USERS["kim"]
LOOKUP_SELECT = "id,displayName,givenName,surname,mail,userPrincipalName,jobTitle"


@pytest.fixture
def client() -> AppClient:
    return AppClient(SandboxApp())


@pytest.fixture
def server() -> Iterator[SandboxServer]:
    with SandboxServer() as running:
        yield running


@pytest.fixture
def graph(server: SandboxServer) -> Iterator[requests.Session]:
    """A keep-alive session that sends the sandbox's token."""
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {fetch_token(session, server.url)}"
        yield session


def test_lookup_by_id_returns_graphs_default_user_properties(client: AppClient) -> None:
    response = client.get(f"/users/{ADELE.id}")

    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"@odata.context", *USER_DEFAULT_PROPERTIES}
    assert body["id"] == ADELE.id
    assert body["displayName"] == "Adele Vance"
    assert body["userPrincipalName"] == ADELE.upn
    assert "department" not in body


def test_select_returns_exactly_the_selected_properties(client: AppClient) -> None:
    response = client.get(f"/users/{ADELE.upn}?$select={LOOKUP_SELECT},department")

    body = response.json()
    assert set(body) - {"@odata.context"} == {*LOOKUP_SELECT.split(","), "department"}
    assert body["department"] == "Sales"
    assert body["@odata.context"].endswith(f"$metadata#users({LOOKUP_SELECT},department)/$entity")


def test_select_of_an_unknown_property_is_a_bad_request(client: AppClient) -> None:
    response = client.get(f"/users/{ADELE.id}?$select=id,shoeSize")

    assert response.status == 400
    assert "shoeSize" in response.json()["error"]["message"]


def test_lookup_by_upn_ignores_case(client: AppClient) -> None:
    response = client.get(f"/users/{ADELE.upn.upper()}")

    assert response.json()["id"] == ADELE.id


def test_the_contractor_is_seeded_with_its_job_title(client: AppClient) -> None:
    body = client.get(f"/users/{DEMO_USERS['lee'].id}?$select=jobTitle").json()

    assert body["jobTitle"] == "Contractor"


def test_a_dollar_upn_is_found_with_the_quoted_key_form(
    server: SandboxServer, graph: requests.Session
) -> None:
    response = graph.get(f"{server.graph_url}/users('{SVC.upn}')")

    assert response.status_code == 200
    assert response.json()["id"] == SVC.id


def test_a_dollar_upn_as_a_plain_segment_is_a_bad_request(
    server: SandboxServer, graph: requests.Session
) -> None:
    response = graph.get(f"{server.graph_url}/users/{SVC.upn}")

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "Request_BadRequest"


def test_a_doubled_quote_in_the_key_form_is_one_quote(client: AppClient) -> None:
    response = client.get("/users('o''missing@contoso.example')")

    assert response.status == 404
    assert "'o'missing@contoso.example'" in response.json()["error"]["message"]


def test_a_lone_quote_in_the_key_form_is_a_syntax_error(client: AppClient) -> None:
    response = client.get("/users('o'missing@contoso.example')")

    assert response.status == 400
    assert response.json()["error"]["code"] == "BadRequest"


def test_a_guest_upn_is_found_when_its_hashes_are_percent_encoded(
    server: SandboxServer, graph: requests.Session
) -> None:
    response = graph.get(f"{server.graph_url}/users/{quote(GUEST.upn, safe='@')}")

    assert response.status_code == 200
    assert response.json()["userPrincipalName"] == "alex_fabrikam.com#EXT#@contoso.example"


def test_a_guest_upn_with_raw_hashes_loses_its_tail_and_is_not_found(
    server: SandboxServer, graph: requests.Session
) -> None:
    # requests treats everything after `#` as a fragment and never sends it.
    response = graph.get(f"{server.graph_url}/users/{GUEST.upn}")

    assert response.status_code == 404


def test_an_unknown_user_is_a_404_in_graphs_error_envelope(
    server: SandboxServer, graph: requests.Session
) -> None:
    missing = str(uuid.uuid4())

    response = graph.get(
        f"{server.graph_url}/users/{missing}", headers={"client-request-id": "trace-me"}
    )

    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "Request_ResourceNotFound"
    assert error["message"] == (
        f"Resource '{missing}' does not exist or one of its queried reference-property "
        "objects are not present."
    )
    assert error["innerError"]["request-id"] == response.headers["request-id"]
    assert error["innerError"]["client-request-id"] == "trace-me"
    assert response.headers["client-request-id"] == "trace-me"
    assert error["innerError"]["date"]
    uuid.UUID(response.headers["request-id"])


def test_every_answer_has_its_own_request_id(client: AppClient) -> None:
    first = client.get(f"/users/{ADELE.id}").headers["request-id"]
    second = client.get(f"/users/{ADELE.id}").headers["request-id"]

    assert first != second


def mail_filter(mail: str) -> str:
    return "mail eq '" + mail.replace("'", "''") + "'"


def test_filter_by_mail_with_a_doubled_quote_finds_the_user(
    server: SandboxServer, graph: requests.Session
) -> None:
    response = graph.get(
        f"{server.graph_url}/users",
        params={"$filter": mail_filter("o'brien@contoso.example"), "$select": LOOKUP_SELECT},
    )

    assert response.status_code == 200
    assert [u["id"] for u in response.json()["value"]] == [OBRIEN.id]


def test_filter_by_mail_with_an_encoded_plus_finds_the_user(
    server: SandboxServer, graph: requests.Session
) -> None:
    # requests encodes `+` in params as %2B.
    response = graph.get(
        f"{server.graph_url}/users", params={"$filter": mail_filter("kim+ops@contoso.example")}
    )

    assert [u["id"] for u in response.json()["value"]] == [KIM.id]


def test_a_raw_plus_in_the_query_reads_as_a_space_and_matches_nobody(client: AppClient) -> None:
    response = client.get("/users?$filter=mail%20eq%20'kim+ops@contoso.example'")

    assert response.status == 200
    assert response.json()["value"] == []


def test_filter_by_a_shared_mail_returns_every_match(client: AppClient) -> None:
    response = client.get(f"/users?$filter={quote(mail_filter('TEAM@contoso.example'))}")

    ids = {u["id"] for u in response.json()["value"]}
    assert ids == {DEMO_USERS["diego"].id, DEMO_USERS["isaiah"].id}


def test_filter_with_no_match_is_an_empty_list_not_a_404(client: AppClient) -> None:
    response = client.get(f"/users?$filter={quote(mail_filter('nobody@contoso.example'))}")

    assert response.status == 200
    assert response.json()["value"] == []


@pytest.mark.parametrize(
    "expression",
    ["displayName eq 'Adele Vance'", "startswith(mail,'adele')", "mail ne 'x@contoso.example'"],
)
def test_any_other_filter_is_an_unsupported_query(client: AppClient, expression: str) -> None:
    response = client.get(f"/users?$filter={quote(expression)}")

    assert response.status == 400
    assert response.json()["error"]["code"] == "Request_UnsupportedQuery"


@pytest.mark.parametrize(
    "expression",
    ["mail eq 'o'brien@contoso.example'", "mail eq 'unterminated@contoso.example"],
)
def test_a_malformed_literal_is_a_bad_request(client: AppClient, expression: str) -> None:
    response = client.get(f"/users?$filter={quote(expression)}")

    assert response.status == 400
    assert response.json()["error"]["code"] == "BadRequest"
