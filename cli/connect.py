"""`entraflow connect`, `connection show|check|rotate-key` and `disconnect`.

`connect` signs a (service) account in with the authorization code flow and PKCE, receiving the
code on a loopback listener or as a pasted redirect URL; `connect --app` stores client
credentials instead. Secrets go to the database encrypted, never to the screen.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from pydantic import SecretStr

from cli.redirect_listener import RedirectListener
from cli.sign_in import begin_sign_in, connect_app, finish_sign_in
from entraflow.secrets import SecretBox, SecretKeyError, generate_key
from entraflow.settings import Settings, get_settings
from models.connections import (
    Connection,
    ConnectionKind,
    delete_connection,
    load_connection,
    reencrypt_connection,
)
from worker.errors import EntraflowError, ForbiddenError, GraphError, NotFoundError
from worker.graph import GraphClient
from worker.permissions import (
    LEAST_PRIVILEGE_BY_ACTION,
    OFFLINE_ACCESS,
    delegated_scopes,
    permission_name,
    review_scopes,
)

# Where the browser goes with --paste: nothing listens, the admin copies the address bar.
PASTE_REDIRECT_URI = "http://localhost"
# How long `connect` waits for the browser to come back, in seconds.
DEFAULT_SIGN_IN_TIMEOUT_S = 300.0
# Entra's client secrets are about 40 characters; a file far larger is not one.
MAX_SECRET_FILE_BYTES = 4096
# Permission bits that let anyone but the owner read or change a secret file.
SHARED_FILE_BITS = stat.S_IRWXG | stat.S_IRWXO
SECRET_SOURCES = (
    "set ENTRAFLOW_CLIENT_SECRET, give --client-secret-file PATH (a file only you can read), "
    "or run at a terminal to be asked for it (a hidden prompt)"
)
# A group id no tenant has: reading it shows the permission (404) without reading anything.
NIL_GUID = "00000000-0000-0000-0000-000000000000"
ACTION_PURPOSE = "keep the connection without signing in again (a refresh token)"


@dataclass(frozen=True)
class SignInOptions:
    """Who to sign in to, and how the code comes back."""

    tenant_id: str
    client_id: str
    client_secret: SecretStr | None
    account: str | None = None
    port: int = 0
    redirect_uri: str | None = None
    timeout_s: float = DEFAULT_SIGN_IN_TIMEOUT_S
    paste: bool = False


def sign_in(
    settings: Settings,
    options: SignInOptions,
    *,
    show_url: Callable[[str], None],
    read_pasted: Callable[[], str],
) -> Connection:
    """Run the authorization code flow and store the delegated connection."""
    box = _secret_box(settings)
    listener = None if options.paste else RedirectListener(options.port)
    try:
        default_uri = listener.redirect_uri if listener else PASTE_REDIRECT_URI
        pending = begin_sign_in(
            settings,
            tenant_id=options.tenant_id,
            client_id=options.client_id,
            redirect_uri=options.redirect_uri or default_uri,
            login_hint=options.account,
        )
        show_url(pending.url)
        if listener is None:
            redirect_url = read_pasted()
        else:
            click.echo(f"Waiting up to {options.timeout_s:g} s for the sign-in to come back...")
            redirect_url = listener.wait(options.timeout_s)
    finally:
        if listener is not None:
            listener.close()
    return finish_sign_in(
        settings, pending, redirect_url.strip(), client_secret=options.client_secret, box=box
    )


@click.command()
@click.option("--app", "app_only", is_flag=True, help="Connect as the app (client credentials).")
@click.option("--tenant-id", help="Directory (tenant) id; default ENTRAFLOW_TENANT_ID.")
@click.option("--client-id", help="Application (client) id; default ENTRAFLOW_CLIENT_ID.")
# Kept only to explain why it is refused: a value in argv is readable by every local user.
@click.option("--client-secret", "argv_secret", hidden=True)
@click.option(
    "--client-secret-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A file (mode 600) holding the client secret; default ENTRAFLOW_CLIENT_SECRET, else a "
    "hidden prompt with --app (optional for a public client).",
)
@click.option("--account", help="The service account to sign in as (sent as login_hint).")
@click.option("--port", type=int, default=0, show_default=True, help="Loopback port; 0: any.")
@click.option("--redirect-uri", help="The redirect URI registered for the app, if not loopback.")
@click.option("--paste", is_flag=True, help="Paste the redirect URL instead of listening for it.")
@click.option("--no-browser", is_flag=True, help="Print the sign-in URL; do not offer a browser.")
@click.option(
    "--timeout-s",
    type=float,
    default=DEFAULT_SIGN_IN_TIMEOUT_S,
    show_default=True,
    help="How long to wait for the sign-in.",
)
@click.option(
    "--generate-key", "new_key", is_flag=True, help="Print a new ENTRAFLOW_SECRET_KEY and exit."
)
def connect(
    app_only: bool,
    tenant_id: str | None,
    client_id: str | None,
    argv_secret: str | None,
    client_secret_file: Path | None,
    account: str | None,
    port: int,
    redirect_uri: str | None,
    paste: bool,
    no_browser: bool,
    timeout_s: float,
    new_key: bool,
) -> None:
    """Connect entraflow to Entra ID: a service account signs in, or --app."""
    if argv_secret is not None:
        raise click.UsageError(
            "--client-secret is refused: a secret on the command line is shown to every local "
            f"user by `ps` and stays in the shell's history. Instead, {SECRET_SOURCES}."
        )
    if new_key:
        click.echo(generate_key())
        return
    settings = get_settings()
    tenant = tenant_id or settings.tenant_id
    client = client_id or settings.client_id
    if not tenant or not client:
        raise click.UsageError(
            "give --tenant-id and --client-id, or set ENTRAFLOW_TENANT_ID/_CLIENT_ID"
        )
    secret = _client_secret(settings, client_secret_file, ask=app_only)
    try:
        if app_only:
            if secret is None:
                raise click.UsageError(f"--app needs the app's client secret: {SECRET_SOURCES}")
            connection = connect_app(
                settings,
                tenant_id=tenant,
                client_id=client,
                client_secret=secret,
                box=_secret_box(settings),
            )
        else:
            _show_review_before_sign_in(settings, tenant)
            options = SignInOptions(
                tenant, client, secret, account, port, redirect_uri, timeout_s, paste
            )
            connection = sign_in(
                settings,
                options,
                show_url=lambda url: _show_url(url, offer_browser=not no_browser),
                read_pasted=lambda: click.prompt("Paste the address your browser was sent to"),
            )
    except EntraflowError as exc:
        raise click.ClickException(str(exc)) from exc
    _show_connected(connection)


@click.group()
def connection() -> None:
    """The stored connection to Entra ID."""


@connection.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(as_json: bool) -> None:
    """Kind, tenant, account or app, scopes, token expiry, status and the actions available."""
    details = describe(get_settings())
    if as_json:
        click.echo(json.dumps(details, indent=2))
        return
    for name, value in details.items():
        click.echo(f"{name.replace('_', ' ')}: {_plain(value)}")


@connection.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def check(as_json: bool) -> None:
    """Test each action's permission with a read-only request where one can."""
    settings = get_settings()
    try:
        results = check_permissions(settings)
    except EntraflowError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for result in results:
            click.echo(f"{result['action']}: {result['result']} ({result['detail']})")
    if any(result["result"] in {"denied", "error"} for result in results):
        raise SystemExit(1)


