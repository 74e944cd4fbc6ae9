"""Tokens and secrets cross the network only over https, and local servers stay on loopback.

Plain http is for the sandbox on this machine only; Flower without authentication and the
metrics endpoints listen on loopback. No test here sends anything to another machine: the
addresses off loopback are documentation addresses (RFC 5737), and every request that could
leave is caught by a recording adapter or a proxy on a closed loopback port.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import pytest
import redis
import requests
from click.testing import CliRunner
from fake_transport import FakeTransport, Reply
from oauthlib.oauth2 import BackendApplicationClient
from pydantic import SecretStr, ValidationError
from requests_oauthlib import OAuth2Session

from cli.main import cli
from cli.processes import LOOPBACK_ADDRESS, flower_address_arguments
from entraflow import metrics
from entraflow.settings import Settings, get_settings
from harness.ports import free_port
from worker.errors import AuthenticationError
from worker.permissions import PUBLIC_GRAPH_SCOPE, scope_for_graph
from worker.tokens import ClientCredentialsTokenProvider

# TEST-NET-1 (RFC 5737): never routed, so a request that escaped would reach nobody.
OFF_LOOPBACK = "192.0.2.10"
TENANT = "contoso.onmicrosoft.com"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
SECRET = "s3cr3t~Value.Never_Shown"
INSECURE_TRANSPORT = "OAUTHLIB_INSECURE_TRANSPORT"
# A refused command exits at once; a process still running after this has not refused.
REFUSAL_TIMEOUT_S = 60.0
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.2
# /proc/net/tcp{,6} state of a listening socket.
TCP_LISTEN = "0A"


def listening_addresses(port: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The local addresses of every socket listening on TCP `port` in this network namespace."""
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            hex_address, _, hex_port = fields[1].partition(":")
            if fields[3] != TCP_LISTEN or int(hex_port, 16) != port:
                continue
            raw = bytes.fromhex(hex_address)
            # The kernel prints each 32-bit word in host (little-endian) order.
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(ipaddress.ip_address(words))
    return found


# --- 5: plain http only on loopback, for Graph and the authority alike -----------------------


@pytest.mark.parametrize("variable", ["graph_url", "authority_url"])
@pytest.mark.parametrize(
    "url",
    [
        f"http://{OFF_LOOPBACK}/v1.0",
        "http://graph.example.com/v1.0",
        "http://0.0.0.0:8765",
        "http://localhost.example.com/v1.0",
        "http://127.0.0.1.example.com/v1.0",
        "HTTP://[2001:db8::1]:8080",
    ],
)
def test_settings_refuse_plain_http_off_loopback(variable: str, url: str) -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(_env_file=None, **{variable: url})  # type: ignore[call-arg]

    assert f"ENTRAFLOW_{variable.upper()}" in str(raised.value)
    assert "plain http" in str(raised.value)


@pytest.mark.parametrize("variable", ["graph_url", "authority_url"])
@pytest.mark.parametrize(
    "url", ["ftp://graph.microsoft.com/v1.0", "graph.microsoft.com", "https:///v1.0"]
)
def test_settings_refuse_urls_that_are_not_http_or_https(variable: str, url: str) -> None:
    with pytest.raises(ValidationError, match=f"ENTRAFLOW_{variable.upper()}"):
        Settings(_env_file=None, **{variable: url})  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8765",
        "http://127.42.0.7:8765/v1.0",
        "http://[::1]:8765/v1.0",
        "http://localhost:8765",
        "http://LOCALHOST./v1.0",
        "https://graph.microsoft.us/v1.0",
    ],
)
def test_settings_accept_https_and_plain_http_on_loopback(url: str) -> None:
    settings = Settings(_env_file=None, graph_url=url, authority_url=url)  # type: ignore[call-arg]

    assert (settings.graph_url, settings.authority_url) == (url, url)


def test_a_host_named_in_plain_http_hosts_may_be_reached_over_http_and_no_other() -> None:
    # The compose sandbox profile: workers reach the `sandbox` container on compose's network.
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        plain_http_hosts="sandbox, other-sandbox",
        graph_url="http://sandbox:8765/v1.0",
        authority_url="http://SANDBOX:8765",
    )
    assert settings.graph_url == "http://sandbox:8765/v1.0"
    with pytest.raises(ValidationError, match="plain http"):
        Settings(  # type: ignore[call-arg]
            _env_file=None, plain_http_hosts="sandbox", graph_url="http://graph.example/v1.0"
        )


