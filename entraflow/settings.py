"""The one place configuration is read: `ENTRAFLOW_*` environment variables and a `.env` file."""

from __future__ import annotations

import ipaddress
import os
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_GRAPH_URL = "https://graph.microsoft.com/v1.0"
DEFAULT_AUTHORITY_URL = "https://login.microsoftonline.com"
DEFAULT_HOME = Path(".entraflow")
# Plain http carries bearer tokens and client secrets in clear, so it may only ever reach this
# machine (the sandbox); these names are loopback besides 127.0.0.0/8 and ::1.
LOOPBACK_NAMES = frozenset({"localhost"})
# Host names besides loopback that Graph and the identity platform may be reached at over plain
# http: none. The compose `sandbox` profile names its sandbox container here, on compose's
# private network; a real Graph or login host must never be named.
DEFAULT_PLAIN_HTTP_HOSTS = ""

# Graph's write budget per app and tenant: 3,000 requests per 150 s (GRAPH.md, "Throttling").
DEFAULT_WRITES_PER_WINDOW = 3000
DEFAULT_WRITE_WINDOW_S = 150.0
# Graph's resource-unit budget per app and tenant for a tenant of more than 500 users.
DEFAULT_RU_PER_WINDOW = 8000
DEFAULT_RU_WINDOW_S = 10.0
# Bulk (low-priority) work may use at most this share of either budget: the rest is kept for
# interactive flows.
DEFAULT_LOW_PRIORITY_BUDGET_SHARE = 0.9
# Write requests to one group in flight at once, across every worker: Graph answers 503 past
# about five (GRAPH.md). 0: no limit.
DEFAULT_MAX_WRITES_PER_GROUP = 5

# Refetch an access token this long before Graph would refuse it.
DEFAULT_TOKEN_REFRESH_MARGIN_S = 300.0
# Waits up to this long are slept inside the worker; longer ones go back to the queue.
DEFAULT_MAX_INPROCESS_WAIT_S = 5.0
# Give up on a transient Graph error after this many attempts or this much time, whichever first.
DEFAULT_MAX_GRAPH_ATTEMPTS = 8
DEFAULT_MAX_GRAPH_RETRY_TIME_S = 180.0
# Timeout of one HTTP request to Graph or the token endpoint (connect, read).
DEFAULT_HTTP_TIMEOUT_S = 30.0
# A message a worker took and never acknowledged (the worker died) is delivered again after
# this long. Countdowns are kept shorter than it (see entraflow.celery_app).
DEFAULT_VISIBILITY_TIMEOUT_S = 300.0
# A step message delivered this many times without the step finishing fails the step.
DEFAULT_MAX_STEP_DELIVERIES = 10
# The scheduler trims the events stream to about this many entries, never an unacknowledged one.
DEFAULT_EVENTS_MAX_LEN = 100_000
# Dead letters kept, about: the oldest go first.
DEFAULT_DEAD_EVENTS_MAX_LEN = 100_000
# An event a scheduler has read but not acknowledged for this long is taken over by another.
DEFAULT_EVENTS_CLAIM_IDLE_S = 60.0
# The embedded Redis shuts itself down once no process has used it for this long (0: never), so
# a one-shot command such as `entraflow action` leaves no server running for good.
DEFAULT_EMBEDDED_REDIS_IDLE_S = 600.0


# Where a worker and a scheduler serve /metrics and /healthz; 0 serves nothing (the default:
# two workers on one host would fight over a fixed port).
DEFAULT_WORKER_METRICS_PORT = 0
DEFAULT_SCHEDULER_METRICS_PORT = 0
# The address those endpoints listen on: this machine only, since they tell anyone who asks
# about the queues and the Graph budget; a container that Prometheus scrapes sets 0.0.0.0.
DEFAULT_METRICS_HOST = "127.0.0.1"


class LogFormat(StrEnum):
    """How log lines are written."""

    AUTO = "auto"  # plain text to a terminal, JSON lines anywhere else
    JSON = "json"
    PLAIN = "plain"