@connection.command("rotate-key")
def rotate_key() -> None:
    """Re-encrypt the stored secrets with the newest key of ENTRAFLOW_SECRET_KEY."""
    settings = get_settings()
    box = _secret_box(settings)
    try:
        rotated = reencrypt_connection(settings.resolved_database_url, box.rotate)
    except SecretKeyError as exc:
        raise click.ClickException(str(exc)) from exc
    if not rotated:
        click.echo("No stored connection: nothing to re-encrypt.")
        return
    click.echo(
        "Stored secrets re-encrypted with the first key; older keys can now be removed from "
        "ENTRAFLOW_SECRET_KEY."
    )


@click.command()
def disconnect() -> None:
    """Remove the stored connection and its tokens."""
    if not delete_connection(get_settings().resolved_database_url):
        click.echo("No stored connection.")
        return
    click.echo(
        "Disconnected: the stored tokens and secret are removed. To invalidate the refresh "
        "token in Entra too, revoke the account's sessions there."
    )


def describe(settings: Settings) -> dict[str, Any]:
    """What `connection show` reports."""
    stored = load_connection(settings.resolved_database_url)
    if stored is None:
        if settings.tenant_id and settings.client_id and settings.client_secret:
            return {
                "status": "configured",
                "kind": ConnectionKind.APP.value,
                "source": "ENTRAFLOW_TENANT_ID, ENTRAFLOW_CLIENT_ID, ENTRAFLOW_CLIENT_SECRET",
                "tenant_id": settings.tenant_id,
                "client_id": settings.client_id,
                "scopes": None,
                "actions_available": None,
                "note": "app permissions are not in the token answer: run `connection check`",
            }
        return {"status": "not_connected", "hint": "run `entraflow connect`"}
    details: dict[str, Any] = {
        "status": stored.status.value,
        "kind": stored.kind.value,
        "source": "stored",
        "tenant_id": stored.tenant_id,
        "client_id": stored.client_id,
        "account": stored.account_upn,
        "connected_at": _iso(stored.connected_at),
        "access_token_expires_at": _iso(stored.access_token_expires_at),
        "broken_reason": stored.broken_reason,
    }
    if stored.kind is ConnectionKind.APP:
        details.update(
            scopes=None,
            actions_available=None,
            note="app permissions are not in the token answer: run `connection check`",
        )
        return details
    review = review_scopes(stored.scope_list)
    details.update(
        scopes=list(review.granted),
        actions_available=review.available_actions,
        actions_disabled={
            action: f"needs {scope}, which was not granted"
            for action, scope in review.missing.items()
        },
        least_privilege_warning=list(review.extra),
    )
    return details