def test_a_plain_http_host_stands_in_for_the_public_graph(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ENTRAFLOW_PLAIN_HTTP_HOSTS", "sandbox")
    get_settings.cache_clear()
    try:
        assert scope_for_graph("http://sandbox:8765/v1.0") == PUBLIC_GRAPH_SCOPE
        with pytest.raises(ValueError, match="plain http"):
            scope_for_graph(f"http://{OFF_LOOPBACK}/v1.0")
    finally:
        get_settings.cache_clear()


def test_a_dotenv_file_with_plain_http_off_loopback_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text(f"ENTRAFLOW_GRAPH_URL=http://{OFF_LOOPBACK}/v1.0\n")
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ValidationError, match="ENTRAFLOW_GRAPH_URL"):
        Settings()


@pytest.fixture
def recorded_sends(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every URL any `requests` session tried to send to; none of them leaves this process."""
    sent: list[str] = []

    def record(
        adapter: requests.adapters.HTTPAdapter,
        request: requests.PreparedRequest,
        *args: object,
        **kwargs: object,
    ) -> requests.Response:
        sent.append(str(request.url))
        raise requests.ConnectionError("the test lets nothing leave")

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", record)
    return sent


@pytest.mark.parametrize("variable", ["ENTRAFLOW_GRAPH_URL", "ENTRAFLOW_AUTHORITY_URL"])
def test_an_action_sends_nothing_when_a_url_is_plain_http_off_loopback(
    settings: Settings,
    recorded_sends: list[str],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
) -> None:
    for name, value in {
        variable: f"http://{OFF_LOOPBACK}/v1.0",
        "ENTRAFLOW_TENANT_ID": TENANT,
        "ENTRAFLOW_CLIENT_ID": CLIENT_ID,
        "ENTRAFLOW_CLIENT_SECRET": SECRET,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(INSECURE_TRANSPORT, "1")
    get_settings.cache_clear()

    result = CliRunner().invoke(cli, ["action", "lookup-user", "--upn", "adele@contoso.example"])

    assert recorded_sends == []
    assert result.exit_code != 0
    assert f"{variable} http://{OFF_LOOPBACK}" in result.output
    assert "plain http" in result.output
    assert not isinstance(result.exception, ValidationError)  # a clear message, no traceback


def _refusing_environment(tmp_path: Path, redis_url: str) -> dict[str, str]:
    """A child's environment in which any HTTP request ends at a closed loopback port."""
    closed = f"http://127.0.0.1:{free_port()}"
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("ENTRAFLOW_", "OAUTHLIB_", "FLOWER_"))
        and name.lower() not in {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    }
    env.update(
        ENTRAFLOW_HOME=str(tmp_path / "home"),
        ENTRAFLOW_REDIS_URL=redis_url,
        ENTRAFLOW_DATABASE_URL=f"sqlite:///{tmp_path / 'runs.db'}",
        ENTRAFLOW_TENANT_ID=TENANT,
        ENTRAFLOW_CLIENT_ID=CLIENT_ID,
        ENTRAFLOW_CLIENT_SECRET=SECRET,
        OAUTHLIB_INSECURE_TRANSPORT="1",
        http_proxy=closed,
        https_proxy=closed,
        all_proxy=closed,
        HTTP_PROXY=closed,
        HTTPS_PROXY=closed,
        ALL_PROXY=closed,
        no_proxy="",
        NO_PROXY="",
    )
    return env


@pytest.mark.integration
@pytest.mark.parametrize(
    ("command", "variable"),
    [
        pytest.param(
            ["action", "lookup-user", "--upn", "adele@contoso.example"],
            "ENTRAFLOW_GRAPH_URL",
            id="action",
        ),
        pytest.param(["connect", "--app"], "ENTRAFLOW_AUTHORITY_URL", id="connect"),
        pytest.param(["worker", "--concurrency=1"], "ENTRAFLOW_GRAPH_URL", id="worker"),
        pytest.param(["scheduler"], "ENTRAFLOW_AUTHORITY_URL", id="scheduler"),
    ],
)
def test_every_process_refuses_plain_http_off_loopback_from_dotenv(
    tmp_path: Path, redis_url: str, command: list[str], variable: str
) -> None:
    (tmp_path / ".env").write_text(f"{variable}=http://{OFF_LOOPBACK}:8080\n")

    finished = subprocess.run(
        [sys.executable, "-m", "cli", *command],
        cwd=tmp_path,
        env=_refusing_environment(tmp_path, redis_url),
        capture_output=True,
        text=True,
        timeout=REFUSAL_TIMEOUT_S,
        check=False,
    )

    assert finished.returncode != 0
    assert f"{variable} http://{OFF_LOOPBACK}:8080 is plain http" in finished.stderr
    assert "Traceback" not in finished.stderr


