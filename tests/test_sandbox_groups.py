"""Groups and memberships: lookup, add, remove, PATCH of 20, the `$ref`-less delete, paging."""

from __future__ import annotations

import uuid

import pytest
import requests
from sandbox_fixtures import AppClient, fetch_token, ref_url

from sandbox.app import SandboxApp
from sandbox.config import SandboxConfig
from sandbox.directory import DEMO_GROUPS, DEMO_USERS, bulk_user_id
from sandbox.responses import ALREADY_MEMBER_MESSAGE
from sandbox.server import SandboxServer

SALES = DEMO_GROUPS["sales"]
FALCON = DEMO_GROUPS["falcon"]
ALL_STAFF = DEMO_GROUPS["all-staff"]
ADELE = DEMO_USERS["adele"]
MEGAN = DEMO_USERS["megan"]
GROUP_SELECT = "id,displayName,description,mail,mailEnabled,securityEnabled"
BULK_USERS = 45


@pytest.fixture
def app() -> SandboxApp:
    return SandboxApp(SandboxConfig(bulk_users=BULK_USERS))


@pytest.fixture
def client(app: SandboxApp) -> AppClient:
    return AppClient(app)


def bind_body(user_ids: list[str]) -> dict[str, list[str]]:
    return {"members@odata.bind": [ref_url(uid) for uid in user_ids]}


def test_group_lookup_with_select(client: AppClient) -> None:
    response = client.get(f"/groups/{SALES.id}?$select={GROUP_SELECT}")

    body = response.json()
    assert response.status == 200
    assert set(body) - {"@odata.context"} == set(GROUP_SELECT.split(","))
    assert body["displayName"] == "Sales Team"
    assert body["mailEnabled"] is True
    assert body["securityEnabled"] is True


def test_a_group_id_that_is_not_a_guid_is_an_invalid_object_identifier(client: AppClient) -> None:
    response = client.get("/groups/sales-team")

    assert response.status == 400
    error = response.json()["error"]
    assert error["code"] == "Request_BadRequest"
    assert error["message"] == "Invalid object identifier 'sales-team'."


def test_an_unknown_group_is_a_404(client: AppClient) -> None:
    response = client.get(f"/groups/{uuid.uuid4()}")

    assert response.status == 404
    assert response.json()["error"]["code"] == "Request_ResourceNotFound"


def test_add_member_then_again_is_already_a_member(app: SandboxApp, client: AppClient) -> None:
    first = client.add(FALCON.id, ADELE.id)
    second = client.add(FALCON.id, ADELE.id)

    assert first.status == 204
    assert first.body == b""
    assert second.status == 400
    assert second.json()["error"]["code"] == "Request_BadRequest"
    assert second.json()["error"]["message"] == ALREADY_MEMBER_MESSAGE
    assert app.directory.members(FALCON.id) == [ADELE.id]
    assert app.stats()["members_added"] == 1


def test_add_member_accepts_any_host_in_the_reference(app: SandboxApp, client: AppClient) -> None:
    body = {"@odata.id": ref_url(ADELE.id, host="http://127.0.0.1:9")}

    response = client.request("POST", f"/groups/{FALCON.id}/members/$ref", body)

    assert response.status == 204
    assert app.directory.is_member(FALCON.id, ADELE.id)


@pytest.mark.parametrize("missing", ["user", "group"])
def test_add_member_of_an_unknown_user_or_group_is_a_404(client: AppClient, missing: str) -> None:
    group_id = str(uuid.uuid4()) if missing == "group" else FALCON.id
    user_id = str(uuid.uuid4()) if missing == "user" else ADELE.id

    response = client.add(group_id, user_id)

    assert response.status == 404
    assert response.json()["error"]["code"] == "Request_ResourceNotFound"


def test_remove_member_then_again_is_not_found(app: SandboxApp, client: AppClient) -> None:
    first = client.remove(SALES.id, ADELE.id)
    second = client.remove(SALES.id, ADELE.id)

    assert first.status == 204
    assert second.status == 404
    assert second.json()["error"]["code"] == "Request_ResourceNotFound"
    assert ADELE.id not in app.directory.members(SALES.id)
    assert app.directory.user(ADELE.id) is not None


