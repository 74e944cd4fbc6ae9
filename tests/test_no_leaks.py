"""No secret leaves the places it belongs: a full delegated session, then a search everywhere.

A service account connects (the test plays the browser) with a distinctive client secret; a real
worker at DEBUG level runs a good flow, a failing flow, a flow whose token expired mid-way (a
refresh), and a flow held back by a throttle; one more run waits on the queue with the worker
stopped. Then the client secret, the secret key, every access token, refresh token and
authorization code the sandbox issued are searched for in every log line, every CLI answer, every
database row, every Redis key and queued or unacknowledged Celery message, and every task event.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from sqlalchemy import inspect, text

from cli.connect import SignInOptions, sign_in
from entraflow import keys
from entraflow.celery_app import app as celery_app
from entraflow.secrets import SecretBox, generate_key
from entraflow.settings import Settings, get_settings
from harness.stack import LocalStack
from harness.waiting import wait_until
from models.connections import load_connection
from models.db import get_engine
from models.history import show_run, wait_for_run
from sandbox.config import SandboxConfig
from sandbox.directory import DEMO_GROUPS, DEMO_USERS, SANDBOX_CLIENT_SECRET, SANDBOX_TENANT_ID
from sandbox.server import SandboxServer
from scheduler.runs import start_run

pytestmark = pytest.mark.integration

# Distinctive, so that a hit can only be a leak.
CANARY_CLIENT_SECRET = "canary-client-secret-7Hq2-do-not-log"
RUN_TIMEOUT_S = 60.0
# Longer than a worker waits in process: the step goes back to the queue with a countdown.
THROTTLE_RETRY_AFTER_S = 8
EVENT_CAPTURE_TIMEOUT_S = 1.0
CLI_TIMEOUT_S = 60.0
# How every Fernet token (an encrypted column's value) begins: version byte 0x80, in base64.
FERNET_TOKEN_PREFIX = "gAAAAA"
GROUP_ID = DEMO_GROUPS["sales"].id
UNKNOWN_GROUP_ID = "00000000-0000-4000-8000-00000000dead"
STEPS: list[dict[str, Any]] = [
    {"id": "user", "action": "lookup_user", "with": {"upn": "{{ event.data.upn }}"}},
    {"id": "group", "action": "lookup_group", "with": {"group_id": "{{ event.data.group_id }}"}},
    {
        "id": "add",
        "action": "add_user_to_group",
        "with": {"user_id": "{{ steps.user.id }}", "group_id": "{{ steps.group.id }}"},
    },
    {
        "id": "remove",
        "action": "remove_member_from_group",
        "with": {"user_id": "{{ steps.user.id }}", "group_id": "{{ steps.group.id }}"},
    },
]


@pytest.fixture
def leak_stack(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[LocalStack, str]]:
    """The stack with a distinctive client secret and a secret key; no worker started yet."""
    secret_key = generate_key()
    monkeypatch.setenv("ENTRAFLOW_SECRET_KEY", secret_key)
    local = LocalStack(
        home=settings.home,
        redis_url=settings.redis_url,
        database_url=settings.database_url,
        workers=0,
        sandbox=SandboxServer(SandboxConfig(client_secret=CANARY_CLIENT_SECRET)),
    )
    with local:
        for name, value in local.env.items():
            monkeypatch.setenv(name, value)
        # The connection made in this process carries the canary; the worker's environment
        # keeps the stack's own secret, which the stored connection overrides.
        monkeypatch.setenv("ENTRAFLOW_CLIENT_SECRET", CANARY_CLIENT_SECRET)
        get_settings.cache_clear()
        yield local, secret_key
    get_settings.cache_clear()


class EventCapture:
    """Every Celery task event on the broker, as Flower receives them."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._connection = celery_app.connection_for_read()
        self._receiver = celery_app.events.Receiver(
            self._connection, handlers={"*": self.events.append}
        )
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        # Wakes up every timeout to notice should_stop.
        while not self._receiver.should_stop:
            try:
                self._receiver.capture(limit=None, timeout=EVENT_CAPTURE_TIMEOUT_S)
            except TimeoutError:
                continue

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop capturing (again, harmlessly)."""
        if self._receiver.should_stop:
            return
        self._receiver.should_stop = True
        self._thread.join(timeout=10 * EVENT_CAPTURE_TIMEOUT_S)
        self._connection.release()


@pytest.fixture
def task_events(redis_client: redis.Redis) -> Iterator[EventCapture]:
    """Task events captured from now until the test ends."""
    capture = EventCapture()
    capture.start()
    yield capture
    capture.stop()


def start_debug_worker(stack: LocalStack) -> subprocess.Popen[bytes]:
    """A worker logging at DEBUG, the most it ever says, to a file in the stack's home."""
    log_path = stack.home / "worker-debug.log"
    with (stack.home / "worker-debug.out").open("ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker", "--loglevel=DEBUG", "--concurrency=2",
             f"--hostname=leaks-{os.getpid()}@%h", "--without-gossip", "--without-mingle",
             f"--logfile={log_path}"],
            env={**os.environ, **stack.env},
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
        )  # fmt: skip
    stack.worker_processes.append(process)  # so that the stack stops it
    return process


