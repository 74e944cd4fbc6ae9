"""`entraflow batch ...` and `entraflow group sync`: bulk membership batches."""

from __future__ import annotations

import csv
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import click
import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from cli.output import fail_json, print_json
from entraflow.redis_server import redis_url
from entraflow.settings import Settings, get_settings
from models.batch_reports import batch_view, list_batches, report_rows
from models.batches import (
    FINAL_BATCH_STATUSES,
    BatchStateError,
    BatchStatus,
    ItemAction,
    NewItem,
    cancel_batch,
)
from scheduler.batches import (
    BatchFileError,
    Duplicate,
    InvalidRowsError,
    Problem,
    is_guid,
    read_batch_file,
    read_member_list,
    resume_batch,
    submit_batch,
    submit_batch_file,
)
from worker.budget import Priority
from worker.bulk import Plan, Row, RowAction, plan, sync_plan
from worker.errors import EntraflowError, GraphError
from worker.graph import GraphClient

DEFAULT_LIST_LIMIT = 50
# How often `--wait` reads the batch's progress.
WAIT_POLL_S = 0.5
# Problems listed in the one-line error message; the JSON error has them all.
PROBLEMS_IN_MESSAGE = 5
REPORT_COLUMNS = (
    "line",
    "action",
    "user_id",
    "group_id",
    "outcome",
    "code",
    "message",
    "request_id",
)
SUCCESS_STATUSES = frozenset({BatchStatus.SUCCEEDED.value})


def _graph_client(settings: Settings) -> GraphClient:
    """A client for bulk reads, paying from the shared budget at low priority."""
    # A person at a terminal can wait out a long Retry-After; there is no queue to go back to.
    patient = settings.model_copy(update={"max_inprocess_wait_s": settings.max_graph_retry_time_s})
    return GraphClient.from_settings(
        patient, budget_redis=redis.Redis.from_url(redis_url(settings)), priority=Priority.LOW
    )


def _fail(outcome: str, message: str, **details: Any) -> NoReturn:
    fail_json({"outcome": outcome, "message": message, **details})


def _refuse_problems(problems: Sequence[Problem], count: int | None = None) -> NoReturn:
    """Fail listing the problems; `count` counts those not listed too."""
    count = len(problems) if count is None else count
    shown = "; ".join(f"line {p.line}: {p.message}" for p in problems[:PROBLEMS_IN_MESSAGE])
    more = f" (and {count - PROBLEMS_IN_MESSAGE} more)" if count > PROBLEMS_IN_MESSAGE else ""
    _fail(
        "invalid_input",
        f"{count} invalid row(s), nothing queued: {shown}{more}",
        problems=[{"line": p.line, "message": p.message} for p in problems],
        problem_count=count,
    )


def _file_extra(
    skipped: Sequence[Problem],
    skipped_count: int,
    duplicates: Sequence[Duplicate],
    duplicate_count: int,
) -> dict[str, Any]:
    """What a submitted file's answer adds: the lines skipped and the repeated rows dropped."""
    return {
        "skipped": [{"line": p.line, "message": p.message} for p in skipped],
        "skipped_count": skipped_count,
        "duplicates": [{"line": d.line, "duplicate_of": d.duplicate_of} for d in duplicates],
        "duplicate_count": duplicate_count,
    }


def _rows(items: Sequence[NewItem]) -> list[Row]:
    return [
        Row(item.line, RowAction(item.action.value), item.user_id, item.group_id) for item in items
    ]


def _plan_view(planned: Plan) -> dict[str, Any]:
    counts = Counter(row.outcome.value for row in planned.rows)
    return {
        "dry_run": True,
        "total": len(planned.rows),
        "changes": len(planned.changes),
        "unchanged": len(planned.unchanged),
        "outcomes": dict(sorted(counts.items())),
        "rows": [
            {
                "line": row.row.row_id,
                "action": row.row.action.value,
                "user_id": row.row.user_id,
                "group_id": row.row.group_id,
                "outcome": row.outcome.value,
                "changes": row.changes,
            }
            for row in planned.rows
        ],
    }


