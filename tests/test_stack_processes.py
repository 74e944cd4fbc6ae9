"""The local stack kills a worker or a scheduler as a dying container would, and restarts it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cli.processes import DEFAULT_WORKER_THREADS
from entraflow import process_info
from entraflow.celery_app import app
from entraflow.settings import Settings
from harness.stack import LocalStack
from harness.waiting import wait_until

pytestmark = pytest.mark.integration

# How long one ping waits for the worker to answer.
PING_TIMEOUT_S = 1.0


@pytest.fixture
def scheduler_stack(settings: Settings) -> Iterator[LocalStack]:
    """The sandbox and one scheduler, no worker."""
    local = LocalStack(
        home=settings.home,
        redis_url=settings.redis_url,
        database_url=settings.database_url,
        workers=0,
        schedulers=1,
    )
    with local:
        yield local


@pytest.fixture
def prefork_stack(settings: Settings) -> Iterator[LocalStack]:
    """The sandbox and one worker running a pool of two processes."""
    local = LocalStack(
        home=settings.home,
        redis_url=settings.redis_url,
        database_url=settings.database_url,
        pool="prefork",
        concurrency=2,
    )
    with local:
        yield local


def test_a_killed_worker_takes_its_pool_with_it_and_restarts_in_its_place(
    prefork_stack: LocalStack,
) -> None:
    stack = prefork_stack
    wait_until(lambda: len(stack.worker_children(0)) == stack.concurrency, "the pool")
    killed = stack.worker_processes[0]
    pool = stack.worker_children(0)

    stack.kill_worker(0)

    assert killed.returncode is not None
    wait_until(
        lambda: not any(process_info.is_running(pid) for pid in pool),
        "the pool to die with its worker",
    )
    restarted = stack.restart_worker(0)
    assert stack.worker_processes == [restarted]
    assert restarted.pid != killed.pid
    wait_until(lambda: len(stack.worker_children(0)) == stack.concurrency, "the new pool")


def test_a_killed_pool_process_is_replaced_and_its_worker_lives_on(
    prefork_stack: LocalStack,
) -> None:
    stack = prefork_stack
    # Not before the worker is up: a pool process dying while it starts ends the whole worker.
    wait_until(lambda: bool(app.control.ping(timeout=PING_TIMEOUT_S)), "the worker to answer")
    victim, *survivors = stack.worker_children(0)

    stack.kill_worker_child(0, victim)

    wait_until(
        lambda: (
            victim not in stack.worker_children(0)
            and len(stack.worker_children(0)) == stack.concurrency
        ),
        "a new pool process",
    )
    assert stack.worker_processes[0].poll() is None
    assert set(survivors) <= set(stack.worker_children(0))
    with pytest.raises(ValueError, match="not a pool process"):
        stack.kill_worker_child(0, stack.worker_processes[0].pid)


def test_a_worker_still_running_is_not_started_twice(stack: LocalStack) -> None:
    with pytest.raises(RuntimeError, match="still running"):
        stack.restart_worker(0)


def test_a_killed_scheduler_restarts_as_the_same_consumer_with_its_environment(
    scheduler_stack: LocalStack,
) -> None:
    stack = scheduler_stack
    killed = stack.start_scheduler({"ENTRAFLOW_EVENTS_CLAIM_IDLE_S": "5"})

    stack.kill_scheduler(1)

    assert killed.returncode is not None
    restarted = stack.restart_scheduler(1)
    assert restarted.pid != killed.pid
    assert stack.scheduler_processes[1] is restarted
    assert isinstance(restarted.args, list)
    assert f"--consumer={stack.scheduler_consumer(1)}" in restarted.args
    # Read once the new process has its own environment, not the forking parent's.
    wait_until(
        lambda: b"ENTRAFLOW_EVENTS_CLAIM_IDLE_S=5" in process_info.environment(restarted.pid),
        "the restarted scheduler's environment",
    )


def test_only_the_last_scheduler_stops_alone(scheduler_stack: LocalStack) -> None:
    stack = scheduler_stack
    first = stack.scheduler_processes[0]
    second = stack.start_scheduler()
    with pytest.raises(ValueError, match="only the last"):
        stack.stop_scheduler(0)

    stack.stop_scheduler(1)

    assert second.returncode is not None
    assert stack.scheduler_processes == [first]
    assert first.poll() is None


def test_the_default_worker_is_one_process_of_many_threads(settings: Settings) -> None:
    with LocalStack(
        home=settings.home, redis_url=settings.redis_url, database_url=settings.database_url
    ) as local:
        wait_until(lambda: bool(app.control.ping(timeout=PING_TIMEOUT_S)), "the worker to answer")
        (stats,) = (app.control.inspect(timeout=PING_TIMEOUT_S).stats() or {}).values()

        assert stats["pool"]["implementation"].endswith("thread:TaskPool")
        assert stats["pool"]["max-concurrency"] == DEFAULT_WORKER_THREADS
        assert local.worker_children(0) == []