def connect_service_account(settings: Settings) -> None:
    """`entraflow connect --paste`, the test following the authorize URL as the browser would."""
    redirects: list[str] = []

    def browse(url: str) -> None:
        answer = requests.get(url, allow_redirects=False, timeout=5)
        redirects.append(answer.headers["Location"])

    sign_in(
        settings,
        SignInOptions(
            SANDBOX_TENANT_ID, settings.client_id or "", settings.client_secret, paste=True
        ),
        show_url=browse,
        read_pasted=lambda: redirects[0],
    )


def run_flow(stack: LocalStack, group_id: str, event_id: str) -> str:
    data = {"upn": DEMO_USERS["nestor"].upn, "group_id": group_id}
    event = {"specversion": "1.0", "id": event_id, "source": "leaks", "type": "t", "data": data}
    return start_run(stack.settings, "leak-flow", STEPS, event)


def wait_until_retrying(database_url: str, run_id: str, step_id: str) -> None:
    def retrying() -> bool:
        run = show_run(database_url, run_id)
        return bool(run) and any(
            s["id"] == step_id and s["status"] == "retrying" for s in run["steps"]
        )

    wait_until(
        retrying, f"step {step_id} of run {run_id} to go back to the queue", timeout_s=RUN_TIMEOUT_S
    )


def issued_secrets(stack: LocalStack) -> dict[str, list[str]]:
    """Every token and code the sandbox issued, read from its token store."""
    sandbox = stack.sandbox.app
    with sandbox._lock:  # the sandbox keeps them private; a leak test has to know them
        issuer = sandbox._tokens
        return {
            "access token": list(issuer._tokens),
            "refresh token": list(issuer._refresh_tokens),
            "authorization code": list(issuer._codes),
        }


def stored_tokens(settings: Settings) -> dict[str, str]:
    """The stored connection's tokens, decrypted."""
    stored = load_connection(settings.resolved_database_url)
    assert stored is not None
    assert stored.access_token_ciphertext and stored.refresh_token_ciphertext
    box = SecretBox.from_settings(settings)
    return {
        "access": box.decrypt(stored.access_token_ciphertext),
        "refresh": box.decrypt(stored.refresh_token_ciphertext),
    }


