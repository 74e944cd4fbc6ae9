"""The one retry policy: short waits are slept in process, long ones go back to the queue.

Modelled on stamina: tenacity underneath, an explicit list of retryable errors, limits on
attempts and on total time, `Retry-After` before backoff, and a testing switch that records
waits instead of sleeping them.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import tenacity

from entraflow.settings import (
    DEFAULT_MAX_GRAPH_ATTEMPTS,
    DEFAULT_MAX_GRAPH_RETRY_TIME_S,
    DEFAULT_MAX_INPROCESS_WAIT_S,
)
from worker.errors import TransientGraphError

T = TypeVar("T")

# Only these are retried; everything else (including bugs) surfaces at once.
RETRY_ON: tuple[type[Exception], ...] = (TransientGraphError,)
# The official Graph SDKs' backoff without Retry-After: 0.5 * 2**(n-1) s plus up to 1 s jitter.
BACKOFF_BASE_S = 0.5
BACKOFF_JITTER_MAX_S = 1.0
# Caps the exponential so a large attempt number cannot overflow; far above any in-process wait.
BACKOFF_MAX_S = 300.0
# Spread clients told the same Retry-After over a little time; never shortens the wait.
RETRY_AFTER_JITTER_MAX_S = 0.25
_BACKOFF_MAX_EXPONENT = math.ceil(math.log2(BACKOFF_MAX_S / BACKOFF_BASE_S))


# Naughty but better than patching `time.sleep` in every test: while testing, the waits the
# policy would sleep are appended here instead; None means sleep for real.
_recorded_waits_s: list[float] | None = None
_testing_lock = threading.Lock()


def set_testing(testing: bool) -> None:
    """Record waits instead of sleeping them (True), or sleep for real again (False)."""
    global _recorded_waits_s
    with _testing_lock:
        _recorded_waits_s = [] if testing else None


def recorded_waits_s() -> list[float]:
    """The waits the policy would have slept since `set_testing(True)`, in order."""
    with _testing_lock:
        return list(_recorded_waits_s or [])


def _sleep(wait_s: float) -> None:
    with _testing_lock:
        if _recorded_waits_s is not None:
            _recorded_waits_s.append(wait_s)
            return
    time.sleep(wait_s)


def backoff_s(attempt: int) -> float:
    """The wait after failed attempt number `attempt` (1-based) when Graph gave no Retry-After."""
    exponent = min(max(attempt, 1) - 1, _BACKOFF_MAX_EXPONENT)
    return min(BACKOFF_BASE_S * 2**exponent, BACKOFF_MAX_S) + random.uniform(
        0.0, BACKOFF_JITTER_MAX_S
    )


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often transient Graph errors are retried in process."""

    max_attempts: int = DEFAULT_MAX_GRAPH_ATTEMPTS
    max_total_s: float = DEFAULT_MAX_GRAPH_RETRY_TIME_S
    max_inprocess_wait_s: float = DEFAULT_MAX_INPROCESS_WAIT_S

    def call(self, attempt: Callable[[int], T]) -> T:
        """Run `attempt(retry_number)` (0 first, then 1, 2, ...) until it stops failing.

        Raises the last transient error either with `retries_exhausted` set (attempts or total
        time used up), or with `retry_after_s` set to the wait still needed when that wait is
        longer than `max_inprocess_wait_s`: the caller requeues itself with that countdown.
        """
        run = _Run(self)
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(RETRY_ON),
            wait=run.wait_s,
            stop=run.should_stop,
            sleep=_sleep,
            retry_error_callback=run.give_up,
        )
        for attempt_manager in retrying:
            with attempt_manager:
                result = attempt(attempt_manager.retry_state.attempt_number - 1)
        return result


class _Run:
    """The state of one `RetryPolicy.call`: why it stopped, if it did."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        # Testing skips the sleeps, so count them as elapsed time to keep the time limit real.
        self._count_idle_time = _recorded_waits_s is not None
        self._handoff_wait_s: float | None = None

    def wait_s(self, retry_state: tenacity.RetryCallState) -> float:
        error = _last_error(retry_state)
        if error.retry_after_s is not None:
            # Retrying before Retry-After only prolongs the throttle (GRAPH.md): never earlier.
            return max(error.retry_after_s, 0.0) + random.uniform(0.0, RETRY_AFTER_JITTER_MAX_S)
        return backoff_s(retry_state.attempt_number)

    def should_stop(self, retry_state: tenacity.RetryCallState) -> bool:
        wait_s = retry_state.upcoming_sleep
        if retry_state.attempt_number >= self._policy.max_attempts:
            return True
        if wait_s > self._policy.max_inprocess_wait_s:
            self._handoff_wait_s = wait_s
            return True
        elapsed_s = time.monotonic() - retry_state.start_time
        if self._count_idle_time:
            elapsed_s += retry_state.idle_for
        return elapsed_s + wait_s > self._policy.max_total_s

    def give_up(self, retry_state: tenacity.RetryCallState) -> NoReturn:
        error = _last_error(retry_state)
        if self._handoff_wait_s is None:
            error.retries_exhausted = True
        else:
            error.retry_after_s = self._handoff_wait_s
        raise error


def _last_error(retry_state: tenacity.RetryCallState) -> TransientGraphError:
    # Only RETRY_ON errors reach wait, stop and give_up: tenacity raises anything else at once.
    assert retry_state.outcome is not None
    error = retry_state.outcome.exception()
    assert isinstance(error, TransientGraphError)
    return error
