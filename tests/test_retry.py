"""Retry-After parsing, backoff and the retry policy, without sleeping."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from worker import retry
from worker.errors import (
    NotFoundError,
    ServiceUnavailableError,
    ThrottledError,
    TransientGraphError,
    parse_retry_after,
)
from worker.retry import (
    BACKOFF_JITTER_MAX_S,
    BACKOFF_MAX_S,
    RETRY_AFTER_JITTER_MAX_S,
    RetryPolicy,
    backoff_s,
)

NOW = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)


# Retry waits are recorded instead of slept (the conftest fixture).
pytestmark = pytest.mark.usefixtures("no_sleeping")


@pytest.mark.parametrize(
    ("value", "expected_s"),
    [
        ("120", 120.0),
        ("0", 0.0),
        ("1.5", 1.5),
        (" 7 ", 7.0),
        ("-3", 0.0),
        ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
        ("inf", None),
        ("Wed, 99 Foo 2015", None),
    ],
)
def test_retry_after_is_seconds_or_an_http_date(
    value: str | None, expected_s: float | None
) -> None:
    assert parse_retry_after(value, now=NOW) == expected_s


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5])
def test_backoff_doubles_from_half_a_second_with_up_to_a_second_of_jitter(attempt: int) -> None:
    base_s = 0.5 * 2 ** (attempt - 1)

    waits_s = [backoff_s(attempt) for _ in range(50)]

    assert all(base_s <= wait_s <= base_s + BACKOFF_JITTER_MAX_S for wait_s in waits_s)
    assert len(set(waits_s)) > 1


def test_backoff_of_a_huge_attempt_number_is_capped() -> None:
    assert BACKOFF_MAX_S <= backoff_s(10_000) <= BACKOFF_MAX_S + BACKOFF_JITTER_MAX_S


class Flaky:
    """An attempt that raises the given errors in turn, then returns "done"."""

    def __init__(self, *failures: Exception) -> None:
        self.failures = list(failures)
        self.retry_numbers: list[int] = []

    def __call__(self, retry_number: int) -> str:
        self.retry_numbers.append(retry_number)
        if self.failures:
            raise self.failures.pop(0)
        return "done"


def test_transient_errors_are_retried_until_success() -> None:
    attempt = Flaky(ServiceUnavailableError("down", status=503), ThrottledError("slow", status=429))

    assert RetryPolicy().call(attempt) == "done"
    assert attempt.retry_numbers == [0, 1, 2]
    assert len(retry.recorded_waits_s()) == 2


def test_the_wait_is_never_shorter_than_retry_after() -> None:
    attempt = Flaky(*(ThrottledError("slow", status=429, retry_after_s=2.0) for _ in range(5)))

    RetryPolicy(max_attempts=10).call(attempt)

    waits_s = retry.recorded_waits_s()
    assert len(waits_s) == 5
    assert all(2.0 <= wait_s <= 2.0 + RETRY_AFTER_JITTER_MAX_S for wait_s in waits_s)


def test_without_retry_after_the_wait_is_the_backoff() -> None:
    attempt = Flaky(*(ServiceUnavailableError("down", status=503) for _ in range(3)))

    RetryPolicy(max_inprocess_wait_s=10).call(attempt)

    first_s, second_s, third_s = retry.recorded_waits_s()
    assert 0.5 <= first_s <= 1.5
    assert 1.0 <= second_s <= 2.0
    assert 2.0 <= third_s <= 3.0


@pytest.mark.parametrize("error", [NotFoundError("gone", status=404), ValueError("a bug")])
def test_other_errors_are_raised_at_once(error: Exception) -> None:
    attempt = Flaky(error)

    with pytest.raises(type(error)) as raised:
        RetryPolicy().call(attempt)

    assert raised.value is error
    assert attempt.retry_numbers == [0]
    assert retry.recorded_waits_s() == []


def test_gives_up_after_max_attempts_with_the_last_error() -> None:
    failures = [ServiceUnavailableError(f"down {n}", status=503) for n in range(5)]
    attempt = Flaky(*failures)

    with pytest.raises(ServiceUnavailableError) as raised:
        RetryPolicy(max_attempts=3).call(attempt)

    assert raised.value is failures[2]
    assert raised.value.retries_exhausted
    assert attempt.retry_numbers == [0, 1, 2]


def test_gives_up_when_the_next_wait_would_pass_the_total_time() -> None:
    attempt = Flaky(*(ThrottledError("slow", status=429, retry_after_s=3.0) for _ in range(10)))

    with pytest.raises(ThrottledError) as raised:
        RetryPolicy(max_attempts=10, max_total_s=10.0).call(attempt)

    # Waits of 3 s after the first three attempts make 9 s; a fourth would pass 10 s.
    assert attempt.retry_numbers == [0, 1, 2, 3]
    assert len(retry.recorded_waits_s()) == 3
    assert raised.value.retries_exhausted


def test_a_long_retry_after_is_handed_back_to_the_caller() -> None:
    attempt = Flaky(ThrottledError("slow", status=429, retry_after_s=30.0))

    with pytest.raises(ThrottledError) as raised:
        RetryPolicy(max_inprocess_wait_s=5.0).call(attempt)

    assert attempt.retry_numbers == [0]
    assert retry.recorded_waits_s() == []
    assert raised.value.retry_after_s is not None
    assert 30.0 <= raised.value.retry_after_s <= 30.0 + RETRY_AFTER_JITTER_MAX_S
    assert not raised.value.retries_exhausted


def test_a_long_backoff_is_handed_back_with_the_wait_still_needed() -> None:
    attempt = Flaky(*(ServiceUnavailableError("down", status=503) for _ in range(5)))

    with pytest.raises(ServiceUnavailableError) as raised:
        RetryPolicy(max_inprocess_wait_s=1.6).call(attempt)

    # Backoffs 0.5-1.5 s and 1-2 s may be slept; the third, 2-3 s, may not.
    assert len(attempt.retry_numbers) in (2, 3)
    assert raised.value.retry_after_s is not None
    assert raised.value.retry_after_s > 1.6
    assert not raised.value.retries_exhausted


def test_handoff_comes_after_short_waits_were_slept() -> None:
    attempt = Flaky(
        ThrottledError("slow", status=429, retry_after_s=1.0),
        ThrottledError("slower", status=429, retry_after_s=60.0),
    )

    with pytest.raises(TransientGraphError) as raised:
        RetryPolicy().call(attempt)

    assert raised.value.message == "slower"
    assert attempt.retry_numbers == [0, 1]
    assert len(retry.recorded_waits_s()) == 1


def test_testing_switch_off_forgets_the_recorded_waits() -> None:
    RetryPolicy().call(Flaky(ServiceUnavailableError("down", status=503)))
    retry.set_testing(False)

    assert retry.recorded_waits_s() == []