def cli(stack: LocalStack, *args: str) -> str:
    """A real `entraflow` process's stdout and stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env={**os.environ, **stack.env},
        capture_output=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    return done.stdout.decode() + done.stderr.decode()


def database_dump(database_url: str) -> str:
    """Every row of every table as text, and for SQLite the raw bytes of its files too."""
    engine = get_engine(database_url)
    parts = []
    with engine.connect() as connection:
        for table in inspect(engine).get_table_names():
            rows = connection.execute(text(f'SELECT * FROM "{table}"')).all()
            parts.append(f"{table}: {rows!r}")
    if database_url.startswith("sqlite:///"):
        path = Path(database_url.removeprefix("sqlite:///"))
        for file in path.parent.glob(path.name + "*"):  # the database, its WAL and shm
            parts.append(file.read_bytes().decode("latin-1"))
    return "\n".join(parts)


def redis_dump(client: redis.Redis) -> str:
    """Every key and value in Redis; Celery message bodies decoded from their base64."""
    parts = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        if kind == "string":
            values: list[Any] = [client.get(key)]
        elif kind == "list":
            values = client.lrange(key, 0, -1)
        elif kind == "hash":
            values = [item for pair in client.hgetall(key).items() for item in pair]
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "zset":
            values = [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            values = [json.dumps(entry, default=repr) for entry in client.xrange(key)]
        else:
            values = []
        parts.append(repr(key))
        for value in values:
            raw = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            parts.append(raw)
            parts.extend(decoded_bodies(raw))
    return "\n".join(parts)


def decoded_bodies(raw: str) -> list[str]:
    """The base64 bodies of the kombu messages inside `raw`, decoded."""
    try:
        found: Any = json.loads(raw)
    except ValueError:
        return []
    bodies = []
    pending = [found]
    while pending:
        item = pending.pop()
        if isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, dict):
            properties = item.get("properties")
            if isinstance(properties, dict) and properties.get("body_encoding") == "base64":
                bodies.append(base64.b64decode(item["body"]).decode("latin-1"))
            pending.extend(item.values())
    return bodies


def test_no_secret_or_token_appears_in_logs_history_queue_redis_or_events(
    leak_stack: tuple[LocalStack, str],
    task_events: EventCapture,
    caplog: pytest.LogCaptureFixture,
    redis_url: str,
) -> None:
    stack, secret_key = leak_stack
    caplog.set_level(logging.DEBUG)
    settings = get_settings()
    client = redis.Redis.from_url(redis_url)
    connect_service_account(settings)
    worker = start_debug_worker(stack)
    database_url = settings.resolved_database_url

    good = run_flow(stack, GROUP_ID, "good")
    assert wait_for_run(database_url, good, timeout_s=RUN_TIMEOUT_S)["status"] == "succeeded"
    failing = run_flow(stack, UNKNOWN_GROUP_ID, "failing")
    assert wait_for_run(database_url, failing, timeout_s=RUN_TIMEOUT_S)["status"] == "failed"
    assert stack.sandbox.app.expire_tokens() >= 1
    refreshed = run_flow(stack, GROUP_ID, "refreshed")
    assert wait_for_run(database_url, refreshed, timeout_s=RUN_TIMEOUT_S)["status"] == "succeeded"
    assert stack.sandbox.app.oauth_stats()["refreshes"] >= 1

    # A step waiting out a throttle is held by the worker, unacknowledged, on a countdown.
    stack.sandbox.app.add_fault(
        method="POST",
        path_regex=r"/members/\$ref$",
        status=429,
        retry_after=str(THROTTLE_RETRY_AFTER_S),
        count=1,
    )
    throttled = run_flow(stack, GROUP_ID, "throttled")
    wait_until_retrying(database_url, throttled, "add")
    redis_while_held = redis_dump(client)
    assert client.hlen("unacked") >= 1
    assert wait_for_run(database_url, throttled, timeout_s=RUN_TIMEOUT_S)["status"] == "succeeded"

    worker.terminate()
    worker.wait()
    queued = run_flow(stack, GROUP_ID, "queued")
    assert client.llen(keys.FLOWS_QUEUE) == 1
    redis_while_queued = redis_dump(client)
    task_events.stop()

    run_ids = [good, failing, refreshed, throttled, queued]
    places: dict[str, str] = {
        "redis, a step held on a countdown": redis_while_held,
        "redis, a run on the queue": redis_while_queued,
        "task events": json.dumps(task_events.events, default=repr),
        "database": database_dump(database_url),
        "test process log": caplog.text,
    }
    for log_file in sorted(stack.home.glob("worker*")):
        places[f"worker log {log_file.name}"] = log_file.read_text(errors="replace")
    for args in (
        *(["runs", "show", run_id, "--json"] for run_id in run_ids),
        ["runs", "show", failing],
        ["runs", "list", "--json"],
        ["audit", "--json"],
        ["audit"],
        ["connection", "show", "--json"],
        ["connection", "check", "--json"],
    ):
        places[f"entraflow {' '.join(args)}"] = cli(stack, *args)

    # The search looked where the secrets went near: each place holds what it should.
    assert queued in places["redis, a run on the queue"]
    assert throttled in places["redis, a step held on a countdown"]
    assert any(event.get("type") == "task-received" for event in task_events.events)
    assert "entra.add_user_to_group" in places["worker log worker-debug.log"]
    assert '"outcome": "added"' in places[f"entraflow runs show {good} --json"]
    assert '"outcome": "not_found"' in places[f"entraflow runs show {failing} --json"]
    assert '"cause": "flow_run"' in places["entraflow audit --json"]
    assert "delegated" in places["entraflow connection show --json"]
    assert FERNET_TOKEN_PREFIX in places["database"]  # the encrypted tokens are there

    secrets = issued_secrets(stack)
    assert len(secrets["access token"]) >= 2 and len(secrets["refresh token"]) >= 2
    # The searched tokens are the ones the worker really holds.
    in_use = stored_tokens(settings)
    assert in_use["access"] in secrets["access token"]
    assert in_use["refresh"] in secrets["refresh token"]
    searched = {
        "client secret": [CANARY_CLIENT_SECRET, SANDBOX_CLIENT_SECRET],
        "secret key": [key for key in secret_key.split(",") if key],
        **secrets,
    }
    leaks = [
        f"{kind} {value[:6]}... in {place}"
        for kind, values in searched.items()
        for value in values
        for place, content in places.items()
        if value in content
    ]
    assert leaks == []
