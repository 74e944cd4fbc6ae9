"""Events to finished runs at several Graph latencies, and against a plain Celery chain, in one run.

entraflow: a producer XADDs CloudEvents; a real `entraflow scheduler` turns each into a run of
the four-step `membership-round-trip` flow; a real worker runs it against the Graph sandbox over
HTTP, which answers each Graph request after the latency of the phase (a median and, with
`--latency-p99-ms`, a log-normal spread with that 99th percentile). At each latency entraflow runs
twice, on its own users: a burst (everything pushed at once: throughput, also as a ratio to the
0 ms burst) and a steady rate below what that burst reached (latency: from XADD, or the send, to
the first Graph request, or the first link, and to the finished run).
Baseline, once, at 0 ms: the same number of plain Celery chains of four tasks making the same
four Graph calls (`bench.plain_chain`: no run history, locks or budget), sent straight to Celery
on the same Redis, run by a plain Celery worker with the same pool and concurrency, in a burst
and at the 0 ms steady rate.

    .venv/bin/python -m bench.events [--events 300] [--pool threads] [--concurrency 32]
        [--latency-ms 0,200,500] [--latency-p99-ms 0,400,1000]
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
from sqlmodel import col, select

from bench.bulk import peak_rss_kb
from bench.groups import DEFAULT_GROUPS, GROUP_WRITES_IN_FLIGHT, bench_groups
from bench.latency import Latency, add_latency_options, latencies_from
from cli.processes import DEFAULT_WORKER_THREADS
from entraflow.settings import get_settings
from harness.stack import LocalStack
from harness.waiting import wait_until
from models.db import session_scope
from models.runs import FlowRun, RunStatus
from sandbox.app import SandboxApp
from sandbox.config import SandboxConfig
from sandbox.directory import bulk_user_upn
from sandbox.server import SandboxServer
from scheduler.flows import apply_flows
from scheduler.producer import build_event

FLOW_FILE = (
    Path(__file__).resolve().parent.parent / "entraflow/examples/flows/membership-round-trip.yaml"
)
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


@dataclass
class Measured:
    """One side at one latency: a burst, then a steady rate at a share of what it reached."""

    latency: Latency
    burst: Phase
    steady: Phase
    steady_rate_per_s: float


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


def group_of(upn: str, groups: list[str]) -> str:
    """The group a run for `upn` writes to: the bench's groups in turns."""
    return groups[int(upn.removeprefix("user").partition("@")[0]) % len(groups)]