@pytest.mark.parametrize(
    ("graph_url", "scope"),
    [
        ("https://graph.microsoft.com/v1.0", PUBLIC_GRAPH_SCOPE),
        ("https://graph.microsoft.us/v1.0", "https://graph.microsoft.us/.default"),
        ("https://dod-graph.microsoft.us/beta", "https://dod-graph.microsoft.us/.default"),
        ("https://microsoftgraph.chinacloudapi.cn/v1.0", "https://microsoftgraph.chinacloudapi.cn/.default"),
        ("https://GRAPH.Microsoft.US:443/v1.0", "https://graph.microsoft.us/.default"),
        ("https://user:pass@graph.microsoft.us/v1.0", "https://graph.microsoft.us/.default"),
        # Any other host gets its own scope, never a token that opens the public Graph.
        ("https://graph.example.com/v1.0", "https://graph.example.com/.default"),
        # The sandbox stands in for the public Graph, on loopback only.
        ("http://127.0.0.1:8765/v1.0", PUBLIC_GRAPH_SCOPE),
        ("http://localhost:8765/v1.0", PUBLIC_GRAPH_SCOPE),
        ("https://[::1]:8443/v1.0", PUBLIC_GRAPH_SCOPE),
    ],
)  # fmt: skip
def test_the_scope_belongs_to_the_graph_urls_cloud(graph_url: str, scope: str) -> None:
    assert scope_for_graph(graph_url) == scope


def test_no_scope_is_made_for_plain_http_off_loopback() -> None:
    with pytest.raises(ValueError, match="plain http"):
        scope_for_graph(f"http://{OFF_LOOPBACK}/v1.0")


# --- 6: the client secret never goes to an http authority off loopback ----------------------


def _provider(transport: FakeTransport, authority: str) -> ClientCredentialsTokenProvider:
    def session_factory(client: BackendApplicationClient) -> OAuth2Session:
        session = OAuth2Session(client=client)
        transport.mount_on(session)
        return session

    return ClientCredentialsTokenProvider(
        authority, TENANT, CLIENT_ID, SecretStr(SECRET), session_factory=session_factory
    )


def _token_reply() -> Reply:
    return Reply(200, {"token_type": "Bearer", "expires_in": 3599, "access_token": "eyJ.t"})


def test_an_http_authority_off_loopback_gets_no_request_even_with_insecure_transport_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(INSECURE_TRANSPORT, "1")
    transport = FakeTransport([_token_reply()])

    with pytest.raises(AuthenticationError, match="plain http") as raised:
        _provider(transport, f"http://{OFF_LOOPBACK}").token()

    assert transport.requests == []
    assert SECRET not in str(raised.value)


def test_a_loopback_http_authority_needs_no_insecure_transport_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(INSECURE_TRANSPORT, raising=False)
    transport = FakeTransport([_token_reply()])

    assert _provider(transport, "http://127.0.0.1:8765").token() == "eyJ.t"
    assert transport.requests[0].url == f"http://127.0.0.1:8765/{TENANT}/oauth2/v2.0/token"


# --- 7: Flower without authentication stays on loopback -------------------------------------


def _flower_environment(redis_url: str, **extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("FLOWER_")}
    return {**env, "ENTRAFLOW_REDIS_URL": redis_url, **extra}