def check_permissions(settings: Settings) -> list[dict[str, str]]:
    """Each action with `allowed`, `denied`, `untested` or `error`."""
    client = GraphClient.from_settings(settings)
    stored = load_connection(settings.resolved_database_url)
    granted = (
        review_scopes(stored.scope_list)
        if stored is not None and stored.kind is ConnectionKind.DELEGATED
        else None
    )
    probes: dict[str, tuple[str, dict[str, str]]] = {
        "lookup_user": ("/users", {"$top": "1", "$select": "id"}),
        "lookup_group": (f"/groups/{NIL_GUID}", {"$select": "id"}),
    }
    results = []
    for action, permission in LEAST_PRIVILEGE_BY_ACTION.items():
        probe = probes.get(action)
        if probe is None:
            if granted is None:
                detail = "a write cannot be tested without a change"
            elif action in granted.missing:
                detail = f"{permission} not granted"
            else:
                detail = "granted; a write cannot be tested without a change"
            result = "denied" if granted is not None and action in granted.missing else "untested"
            results.append(
                {"action": action, "permission": permission, "result": result, "detail": detail}
            )
            continue
        path, params = probe
        try:
            client.request("GET", path, params=params)
            result, detail = "allowed", f"GET {path} answered"
        except NotFoundError:
            result, detail = "allowed", f"GET {path} answered 404 (permission granted)"
        except ForbiddenError:
            result, detail = "denied", f"Graph refused GET {path}: {permission} is needed"
        except GraphError as exc:
            result, detail = "error", str(exc)
        results.append(
            {"action": action, "permission": permission, "result": result, "detail": detail}
        )
    return results


