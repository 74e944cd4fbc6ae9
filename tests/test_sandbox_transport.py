"""The in-process requests adapter: a real `requests.Session` served by `SandboxApp`, no sockets."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from sandbox_fixtures import fetch_token, ref_url

from sandbox.app import SandboxApp
from sandbox.config import SandboxConfig
from sandbox.directory import DEMO_GROUPS, DEMO_USERS
from sandbox.transport import IN_PROCESS_URL, SandboxAdapter

ALL_STAFF = DEMO_GROUPS["all-staff"]
FALCON = DEMO_GROUPS["falcon"]
ADELE = DEMO_USERS["adele"]
GRAPH_URL = IN_PROCESS_URL + "/v1.0"


@pytest.fixture
def app() -> SandboxApp:
    return SandboxApp(SandboxConfig(bulk_users=5))


@pytest.fixture
def session(app: SandboxApp) -> Iterator[requests.Session]:
    with requests.Session() as opened:
        opened.mount(IN_PROCESS_URL, SandboxAdapter(app))
        opened.headers["Authorization"] = f"Bearer {fetch_token(opened, IN_PROCESS_URL)}"
        yield opened


def test_a_session_reads_and_writes_through_the_adapter(
    app: SandboxApp, session: requests.Session
) -> None:
    user = session.get(f"{GRAPH_URL}/users/{ADELE.upn}", params={"$select": "id"})
    added = session.post(
        f"{GRAPH_URL}/groups/{FALCON.id}/members/$ref", json={"@odata.id": ref_url(ADELE.id)}
    )

    assert user.json()["id"] == ADELE.id
    assert user.headers["x-ms-resource-unit"] == "1"
    assert added.status_code == 204
    assert app.directory.members(FALCON.id) == [ADELE.id]


def test_next_links_point_back_at_the_mounted_url(session: requests.Session) -> None:
    body = session.get(f"{GRAPH_URL}/groups/{ALL_STAFF.id}/members?$select=id&$top=5").json()

    assert body["@odata.nextLink"].startswith(GRAPH_URL + "/groups/")
    assert len(session.get(body["@odata.nextLink"]).json()["value"]) == 5


def test_errors_raise_through_raise_for_status(session: requests.Session) -> None:
    response = session.get(f"{GRAPH_URL}/groups/not-a-guid")

    with pytest.raises(requests.HTTPError):
        response.raise_for_status()
    assert response.reason == "Bad Request"
