"""Waiting for a condition by looking again: the one polling loop of tests, benches and chaos."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# How long a test waits for a process or a stack to do what it should before calling it failed.
DEFAULT_TIMEOUT_S = 60.0
# How often it looks again; short, since every look is a cheap read.
DEFAULT_POLL_S = 0.1


def poll_until(
    check: Callable[[], T], deadline_s: float, *, poll_s: float = DEFAULT_POLL_S
) -> T | None:
    """`check()`'s first truthy value, or None once `deadline_s` (time.monotonic) has passed."""
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline_s:
            return None
        time.sleep(poll_s)


def wait_until(
    check: Callable[[], T],
    what: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    poll_s: float = DEFAULT_POLL_S,
) -> T:
    """`check()`'s first truthy value; TimeoutError naming `what` after `timeout_s`."""
    value = poll_until(check, time.monotonic() + timeout_s, poll_s=poll_s)
    if not value:
        raise TimeoutError(f"still waiting after {timeout_s:.0f} s for {what}")
    return value
