"""The baseline: a plain Celery chain of four tasks making the same Graph calls as a run.

Run as its own worker (`celery -A bench.plain_chain:plain_app worker`, the same pool and
concurrency as entraflow's), each chain looks a user up by UPN, looks the group up, adds the
user and removes them again: the four requests of the `membership-round-trip` flow, over HTTP to
the same sandbox, with one cached token per process. No run history, no step locks, no shared
budget, no templates: what Celery, Redis and the Graph calls cost by themselves, so entraflow's
figures read as a ratio against it. The first and last link note when they ran, in Redis.
"""

from __future__ import annotations

import os
import threading
import time
from functools import cache
from typing import Any

import redis
import requests
from celery import Celery, chain
from requests.adapters import HTTPAdapter

PLAIN_QUEUE = "bench:plain"
# Hashes of chain id -> wall-clock time: the first link started, the last link finished.
STARTED_KEY = "bench:plain:started"
FINISHED_KEY = "bench:plain:finished"
# Where the worker finds Redis and the sandbox, and the app it signs in as.
REDIS_VARIABLE = "BENCH_REDIS_URL"
KEPT_CONNECTIONS = 128

plain_app = Celery("bench-plain", broker=os.environ.get(REDIS_VARIABLE))
plain_app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_default_queue=PLAIN_QUEUE,
    task_ignore_result=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
)
_token_lock = threading.Lock()
_token: list[str] = []


@cache
def _clock_store() -> redis.Redis:
    return redis.Redis.from_url(os.environ.get(REDIS_VARIABLE) or "redis://localhost")


@cache
def _session() -> requests.Session:
    session = requests.Session()
    session.mount("http://", HTTPAdapter(pool_maxsize=KEPT_CONNECTIONS))
    return session


def _bearer() -> dict[str, str]:
    with _token_lock:
        if not _token:
            answer = _session().post(
                f"{os.environ['ENTRAFLOW_AUTHORITY_URL']}/{os.environ['ENTRAFLOW_TENANT_ID']}"
                "/oauth2/v2.0/token",
                data={
                    "grant_type": "client_credentials",
                    "client_id": os.environ["ENTRAFLOW_CLIENT_ID"],
                    "client_secret": os.environ["ENTRAFLOW_CLIENT_SECRET"],
                    "scope": "https://graph.microsoft.com/.default",
                },
                timeout=30,
            )
            answer.raise_for_status()
            _token.append(answer.json()["access_token"])
        return {"Authorization": f"Bearer {_token[0]}"}


def _graph(method: str, path: str, json: Any = None) -> Any:
    response = _session().request(
        method,
        os.environ["ENTRAFLOW_GRAPH_URL"] + path,
        json=json,
        headers=_bearer(),
        timeout=30,
    )
    response.raise_for_status()
    return response.json() if response.content else None


@plain_app.task(name="bench.plain.lookup_user")
def lookup_user(chain_id: str, upn: str, group_id: str) -> dict[str, str]:
    _clock_store().hset(STARTED_KEY, chain_id, time.time())
    user = _graph("GET", f"/users/{upn}?$select=id,displayName,mail,userPrincipalName")
    return {"chain_id": chain_id, "user_id": user["id"], "group_id": group_id}


@plain_app.task(name="bench.plain.lookup_group")
def lookup_group(state: dict[str, str]) -> dict[str, str]:
    _graph("GET", f"/groups/{state['group_id']}?$select=id,displayName")
    return state


@plain_app.task(name="bench.plain.add")
def add(state: dict[str, str]) -> dict[str, str]:
    directory_object = f"https://graph.microsoft.com/v1.0/directoryObjects/{state['user_id']}"
    _graph("POST", f"/groups/{state['group_id']}/members/$ref", {"@odata.id": directory_object})
    return state


@plain_app.task(name="bench.plain.remove")
def remove(state: dict[str, str]) -> None:
    _graph("DELETE", f"/groups/{state['group_id']}/members/{state['user_id']}/$ref")
    _clock_store().hset(FINISHED_KEY, state["chain_id"], time.time())


def send_chain(chain_id: str, upn: str, group_id: str) -> None:
    """Queue one chain of the four tasks."""
    chain(
        lookup_user.s(chain_id, upn, group_id), lookup_group.s(), add.s(), remove.s()
    ).apply_async()
