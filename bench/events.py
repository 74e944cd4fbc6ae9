"""Events to finished runs: entraflow against a plain Celery chain of no-op tasks, in one run.

entraflow: a producer XADDs CloudEvents; a real `entraflow scheduler` turns each into a run of
the four-step `membership-round-trip` flow; a real worker runs it against the Graph sandbox over
HTTP. Baseline: the same number of four-link chains of tasks that do nothing, sent straight to
Celery on the same Redis, run by a plain Celery worker with the same concurrency. Each side runs
twice: a burst (everything pushed at once: throughput) and a steady rate below what the burst
reached (latency: from XADD, or the send, to the first Graph request, or the first link, and to
the finished run).

    .venv/bin/python -m bench.events [--events 300] [--concurrency 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import redis
from celery import chain
from sqlmodel import col, select

from entraflow.settings import get_settings
from harness.stack import LocalStack
from harness.waiting import wait_until
from models.db import session_scope
from models.runs import FlowRun, RunStatus
from sandbox.app import SandboxApp
from sandbox.config import SandboxConfig
from sandbox.directory import DEMO_GROUPS, bulk_user_upn
from sandbox.server import SandboxServer
from scheduler.flows import apply_flows
from scheduler.producer import build_event

FLOW_FILE = (
    Path(__file__).resolve().parent.parent / "entraflow/examples/flows/membership-round-trip.yaml"
)
CHAIN_LENGTH = 4
# The steady phase runs at this share of the rate the burst reached.
STEADY_SHARE_OF_BURST = 0.5
FINISH_TIMEOUT_S = 600.0


@dataclass
class Phase:
    """What one side did in one phase: per item, when it was sent, first touched, finished."""

    sent_s: dict[str, float]
    first_s: dict[str, float]
    finished_s: dict[str, float]

    def throughput_per_s(self) -> float:
        span_s = max(self.finished_s.values()) - min(self.sent_s.values())
        return len(self.finished_s) / span_s

    def latencies_ms(self, ends: Mapping[str, float]) -> list[float]:
        return [(ends[key] - self.sent_s[key]) * 1000 for key in self.sent_s]


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def send_paced(
    keys: list[str], rate_per_s: float | None, send: Callable[[str], None]
) -> dict[str, float]:
    """Send every key, at `rate_per_s` or as fast as possible; return when each went."""
    sent_s: dict[str, float] = {}
    started = time.monotonic()
    for index, key in enumerate(keys):
        if rate_per_s:
            delay_s = started + index / rate_per_s - time.monotonic()
            if delay_s > 0:
                time.sleep(delay_s)
        sent_s[key] = time.time()
        send(key)
    return sent_s


class GraphClock:
    """Notes when the sandbox first heard of each bulk user: the first Graph request of a run."""

    def __init__(self, app: SandboxApp) -> None:
        self.first_s: dict[str, float] = {}
        self._lock = threading.Lock()
        handle = app.handle

        def timed(method: str, target: str, headers: Any, body: bytes = b"") -> Any:
            moment = time.time()
            path = unquote(target.split("?", 1)[0])
            if "/users/" in path:
                upn = path.rsplit("/", 1)[-1]
                with self._lock:
                    self.first_s.setdefault(upn, moment)
            return handle(method, target, headers, body)

        app.handle = timed  # type: ignore[method-assign]


def entraflow_phase(
    stack: LocalStack, clock: GraphClock, users: range, rate_per_s: float | None
) -> Phase:
    client = redis.Redis.from_url(stack.redis_url or "")
    group_id = DEMO_GROUPS["falcon"].id
    upns = [bulk_user_upn(n) for n in users]

    def push(upn: str) -> None:
        event = build_event(
            type="demo.membership.checked",
            source="bench",
            id=upn,
            data={"upn": upn, "group_id": group_id},
        )
        client.xadd("entraflow:events", {"event": json.dumps(event)})

    sent_s = send_paced(upns, rate_per_s, push)
    database_url = stack.settings.resolved_database_url

    def finished() -> dict[str, float]:
        with session_scope(database_url) as session:
            rows = session.exec(
                select(FlowRun.event_id, FlowRun.finished_at, FlowRun.status).where(
                    col(FlowRun.event_id).in_(upns)
                )
            ).all()
        failed = [event_id for event_id, _, status in rows if status == RunStatus.FAILED]
        if failed:
            raise RuntimeError(f"runs failed: {failed[:5]}")
        return {e: f.timestamp() for e, f, s in rows if e and f and s == RunStatus.SUCCEEDED}

    wait_until(
        lambda: len(finished()) == len(upns), "entraflow runs to finish", timeout_s=FINISH_TIMEOUT_S
    )
    client.close()
    return Phase(sent_s, {upn: clock.first_s[upn] for upn in upns}, finished())


def noop_phase(redis_url: str, batch: str, count: int, rate_per_s: float | None) -> Phase:
    from bench.noop_app import FINISHED_KEY, STARTED_KEY, noop

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = [f"{batch}-{n}" for n in range(count)]

    def send(chain_id: str) -> None:
        links = [noop.si(chain_id, position, CHAIN_LENGTH) for position in range(CHAIN_LENGTH)]
        chain(*links).apply_async()

    sent_s = send_paced(keys, rate_per_s, send)
    wait_until(
        lambda: sum(client.hexists(FINISHED_KEY, k) for k in keys) == count,
        "no-op chains to finish",
        timeout_s=FINISH_TIMEOUT_S,
    )
    started = {k: float(str(v)) for k, v in zip(keys, client.hmget(STARTED_KEY, keys), strict=True)}
    ended = {k: float(str(v)) for k, v in zip(keys, client.hmget(FINISHED_KEY, keys), strict=True)}
    client.close()
    return Phase(sent_s, started, ended)


def report(name: str, phase: Phase) -> None:
    first = phase.latencies_ms(phase.first_s)
    done = phase.latencies_ms(phase.finished_s)
    print(
        f"  {name:<22} {phase.throughput_per_s():7.1f} runs/s   to first request p50 "
        f"{statistics.median(first):6.1f} ms p99 {percentile(first, 0.99):6.1f} ms   "
        f"to finished p50 {statistics.median(done):6.1f} ms p99 {percentile(done, 0.99):6.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    count = args.events
    sandbox = SandboxServer(SandboxConfig(bulk_users=3 * count))
    with tempfile.TemporaryDirectory() as home:
        stack = LocalStack(
            home=Path(home), concurrency=args.concurrency, schedulers=1, sandbox=sandbox
        )
        with stack:
            os.environ.update(stack.env)
            get_settings.cache_clear()
            apply_flows(stack.settings, FLOW_FILE)
            clock = GraphClock(stack.sandbox.app)
            assert stack.redis_url is not None
            noop_worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "bench.noop_app:noop_app", "worker",
                 f"--concurrency={args.concurrency}", "--queues=bench:noop",
                 "--without-gossip", "--without-mingle", "--loglevel=WARNING"],
                env={**os.environ, "BENCH_REDIS_URL": stack.redis_url},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            os.environ["BENCH_REDIS_URL"] = stack.redis_url
            try:
                ours_burst = entraflow_phase(stack, clock, range(1, count + 1), None)
                base_burst = noop_phase(stack.redis_url, "burst", count, None)
                rate = STEADY_SHARE_OF_BURST * ours_burst.throughput_per_s()
                steady_users = range(count + 1, 2 * count + 1)
                ours_steady = entraflow_phase(stack, clock, steady_users, rate)
                base_steady = noop_phase(stack.redis_url, "steady", count, rate)
            finally:
                noop_worker.terminate()
                noop_worker.wait()
    print(f"{count} events, worker concurrency {args.concurrency}, one scheduler, 2 cores")
    print("burst (all pushed at once):")
    report("entraflow", ours_burst)
    report("no-op Celery chain", base_burst)
    print(f"steady at {rate:.1f} events/s:")
    report("entraflow", ours_steady)
    report("no-op Celery chain", base_steady)
    throughput_ratio = ours_burst.throughput_per_s() / base_burst.throughput_per_s()
    ours_first = statistics.median(ours_steady.latencies_ms(ours_steady.first_s))
    base_first = statistics.median(base_steady.latencies_ms(base_steady.first_s))
    print(
        f"ratio entraflow / no-op: burst throughput {throughput_ratio:.2f}; "
        f"steady p50 to first request {ours_first / base_first:.1f}x"
    )


if __name__ == "__main__":
    main()
