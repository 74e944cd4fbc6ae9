"""The scenarios: each injects one kind of fault, asks for work, and checks what became of it."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Any

from chaos.harness import Harness, Result, Scenario, Sizes, Tally, measured, wait_for
from entraflow import keys
from models.history import FINAL_RUN_STATUSES
from sandbox.directory import DEMO_GROUPS
from scheduler.producer import EVENT_FIELD, MAX_EVENT_BYTES

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
# Share of membership writes that are applied and then answered 500.
AMBIGUOUS_SHARE = 0.3
# The requests that add a member: POST .../members/$ref (a flow step) and PATCH /groups/{id}
# with members@odata.bind (a bulk chunk).
WRITE_FAULTS = (
    ("POST", r"/members/\$ref$"),
    ("PATCH", r"^/v1\.0/groups/[^/]+$"),
)
# Share of the poison scenario's events that are good.
GOOD_SHARE = 0.3
# Each scenario adds to its own group, so one's members never blur another's check.
THROTTLE_GROUP = DEMO_GROUPS["falcon"].id
AMBIGUOUS_GROUP = DEMO_GROUPS["engineering"].id
POISON_GROUP = DEMO_GROUPS["support"].id


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
    """Issue 7, scenario 6: writes applied, then answered 500."""

    def inject() -> None:
        for offset, (method, path) in enumerate(WRITE_FAULTS):
            harness.sandbox.add_fault(
                path,
                method=method,
                status=500,
                apply_first=True,
                ratio=AMBIGUOUS_SHARE,
                duration_s=sizes.fault_s,
                seed=sizes.seed + offset,
            )

    asked = (
        f"{sizes.runs} runs + {sizes.rows} rows, {AMBIGUOUS_SHARE:.0%} of writes "
        f"applied then 500 for {sizes.fault_s:g}s"
    )
    return [
        measured(
            harness,
            "ambiguous writes",
            asked,
            lambda tally: _flows_and_batch(
                harness, sizes, tally, "chaos/ambiguous", AMBIGUOUS_GROUP, sizes.rows, inject
            ),
        )
    ]


def poison(harness: Harness, sizes: Sizes) -> list[Result]:
    """Issue 7, scenario 8: malformed events of every kind mixed with good ones."""
    good = round(sizes.events * GOOD_SHARE)
    asked = f"{sizes.events} events, {sizes.events - good} malformed"
    return [
        measured(harness, "poison input", asked, lambda tally: _poison(harness, sizes, good, tally))
    ]


SCENARIOS = [
    Scenario("throttling", 5, throttling, _throttling_users),
    Scenario("ambiguous", 6, ambiguous_writes, lambda sizes: sizes.runs + sizes.rows),
    Scenario("poison", 8, poison, lambda sizes: sizes.events),
]


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


# A malformed event's stream entry, from the harness, the seeded generator and a unique id.
Poison = Callable[[Harness, random.Random, str], dict[str, bytes | str]]


def _good_json(harness: Harness, source: str, user: int, divisor: int) -> str:
    return harness.add_event(source, user, POISON_GROUP, weight=1, divisor=divisor)


def _entry(text: str | bytes) -> dict[str, bytes | str]:
    return {EVENT_FIELD: text}


def _not_json(_: Harness, rng: random.Random, __: str) -> dict[str, bytes | str]:
    return _entry("{" + "".join(rng.choices('"{}[]:,abc ', k=rng.randint(0, 40))))


def _not_utf8(_: Harness, rng: random.Random, __: str) -> dict[str, bytes | str]:
    return _entry(b"\xff\xfe" + rng.randbytes(rng.randint(0, 40)))


def _not_an_object(_: Harness, rng: random.Random, event_id: str) -> dict[str, bytes | str]:
    return _entry(json.dumps(rng.choice([[event_id], event_id, 1, None, True])))


def _broken(change: Callable[[dict[str, Any], random.Random], None]) -> Poison:
    """A good event with one rule broken by `change`."""

    def make(harness: Harness, rng: random.Random, event_id: str) -> dict[str, bytes | str]:
        event = json.loads(_good_json(harness, "chaos/poison", int(event_id), 1))
        change(event, rng)
        return _entry(json.dumps(event))

    return make


def _drop_field(event: dict[str, Any], rng: random.Random) -> None:
    del event[rng.choice(["id", "source", "type", "specversion"])]


def _wrong_specversion(event: dict[str, Any], rng: random.Random) -> None:
    event["specversion"] = rng.choice(["0.3", "1", 1.0, "", None])


def _data_not_object(event: dict[str, Any], rng: random.Random) -> None:
    event["data"] = rng.choice([[1, 2], "text", 3])


def _oversized(event: dict[str, Any], rng: random.Random) -> None:
    event["data"] = {"padding": "x" * (MAX_EVENT_BYTES + rng.randint(1, 1000))}


def _trigger_fails(event: dict[str, Any], _: random.Random) -> None:
    event["data"]["divisor"] = 0


def _no_event_field(_: Harness, rng: random.Random, event_id: str) -> dict[str, bytes | str]:
    return {"payload": event_id}


# Each malformed kind and its weight; oversized ones are rare so the full run stays in memory.
POISONS: dict[str, tuple[Poison, int]] = {
    "not JSON": (_not_json, 10),
    "not UTF-8": (_not_utf8, 10),
    "not an object": (_not_an_object, 10),
    "missing field": (_broken(_drop_field), 10),
    "wrong specversion": (_broken(_wrong_specversion), 10),
    "data not an object": (_broken(_data_not_object), 10),
    "oversized": (_broken(_oversized), 1),
    "trigger.if fails": (_broken(_trigger_fails), 10),
    "no event field": (_no_event_field, 10),
}


def _poison(harness: Harness, sizes: Sizes, good: int, tally: Tally) -> str:
    """Publish a seeded mix, wait for runs and dead letters, check both."""
    source = "chaos/poison"
    rng = random.Random(sizes.seed)
    users = harness.users(sizes.events)
    good_users = set(rng.sample(users, good))
    names, weights = list(POISONS), [weight for _, weight in POISONS.values()]
    before = harness.members(POISON_GROUP)
    dead_before = harness.redis.xlen(keys.DEAD_EVENTS_STREAM)
    good_ids: list[str] = []
    bad_kinds: dict[str, str] = {}  # stream id -> kind
    for user in users:
        if user in good_users:
            entry: dict[str, bytes | str] = _entry(_good_json(harness, source, user, 1))
            good_ids.append(str(user))
        else:
            kind = rng.choices(names, weights)[0]
            entry = POISONS[kind][0](harness, rng, str(user))
        stream_id = harness.redis.xadd(keys.EVENTS_STREAM, entry)  # type: ignore[arg-type]
        if user not in good_users:
            bad_kinds[_text(stream_id)] = kind
    deadline = time.monotonic() + sizes.timeout_s
    finished = wait_for(
        lambda: (
            harness.runs_final(source, len(good_ids))
            # The length is cheap to poll; which entries they are is checked once, after.
            and harness.redis.xlen(keys.DEAD_EVENTS_STREAM) >= dead_before + len(bad_kinds)
        ),
        deadline,
    )
    dead = _dead_letters(harness, bad_kinds)
    tally.lose(len(bad_kinds.keys() - dead.keys()), "bad events not dead-lettered")
    tally.lose(sum(not reason for reason in dead.values()), "dead letters without a reason")
    harness.check_runs(source, good_ids, tally)
    harness.check_members(POISON_GROUP, before, [int(i) for i in good_ids], tally)
    kinds = sorted(set(bad_kinds.values()))
    final = sum(s in FINAL_RUN_STATUSES for _, _, s in harness.runs(source))
    state = "all final" if finished else f"NOT FINAL after {sizes.timeout_s:g}s"
    return f"{state}, {final} runs, {len(dead)} dead letters of {len(kinds)} kinds"


def _dead_letters(harness: Harness, ours: dict[str, str]) -> dict[str, str]:
    """The reason of each dead letter whose entry is one of `ours`, by stream id."""
    letters: Any = harness.redis.xrange(keys.DEAD_EVENTS_STREAM)
    found = {}
    for _, fields in letters:
        stream_id = _text(fields.get(b"stream_id", b""))
        if stream_id in ours:
            found[stream_id] = _text(fields.get(b"reason", b""))
    return found


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
