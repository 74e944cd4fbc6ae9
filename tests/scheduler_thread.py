"""A scheduler's `run_forever` in a thread of the test, stopped on request as a process is."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from scheduler.intake import Scheduler

# How long a stop request may take: one blocking read and one backoff, with room to spare.
STOP_TIMEOUT_S = 60.0


@contextmanager
def running(scheduler: Scheduler) -> Iterator[list[BaseException]]:
    """Run `scheduler` for the block; yield the list of what `run_forever` raised, if anything."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            scheduler.run_forever(stop)
        except BaseException as exc:  # a test asserts there is none
            errors.append(exc)

    thread = threading.Thread(target=run, name="scheduler")
    thread.start()
    try:
        yield errors
    finally:
        stop.set()
        thread.join(timeout=STOP_TIMEOUT_S)
    assert not thread.is_alive(), "the scheduler did not stop on request"
