"""Bulk membership throughput against the Graph sandbox, with Graph's write budget scaled down.

In one run, on one machine, with the same budget in the sandbox and in entraflow's settings:
(a) entraflow's batch through real workers (20 adds to a PATCH, 20 removals to a `$batch`);
(b) a naive baseline: one `POST .../members/$ref` or `DELETE .../$ref` per membership, sent by
a few threads as fast as the same shared budget allows, on a share of the workload (same mix);
(c) the limit the budget implies for the workload of (a): a rolling window lets no `write_window_s`
hold more than `writes_per_window` writes. Every `$batch` part is one write (GRAPH.md).

    .venv/bin/python -m bench.bulk [--adds 10000] [--removes 2000] [--latency-ms 0,200,500]
                                   [--latency-p99-ms 0,400,900]

(a) runs once for each Graph latency, one after the other in the same run (after a small batch
that warms the workers up), each on users of its own and in a fresh budget window; (b) runs
once, at the first latency.

Bulk work may use `ENTRAFLOW_LOW_PRIORITY_BUDGET_SHARE` of the budget; no interactive work runs
here, so the bench gives it all (`--low-priority-share 1.0`) unless told otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench.groups import DEFAULT_GROUPS, GROUP_WRITES_IN_FLIGHT, bench_groups
from bench.latency import Latency, add_latency_options, latencies_from
from entraflow import process_info
from entraflow.settings import get_settings
from harness.stack import LocalStack
from models.batch_reports import batch_view
from models.batches import FINAL_BATCH_STATUSES, ItemAction, NewItem
from sandbox.config import SandboxConfig
from sandbox.directory import DEMO_GROUPS, bulk_user_id
from sandbox.server import SandboxServer
from scheduler.batches import submit_batch
from worker.actions import run_action
from worker.budget import MAX_MEMBERS_PER_PATCH, Priority
from worker.graph import GraphClient

# Graph's 3,000 writes per 150 s is 20 a second; this scale runs 10,000 adds and 2,000 removals
# through entraflow in about a minute.
DEFAULT_WRITES_PER_WINDOW = 400
DEFAULT_WRITE_WINDOW_S = 10.0
DEFAULT_ADDS = 10_000
DEFAULT_REMOVES = 2_000
# The naive baseline runs this share of the workload: at one write per membership the whole of
# it would take several times longer, and its rate is what we compare.
DEFAULT_NAIVE_SHARE = 0.2
DEFAULT_NAIVE_THREADS = 8
DEFAULT_WORKERS = 1
POLL_S = 0.2
FINISH_TIMEOUT_S = 900.0
NAIVE_ADD_GROUP = DEMO_GROUPS["engineering"].id
REMOVE_GROUP = DEMO_GROUPS["all-staff"].id  # holds every bulk user
# A small batch first, not measured: worker processes start, fetch a token, fill their pools.
WARM_UP_ADDS = 40
WARM_UP_GROUP = DEMO_GROUPS["support"].id


@dataclass
class Result:
    """What one side did."""

    memberships: int
    elapsed_s: float
    throttled: int
    requests: int
    # Writes Graph answered 503 because their group had too many in flight.
    busy: int = 0

    @property
    def per_s(self) -> float:
        return self.memberships / self.elapsed_s if self.elapsed_s else math.inf


def theoretical_s(writes: int, per_window: int, window_s: float) -> float:
    """The least time between the first and the last of `writes` a rolling window allows.

    No window of `window_s` may hold more than `per_window` writes, so `writes` span at least
    `ceil(writes / per_window) - 1` whole windows.
    """
    return (math.ceil(writes / per_window) - 1) * window_s


def batch_writes(adds: int, removes: int, groups: int) -> int:
    """Writes entraflow's batch needs: a PATCH per 20 adds to a group, one per removal."""
    per_group = [len(range(group, adds, groups)) for group in range(groups)]
    return sum(math.ceil(count / MAX_MEMBERS_PER_PATCH) for count in per_group) + removes


def peak_rss_kb(pids: list[int]) -> list[int]:
    """The peak resident memory (VmHWM, kB) of each of `pids` and their children, from /proc."""
    measured = pids + [child for parent in pids for child in process_info.children(parent)]
    peaks = map(process_info.peak_resident_kib, measured)
    return [peak for peak in peaks if peak is not None]


def _stats(stack: LocalStack) -> dict[str, Any]:
    return stack.sandbox.app.stats()