# PostgreSQL connections each process keeps open, and the extra ones it may open under load.
DEFAULT_DB_POOL_SIZE = 5
DEFAULT_DB_MAX_OVERFLOW = 10
# How long a caller waits for a pooled connection before failing.
DEFAULT_DB_POOL_TIMEOUT_S = 30.0
# Reopen a pooled connection this old: servers and proxies drop long-idle ones.
DEFAULT_DB_POOL_RECYCLE_S = 1800.0
# Test a pooled connection with a round trip before use: a restarted database costs no errors.
DEFAULT_DB_POOL_PRE_PING = True
# PostgreSQL cancels a statement running longer than this (0: never), so a stuck lock fails a
# task instead of holding a worker; `entraflow db` migrations are exempt.
DEFAULT_DB_STATEMENT_TIMEOUT_S = 60.0
# Accepted events are what recognises a redelivered event as a duplicate: pruning keeps them
# at least this many days, far beyond any producer's or Redis's redelivery.
DEFAULT_ACCEPTED_EVENTS_MIN_KEEP_DAYS = 30
# The most rows one batch file may hold: a file is read and stored in one transaction, and its
# size must not be what decides whether the submit, or the database, copes.
DEFAULT_BATCH_MAX_ROWS = 1_000_000


class PatchWriteCost(StrEnum):
    """How many writes Graph charges for a `PATCH /groups/{id}` binding members (undocumented)."""

    REQUEST = "request"  # one write for the whole request
    MEMBER = "member"  # one write per member bound


# What the budget charges a members@odata.bind PATCH until Graph's own count says otherwise.
DEFAULT_PATCH_WRITE_COST = PatchWriteCost.REQUEST