def _show_review_before_sign_in(settings: Settings, tenant_id: str) -> None:
    click.echo(f"entraflow will ask tenant {tenant_id} for these delegated permissions, the least")
    click.echo("each action needs:")
    actions_by_permission: dict[str, list[str]] = {}
    for action, permission in LEAST_PRIVILEGE_BY_ACTION.items():
        actions_by_permission.setdefault(permission, []).append(action)
    for scope in delegated_scopes(settings.graph_url):
        name = permission_name(scope)
        purpose = ", ".join(actions_by_permission.get(name, [])) or ACTION_PURPOSE
        click.echo(f"  {name:<28} {purpose}")
    click.secho(
        "Warning: every action entraflow runs will be attributed to the account that signs in. "
        "Sign in with a dedicated service account, not a person's own account.",
        fg="yellow",
    )


def _show_url(url: str, *, offer_browser: bool) -> None:
    click.echo("Open this address to sign in:")
    click.echo(f"  {url}")
    if offer_browser and click.confirm("Open it in your browser now?", default=True):
        webbrowser.open(url)


def _show_connected(stored: Connection) -> None:
    if stored.kind is ConnectionKind.DELEGATED:
        who = stored.account_upn or "an account Graph did not name"
    else:
        who = f"app {stored.client_id}"
    click.echo(f"Connected ({stored.kind.value}) to tenant {stored.tenant_id} as {who}.")
    if stored.kind is ConnectionKind.APP:
        click.echo("Run `entraflow connection check` to test the app's permissions.")
        return
    review = review_scopes(stored.scope_list)
    click.echo(f"Granted: {' '.join(review.granted)}")
    click.echo(f"Actions available: {', '.join(review.available_actions) or 'none'}")
    for action, scope in review.missing.items():
        click.secho(f"Disabled: {action}: {scope} was not granted", fg="red")
    if review.extra:
        click.secho(
            "Warning (least privilege): granted more than the actions need: "
            f"{', '.join(review.extra)}; remove these permissions from the app registration",
            fg="yellow",
        )
    if not review.has_refresh:
        click.secho(f"Warning: {OFFLINE_ACCESS} was not granted", fg="yellow")


def _secret_box(settings: Settings) -> SecretBox:
    try:
        return SecretBox.from_settings(settings)
    except SecretKeyError as exc:
        raise click.ClickException(str(exc)) from exc


def stdin_is_terminal() -> bool:
    """Whether someone is at the keyboard to type a secret into a hidden prompt."""
    return sys.stdin.isatty()


def _client_secret(settings: Settings, path: Path | None, *, ask: bool) -> SecretStr | None:
    """The client secret from `path`, else ENTRAFLOW_CLIENT_SECRET, else a hidden prompt."""
    if path is not None:
        return SecretStr(read_secret_file(path))
    if settings.client_secret is not None and settings.client_secret.get_secret_value():
        return settings.client_secret
    if ask and stdin_is_terminal():
        typed = click.prompt("Client secret", hide_input=True, default="", show_default=False)
        return SecretStr(typed.strip()) if typed.strip() else None
    return None


def read_secret_file(path: Path) -> str:
    """The secret `path` holds; refused when others may read it, or when it is not one."""
    try:
        with path.open("rb") as opened:
            status = os.fstat(opened.fileno())
            # A pipe (`--client-secret-file <(vault read ...)`) has no permissions to check.
            if stat.S_ISREG(status.st_mode) and status.st_mode & SHARED_FILE_BITS:
                raise click.UsageError(
                    f"{path} can be read by others (mode {stat.S_IMODE(status.st_mode):o}): "
                    f"run `chmod 600 {path}` and keep the secret to yourself"
                )
            content = opened.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        raise click.UsageError(f"cannot read {path}: {exc.strerror}") from exc
    secret = content.decode("utf-8", errors="replace").strip()
    if len(content) > MAX_SECRET_FILE_BYTES or not secret or "\n" in secret:
        raise click.UsageError(f"{path} must hold the client secret alone, on one line")
    return secret


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _plain(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(item) for item in value) or "none"
    if isinstance(value, dict):
        return "; ".join(f"{key}: {item}" for key, item in value.items()) or "none"
    return "-" if value is None else str(value)