def entraflow_phase(
    stack: LocalStack, clock: GraphClock, users: range, rate_per_s: float | None, groups: list[str]
) -> Phase:
    client = redis.Redis.from_url(stack.redis_url or "")
    upns = [bulk_user_upn(n) for n in users]

    def push(upn: str) -> None:
        event = build_event(
            type="demo.membership.checked",
            source="bench",
            id=upn,
            data={"upn": upn, "group_id": group_of(upn, groups)},
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


def plain_phase(redis_url: str, users: range, rate_per_s: float | None, groups: list[str]) -> Phase:
    from bench.plain_chain import FINISHED_KEY, STARTED_KEY, send_chain

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = [bulk_user_upn(n) for n in users]
    sent_s = send_paced(keys, rate_per_s, lambda upn: send_chain(upn, upn, group_of(upn, groups)))
    wait_until(
        lambda: sum(client.hexists(FINISHED_KEY, k) for k in keys) == len(keys),
        "plain chains to finish",
        timeout_s=FINISH_TIMEOUT_S,
    )
    started = {k: float(str(v)) for k, v in zip(keys, client.hmget(STARTED_KEY, keys), strict=True)}
    ended = {k: float(str(v)) for k, v in zip(keys, client.hmget(FINISHED_KEY, keys), strict=True)}
    client.close()
    return Phase(sent_s, started, ended)


def entraflow_latency(
    stack: LocalStack, clock: GraphClock, latency: Latency, users: range, groups: list[str]
) -> Measured:
    """A burst on the first half of `users`, then the steady rate on the second half."""
    stack.sandbox.app.configure(**latency.sandbox_changes())
    half = len(users) // 2
    burst = entraflow_phase(stack, clock, users[:half], None, groups)
    rate_per_s = STEADY_SHARE_OF_BURST * burst.throughput_per_s()
    steady = entraflow_phase(stack, clock, users[half:], rate_per_s, groups)
    return Measured(latency, burst, steady, rate_per_s)


def row(side: str, measured: Measured, burst_to_zero: str) -> str:
    latency, steady = measured.latency, measured.steady
    done = steady.latencies_ms(steady.finished_s)
    p99 = f"{latency.p99_ms:g}" if latency.p99_ms > latency.p50_ms else "-"
    return (
        f"{side:<20} {latency.p50_ms:>9g} {p99:>7} {measured.burst.throughput_per_s():>9.1f} "
        f"{burst_to_zero:>9} {measured.steady_rate_per_s:>9.1f} {statistics.median(done):>9.1f} "
        f"{percentile(done, 0.99):>9.1f}"
    )


def report(
    count: int, workers: str, measured: list[Measured], zero: Measured, base: Measured
) -> None:
    """One table: entraflow at each latency, then the plain chain; ratios to `zero`, at 0 ms."""
    print(f"{count} events per phase, {workers}, one scheduler, {os.cpu_count()} cores")
    print(
        f"{'':<20} {'Graph ms':>17} {'burst':>9} {'burst /':>9} "
        f"{'steady':>9} {'to finished ms':>19}"
    )
    print(
        f"{'':<20} {'p50':>9} {'p99':>7} {'runs/s':>9} {'0 ms':>9} "
        f"{'events/s':>9} {'p50':>9} {'p99':>9}"
    )
    zero_per_s = zero.burst.throughput_per_s()
    for each in measured:
        print(row("entraflow", each, f"{each.burst.throughput_per_s() / zero_per_s:.2f}"))
    print(row("plain Celery chain", base, "-"))
    throughput_ratio = zero_per_s / base.burst.throughput_per_s()
    ours_first = statistics.median(zero.steady.latencies_ms(zero.steady.first_s))
    base_first = statistics.median(base.steady.latencies_ms(base.steady.first_s))
    print(
        f"ratio entraflow / plain chain at 0 ms: burst throughput {throughput_ratio:.2f}; "
        f"steady p50 to first request {ours_first / base_first:.1f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=300, help="runs per phase")
    parser.add_argument("--pool", choices=["threads", "prefork"], default="threads")
    parser.add_argument("--groups", type=int, default=DEFAULT_GROUPS, help="groups written to")
    parser.add_argument(
        "--concurrency", type=int, default=None, help="[default: the worker's for the pool]"
    )
    add_latency_options(parser)
    args = parser.parse_args()
    if 0 not in args.latency_ms:
        parser.error("--latency-ms needs a 0: the rate the other latencies are compared to")
    latencies = latencies_from(parser, args)
    zero_index = args.latency_ms.index(0)
    count = args.events
    concurrency = args.concurrency or (
        DEFAULT_WORKER_THREADS if args.pool == "threads" else os.cpu_count() or 1
    )
    workers = f"one worker of {concurrency} {args.pool}, runs writing to {args.groups} groups"
    # Every phase takes users of its own: a second run for the same user finds it already a
    # member; the baseline takes the last ones.
    first_plain_user = 1 + 2 * count * len(latencies)
    sandbox = SandboxServer(
        SandboxConfig(
            bulk_users=first_plain_user - 1 + 2 * count,
            max_group_writes_in_flight=GROUP_WRITES_IN_FLIGHT,
        )
    )
    with tempfile.TemporaryDirectory() as home:
        stack = LocalStack(
            home=Path(home),
            pool=args.pool,
            concurrency=concurrency,
            schedulers=1,
            sandbox=sandbox,
        )
        with stack:
            os.environ.update(stack.env)
            get_settings.cache_clear()
            apply_flows(stack.settings, FLOW_FILE)
            clock = GraphClock(stack.sandbox.app)
            groups = bench_groups(stack.sandbox.app, args.groups)
            assert stack.redis_url is not None
            plain_worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "bench.plain_chain:plain_app", "worker",
                 f"--pool={args.pool}", f"--concurrency={concurrency}", "--queues=bench:plain",
                 "--without-gossip", "--without-mingle", "--loglevel=WARNING"],
                env={**os.environ, "BENCH_REDIS_URL": stack.redis_url},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            os.environ["BENCH_REDIS_URL"] = stack.redis_url
            measured: list[Measured] = []
            try:
                for index, latency in enumerate(latencies):
                    first_user = 1 + 2 * count * index
                    users = range(first_user, first_user + 2 * count)
                    measured.append(entraflow_latency(stack, clock, latency, users, groups))
                    if index == zero_index:
                        rate = measured[-1].steady_rate_per_s
                        plain_users = range(first_plain_user, first_plain_user + 2 * count)
                        base = Measured(
                            latency,
                            plain_phase(stack.redis_url, plain_users[:count], None, groups),
                            plain_phase(stack.redis_url, plain_users[count:], rate, groups),
                            rate,
                        )
                rss_kb = peak_rss_kb([p.pid for p in stack.worker_processes])
            finally:
                stack.sandbox.app.configure(**Latency(0.0).sandbox_changes())
                plain_worker.terminate()
                plain_worker.wait()
    report(count, workers, measured, measured[zero_index], base)
    print(f"peak RSS of the worker's {len(rss_kb)} process(es): {sum(rss_kb) / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
