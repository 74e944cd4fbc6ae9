"""Riding out a Redis restart: what chaos scenario 3 (`python -m chaos --only redis-restart`) found.

A step recorded as done whose lock release then met the restart went back to the queue with a
retry the broker refused; Celery rejected its message for good and the run never went on. The
scheduler sat idle for up to half a minute after Redis was back.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from sqlite3 import SQLITE_BUSY
from unittest import mock

import pytest
import redis
from celery import Celery
from celery.canvas import Signature
from celery.exceptions import Reject
from kombu.exceptions import OperationalError
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import exc as database

from entraflow import keys
from entraflow.celery_app import EntraflowTask, celery_config
from entraflow.redis_server import EmbeddedRedis
from entraflow.settings import Settings, get_settings
from scheduler import intake
from scheduler.intake import Scheduler
from worker import batch_tasks, tasks
from worker.budget import Budget, Cost

# How long a restarted Redis stays away in these tests: longer than Celery's own publish retries
# (about a second) and than the steps' first waits, well within the patience of both.
RESTART_S = 2.0
# Once Redis is back, the scheduler reads events again within this long at the latest.
SCHEDULER_RECOVERY_S = 5.0
# Failed tries after which the scheduler's backoff has long reached its cap.
FAILED_TRIES = 20


@pytest.fixture
def restart(private_redis: EmbeddedRedis) -> Iterator[threading.Timer]:
    """Stop the private server now, keeping its port; it starts again `RESTART_S` later."""
    private_redis.stop(keep_port=True)
    timer = threading.Timer(RESTART_S, private_redis.start_again)
    timer.start()
    yield timer
    timer.join()


def test_every_task_puts_back_a_message_whose_retry_the_broker_refuses() -> None:
    task = tasks.STEP_TASKS["add_user_to_group"]
    task.push_request(id="delivery-1", args=["run-1", "add"], kwargs={}, called_directly=False)
    try:
        with (
            mock.patch.object(Signature, "apply_async", side_effect=OperationalError("refused")),
            pytest.raises(Reject) as rejected,
        ):
            task.retry(countdown=5, exc=redis.ConnectionError("Redis is away"))
    finally:
        task.pop_request()

    # Celery's own answer, requeue=False, drops the message: the run would never go on.
    assert rejected.value.requeue is True
    assert all(
        isinstance(t, EntraflowTask)
        for t in (batch_tasks.start_batch, batch_tasks.apply_batch_chunk, task)
    )


class DriverError(Exception):
    """What a database driver raises, with the code a server or SQLite gave it."""

    def __init__(self, sqlstate: str | None = None, sqlite_errorcode: int | None = None) -> None:
        super().__init__("driver error")
        self.sqlstate = sqlstate
        self.sqlite_errorcode = sqlite_errorcode


@pytest.mark.parametrize(
    ("error", "waits"),
    [
        (database.OperationalError("INSERT", {}, DriverError(sqlstate="08006")), True),
        (database.OperationalError("INSERT", {}, DriverError(sqlstate="57P01")), True),
        (database.OperationalError("INSERT", {}, DriverError(sqlite_errorcode=SQLITE_BUSY)), True),
        (database.TimeoutError("no pooled connection free"), True),
        (redis.ConnectionError("Redis is away"), True),
        # A value the database refuses fails now instead of at every retry, forever.
        (database.OperationalError("INSERT", {}, DriverError(sqlstate="54000")), False),
        (database.IntegrityError("INSERT", {}, DriverError(sqlstate="23505")), False),
        (database.OperationalError("INSERT", {}, DriverError(sqlite_errorcode=1)), False),
    ],
)
def test_worker_tasks_wait_out_storage_that_passes_and_fail_on_a_refusal(
    error: Exception, waits: bool
) -> None:
    for task in (
        tasks.STEP_TASKS["add_user_to_group"],
        batch_tasks.start_batch,
        batch_tasks.apply_batch_chunk,
    ):
        assert (isinstance(error, task.waits_for) and task.waits_on(error)) is waits, task.name


@pytest.mark.integration
def test_a_task_sent_while_redis_restarts_is_queued_once_it_is_back(
    tmp_path: Path, private_redis: EmbeddedRedis, restart: threading.Timer
) -> None:
    url = private_redis.recorded_url
    assert url is not None
    app = Celery("outage-test", set_as_current=False)
    app.conf.update(celery_config(Settings(home=tmp_path, redis_url=url)))

    # Celery's default policy gives up after about a second: the chain's next step was lost.
    app.send_task("entra.add_user_to_group", args=("run-1", "add"))
    restart.join()

    assert redis.Redis.from_url(url).llen(keys.FLOWS_QUEUE) == 1


@pytest.mark.integration
def test_a_step_lock_taken_before_a_redis_restart_is_released_after_it(
    private_redis: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = private_redis.url
    assert url is not None
    monkeypatch.setenv("ENTRAFLOW_REDIS_URL", url)
    get_settings.cache_clear()
    tasks.lock_client.cache_clear()
    try:
        client = tasks.lock_client()
        name = keys.step_lock("run-1", "user")
        lock = client.lock(name, timeout=60)
        assert lock.acquire(blocking=False)
        private_redis.stop(keep_port=True)
        timer = threading.Timer(RESTART_S, private_redis.start_again)
        timer.start()
        try:
            # Without patience this raised at once, and the lock held the step for its lease.
            lock.release()
        finally:
            timer.join()  # before the fixture stops the server, or the timer starts it again

        assert client.lock(name, timeout=60).acquire(blocking=False)
    finally:
        tasks.lock_client.cache_clear()
        get_settings.cache_clear()


@pytest.mark.integration
@pytest.mark.parametrize("stop", ["shutdown", "kill"])
def test_the_graph_budget_and_step_locks_work_again_after_redis_restarts(
    private_redis: EmbeddedRedis, stop: str
) -> None:
    url = private_redis.url
    assert url is not None
    client = redis.Redis.from_url(url)
    budget = Budget(client, "app", "tenant")
    budget.acquire(Cost(ru=1))  # loads the budget's scripts into the server
    assert client.lock("lock-before", timeout=60).acquire(blocking=False)

    if stop == "kill":
        private_redis.kill()
    else:
        private_redis.stop(keep_port=True)
    private_redis.start_again()
    # Redis 7 starts with no scripts (6.2 replays their loading from the AOF): each step lock
    # and budget script must be sent again when the server answers NOSCRIPT.
    client.script_flush()

    budget.acquire(Cost(ru=1, writes=1))
    assert budget.usage() == Cost(ru=2, writes=1)
    lock = client.lock("lock-after", timeout=60)
    assert lock.acquire(blocking=False)
    lock.release()


def test_after_a_long_outage_the_scheduler_tries_again_every_few_seconds(
    settings: Settings,
) -> None:
    # No client-side retries: the scheduler's own backoff is what is tested.
    unreachable = redis.Redis(port=1, socket_connect_timeout=0.1, retry=Retry(NoBackoff(), 0))
    waits_s: list[float] = []

    class CountingStop(threading.Event):
        """A stop request that records each backoff instead of sleeping it."""

        def wait(self, timeout: float | None = None) -> bool:
            waits_s.append(timeout or 0.0)
            if len(waits_s) >= FAILED_TRIES:
                self.set()
            return self.is_set()

    Scheduler(settings, unreachable, "scheduler-1").run_forever(CountingStop())

    assert waits_s[0] == intake.BACKOFF_FIRST_S
    assert max(waits_s) <= SCHEDULER_RECOVERY_S
