"""Issue 7, scenario 7: access tokens expiring mid-work, and a refresh token revoked mid-work.

Expiry must be invisible: every run and row succeeds, no step or row records an error. A
revoked refresh token must fail the work clearly and stop it: the connection is marked broken,
every run and row left fails at once naming it and saying to connect again, the token endpoint
is asked once, and what was applied before stays applied. The second part needs a delegated
connection (client credentials have no refresh token): it signs the sandbox's service account
in on the shared stack, as `entraflow connect` would, while the workers run, and restores the
app-only connection the stack started with afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

import requests
from sqlalchemy import func
from sqlmodel import col, select

from chaos.harness import (
    ADDED_OUTCOMES,
    Harness,
    Result,
    Scenario,
    Sizes,
    Tally,
    checked,
    fail_check,
    wait_for,
)
from cli.sign_in import begin_sign_in, finish_sign_in
from entraflow.secrets import SecretBox, generate_key
from harness.stack import PROCESS_STOP_TIMEOUT_S, LocalStack
from models.audit import AuditEntry
from models.batches import BatchItem
from models.connections import ConnectionStatus, delete_connection, load_connection
from models.db import session_scope
from models.runs import FlowRun, RunStatus, StepRun
from sandbox.authorize import DEFAULT_ACCOUNT_UPN
from sandbox.directory import DEMO_GROUPS, SANDBOX_CLIENT_ID, SANDBOX_TENANT_ID, bulk_user_id
from worker.tokens import CONNECTION_RECHECK_S, RECONNECT_HINT

# Both parts add to this group; no other scenario of the suite writes to it at the same time.
GROUP = DEMO_GROUPS["sales"].id
SECRET_KEY_VARIABLE = "ENTRAFLOW_SECRET_KEY"
# Every Graph write: a flow step's POST .../members/$ref and a chunk's PATCH /groups/{id}.
WRITE_PATHS = r"^/v1\.0/groups/[^/]+(/members/\$ref)?$"
# Part A: every access token is expired this often while work remains, and tokens live this
# long (seconds), so workers also renew them by themselves, a margin before they expire.
EXPIRY_INTERVAL_S = 1.0
# How often the expirer looks at the work's progress, in seconds.
EXPIRY_POLL_S = 0.2
SHORT_TOKEN_LIFETIME_S = 3
# Each write is held this long (seconds) so the work spans several expiries (part A) and the
# revocation lands while some of it is done and some is not (part B).
EXPIRY_WRITE_DELAY_S = 0.05
REVOCATION_WRITE_DELAY_S = 0.3
# Part B: the refresh token is revoked once this share of the runs and rows is final.
REVOKE_AT_SHARE = 0.3
# After a revocation one refresh is refused; every other process reads the broken mark.
MAX_TOKEN_REQUESTS_AFTER_REVOCATION = 1
# Runs that show the stack's workers act as the connection just stored (or restored).
CANARY_EVENTS = 4
# How long a canary may take to finish, in seconds.
CANARY_TIMEOUT_S = 60.0
# How long to wait after the sign-in, in seconds: longer than a worker process goes without
# looking at the stored connection again.
CONNECTION_SETTLE_S = CONNECTION_RECHECK_S + 2.0
# Redirect URI of the in-process sign-in; nothing listens there, the redirect is read instead.
REDIRECT_URI = "http://localhost:1/"
# How long a browser waits for the sandbox's authorize endpoint, in seconds.
SIGN_IN_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class TokenSizes:
    """The work of each part: runs (one event each) and batch rows."""

    expiry_runs: int
    expiry_rows: int
    revocation_runs: int
    revocation_rows: int


FULL_SIZES = TokenSizes(
    expiry_runs=1000, expiry_rows=4000, revocation_runs=200, revocation_rows=600
)
SHORT_SIZES = TokenSizes(expiry_runs=100, expiry_rows=400, revocation_runs=40, revocation_rows=200)


def token_sizes(sizes: Sizes) -> TokenSizes:
    return SHORT_SIZES if sizes.short else FULL_SIZES


def users_needed(sizes: Sizes) -> int:
    own = token_sizes(sizes)
    canaries = 3 * CANARY_EVENTS
    return sum(dataclasses.astuple(own)) + canaries


def tokens(harness: Harness, sizes: Sizes) -> list[Result]:
    """Scenario 7: expiry mid-batch (invisible), then a refresh token revoked (fails, stops)."""
    own = token_sizes(sizes)
    return [
        checked(
            harness,
            "token expiry",
            f"{own.expiry_runs} runs + {own.expiry_rows} rows, all tokens expired every "
            f"{EXPIRY_INTERVAL_S:g}s, {SHORT_TOKEN_LIFETIME_S}s lifetime",
            lambda tally, failed: _expiry(harness, sizes, own, tally, failed),
        ),
        checked(
            harness,
            "refresh token revoked",
            f"{own.revocation_runs} runs + {own.revocation_rows} rows as a service account, "
            f"its refresh token revoked at {REVOKE_AT_SHARE:.0%}",
            lambda tally, failed: _revocation(harness, sizes, own, tally, failed),
        ),
    ]


SCENARIOS = [Scenario("tokens", 7, tokens, users_needed)]


# --- part A: expiry ---


def _expiry(
    harness: Harness, sizes: Sizes, own: TokenSizes, tally: Tally, failed: list[str]
) -> str:
    source = "chaos/tokens/expiry"
    run_users = harness.users(own.expiry_runs)
    row_users = harness.users(own.expiry_rows)
    before = harness.members(GROUP)
    stats_before = harness.sandbox.stats()
    lifetime_before = harness.sandbox.config.token_lifetime_s
    harness.sandbox.configure(token_lifetime_s=SHORT_TOKEN_LIFETIME_S)
    harness.sandbox.add_fault(WRITE_PATHS, delay_s=EXPIRY_WRITE_DELAY_S)
    try:
        batch_id = harness.submit_adds(source, row_users, GROUP)
        event_ids = harness.publish_adds(source, run_users, GROUP)
        done = threading.Event()
        expiries = _Expiries(harness, source, len(event_ids), batch_id, len(row_users))
        expirer = threading.Thread(target=expiries.run, args=(done,), daemon=True)
        expirer.start()
        deadline = time.monotonic() + sizes.timeout_s
        finished = wait_for(
            lambda: harness.runs_final(source, len(event_ids)) and harness.batch_final(batch_id),
            deadline,
        )
        done.set()
        expirer.join()
    finally:
        harness.sandbox.configure(token_lifetime_s=lifetime_before)
    harness.check_runs(source, event_ids, tally)
    harness.check_batch(batch_id, len(row_users), tally)
    harness.check_members(GROUP, before, [*run_users, *row_users], tally)
    step_errors = _step_errors(harness, source)
    row_errors = _row_errors(harness, batch_id)
    if step_errors or row_errors:
        fail_check(tally, failed, f"{step_errors} steps and {row_errors} rows recorded an error")
    if not finished:
        fail_check(tally, failed, f"not final after {sizes.timeout_s:g}s")
    if not expiries.mid_batch or not expiries.mid_stream:
        fail_check(
            tally,
            failed,
            "no expiry landed mid-batch, or none mid-stream: nothing was tested there",
        )
    stats = harness.sandbox.stats()
    unauthorized = _delta(stats, stats_before, "401")
    if not unauthorized:
        fail_check(
            tally, failed, "no request was refused with an expired token: nothing was tested"
        )
    token_requests = _token_requests(stats) - _token_requests(stats_before)
    return (
        f"{expiries.count} expiries ({expiries.mid_batch} mid-batch, {expiries.mid_stream} "
        f"mid-stream), {unauthorized} requests refused 401, {token_requests} tokens fetched, "
        f"{step_errors + row_errors} errors seen"
    )


class _Expiries:
    """Expires every access token at an interval while the work is under way; counts where.

    The first time the batch, or the runs, are seen under way, tokens expire at once, so each
    gets at least one expiry however quickly it goes.
    """

    def __init__(self, harness: Harness, source: str, runs: int, batch_id: str, rows: int) -> None:
        self._harness = harness
        self._source = source
        self._runs = runs
        self._batch_id = batch_id
        self._rows = rows
        self.count = self.mid_batch = self.mid_stream = 0

    def run(self, done: threading.Event) -> None:
        expired_at = time.monotonic()
        while not done.wait(EXPIRY_POLL_S):
            mid_stream = 0 < _final_runs(self._harness, self._source) < self._runs
            mid_batch = 0 < _rows_done(self._harness, self._batch_id) < self._rows
            first = (mid_stream and not self.mid_stream) or (mid_batch and not self.mid_batch)
            if first or time.monotonic() >= expired_at + EXPIRY_INTERVAL_S:
                self._harness.sandbox.expire_tokens()
                expired_at = time.monotonic()
                self.count += 1
                self.mid_stream += mid_stream
                self.mid_batch += mid_batch


# --- part B: revocation ---


def _revocation(
    harness: Harness, sizes: Sizes, own: TokenSizes, tally: Tally, failed: list[str]
) -> str:
    source = "chaos/tokens/revocation"
    key_before = os.environ.get(SECRET_KEY_VARIABLE)
    try:
        if key_before is None:
            # The stack's workers must be able to open the stored connection, as deployed
            # workers with a connection are.
            os.environ[SECRET_KEY_VARIABLE] = generate_key()
            _restart_workers(harness.stack)
            _canary(harness, "chaos/tokens/restarted", tally, failed)
        account = _sign_in(harness)
        # Then every worker process's next request looks at the stored connection before it
        # takes a token, instead of after its old token was refused.
        time.sleep(CONNECTION_SETTLE_S)
        refreshes = harness.sandbox.oauth_stats()["refreshes"]
        harness.sandbox.expire_tokens()
        _canary(harness, "chaos/tokens/delegated", tally, failed)
        if harness.sandbox.oauth_stats()["refreshes"] == refreshes:
            fail_check(tally, failed, "the workers did not take up the delegated connection")
        return _revoke_mid_work(harness, sizes, own, source, account, tally, failed)
    finally:
        delete_connection(harness.database_url)
        if key_before is None:
            del os.environ[SECRET_KEY_VARIABLE]
        # Later scenarios need the app-only connection the stack started with.
        _canary(harness, "chaos/tokens/restored", tally, failed)


def _revoke_mid_work(
    harness: Harness,
    sizes: Sizes,
    own: TokenSizes,
    source: str,
    account: str,
    tally: Tally,
    failed: list[str],
) -> str:
    run_users = harness.users(own.revocation_runs)
    row_users = harness.users(own.revocation_rows)
    before = harness.members(GROUP)
    harness.sandbox.add_fault(WRITE_PATHS, delay_s=REVOCATION_WRITE_DELAY_S)
    batch_id = harness.submit_adds(source, row_users, GROUP)
    event_ids = harness.publish_adds(source, run_users, GROUP)
    total = len(event_ids) + len(row_users)
    deadline = time.monotonic() + sizes.timeout_s
    wait_for(
        lambda: (
            _final_runs(harness, source) + _rows_done(harness, batch_id) >= REVOKE_AT_SHARE * total
        ),
        deadline,
    )
    token_requests = _token_requests(harness.sandbox.stats())
    revoked = harness.sandbox.revoke_refresh_tokens(account)
    harness.sandbox.expire_tokens()
    revoked_at = time.monotonic()
    finished = wait_for(
        lambda: harness.runs_final(source, len(event_ids)) and harness.batch_final(batch_id),
        deadline,
    )
    stopped_s = time.monotonic() - revoked_at
    token_requests = _token_requests(harness.sandbox.stats()) - token_requests
    if not finished:
        fail_check(tally, failed, f"not final {sizes.timeout_s:g}s after the revocation")
    if not revoked:
        fail_check(tally, failed, f"{account} had no refresh token to revoke")
    if token_requests > MAX_TOKEN_REQUESTS_AFTER_REVOCATION:
        fail_check(tally, failed, f"{token_requests} token requests after the revocation")
    connection = load_connection(harness.database_url)
    if connection is None or connection.status is not ConnectionStatus.BROKEN:
        fail_check(tally, failed, "the connection was not marked broken")
    runs = _run_outcomes(harness, source)
    rows = _row_outcomes(harness, batch_id)
    outcomes = [*runs.values(), *rows.values()]
    succeeded = sum(ok for ok, _ in outcomes)
    unclear = sum(not ok and RECONNECT_HINT not in (error or "") for ok, error in outcomes)
    if unclear:
        fail_check(tally, failed, f"{unclear} runs or rows failed without saying to reconnect")
    if not succeeded or succeeded == len(outcomes):
        fail_check(tally, failed, "the revocation did not land while work was under way")
    _check_applied(harness, event_ids, runs, run_users, rows, row_users, before, tally)
    tally.duplicate(_runs_count(harness, source) - len(runs), "extra runs")
    run_ids = [run_id for _, run_id, _ in harness.runs(source)]
    repeats = harness.audit_repeats(
        col(AuditEntry.run_id).in_(run_ids), AuditEntry.run_id
    ) + harness.audit_repeats(AuditEntry.batch_id == batch_id, AuditEntry.batch_row)
    tally.duplicate(repeats, "changes audited twice")
    first_error = next((error for ok, error in outcomes if not ok), None)
    return (
        f"{succeeded} done before, {len(outcomes) - succeeded} failed after the revocation, "
        f"stopped in {stopped_s:.1f}s, {token_requests} token requests after it, connection "
        f"{connection.status if connection else 'gone'}; they say: {first_error}"
    )


def _check_applied(
    harness: Harness,
    event_ids: list[str],
    runs: dict[str, tuple[bool, str | None]],
    run_users: list[int],
    rows: dict[int, tuple[bool, str | None]],
    row_users: list[int],
    before: set[str],
    tally: Tally,
) -> None:
    """What succeeded is a member, what failed is not: an outcome never hides a change."""
    members = harness.members(GROUP)
    ok_users = [u for e, u in zip(event_ids, run_users, strict=True) if e in runs and runs[e][0]]
    ok_users += [u for n, u in enumerate(row_users, start=1) if n in rows and rows[n][0]]
    failed_users = {*run_users, *row_users} - set(ok_users)
    tally.lose(len(event_ids) - len(runs), "events without a run")
    tally.lose(len(row_users) - len(rows), "rows without an outcome")
    tally.lose(sum(bulk_user_id(u) not in members for u in ok_users), "memberships missing")
    tally.lose(len(before - members), "memberships removed")
    tally.duplicate(
        sum(bulk_user_id(u) in members for u in failed_users), "failed but applied anyway"
    )


# --- the connection ---


def _sign_in(harness: Harness) -> str:
    """Sign the sandbox's service account in, as `entraflow connect --paste` does; its UPN."""
    settings = harness.stack.settings
    pending = begin_sign_in(
        settings,
        tenant_id=SANDBOX_TENANT_ID,
        client_id=SANDBOX_CLIENT_ID,
        redirect_uri=REDIRECT_URI,
    )
    # The sandbox signs the account in and consents at once; its redirect carries the code.
    answer = requests.get(pending.url, allow_redirects=False, timeout=SIGN_IN_TIMEOUT_S)
    connection = finish_sign_in(
        settings,
        pending,
        answer.headers["Location"],
        client_secret=None,
        box=SecretBox.from_settings(settings),
    )
    return connection.account_upn or DEFAULT_ACCOUNT_UPN


