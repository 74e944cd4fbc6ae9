"""Helpers shared by the Graph sandbox tests: a fake clock and an in-process Graph client."""

from __future__ import annotations

import json
from collections.abc import Mapping

import requests

from sandbox.app import SandboxApp
from sandbox.directory import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET, SANDBOX_TENANT_ID
from sandbox.responses import SandboxResponse

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
# Start of fake time: any positive value; tests only look at differences.
FAKE_CLOCK_START_S = 1000.0


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start_s: float = FAKE_CLOCK_START_S) -> None:
        self.now = start_s
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass."""
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        """Record a sleep and let that time pass, without waiting."""
        self.slept.append(seconds)
        self.now += seconds


def ref_url(user_id: str, host: str = "https://graph.microsoft.com") -> str:
    """The `@odata.id` / `members@odata.bind` URL of a user."""
    return f"{host}/v1.0/directoryObjects/{user_id}"


def token_form(**overrides: str) -> dict[str, str]:
    """A valid client-credentials form, with fields replaced or (as "") emptied."""
    form = {
        "grant_type": "client_credentials",
        "client_id": SANDBOX_CLIENT_ID,
        "client_secret": SANDBOX_CLIENT_SECRET,
        "scope": GRAPH_SCOPE,
    }
    form.update(overrides)
    return {name: value for name, value in form.items() if value != ""}


def fetch_token(session: requests.Session, url: str, tenant: str = SANDBOX_TENANT_ID) -> str:
    """An access token from a sandbox server at `url`."""
    response = session.post(f"{url}/{tenant}/oauth2/v2.0/token", data=token_form())
    response.raise_for_status()
    token: str = response.json()["access_token"]
    return token


class AppClient:
    """Calls a `SandboxApp` in process, as a Graph client with a token would."""

    def __init__(self, app: SandboxApp, token: str | None = None) -> None:
        self.app = app
        self.token = token if token is not None else app.issue_token()

    def request(
        self,
        method: str,
        target: str,
        body: object = None,
        headers: Mapping[str, str] | None = None,
    ) -> SandboxResponse:
        """Send `body` as JSON to `/v1.0{target}`."""
        all_headers = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        raw = b"" if body is None else json.dumps(body).encode()
        if body is not None:
            all_headers["Content-Type"] = "application/json"
        return self.app.handle(method, f"/v1.0{target}", all_headers, raw)

    def get(self, target: str, headers: Mapping[str, str] | None = None) -> SandboxResponse:
        """GET `/v1.0{target}`."""
        return self.request("GET", target, headers=headers)

    def add(self, group_id: str, user_id: str) -> SandboxResponse:
        """POST /groups/{gid}/members/$ref."""
        return self.request(
            "POST", f"/groups/{group_id}/members/$ref", {"@odata.id": ref_url(user_id)}
        )

    def remove(self, group_id: str, user_id: str) -> SandboxResponse:
        """DELETE /groups/{gid}/members/{uid}/$ref."""
        return self.request("DELETE", f"/groups/{group_id}/members/{user_id}/$ref")