@contextmanager
def _unauthenticated_flower(redis_url: str, tmp_path: Path) -> Iterator[int]:
    """`entraflow flower` with no authentication and no address; yields its port."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "flower", f"--port={port}"],
        cwd=tmp_path,
        env=_flower_environment(redis_url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                requests.get(f"http://127.0.0.1:{port}/healthcheck", timeout=1)
                break
            except requests.ConnectionError:
                assert process.poll() is None, "flower exited"
                assert time.monotonic() < deadline, "flower did not start"
                time.sleep(POLL_S)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=STOP_TIMEOUT_S)


@pytest.mark.integration
def test_flower_without_authentication_listens_on_loopback_only(
    redis_url: str, tmp_path: Path
) -> None:
    with _unauthenticated_flower(redis_url, tmp_path) as port:
        addresses = listening_addresses(port)

    assert addresses == {ipaddress.ip_address("127.0.0.1")}


@pytest.mark.integration
@pytest.mark.parametrize(
    ("arguments", "extra_env"),
    [
        pytest.param(["--address=0.0.0.0"], {}, id="every-interface"),
        pytest.param([f"--address={OFF_LOOPBACK}"], {}, id="another-address"),
        pytest.param([], {"FLOWER_ADDRESS": "0.0.0.0"}, id="from-the-environment"),
    ],
)
def test_flower_without_authentication_refuses_an_address_off_loopback(
    redis_url: str, tmp_path: Path, arguments: list[str], extra_env: dict[str, str]
) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "flower", f"--port={port}", *arguments],
        cwd=tmp_path,
        env=_flower_environment(redis_url, **extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = process.communicate(timeout=REFUSAL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.terminate()
        process.wait(timeout=STOP_TIMEOUT_S)
        pytest.fail("flower started without authentication on an address off loopback")

    assert process.returncode != 0
    assert "FLOWER_BASIC_AUTH" in stderr
    assert "127.0.0.1" in stderr


@pytest.mark.parametrize(
    ("address", "unix_socket", "authenticated", "added"),
    [
        ("", "", False, ["--address=127.0.0.1"]),
        ("127.0.0.1", "", False, []),
        ("127.0.0.2", "", False, []),
        ("::1", "", False, []),
        ("localhost", "", False, []),
        ("", "/run/entraflow/flower.sock", False, []),
        ("", "", True, []),
        ("0.0.0.0", "", True, []),
    ],
)
def test_flower_without_authentication_is_kept_on_loopback(
    address: str, unix_socket: str, authenticated: bool, added: list[str]
) -> None:
    assert flower_address_arguments(address, unix_socket, authenticated) == added


@pytest.mark.parametrize("address", ["0.0.0.0", "::", OFF_LOOPBACK, "flower.example.com"])
def test_flower_without_authentication_refuses_every_other_address(address: str) -> None:
    with pytest.raises(click.ClickException, match="FLOWER_BASIC_AUTH") as raised:
        flower_address_arguments(address, "", authenticated=False)

    assert f"--address={LOOPBACK_ADDRESS}" in raised.value.message


@pytest.mark.parametrize(
    ("arguments", "config", "expected"),
    [
        pytest.param(["--basic-auth=operator:pw"], "", ("", "", True), id="basic-auth"),
        pytest.param(["--auth=.*@contoso\\.example"], "", ("", "", True), id="oauth2-login"),
        # A login page alone lets everyone in.
        pytest.param(
            ["--auth_provider=flower.views.auth.GoogleAuth2LoginHandler"],
            "",
            ("", "", False),
            id="auth-provider-alone",
        ),
        pytest.param(["--basic-auth="], "", ("", "", False), id="empty-basic-auth"),
        pytest.param([], 'address = "0.0.0.0"\n', ("0.0.0.0", "", False), id="config-file"),
    ],
)
def test_flower_options_are_read_as_flower_reads_them(
    tmp_path: Path, arguments: list[str], config: str, expected: tuple[str, str, bool]
) -> None:
    if config:
        (tmp_path / "flowerconfig.py").write_text(config)
    # Flower keeps its options in one global registry: read them in a process of their own.
    script = (
        "import sys; from cli.processes import flower_options; "
        "print(repr(flower_options(sys.argv[1:])))"
    )

    finished = subprocess.run(
        [sys.executable, "-c", script, *arguments],
        cwd=tmp_path,
        env=_flower_environment("redis://127.0.0.1:1/0"),
        capture_output=True,
        text=True,
        timeout=REFUSAL_TIMEOUT_S,
        check=True,
    )

    assert finished.stdout.strip() == repr(expected)


# --- 10: /metrics and /healthz on loopback unless told otherwise ----------------------------


def test_metrics_listen_on_loopback_by_default(tmp_path: Path, redis_url: str) -> None:
    settings = Settings(_env_file=None, home=tmp_path)  # type: ignore[call-arg]
    client = redis.Redis.from_url(redis_url)

    server = metrics.serve(settings.metrics_host, 0, client, settings.resolved_database_url)
    try:
        addresses = listening_addresses(server.port)
    finally:
        server.stop()
        client.close()

    assert addresses == {ipaddress.ip_address("127.0.0.1")}


def test_settings_never_show_a_redis_or_database_password_in_their_repr() -> None:
    # Settings reach tracebacks (pytest showed the embedded Redis's password in one) and logs.
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        redis_url="redis://:hunter2-redis@127.0.0.1:6379/0",
        database_url="postgresql://entraflow:hunter2-db@127.0.0.1/entraflow",
    )
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings)