def test_patch_binds_twenty_members_at_once(app: SandboxApp, client: AppClient) -> None:
    twenty = [bulk_user_id(n) for n in range(1, 21)]

    response = client.request("PATCH", f"/groups/{FALCON.id}", bind_body(twenty))

    assert response.status == 204
    assert app.directory.members(FALCON.id) == twenty


def test_patch_of_more_than_twenty_is_refused_and_applies_nothing(
    app: SandboxApp, client: AppClient
) -> None:
    twenty_one = [bulk_user_id(n) for n in range(1, 22)]

    response = client.request("PATCH", f"/groups/{FALCON.id}", bind_body(twenty_one))

    assert response.status == 400
    assert app.directory.members(FALCON.id) == []


def test_patch_with_one_existing_member_applies_nothing(app: SandboxApp, client: AppClient) -> None:
    # Adele is already in Sales; the 19 others are not.
    batch = [bulk_user_id(n) for n in range(1, 20)] + [ADELE.id]

    response = client.request("PATCH", f"/groups/{SALES.id}", bind_body(batch))

    assert response.status == 400
    assert response.json()["error"]["message"] == ALREADY_MEMBER_MESSAGE
    assert app.directory.members(SALES.id) == [ADELE.id]


def test_patch_with_one_unknown_user_applies_nothing(app: SandboxApp, client: AppClient) -> None:
    batch = [bulk_user_id(n) for n in range(1, 20)] + [str(uuid.uuid4())]

    response = client.request("PATCH", f"/groups/{FALCON.id}", bind_body(batch))

    assert response.status == 404
    assert app.directory.members(FALCON.id) == []


def test_delete_without_ref_deletes_the_user_object_and_is_counted(
    app: SandboxApp, client: AppClient
) -> None:
    response = client.request("DELETE", f"/groups/{SALES.id}/members/{ADELE.id}")

    assert response.status == 204
    assert app.stats()["users_deleted"] == 1
    assert app.directory.user(ADELE.id) is None
    assert client.get(f"/users/{ADELE.id}").status == 404
    assert ADELE.id not in app.directory.members(ALL_STAFF.id)


def test_members_are_paged_with_an_absolute_next_link_to_this_server() -> None:
    with (
        SandboxServer(SandboxConfig(bulk_users=BULK_USERS)) as server,
        requests.Session() as session,
    ):
        session.headers["Authorization"] = f"Bearer {fetch_token(session, server.url)}"
        url: str | None = f"{server.graph_url}/groups/{ALL_STAFF.id}/members?$select=id&$top=10"
        seen: list[str] = []
        pages = 0
        while url is not None:
            assert url.startswith(server.graph_url)
            body = session.get(url).json()
            seen += [member["id"] for member in body["value"]]
            assert all(m["@odata.type"] == "#microsoft.graph.user" for m in body["value"])
            url = body.get("@odata.nextLink")
            pages += 1

        assert seen == server.app.directory.members(ALL_STAFF.id)
        assert len(seen) == 8 + BULK_USERS
        assert pages == 6


def test_members_without_top_come_in_pages_of_one_hundred() -> None:
    client = AppClient(SandboxApp(SandboxConfig(bulk_users=150)))

    body = client.get(f"/groups/{ALL_STAFF.id}/members?$select=id").json()

    assert len(body["value"]) == 100
    assert "$skiptoken=" in body["@odata.nextLink"]


@pytest.mark.parametrize("top", ["0", "1000", "ten"])
def test_a_page_size_outside_1_to_999_is_refused(client: AppClient, top: str) -> None:
    response = client.get(f"/groups/{ALL_STAFF.id}/members?$top={top}")

    assert response.status == 400


def test_a_forged_skiptoken_is_refused(client: AppClient) -> None:
    response = client.get(f"/groups/{ALL_STAFF.id}/members?$skiptoken=nonsense")

    assert response.status == 400
