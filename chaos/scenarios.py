"""The scenarios: each injects one kind of fault, asks for work, and checks what became of it."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from chaos.harness import Harness, Result, Scenario, Sizes, Tally, measured, wait_for
from sandbox.directory import DEMO_GROUPS

# Every Graph request (not the token endpoint, which answers through its own path).
GRAPH_PATHS = r"^/v1\.0/"
# Issue 7, scenario 5: half of all requests throttled.
THROTTLED_SHARE = 0.5
# `Retry-After` as Graph may send it: whole seconds, absent, or fractional.
RETRY_AFTER_VARIANTS: dict[str, str | None] = {
    "integer Retry-After": "1",
    "no Retry-After": None,
    "fractional Retry-After": "0.5",
}
# The small batch of the throttling scenario, as a share of the full batch size.
SMALL_BATCH_SHARE = 0.1
# Share of membership writes that are applied and then answered 500 or answered too late.
AMBIGUOUS_SHARE = 0.3
# How much later than the client's HTTP timeout a late answer comes.
LATE_ANSWER_MARGIN_S = 1.0
# The ambiguous-write scenario's two answers: 500, and a timeout.
AMBIGUOUS_ANSWERS = 2
# The requests that add a member: POST .../members/$ref (a flow step) and PATCH /groups/{id}
# with members@odata.bind (a bulk chunk).
WRITE_FAULTS = (
    ("POST", r"/members/\$ref$"),
    ("PATCH", r"^/v1\.0/groups/[^/]+$"),
)
# Each scenario adds to its own group, so one's members never blur another's check.
THROTTLE_GROUP = DEMO_GROUPS["falcon"].id
AMBIGUOUS_GROUP = DEMO_GROUPS["engineering"].id


def _throttling_users(sizes: Sizes) -> int:
    return len(RETRY_AFTER_VARIANTS) * (sizes.runs + small_batch_rows(sizes))


def small_batch_rows(sizes: Sizes) -> int:
    return max(1, round(sizes.rows * SMALL_BATCH_SHARE))


def throttling(harness: Harness, sizes: Sizes) -> list[Result]:
    """Issue 7, scenario 5: half of the Graph requests answered 429 for a while."""
    return [
        _throttled(harness, sizes, index, variant, retry_after)
        for index, (variant, retry_after) in enumerate(RETRY_AFTER_VARIANTS.items())
    ]


def _throttled(
    harness: Harness, sizes: Sizes, index: int, variant: str, retry_after: str | None
) -> Result:
    rows = small_batch_rows(sizes)

    def inject() -> None:
        harness.sandbox.add_fault(
            GRAPH_PATHS,
            status=429,
            retry_after=retry_after,
            ratio=THROTTLED_SHARE,
            duration_s=sizes.fault_s,
            seed=sizes.seed + index,
        )

    asked = f"{sizes.runs} runs + {rows} rows, {THROTTLED_SHARE:.0%} 429 for {sizes.fault_s:g}s"
    return measured(
        harness,
        f"throttling, {variant}",
        asked,
        lambda tally: _flows_and_batch(
            harness, sizes, tally, f"chaos/throttling/{index}", THROTTLE_GROUP, rows, inject
        ),
    )


def ambiguous_writes(harness: Harness, sizes: Sizes) -> list[Result]:
    """Issue 7, scenario 6: writes applied, then answered 500 or not answered in time."""
    # Longer than the stack's HTTP timeout: the change is made and the client gives up waiting.
    timed_out = {"delay_s": http_timeout_s(harness) + LATE_ANSWER_MARGIN_S}
    return [
        _ambiguous(harness, sizes, "500", {"status": 500, "apply_first": True}),
        _ambiguous(harness, sizes, "timeout", timed_out),
    ]


def http_timeout_s(harness: Harness) -> float:
    return harness.stack.settings.http_timeout_s


def _ambiguous(harness: Harness, sizes: Sizes, answer: str, fault: Mapping[str, object]) -> Result:
    def inject() -> None:
        for offset, (method, path) in enumerate(WRITE_FAULTS):
            harness.sandbox.add_fault(
                path,
                method=method,
                ratio=AMBIGUOUS_SHARE,
                duration_s=sizes.fault_s,
                seed=sizes.seed + offset,
                **fault,
            )

    asked = (
        f"{sizes.runs} runs + {sizes.rows} rows, {AMBIGUOUS_SHARE:.0%} of writes "
        f"applied then {answer} for {sizes.fault_s:g}s"
    )
    return measured(
        harness,
        f"ambiguous writes, {answer}",
        asked,
        lambda tally: _flows_and_batch(
            harness, sizes, tally, f"chaos/ambiguous/{answer}", AMBIGUOUS_GROUP, sizes.rows, inject
        ),
    )


def _flows_and_batch(
    harness: Harness,
    sizes: Sizes,
    tally: Tally,
    source: str,
    group_id: str,
    rows: int,
    inject: Callable[[], object],
) -> str:
    """A stream of `chaos-add` runs and a batch of adds into one group, under a fault."""
    run_users = harness.users(sizes.runs)
    row_users = harness.users(rows)
    before = harness.members(group_id)
    stats_before = harness.sandbox.stats()
    inject()
    event_ids = harness.publish_adds(source, run_users, group_id)
    batch_id = harness.submit_adds(source, row_users, group_id)
    deadline = time.monotonic() + sizes.timeout_s
    finished = wait_for(
        lambda: harness.runs_final(source, len(event_ids)) and harness.batch_final(batch_id),
        deadline,
    )
    harness.check_runs(source, event_ids, tally)
    harness.check_batch(batch_id, rows, tally)
    harness.check_members(group_id, before, [*run_users, *row_users], tally)
    stats = harness.sandbox.stats()
    faults, writes = (stats[key] - stats_before[key] for key in ("fault_hits", "writes_applied"))
    state = "all final" if finished else f"NOT FINAL after {sizes.timeout_s:g}s"
    return f"{state}, {faults} faults hit, {writes} writes applied"


SCENARIOS = [
    Scenario("throttling", 5, throttling, _throttling_users),
    Scenario(
        "ambiguous",
        6,
        ambiguous_writes,
        lambda sizes: AMBIGUOUS_ANSWERS * (sizes.runs + sizes.rows),
    ),
]