def _restart_workers(stack: LocalStack) -> None:
    """Stop the stack's workers and start them again, with this process's environment."""
    for process in stack.worker_processes:
        process.send_signal(signal.SIGTERM)
    for index, process in enumerate(stack.worker_processes):
        try:
            process.wait(timeout=PROCESS_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stack.kill_worker(index)
        stack.restart_worker(index)


def _canary(harness: Harness, source: str, tally: Tally, failed: list[str]) -> None:
    """A few runs that must succeed: the stack's workers can act as the current connection."""
    users = harness.users(CANARY_EVENTS)
    event_ids = harness.publish_adds(source, users, GROUP)
    wait_for(
        lambda: harness.runs_final(source, len(event_ids)),
        time.monotonic() + CANARY_TIMEOUT_S,
    )
    ok = sum(status is RunStatus.SUCCEEDED for _, _, status in harness.runs(source))
    if ok != len(event_ids):
        fail_check(
            tally, failed, f"{len(event_ids) - ok} of {len(event_ids)} runs of {source} failed"
        )


# --- reading the outcomes ---


def _final_runs(harness: Harness, source: str) -> int:
    with session_scope(harness.database_url) as session:
        return int(
            session.exec(
                select(func.count()).where(
                    FlowRun.event_source == source,
                    col(FlowRun.status).in_([RunStatus.SUCCEEDED, RunStatus.FAILED]),
                )
            ).one()
        )


def _rows_done(harness: Harness, batch_id: str) -> int:
    with session_scope(harness.database_url) as session:
        return int(
            session.exec(
                select(func.count()).where(
                    BatchItem.batch_id == batch_id, col(BatchItem.outcome).is_not(None)
                )
            ).one()
        )


def _step_errors(harness: Harness, source: str) -> int:
    """Steps of the source's runs that recorded an error, even one they got past."""
    with session_scope(harness.database_url) as session:
        errors = session.exec(
            select(StepRun.error)
            .join(FlowRun, col(FlowRun.id) == col(StepRun.run_id))
            .where(FlowRun.event_source == source)
        ).all()
    # Read here: a JSON column stores "no error" as JSON null, which SQL does not see as NULL.
    return sum(bool(error) for error in errors)


def _row_errors(harness: Harness, batch_id: str) -> int:
    with session_scope(harness.database_url) as session:
        return int(
            session.exec(
                select(func.count()).where(
                    BatchItem.batch_id == batch_id,
                    col(BatchItem.code).is_not(None) | col(BatchItem.message).is_not(None),
                )
            ).one()
        )


def _run_outcomes(harness: Harness, source: str) -> dict[str, tuple[bool, str | None]]:
    """Whether each event's run succeeded, and its error, by event id."""
    with session_scope(harness.database_url) as session:
        found = session.exec(
            select(FlowRun.event_id, FlowRun.status, FlowRun.error).where(
                FlowRun.event_source == source
            )
        ).all()
    return {
        event_id or "": (status == RunStatus.SUCCEEDED, error) for event_id, status, error in found
    }


def _runs_count(harness: Harness, source: str) -> int:
    with session_scope(harness.database_url) as session:
        return int(session.exec(select(func.count()).where(FlowRun.event_source == source)).one())


def _row_outcomes(harness: Harness, batch_id: str) -> dict[int, tuple[bool, str | None]]:
    """Whether each row succeeded, and its message, by line."""
    with session_scope(harness.database_url) as session:
        found = session.exec(
            select(BatchItem.line, BatchItem.outcome, BatchItem.message).where(
                BatchItem.batch_id == batch_id
            )
        ).all()
    return {line: (outcome in ADDED_OUTCOMES, message) for line, outcome, message in found}


def _token_requests(stats: dict[str, object]) -> int:
    requests_by_method = stats["requests"]
    assert isinstance(requests_by_method, dict)
    return int(requests_by_method.get("POST", {}).get("token", 0))


def _delta(stats: dict[str, object], before: dict[str, object], status: str) -> int:
    after_counts, before_counts = stats["responses"], before["responses"]
    assert isinstance(after_counts, dict) and isinstance(before_counts, dict)
    return int(after_counts.get(status, 0)) - int(before_counts.get(status, 0))