def run_batch(
    stack: LocalStack, adds: int, removes: int, first_user: int, add_groups: list[str]
) -> tuple[Result, dict[str, Any]]:
    """(a): one batch through the stack's workers, from submit to its end.

    It adds users `first_user` on to `add_groups`, in turns, and removes as many from the group
    that holds every bulk user.
    """
    users = range(first_user, first_user + max(adds, removes))
    items = [
        NewItem(n, ItemAction.ADD, bulk_user_id(users[n - 1]), add_groups[n % len(add_groups)])
        for n in range(1, adds + 1)
    ]
    items += [
        NewItem(adds + n, ItemAction.REMOVE, bulk_user_id(users[n - 1]), REMOVE_GROUP)
        for n in range(1, removes + 1)
    ]
    before = _stats(stack)
    started = time.monotonic()
    batch_id = submit_batch(stack.settings, "bench", items)
    deadline = started + FINISH_TIMEOUT_S
    while True:
        view = batch_view(stack.settings.resolved_database_url, batch_id)
        if view is not None and view["status"] in FINAL_BATCH_STATUSES:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} did not finish: {view}")
        time.sleep(POLL_S)
    elapsed_s = time.monotonic() - started
    after = _stats(stack)
    return _result(adds + removes, elapsed_s, before, after), view


def run_naive(
    stack: LocalStack, adds: int, removes: int, threads: int, first_removal: int
) -> Result:
    """(b): one request per membership, from `threads` threads paying from the shared budget."""
    settings = stack.settings
    # A loop has no queue to go back to: it sleeps through every wait for the budget.
    settings = settings.model_copy(update={"max_inprocess_wait_s": FINISH_TIMEOUT_S})
    client = GraphClient.from_settings(
        settings, budget_redis=redis.Redis.from_url(settings.redis_url or ""), priority=Priority.LOW
    )
    # Users the batches did not touch (from `first_removal` on), so every request changes one.
    work = [("add_user_to_group", bulk_user_id(n), NAIVE_ADD_GROUP) for n in range(1, adds + 1)]
    work += [
        ("remove_member_from_group", bulk_user_id(n), REMOVE_GROUP)
        for n in range(first_removal, first_removal + removes)
    ]

    def send(change: tuple[str, str, str]) -> None:
        action, user_id, group_id = change
        run_action(client, action, {"user_id": user_id, "group_id": group_id})

    before = _stats(stack)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(send, work))
    elapsed_s = time.monotonic() - started
    after = _stats(stack)
    return _result(len(work), elapsed_s, before, after)


def _result(
    memberships: int, elapsed_s: float, before: dict[str, Any], after: dict[str, Any]
) -> Result:
    """What a side did, from the sandbox's counters before and after it."""

    def grew(counter: str) -> int:
        return int(after[counter] - before[counter])

    return Result(
        memberships,
        elapsed_s,
        grew("throttled"),
        grew("requests_total"),
        grew("busy_group_refusals"),
    )