class Settings(BaseSettings):
    """Every setting of entraflow; see README.md, "Configuration"."""

    model_config = SettingsConfigDict(
        env_prefix="ENTRAFLOW_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # Left out of the repr, which tracebacks and logs show: the URLs may carry a password.
    redis_url: str | None = Field(default=None, repr=False)
    embedded_redis_idle_s: float = DEFAULT_EMBEDDED_REDIS_IDLE_S
    database_url: str | None = Field(default=None, repr=False)
    home: Path = DEFAULT_HOME

    # Comma-separated; read before the two URLs below, whose check depends on it.
    plain_http_hosts: str = DEFAULT_PLAIN_HTTP_HOSTS
    graph_url: str = DEFAULT_GRAPH_URL
    authority_url: str = DEFAULT_AUTHORITY_URL
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    secret_key: SecretStr | None = None

    writes_per_window: int = DEFAULT_WRITES_PER_WINDOW
    write_window_s: float = DEFAULT_WRITE_WINDOW_S
    ru_per_window: int = DEFAULT_RU_PER_WINDOW
    ru_window_s: float = DEFAULT_RU_WINDOW_S
    patch_write_cost: PatchWriteCost = DEFAULT_PATCH_WRITE_COST
    low_priority_budget_share: float = DEFAULT_LOW_PRIORITY_BUDGET_SHARE
    max_writes_per_group: int = Field(default=DEFAULT_MAX_WRITES_PER_GROUP, ge=0)

    token_refresh_margin_s: float = DEFAULT_TOKEN_REFRESH_MARGIN_S
    max_inprocess_wait_s: float = DEFAULT_MAX_INPROCESS_WAIT_S
    max_graph_attempts: int = DEFAULT_MAX_GRAPH_ATTEMPTS
    max_graph_retry_time_s: float = DEFAULT_MAX_GRAPH_RETRY_TIME_S
    http_timeout_s: float = DEFAULT_HTTP_TIMEOUT_S
    max_step_deliveries: int = DEFAULT_MAX_STEP_DELIVERIES
    visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S

    events_max_len: int = DEFAULT_EVENTS_MAX_LEN
    dead_events_max_len: int = DEFAULT_DEAD_EVENTS_MAX_LEN
    events_claim_idle_s: float = DEFAULT_EVENTS_CLAIM_IDLE_S

    db_pool_size: int = DEFAULT_DB_POOL_SIZE
    db_max_overflow: int = DEFAULT_DB_MAX_OVERFLOW
    db_pool_timeout_s: float = DEFAULT_DB_POOL_TIMEOUT_S
    db_pool_recycle_s: float = DEFAULT_DB_POOL_RECYCLE_S
    db_pool_pre_ping: bool = DEFAULT_DB_POOL_PRE_PING
    db_statement_timeout_s: float = DEFAULT_DB_STATEMENT_TIMEOUT_S

    # Housekeeping prunes runs that ended more than this many days ago; None keeps them forever.
    runs_retention_days: int | None = None
    accepted_events_min_keep_days: int = DEFAULT_ACCEPTED_EVENTS_MIN_KEEP_DAYS
    batch_max_rows: int = DEFAULT_BATCH_MAX_ROWS

    worker_metrics_port: int = DEFAULT_WORKER_METRICS_PORT
    scheduler_metrics_port: int = DEFAULT_SCHEDULER_METRICS_PORT
    metrics_host: str = DEFAULT_METRICS_HOST
    log_format: LogFormat = LogFormat.AUTO

    @field_validator("graph_url", "authority_url")
    @classmethod
    def _refuse_clear_text_off_loopback(cls, url: str, info: ValidationInfo) -> str:
        allowed = plain_http_host_names(info.data.get("plain_http_hosts", ""))
        return check_transport(url, f"ENTRAFLOW_{(info.field_name or '').upper()}", allowed)

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file under `home`."""
        return self.database_url or _sqlite_url_under(self.home, os.getcwd())


@lru_cache(maxsize=64)
def _sqlite_url_under(home: Path, cwd: str) -> str:
    # Resolved once per home (and working folder, which a relative home is under): every step
    # reads the URL several times, and resolving costs a system call per path component.
    return f"sqlite:///{(Path(cwd) / home / 'entraflow.db').resolve()}"


class InsecureURLError(ValueError):
    """Raised when a Graph or identity URL would carry tokens or secrets in clear."""


def is_loopback_host(host: str) -> bool:
    """Whether `host` is this machine: 127.0.0.0/8, ::1 or `localhost`."""
    name = host.lower().removesuffix(".")
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def plain_http_host_names(value: str) -> frozenset[str]:
    """The host names of an `ENTRAFLOW_PLAIN_HTTP_HOSTS` value, lower-cased."""
    return frozenset(name.strip().lower() for name in value.split(",") if name.strip())


def check_transport(url: str, name: str, plain_http_hosts: frozenset[str] | None = None) -> str:
    """`url` if a token may be sent there (https, or plain http to loopback); else raise.

    `plain_http_hosts` defaults to the process's `ENTRAFLOW_PLAIN_HTTP_HOSTS`.
    """
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), parts.hostname or ""
    if scheme not in {"http", "https"} or not host:
        raise InsecureURLError(f"{name} must be an https:// URL (http:// only on loopback)")
    if plain_http_hosts is None:
        plain_http_hosts = plain_http_host_names(get_settings().plain_http_hosts)
    if scheme == "http" and not is_loopback_host(host) and host not in plain_http_hosts:
        # The origin only: a URL's user:password must not reach a message.
        origin = f"{scheme}://{parts.netloc.rpartition('@')[2]}"
        raise InsecureURLError(
            f"{name} {origin} is plain http to another machine: tokens and secrets would "
            "cross the network in clear. Use https; plain http only on loopback "
            "(127.0.0.1, ::1, localhost), for the sandbox"
        )
    return url


def settings_problem(exc: ValidationError) -> str:
    """One line per invalid setting, naming its variable and never echoing its value."""
    lines = []
    for error in exc.errors():
        variable = "ENTRAFLOW_" + "_".join(str(part) for part in error["loc"]).upper()
        message = str(error["msg"]).removeprefix("Value error, ")
        lines.append(message if message.startswith(variable) else f"{variable}: {message}")
    return "\n".join(lines)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once; tests call `get_settings.cache_clear()` to re-read."""
    return Settings()