def _print_view(view: dict[str, Any]) -> None:
    rate = f"{view['rate_per_s']}/s" if view["rate_per_s"] is not None else "-"
    eta = f"{view['eta_s']} s" if view["eta_s"] is not None else "-"
    click.echo(f"batch {view['id']}  {view['status']}  ({view['source']})")
    click.echo(f"  done {view['done']}/{view['total']}  rate {rate}  eta {eta}")
    if view["outcomes"]:
        counts = ", ".join(f"{name} {count}" for name, count in view["outcomes"].items())
        click.echo(f"  outcomes: {counts}")


def _wait(settings: Settings, batch_id: str, *, show_progress: bool) -> dict[str, Any]:
    """The batch once it has ended, drawing a progress bar on stderr meanwhile if asked."""
    database_url = settings.resolved_database_url
    with Progress(
        TextColumn("batch {task.fields[status]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        console=Console(stderr=True),
        disable=not show_progress,
    ) as progress:
        task = progress.add_task("batch", total=None, status="queued", rate="")
        while True:
            view = batch_view(database_url, batch_id)
            if view is None:
                _fail("not_found", f"batch {batch_id} disappeared")
            rate = f"{view['rate_per_s']}/s, eta {view['eta_s']} s" if view["rate_per_s"] else ""
            progress.update(
                task, total=view["total"], completed=view["done"], status=view["status"], rate=rate
            )
            if view["status"] in FINAL_BATCH_STATUSES:
                return view
            time.sleep(WAIT_POLL_S)


def _submit(
    settings: Settings,
    source: str,
    items: Sequence[NewItem],
    *,
    wait: bool,
    as_json: bool,
    extra: dict[str, Any],
) -> None:
    _show_submitted(settings, submit_batch(settings, source, items), wait, as_json, extra)


def _show_submitted(
    settings: Settings, batch_id: str, wait: bool, as_json: bool, extra: dict[str, Any]
) -> None:
    if wait:
        view = _wait(settings, batch_id, show_progress=not as_json)
    else:
        view = batch_view(settings.resolved_database_url, batch_id) or {}
    view = {**view, **extra}
    if as_json:
        print_json(view)
    else:
        _print_view(view)
    if wait and view["status"] not in SUCCESS_STATUSES:
        sys.exit(1)


def _check_threshold(changes: int, max_changes: int | None) -> None:
    if max_changes is not None and changes > max_changes:
        _fail(
            "too_many_changes",
            f"the batch would change {changes} memberships, more than --max-changes "
            f"{max_changes}; nothing queued",
            changes=changes,
            max_changes=max_changes,
        )


@click.group()
def batch() -> None:
    """Bulk group-membership batches: submit, follow, report, cancel, resume."""


@batch.command("submit")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--wait", is_flag=True, help="Show progress and print the batch once it ends.")
@click.option("--dry-run", is_flag=True, help="Read memberships, print the plan, change nothing.")
@click.option(
    "--max-changes",
    type=click.IntRange(min=0),
    help="Refuse the batch if it would change more memberships than this.",
)
@click.option("--skip-invalid", is_flag=True, help="Queue the valid rows, skipping bad ones.")
def submit_command(
    file: Path,
    as_json: bool,
    wait: bool,
    dry_run: bool,
    max_changes: int | None,
    skip_invalid: bool,
) -> None:
    """Submit a CSV (action,user_id,group_id) or JSON lines file of membership changes.

    With --wait the exit status is non-zero unless every row ended in a success outcome.
    """
    settings = get_settings()
    if not dry_run and max_changes is None:
        # The common case streams the file into the database: no row is held in memory.
        try:
            submitted = submit_batch_file(settings, file, skip_invalid=skip_invalid)
        except InvalidRowsError as exc:
            _refuse_problems(exc.problems, exc.count)
        except BatchFileError as exc:
            _fail("invalid_input", str(exc))
        extra = _file_extra(
            submitted.skipped,
            submitted.skipped_count,
            submitted.duplicates,
            submitted.duplicate_count,
        )
        _show_submitted(settings, submitted.batch_id, wait, as_json, extra)
        return
    # A plan needs every row at hand; `batch_max_rows` bounds them.
    try:
        parsed = read_batch_file(file, max_rows=settings.batch_max_rows)
    except BatchFileError as exc:
        _fail("invalid_input", str(exc))
    if parsed.problems and not skip_invalid:
        _refuse_problems(parsed.problems, parsed.problem_count)
    if not parsed.items:
        _fail("invalid_input", "no valid rows, nothing queued")
    extra = _file_extra(
        parsed.problems, parsed.problem_count, parsed.duplicates, parsed.duplicate_count
    )
    try:
        planned = plan(_graph_client(settings), _rows(parsed.items))
    except GraphError as exc:
        fail_json(exc.to_dict())
    if dry_run:
        view = {**_plan_view(planned), **extra}
        if as_json:
            print_json(view)
        else:
            _print_plan(view)
        return
    _check_threshold(len(planned.changes), max_changes)
    _submit(settings, file.name, parsed.items, wait=wait, as_json=as_json, extra=extra)


def _print_plan(view: dict[str, Any]) -> None:
    click.echo(
        f"dry run: {view['changes']} of {view['total']} rows would change a membership, "
        f"{view['unchanged']} would not"
    )
    table = Table("group", "action", "planned outcome", "rows")
    counts = Counter((r["group_id"], r["action"], r["outcome"]) for r in view["rows"])
    for (group_id, action, outcome), count in sorted(counts.items()):
        table.add_row(group_id, action, outcome, str(count))
    Console().print(table)


@batch.command("show")
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show_command(batch_id: str, as_json: bool) -> None:
    """Show a batch: status, rows done, a count per outcome, rate and time left."""
    view = batch_view(get_settings().resolved_database_url, batch_id)
    if view is None:
        _fail("not_found", f"no batch {batch_id!r}")
    if as_json:
        print_json(view)
    else:
        _print_view(view)


@batch.command("list")
@click.option(
    "--status", type=click.Choice([s.value for s in BatchStatus]), help="Only this status."
)
@click.option("--limit", type=click.IntRange(min=1), default=DEFAULT_LIST_LIMIT, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def list_command(status: str | None, limit: int, as_json: bool) -> None:
    """List batches, newest first."""
    found = list_batches(
        get_settings().resolved_database_url,
        limit=limit,
        status=BatchStatus(status) if status else None,
    )
    if as_json:
        print_json(found)
        return
    table = Table("batch", "status", "source", "done", "total", "created")
    for view in found:
        table.add_row(
            view["id"],
            view["status"],
            view["source"],
            str(view["done"]),
            str(view["total"]),
            f"{view['created_at']:%Y-%m-%d %H:%M:%S}",
        )
    Console().print(table)


@batch.command("report")
@click.argument("batch_id")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write the CSV here instead of stdout.",
)
def report_command(batch_id: str, output: Path | None) -> None:
    """Write a CSV of every row of a batch and how it ended."""
    database_url = get_settings().resolved_database_url
    if batch_view(database_url, batch_id) is None:
        _fail("not_found", f"no batch {batch_id!r}")
    with output.open("w", newline="", encoding="utf-8") if output else _stdout() as stream:
        writer = csv.DictWriter(stream, fieldnames=REPORT_COLUMNS)
        writer.writeheader()
        writer.writerows(report_rows(database_url, batch_id))
    if output:
        click.echo(f"wrote {output}", err=True)


def _stdout() -> Any:
    """Stdout for `with`, left open on the way out."""
    return click.open_file("-", "w")


@batch.command("cancel")
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def cancel_command(batch_id: str, as_json: bool) -> None:
    """Cancel a batch: chunks not yet run do nothing, their rows end as `cancelled`."""
    database_url = get_settings().resolved_database_url
    try:
        cancel_batch(database_url, batch_id)
    except LookupError as exc:
        _fail("not_found", str(exc).strip("'\""))
    except BatchStateError as exc:
        _fail("not_cancelled", str(exc))
    view = batch_view(database_url, batch_id) or {}
    if as_json:
        print_json(view)
    else:
        _print_view(view)


@batch.command("resume")
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def resume_command(batch_id: str, as_json: bool) -> None:
    """Queue again the chunks of a batch with rows not done (after lost messages)."""
    settings = get_settings()
    try:
        resume_batch(settings, batch_id)
    except LookupError as exc:
        _fail("not_found", str(exc).strip("'\""))
    except BatchStateError as exc:
        _fail("not_resumed", str(exc))
    view = batch_view(settings.resolved_database_url, batch_id) or {}
    if as_json:
        print_json(view)
    else:
        _print_view(view)


@click.group()
def group() -> None:
    """Group membership as a whole."""


@group.command("sync")
@click.argument("group_id")
@click.option(
    "--members",
    "members_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="User ids, one a line, or a CSV with a user_id column.",
)
@click.option("--dry-run", is_flag=True, help="Print the adds and removes, change nothing.")
@click.option(
    "--max-changes",
    type=click.IntRange(min=0),
    help="Refuse if the sync would change more memberships than this.",
)
@click.option("--wait", is_flag=True, help="Show progress and print the batch once it ends.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def sync_command(
    group_id: str,
    members_file: Path,
    dry_run: bool,
    max_changes: int | None,
    wait: bool,
    as_json: bool,
) -> None:
    """Make a group's direct members exactly the users of a file, as a batch."""
    settings = get_settings()
    if not is_guid(group_id):
        _fail("invalid_input", f"GROUP_ID must be an object id (a GUID), got {group_id!r}")
    group_id = group_id.lower()
    try:
        members = read_member_list(members_file, max_rows=settings.batch_max_rows)
    except BatchFileError as exc:
        _fail("invalid_input", str(exc))
    # A skipped line would remove that user from the group: bad lines always refuse the sync.
    if members.problems:
        _refuse_problems(members.problems, members.problem_count)
    user_ids = members.user_ids
    if not user_ids:
        _fail("invalid_input", f"{members_file} lists no users; refusing to empty the group")
    try:
        planned = sync_plan(_graph_client(settings), group_id, user_ids)
    except GraphError as exc:
        fail_json(exc.to_dict())
    except EntraflowError as exc:
        _fail("invalid_input", str(exc))
    summary = {
        "group_id": group_id,
        "adds": len(planned.adds),
        "removes": len(planned.removes),
        "unchanged": planned.unchanged,
    }
    if dry_run:
        view = {
            "dry_run": True,
            **summary,
            "add": list(planned.adds),
            "remove": list(planned.removes),
        }
        if as_json:
            print_json(view)
        else:
            click.echo(
                f"dry run: group {group_id} would get {summary['adds']} adds and "
                f"{summary['removes']} removes; {summary['unchanged']} members stay"
            )
        return
    _check_threshold(len(planned.adds) + len(planned.removes), max_changes)
    changes = [(ItemAction.ADD, user_id) for user_id in planned.adds]
    changes += [(ItemAction.REMOVE, user_id) for user_id in planned.removes]
    if not changes:
        view = {**summary, "batch": None}
        if as_json:
            print_json(view)
        else:
            click.echo(f"group {group_id} already has exactly these members; nothing to do")
        return
    items = [
        NewItem(position, action, user_id, group_id)
        for position, (action, user_id) in enumerate(changes, start=1)
    ]
    _submit(
        settings,
        f"group sync {group_id}",
        items,
        wait=wait,
        as_json=as_json,
        extra={"sync": summary},
    )