@dataclass
class Phase:
    """(a) at one Graph latency."""

    latency: Latency
    result: Result
    view: dict[str, Any]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adds", type=int, default=DEFAULT_ADDS)
    parser.add_argument("--removes", type=int, default=DEFAULT_REMOVES)
    parser.add_argument("--add-groups", type=int, default=DEFAULT_GROUPS)
    parser.add_argument("--writes-per-window", type=int, default=DEFAULT_WRITES_PER_WINDOW)
    parser.add_argument("--write-window-s", type=float, default=DEFAULT_WRITE_WINDOW_S)
    parser.add_argument("--low-priority-share", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument(
        "--pool", choices=["threads", "prefork"], default=None, help="[default: the worker's]"
    )
    parser.add_argument("--concurrency", type=int, default=None, help="[default: the worker's]")
    parser.add_argument("--naive-share", type=float, default=DEFAULT_NAIVE_SHARE)
    parser.add_argument("--naive-threads", type=int, default=DEFAULT_NAIVE_THREADS)
    add_latency_options(parser)
    args = parser.parse_args()
    latencies = latencies_from(parser, args)

    per_window, window_s = args.writes_per_window, args.write_window_s
    # The workers read these from their environment, this process from its settings.
    os.environ["ENTRAFLOW_WRITES_PER_WINDOW"] = str(per_window)
    os.environ["ENTRAFLOW_WRITE_WINDOW_S"] = str(window_s)
    os.environ["ENTRAFLOW_LOW_PRIORITY_BUDGET_SHARE"] = str(args.low_priority_share)
    naive_adds = round(args.adds * args.naive_share)
    naive_removes = round(args.removes * args.naive_share)
    # Each run of (a) takes users of its own; the baseline's removals take the ones after them.
    users_per_phase = max(args.adds, args.removes)
    first_naive_removal = len(latencies) * users_per_phase + 1
    config = SandboxConfig(
        bulk_users=max(first_naive_removal - 1 + naive_removes, naive_adds),
        writes_per_window=per_window,
        write_window_s=window_s,
        max_group_writes_in_flight=GROUP_WRITES_IN_FLIGHT,
    )
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="entraflow-bench-") as home:
        stack = LocalStack(
            home=Path(home),
            workers=args.workers,
            pool=args.pool,
            concurrency=args.concurrency,
            sandbox=SandboxServer(config),
        )
        with stack:
            os.environ.update(stack.env)
            get_settings.cache_clear()
            run_batch(stack, WARM_UP_ADDS, 0, 1, [WARM_UP_GROUP])
            add_groups = bench_groups(stack.sandbox.app, args.add_groups)
            time.sleep(window_s + 1)
            for index, latency in enumerate(latencies):
                stack.sandbox.app.configure(**latency.sandbox_changes())
                first_user = index * users_per_phase + 1
                batch, view = run_batch(stack, args.adds, args.removes, first_user, add_groups)
                phases.append(Phase(latency, batch, view))
                # A fresh window for the next side, so every side starts with the same burst.
                time.sleep(window_s + 1)
            rss_kb = peak_rss_kb([p.pid for p in stack.worker_processes])
            stack.sandbox.app.configure(**latencies[0].sandbox_changes())
            naive = run_naive(
                stack, naive_adds, naive_removes, args.naive_threads, first_naive_removal
            )

    writes = batch_writes(args.adds, args.removes, args.add_groups)
    limit_s = theoretical_s(writes, per_window, window_s)
    limit_per_s = (args.adds + args.removes) / limit_s if limit_s else math.inf
    naive_limit_s = theoretical_s(naive.memberships, per_window, window_s)
    print(
        f"budget: {per_window} writes per {window_s:g} s ({per_window / window_s:g}/s), "
        f"low-priority share {args.low_priority_share:g}; workload {args.adds} adds to "
        f"{args.add_groups} groups, "
        f"{args.removes} removals ({writes} writes batched); {args.workers} worker(s), pool "
        f"{args.pool or 'default'}, concurrency {args.concurrency or 'default'}; a group answers "
        f"503 past {GROUP_WRITES_IN_FLIGHT} writes in flight"
    )
    print(
        f"{'side':<34}{'latency ms':>12}{'memberships':>12}{'seconds':>9}{'per s':>9}"
        f"{'of (c)':>8}{'429s':>6}{'busy 503s':>10}{'requests':>9}"
    )
    for phase in phases:
        result = phase.result
        print(
            f"{'(a) entraflow batch':<34}{phase.latency.label:>12}{result.memberships:>12}"
            f"{result.elapsed_s:>9.1f}{result.per_s:>9.1f}{share_of(result.per_s, limit_per_s):>8}"
            f"{result.throttled:>6}{result.busy:>10}{result.requests:>9}"
        )
    print(
        f"{'(b) naive, one request each':<34}{phases[0].latency.label:>12}{naive.memberships:>12}"
        f"{naive.elapsed_s:>9.1f}{naive.per_s:>9.1f}{'':>8}{naive.throttled:>6}{naive.busy:>10}"
        f"{naive.requests:>9}"
    )
    print(f"{'(c) budget limit for (a)':<34}{'':>12}{args.adds + args.removes:>12}{limit_s:>9.1f}"
          f"{limit_per_s:>9.1f}")  # fmt: skip
    first = phases[0].result
    print(f"(a)/(b) at {phases[0].latency.label} ms = {first.per_s / naive.per_s:.1f}x")
    print(
        f"(b) against its own limit ({naive_limit_s:.1f} s): {naive_limit_s / naive.elapsed_s:.1%}"
        if naive.elapsed_s
        else ""
    )
    for phase in phases:
        print(
            f"batch at {phase.latency.label} ms: {phase.view['status']}, "
            f"outcomes {phase.view['outcomes']}"
        )
    print(
        f"peak RSS of the {len(rss_kb)} worker processes: largest {max(rss_kb) / 1024:.0f} MiB, "
        f"sum {sum(rss_kb) / 1024:.0f} MiB (pages shared after fork counted in each)"
    )


def share_of(per_s: float, limit_per_s: float) -> str:
    """`per_s` as a share of the limit; none when the workload fits in one window's burst."""
    return f"{per_s / limit_per_s:.1%}" if math.isfinite(limit_per_s) else "-"


if __name__ == "__main__":
    main()
